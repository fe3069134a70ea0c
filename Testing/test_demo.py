"""scripts/demo.py (what `make demo` runs), as a user runs it: a subprocess, its table and its files.

The bundled model is not needed: the demo takes `--model FILE`, here a small untrained ddm4d model
on a small phantom. What is checked against numbers computed here, independently of the demo:
Initial's Dice (the ED labels kept) equals the Dice of the phantom's true ED labels with its true
labels at ES and at every frame, and the printed `ddm4d generate` command reproduces the demo's frames.
Without a bundled model, `--model default` must stop with exit code 2 and say how to get one; that
runs on a copy of the ddm4d package that has no model beside it, through the real lookup.
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "scripts" / "demo.py"
METHODS = ("Initial", "Linear blend", "DDM")
HEADER = ["Method", "PSNR (dB)", "NMSE", "Dice total, mean", "Dice total, ES", "Dice LV cavity, mean",
          "Dice LV cavity, ES", "Folding (%)", "Time (s)"]
SMALL = ["--size", "48", "48", "8", "--frames", "8", "--seed", "7", "--device", "cpu"]


def _run(args, cwd, timeout=300, env=None):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env=env)


def _table(stdout: str) -> dict[str, list[str]]:
    """The printed Markdown table: method -> its cells, after checking the header."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("|")]
    assert lines, f"no table in the demo's output:\n{stdout}"
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    assert cells[0] == HEADER
    assert set(cells[1][0]) == {"-"}  # the rule under the header
    return {row[0]: row[1:] for row in cells[2:]}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    import torch

    from ddm4d.checkpoint import save_model
    from ddm4d.config import DDMConfig
    from ddm4d.model import DDM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    # a coarse grid so the model's field of view covers the small phantom's heart; the untrained
    # flow layer starts near zero, so scale it up: the frames then really move (by up to a few cm)
    # and the comparisons below see frames that differ from the source
    model = DDM(DDMConfig(image_size=(32, 32, 16), spacing=(6.0, 6.0, 8.0)))
    with torch.no_grad():
        model.deformation.flow.weight.mul_(1e5)
    save_model(model, path)
    return path


@pytest.fixture(scope="module")
def demo_run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = _run([DEMO, "--out", out, "--model", tiny_model, *SMALL], cwd=out.parent)
    assert proc.returncode == 0, f"demo failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return out, proc.stdout


def test_demo_prints_the_three_methods_with_numbers(demo_run):
    _, stdout = demo_run
    table = _table(stdout)
    assert list(table) == list(METHODS)
    number = re.compile(r"^-?\d+(\.\d+)?(e[+-]\d+)?$")
    for method, cells in table.items():
        for header, cell in zip(HEADER[1:], cells):
            motion_only = header.startswith(("Dice", "Folding"))
            if method == "Linear blend" and motion_only:
                assert cell == "–", (method, header, cell)  # a cross-fade moves nothing
            else:
                assert number.match(cell), (method, header, cell)
    # Dice and folding are fractions / percentages
    for method in ("Initial", "DDM"):
        dice = [float(c) for h, c in zip(HEADER[1:], table[method]) if h.startswith("Dice")]
        assert all(0.0 <= d <= 1.0 for d in dice)
    assert float(table["Initial"][HEADER.index("Folding (%)") - 1]) == 0.0
    assert table["DDM"][:2] != table["Initial"][:2]  # the model moved the frames


def test_demo_writes_the_outputs_it_lists(demo_run):
    out, stdout = demo_run
    generated = out / "generated"
    results = json.loads((out / "demo_results.json").read_text())
    n = results["n_frames"]
    assert n == results["es_frame"] - results["ed_frame"] + 1 >= 2
    frames = sorted((generated / "frames").glob("frame_*.nii.gz"))
    assert [f.name for f in frames] == [f"frame_{i:03d}.nii.gz" for i in range(n)]
    assert len(list((generated / "fields").glob("field_*.nrrd"))) == n
    for name in ("frames.seq.nrrd", "frames_4d.nii.gz", "labels.seq.nrrd", "montage.png", "frames.gif",
                 "volumes.csv", "volumes.png", "report.json"):
        assert (generated / name).is_file(), name
        assert (generated / name).stat().st_size > 0, name
        assert str(generated / name) in stdout or name == "volumes.png"
    assert len((generated / "volumes.csv").read_text().splitlines()) == n + 1
    report = json.loads((generated / "report.json").read_text())
    assert report["gammas"] == pytest.approx(results["gammas"])
    assert (out / "data" / "patient001" / "Info.cfg").is_file()


