"""The documented Python API works as a notebook or the Slicer console uses it: twice in one process."""
import subprocess
import sys
import textwrap


def test_each_public_function_works_twice_in_one_fresh_process(tmp_path):
    """In a fresh interpreter (nothing imported before), as a user's notebook: generate, write, train and
    evaluate called twice each, with `type(...)` looked at first, which alone used to break them. The
    PNGs they write (volumes, loss curve, box plots) leave the user's plotting backend and pyplot alone."""
    script = textwrap.dedent(f"""
        import sys
        import matplotlib
        matplotlib.use("svg")  # the user's backend, e.g. a notebook's inline one
        import ddm4d
        from pathlib import Path
        out = Path({str(tmp_path)!r})
        assert callable(ddm4d.generate) and type(ddm4d.generate).__name__ == "function"
        from ddm4d.phantom import write_dataset
        write_dataset(out / "data", n_subjects=2, seed=0, size=(32, 32, 1))
        src = out / "data" / "patient001" / "patient001_frame01.nii.gz"
        for i in range(2):
            result = ddm4d.generate(src, src, model="none", frames=3, device="cpu", seg=str(src).replace(".nii", "_gt.nii"))
            assert len(result.frames) == 3
            result.write(out / f"gen{{i}}")
            run = ddm4d.train(out / "data", out / f"run{{i}}", iterations=1, size=(32, 32), device="cpu",
                              progress="json")
            assert run.exit_code == 0
            report = ddm4d.evaluate(out / "data", out / f"report{{i}}", model=str(run.model), methods="initial,linear,ddm",
                                    device="cpu")
            assert callable(ddm4d.generate) and callable(ddm4d.train) and callable(ddm4d.evaluate)
        assert (out / "gen1" / "volumes.png").is_file() and (out / "run1" / "loss_curve.png").is_file()
        assert matplotlib.get_backend() == "svg" and "matplotlib.pyplot" not in sys.modules
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
