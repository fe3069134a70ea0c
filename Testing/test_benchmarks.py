"""The benchmark scripts as a user runs them where they cannot measure (no GPU), and their reports."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import bench  # noqa: E402
import motion  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: the benchmark would measure it")
def test_gpu_benchmark_without_a_gpu_says_so_and_exits_0(tmp_path):
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench.py"), "--device", "cuda", "--name",
                           str(tmp_path / "gpu")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "no CUDA GPU here" in done.stdout and "nothing measured" in done.stdout
    assert not list(tmp_path.iterdir())  # nothing written


def test_gpu_run_times_the_compiled_networks_and_a_failed_case_reads_as_such():
    assert {"generate", "generate_compiled", "train", "train_compiled"} <= set(bench.DEFAULT_CASES["cuda"].split(","))
    report = {"machine": "m", "device": "cuda", "threads": 2, "size": [128, 128, 32], "torch": "2", "frames": 10,
              "results": [{"case": "generate", "seconds_min": 0.04, "gflops": 5000.0, "matmul_gflops_after": 9000.0,
                           "fraction_of_matmul": 0.55, "peak_memory_gib": 0.8},
                          {"case": "generate_compiled", "error": "RuntimeError: capture failed",
                           "matmul_gflops_after": 9000.0}]}
    text = bench.markdown(report)
    assert "| generate | 0.040 |" in text
    assert "| generate_compiled | failed: RuntimeError: capture failed |" in text


def test_a_compiled_case_that_cannot_compile_reports_the_reason(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler\nmore detail")
    monkeypatch.setattr(bench, "compiled_case", broken)
    result = bench.case("generate_compiled", [16, 16, 8], "cpu", 2, 1)
    assert result == {"case": "generate_compiled", "error": "RuntimeError: no compiler"}


def test_authors_side_by_side_refuses_a_folder_that_is_not_their_checkout(tmp_path):
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench.py"), "--authors", str(tmp_path), "--name",
                           str(tmp_path / "side")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "not a checkout of the authors' code" in done.stderr and "torchDDM/DDM" in done.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_side_by_side_reports_how_many_times_faster_and_both_peak_memories():
    results = [{"case": "authors_generate", "seconds_min": 4.0, "peak_memory_gib": 0.9},
               {"case": "generate", "seconds_min": 1.0, "peak_memory_gib": 0.7},
               {"case": "authors_train", "seconds_min": 6.0, "peak_memory_gib": 2.0},
               {"case": "train_bf16", "seconds_min": 1.5, "peak_memory_gib": 1.2},
               {"case": "train", "error": "RuntimeError: out of memory"}]
    lines = bench.side_by_side(results)
    assert lines[1] == "Against the authors' code in the same run:"
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| case")]
    assert len(rows) == 2  # a failed case is not compared
    assert rows[0].startswith("| 10 frames") and rows[0].endswith("| 1.000 | 4.000 | 4.00x | 0.70 / 0.90 |")
    assert rows[1].startswith("| training iteration, bf16 (`--precision bf16`), our loss |")
    assert rows[1].endswith("| 1.500 | 6.000 | 4.00x | 1.20 / 2.00 |")
    assert bench.side_by_side(results[1:2]) == []  # nothing of theirs, nothing said


def test_render_writes_the_table_again_from_the_record_and_a_missing_figure_is_a_blank_cell(tmp_path, monkeypatch):
    import json
    report = {"machine": "m", "device": "cpu", "threads": 2, "size": [128, 128, 32], "torch": "2", "frames": 10,
              "results": [{"case": "refine 128 x 128", "seconds_min": 1.25, "matmul_gflops_after": 150.0,
                           "peak_memory_gib": 0.35}]}
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "r.json").write_text(json.dumps(report))
    monkeypatch.setattr(bench, "HERE", tmp_path)
    bench.render("r")
    assert "| refine 128 x 128 | 1.250 |  | 150.0 |  | 0.35 |" in (tmp_path / "results" / "r.md").read_text()
    (tmp_path / "results" / "other.json").write_text("[1, 2]")  # not bench.py's: left alone, nothing written
    with pytest.raises(SystemExit):
        bench.render("other")
    assert not (tmp_path / "results" / "other.md").exists()


def test_the_paper_loss_case_times_the_authors_algorithm_one_deformation_pass_per_step(monkeypatch):
    from ddm4d.model import DDM
    calls = []  # the codes of each deformation pass
    deform = DDM._deform
    monkeypatch.setattr(DDM, "_deform",
                        lambda self, source, code: calls.append(code.shape[0]) or deform(self, source, code))
    ours = bench.case("train", [32, 32, 16], "cpu", 2, 1, "fp32")
    default_calls = list(calls)  # one warm-up and one timed step
    calls.clear()
    paper = bench.case("train_paper_loss", [32, 32, 16], "cpu", 2, 1, "fp32")
    assert paper["case"] == "train_paper_loss" and calls == [1, 1]
    assert default_calls == [2, 2]  # the code and the zero code, one pass of two per step
    assert paper["gflop"] < ours["gflop"]
    with pytest.raises(ValueError):
        bench.case("train_something_else", [32, 32, 16], "cpu", 2, 1)


def _disc(centre_x: float):
    import numpy as np
    import SimpleITK as sitk
    yy, xx = np.mgrid[:64, :64]
    img = sitk.GetImageFromArray((100.0 / (1 + np.exp(np.hypot(yy - 32, xx - centre_x) - 12))).astype(np.float32))
    img.SetSpacing((1.5, 1.5))
    return img


def test_motion_bounds_see_the_real_frames_and_the_methods_do_not():
    """A disc that moves right and back: the pair (source = target) says nothing of the frame between, so
    every method leaves it where it is; the forward ceiling registers the source to that frame itself."""
    import motion
    import numpy as np
    source, middle = _disc(28.0), _disc(34.0)
    case = motion.Case("there and back", source, source, [(0.5, middle, None)])
    gammas = [0.0, 0.5, 1.0]
    scores = {m: motion.score(case, motion.run_method(m, case, gammas))["psnr_db"]
              for m in ("initial", "refine only forward", "forward best gamma", "forward ceiling")}
    assert np.isclose(scores["refine only forward"], scores["initial"], atol=0.2)
    assert np.isclose(scores["forward best gamma"], scores["initial"], atol=0.2)
    assert scores["forward ceiling"] > scores["initial"] + 10
    assert set(motion.BOUNDS).isdisjoint(motion.METHODS)  # never in a default run: they are not methods


@pytest.mark.skipif(not motion.CINE.is_file(),
                    reason="the real cine sample lives in ../shared/data/real-cine-2d, absent from a bare clone")
def test_motion_real128_is_the_real_cine_at_half_resolution_over_the_same_field_of_view():
    import numpy as np
    import SimpleITK as sitk
    full, half = motion.real_cases(every=20), motion.real_cases(every=20, shrink=2)
    assert [c.name for c in half] == [c.name for c in full]
    for a, b in zip(full, half):
        assert b.source.GetSize()[:2] == (128, 128) and b.source.GetSpacing()[:2] == (2.0, 2.0)
        frames = [(a.source, b.source), (a.target, b.target)] + [(x[1], y[1]) for x, y in zip(a.refs, b.refs)]
        for image_a, image_b in frames:
            # each pixel is the mean of its 2 x 2 bin, centred where the bin's centre was
            bins = sitk.GetArrayViewFromImage(image_a).astype(np.float64)[0].reshape(128, 2, 128, 2).mean(axis=(1, 3))
            assert np.allclose(sitk.GetArrayViewFromImage(image_b)[0], bins, atol=1e-3)
            assert np.allclose(image_b.TransformContinuousIndexToPhysicalPoint((0, 0, 0)),
                               image_a.TransformContinuousIndexToPhysicalPoint((0.5, 0.5, 0)))


@pytest.mark.skipif(not motion.CINE.is_file(),
                    reason="the real cine sample lives in ../shared/data/real-cine-2d, absent from a bare clone")
def test_motion_real_stack_is_the_cine_cut_into_shifted_thick_slices():
    """Slice i of the stack made from frame k is frame k's crop shifted by i steps, in 2 x 2 bins, 8 mm
    from the next; the pairs are the real group's, so the two groups compare pair by pair."""
    import numpy as np
    import SimpleITK as sitk
    stacks, slices = motion.real_stack_cases(every=20), motion.real_cases(every=20)
    assert [c.name.split()[1] for c in stacks] == [c.name.split()[1] for c in slices]
    c, (dy, dx) = motion.STACK_CROP, motion.STACK_SHIFT
    for stack, real in zip(stacks, slices):
        assert stack.source.GetSize() == (c // 2, c // 2, motion.STACK_SLICES)
        assert stack.source.GetSpacing() == motion.STACK_SPACING
        assert [g for g, _, _ in stack.refs] == [g for g, _, _ in real.refs]
        for volume, frame in [(stack.source, real.source), (stack.target, real.target), (stack.refs[-1][1], real.refs[-1][1])]:
            frame = sitk.GetArrayViewFromImage(frame).astype(np.float64).reshape(256, 256)
            for i in (0, 5, motion.STACK_SLICES - 1):
                crop = frame[dy * i:dy * i + c, dx * i:dx * i + c].reshape(c // 2, 2, c // 2, 2).mean(axis=(1, 3))
                assert np.allclose(sitk.GetArrayViewFromImage(volume)[i], crop, atol=1e-3)


def test_noisy_phantom_cases_carry_rician_noise_of_the_stated_size_on_every_frame():
    """Rician noise of sigma = NOISE_FRACTION x the source's range: a bright region keeps about its mean and
    gains a standard deviation of sigma, a dark one reads sigma sqrt(pi / 2) (Rayleigh); each frame its own."""
    import numpy as np
    import SimpleITK as sitk

    def image(value_right):
        a = np.zeros((1, 200, 200), np.float32)
        a[..., 100:] = value_right
        return sitk.GetImageFromArray(a)
    labels = sitk.GetImageFromArray(np.ones((1, 200, 200), np.uint8))
    case = motion.Case("c", image(100.0), image(100.0), [(0.5, image(100.0), labels)], labels, labels, "phantom2d")
    noisy = motion.with_rician_noise(case, seed=3)
    sigma = motion.NOISE_FRACTION * 100.0
    arrays = [sitk.GetArrayFromImage(im)[0] for im in (noisy.source, noisy.target, noisy.refs[0][1])]
    for a in arrays:
        # Rician mean at high SNR: A + sigma^2 / (2 A)
        assert abs(a[:, 100:].mean() - (100.0 + sigma ** 2 / 200)) < 0.1 and abs(a[:, 100:].std() - sigma) < 0.1
        assert abs(a[:, :100].mean() - sigma * np.sqrt(np.pi / 2)) < 0.1
    assert not np.allclose(arrays[0], arrays[1]) and not np.allclose(arrays[0], arrays[2])
    assert noisy.refs[0][2] is labels and noisy.source_labels is labels and noisy.kind == "phantom2d-noisy"
    again = motion.with_rician_noise(case, seed=3)
    assert np.array_equal(sitk.GetArrayViewFromImage(again.target)[0], arrays[1])  # reproducible
    assert np.array_equal(sitk.GetArrayViewFromImage(case.source)[0, :, 100:], np.full((200, 100), 100.0))  # untouched


@pytest.mark.skipif(not motion.CINE.is_file(),
                    reason="the real cine sample lives in ../shared/data/real-cine-2d, absent from a bare clone")
def test_motion_noisy_real_group_is_the_128_group_with_fresh_noise_on_every_frame_and_the_same_pairs():
    import numpy as np
    import SimpleITK as sitk
    clean, noisy = motion.case_group("real128", every=20), motion.case_group("real128-noisy", every=20)
    assert [c.name for c in noisy] == [c.name for c in clean] and len(clean) == 3
    for a, b in zip(clean, noisy):
        assert [g for g, _, _ in a.refs] == [g for g, _, _ in b.refs]
        pairs = [(a.source, b.source), (a.target, b.target)] + [(x, y) for (_, x, _), (_, y, _) in zip(a.refs, b.refs)]
        diffs = []
        for x, y in pairs:
            assert y.GetSize() == x.GetSize() == (128, 128, 1) and y.GetSpacing() == x.GetSpacing()
            diffs.append(sitk.GetArrayFromImage(y) - sitk.GetArrayFromImage(x))
        lo, hi = motion._range(a.source)
        # each frame its own noise, of about the stated size (Rician: the difference's spread ~ sigma)
        assert all(0.5 < d.std() / (motion.NOISE_FRACTION * (hi - lo)) < 1.5 for d in diffs)
        assert not np.allclose(diffs[0], diffs[1])
    again = motion.case_group("real128-noisy", every=20)
    assert np.array_equal(sitk.GetArrayViewFromImage(again[1].target), sitk.GetArrayViewFromImage(noisy[1].target))
    with pytest.raises(ValueError, match="unknown case group"):
        motion.case_group("real256")


def test_smoothed_blend_reference_smooths_in_plane_only_and_keeps_geometry_and_mean():
    """The reference's Gaussian: white noise of sigma 1 leaves with the spread a Gaussian of s pixels
    gives it in 2D, 1 / (2 s sqrt(pi)); the mean and the grid are kept, a thick axis by its mm."""
    import numpy as np
    import SimpleITK as sitk
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.normal(5.0, 1.0, (1, 256, 256)).astype(np.float32))
    image.SetSpacing((1.5, 1.5, 8.0))
    image.SetOrigin((3.0, -2.0, 1.0))
    out = motion.smoothed(image, 2.0)
    a = sitk.GetArrayFromImage(out)
    assert out.GetSize() == image.GetSize() and out.GetSpacing() == image.GetSpacing() and out.GetOrigin() == image.GetOrigin()
    assert abs(a.mean() - 5.0) < 0.01
    assert abs(a[0, 20:-20, 20:-20].std() - 1 / (2 * 2.0 * np.sqrt(np.pi))) < 0.02
    stack = sitk.GetImageFromArray(np.stack([np.zeros((64, 64)), np.ones((64, 64)), np.zeros((64, 64))]).astype(np.float32))
    stack.SetSpacing((1.0, 1.0, 8.0))
    # sigma 2 pixels = 2 mm along a z of 8 mm slices: a quarter slice, under a third of a voxel: untouched
    a = sitk.GetArrayFromImage(motion.smoothed(stack, 2.0))
    assert not a[0].any() and not a[2].any() and np.allclose(a[1], 1.0)


def test_smoothed_blend_reference_runs_on_a_case_with_labels_and_moves_nothing():
    """A reference with frames only: the benchmark scores its frames and asks it for no field."""
    import numpy as np
    import SimpleITK as sitk
    a = np.zeros((1, 64, 64), np.float32)
    a[:, 20:40, 20:40] = 100.0
    image = sitk.GetImageFromArray(a)
    labels = sitk.GetImageFromArray((a > 0).astype(np.uint8))
    case = motion.Case("c", image, image * 0.5, [(0.5, image, labels)], labels, labels, "phantom2d")
    out = motion.run_method("smoothed blend", case, [0.0, 0.5, 1.0])
    middle = sitk.GetArrayFromImage(out.frames[0.5])
    assert abs(middle.sum() - 0.75 * a.sum()) < 1e-2 * a.sum()  # the blend's mass, smoothed
    assert 0 < middle[0, 20, 20] < 75.0 and abs(middle[0, 30, 30] - 75.0) < 1e-3  # edges soft, inside kept
    assert not out.fields and motion.identical_motion(case, "smoothed blend") is None