def test_initial_dice_is_the_true_ed_versus_es_dice(demo_run):
    """Initial keeps the ED labels, so its Dice is the overlap of the true ED and ES labels."""
    out, stdout = demo_run
    patient = out / "data" / "patient001"
    info = dict(line.split(":", 1) for line in (patient / "Info.cfg").read_text().splitlines() if ":" in line)
    ed, es = int(info["ED"]), int(info["ES"])
    ed_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(patient / f"patient001_frame{ed:02d}_gt.nii.gz")))
    es_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(patient / f"patient001_frame{es:02d}_gt.nii.gz")))
    total_es = _dice(ed_labels > 0, es_labels > 0)
    lv_es = _dice(ed_labels == 3, es_labels == 3)
    cine = sitk.GetArrayFromImage(sitk.ReadImage(str(patient / "patient001_4d_gt.nii.gz")))  # (t, z, y, x)
    later = [cine[k] for k in range(ed, es)]  # 0-based frames ED+1 .. ES
    total_mean = float(np.mean([_dice(ed_labels > 0, lab > 0) for lab in later]))
    lv_mean = float(np.mean([_dice(ed_labels == 3, lab == 3) for lab in later]))
    assert total_es < 0.99  # the heart moves: the check below can tell Initial from a perfect method

    results = json.loads((out / "demo_results.json").read_text())["methods"]["Initial"]
    assert results["dice_total_es"] == pytest.approx(total_es, abs=1e-12)
    assert results["dice_lv_es"] == pytest.approx(lv_es, abs=1e-12)
    assert results["dice_total_mean"] == pytest.approx(total_mean, abs=1e-12)
    assert results["dice_lv_mean"] == pytest.approx(lv_mean, abs=1e-12)
    printed = dict(zip(HEADER[1:], _table(stdout)["Initial"]))
    assert printed["Dice total, ES"] == f"{total_es:.3f}"
    assert printed["Dice LV cavity, ES"] == f"{lv_es:.3f}"
    assert printed["Dice total, mean"] == f"{total_mean:.3f}"
    assert printed["Dice LV cavity, mean"] == f"{lv_mean:.3f}"


def test_printed_command_line_reproduces_the_frames(demo_run, tmp_path):
    """The `ddm4d generate` line the demo prints is a working command that gives the same frames."""
    out, stdout = demo_run
    line = next(ln.strip() for ln in stdout.splitlines() if ln.strip().startswith("ddm4d generate "))
    argv = shlex.split(line)
    argv[argv.index("--out") + 1] = str(tmp_path / "cli")
    proc = _run(["-m", "ddm4d", *argv[1:], "--quiet", "--no-quicklook"], cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    n = json.loads((out / "demo_results.json").read_text())["n_frames"]
    for i in (1, n - 1):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "generated" / "frames" / f"frame_{i:03d}.nii.gz")))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "cli" / "frames" / f"frame_{i:03d}.nii.gz")))
        np.testing.assert_allclose(a, b, atol=1e-3 * float(np.ptp(a)))


def _package_copy_without_models(root: Path, script: str = "demo.py") -> Path:
    """demo.py beside (or, as in a checkout, in scripts/ below) a copy of the ddm4d package with no
    models folder anywhere near it."""
    shutil.copytree(REPO / "ddm4d", root / "ddm4d", ignore=shutil.ignore_patterns("models", "__pycache__"))
    (root / script).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(DEMO, root / script)
    return root / script


@pytest.mark.parametrize("dims, script", [("3", "demo.py"), ("2", "demo.py"), ("3", "scripts/demo.py")])
def test_no_bundled_model_exits_2_with_a_hint(tmp_path, dims, script):
    """Also where another ddm4d (this checkout's, with its models) is installed: the copy beside wins."""
    demo = _package_copy_without_models(tmp_path / "pkg", script)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = _run([demo, "--out", tmp_path / "out", "--model", "default", "--dims", dims], cwd=tmp_path,
                timeout=120, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    message = proc.stderr.strip()
    assert "Traceback" not in message
    assert len(message.splitlines()) == 1
    assert f"no bundled {dims}D model is installed" in message
    assert "train_default_models.sh" in message and "--model" in message
    assert str(tmp_path / "pkg" / "ddm4d") in message  # the copy was used, and its lookup found nothing
    assert not (tmp_path / "out").exists()  # it stops before any work


def test_missing_model_file_exits_2(tmp_path):
    proc = _run([DEMO, "--out", tmp_path / "out", "--model", tmp_path / "nope.safetensors"], cwd=tmp_path,
                timeout=120)
    assert proc.returncode == 2
    assert "nope.safetensors does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_bundled_model_beats_initial(tmp_path):
    """With the shipped default model (when this checkout has one): DDM's frames are closer to the
    truth than doing nothing, on a subject the model never saw."""
    from ddm4d.generation import bundled_model_path

    if bundled_model_path(3) is None:
        pytest.skip("no bundled 3D model in this checkout (scripts/train_default_models.sh makes it)")
    out = tmp_path / "out"
    proc = _run([DEMO, "--out", out, "--frames", "12", "--device", "cpu"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((out / "demo_results.json").read_text())["methods"]
    assert rows["DDM"]["psnr_db"] > rows["Initial"]["psnr_db"]
    assert rows["DDM"]["dice_total_es"] > rows["Initial"]["dice_total_es"]
    assert rows["DDM"]["folding_percent"] < 1.0
    assert math.isfinite(rows["DDM"]["time_s"])
