"""`ddm4d evaluate` end to end on a tiny phantom: a complete report, numbers checked against ground truth
where it is known, and one clear line with exit code 2 for every kind of bad input."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ddm4d import cli
from ddm4d.checkpoint import save_model, save_tensors
from ddm4d.config import DDMConfig
from ddm4d.data import scan_dataset
from ddm4d.evaluation import METHODS, REPORT_FILES, evaluate, parse_methods
from ddm4d.evaluation_report import _paired_p_values
from ddm4d.errors import InputError
from ddm4d.metrics import STRUCTURE_NAMES, dice, psnr
from ddm4d.model import DDM
from ddm4d.phantom import write_dataset

N_SUBJECTS = 2
N_FRAMES = 8  # per cycle; ED..ES is about half of it
PHANTOM = dict(size=(32, 32, 8), n_frames=N_FRAMES)  # ~7 mm voxels over a chest-sized field of view
# a small model grid that still covers the phantom's field of view (32 x 7.5 mm = 240 mm in-plane)
GRID = dict(image_size=(32, 32, 16), spacing=(7.5, 7.5, 5.0))
SUMMARY_KEYS = {"psnr_db", "nmse", "time_s", "network_time_s", "folding_percent", "folding_percent_max",
                "ef_abs_error"} | {f"dice_{k}" for k in STRUCTURE_NAMES}


def _strict_json(path: Path) -> dict:
    """report.json must be strict JSON: NaN/Infinity tokens are refused."""
    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token} in {path}")
    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evaluate")
    write_dataset(root / "data", n_subjects=N_SUBJECTS, seed=1, **PHANTOM)
    torch.manual_seed(0)
    save_model(DDM(DDMConfig(**GRID)), root / "ddm.safetensors")
    try:
        from ddm4d.baselines import BaselineModel, save_baseline

        for method in ("vm", "vmdiff"):
            save_baseline(BaselineModel(DDMConfig(**GRID), method), root / f"{method}.safetensors")
    except (ImportError, InputError):  # voxelmorph is optional: VM rows are then skipped
        pass
    return root


def _model_args(workdir: Path) -> list[str]:
    args = ["--model", str(workdir / "ddm.safetensors")]
    for method in ("vm", "vmdiff"):
        if (workdir / f"{method}.safetensors").exists():
            args += [f"--{method}-model", str(workdir / f"{method}.safetensors")]
    return args


@pytest.fixture(scope="module")
def full_run(workdir) -> tuple[Path, dict]:
    """Every method the environment can run, through the CLI entry point."""
    out = workdir / "report"
    rc = cli.main(["evaluate", str(workdir / "data"), "--out", str(out), "--device", "cpu", *_model_args(workdir)])
    assert rc == 0
    return out, _strict_json(out / "report.json")


@pytest.fixture(scope="module")
def image_run(workdir) -> tuple[Path, dict]:
    """The model-free methods over the whole image, where every number can be recomputed by hand."""
    out = workdir / "report_image"
    rc = cli.main(["evaluate", str(workdir / "data"), "--out", str(out), "--methods", "initial,linear",
                   "--region", "image"])
    assert rc == 0
    return out, _strict_json(out / "report.json")


def _expected_methods(workdir: Path) -> list[str]:
    return [m for m in METHODS if m not in ("vm", "vmdiff") or (workdir / f"{m}.safetensors").exists()]


# ------------------------------------------------------------------------------------------ the report

def test_report_holds_every_metric_for_every_method_and_subject(workdir, full_run):
    out, report = full_run
    methods = _expected_methods(workdir)
    assert report["settings"]["methods"] == methods
    assert report["n_subjects"] == N_SUBJECTS and len(report["subjects"]) == N_SUBJECTS
    for subject in report["subjects"]:
        n = subject["n_frames"]
        assert n >= 3 and subject["gammas"] == pytest.approx([k / (n - 1) for k in range(n)])
        for method in methods:
            scores = subject["methods"][method]
            assert set(scores["summary"]) == SUMMARY_KEYS
            assert len(scores["psnr_db"]) == len(scores["nmse"]) == len(scores["mse"]) == n - 1
            assert len(scores["dice_frames"]) == n
    for method in methods:
        assert set(report["aggregate"][method]) == SUMMARY_KEYS
        assert report["aggregate"][method]["psnr_db"]["n"] == N_SUBJECTS
    assert set(report["settings"]["models"]) == {m for m in methods if m in ("ddm", "vm", "vmdiff")}
    assert all(len(info["sha256"]) == 64 for info in report["settings"]["models"].values())


def test_metrics_are_finite_and_in_range(workdir, full_run):
    _, report = full_run
    for method in _expected_methods(workdir):
        for subject in report["subjects"]:
            s = subject["methods"][method]["summary"]
            assert math.isfinite(s["psnr_db"]) and s["psnr_db"] > 0
            assert 0 <= s["nmse"] < 1
            assert s["time_s"] >= 0
            if method == "linear":  # no field, no labels: reported as missing, not as zero
                assert s["dice_total"] is None and s["folding_percent"] is None
                continue
            assert all(0 <= s[f"dice_{k}"] <= 1 for k in STRUCTURE_NAMES)
            assert 0 <= s["folding_percent"] <= 100
            if method in ("ddm", "vm", "vmdiff"):
                assert s["network_time_s"] > 0


def test_dice_at_every_labelled_frame(full_run):
    """The phantom labels every frame, so Dice exists at every generated frame, not only at ES."""
    _, report = full_run
    for subject in report["subjects"]:
        assert subject["labelled_frames"] == list(range(subject["n_frames"]))
        frames = subject["methods"]["ddm"]["dice_frames"]
        assert frames[0] is None and all(f is not None for f in frames[1:])
        assert subject["methods"]["ddm"]["dice_es"] == frames[-1]


def test_initial_dice_is_the_dice_of_ed_against_es_labels(workdir, full_run):
    _, report = full_run
    for dataset_subject, subject in zip(scan_dataset(workdir / "data"), report["subjects"]):
        seq = dataset_subject.load_sequence()
        direct = dice(sitk.GetArrayViewFromImage(seq.labels[0]), sitk.GetArrayViewFromImage(seq.labels[-1]))
        reported = subject["methods"]["initial"]["dice_es"]
        assert reported == pytest.approx(direct)
        assert subject["methods"]["initial"]["ef"] == 0.0  # no motion: the cavity never shrinks
        assert subject["methods"]["initial"]["ef_true"] > 0.05


def test_frame_zero_is_the_source_for_linear_initial_and_ddm(full_run):
    """gamma = 0 reproduces the source exactly (so ED is left out of PSNR); Linear blend also hits ES."""
    _, report = full_run
    for subject in report["subjects"]:
        for method in ("initial", "linear", "ddm"):
            assert subject["methods"][method]["ed_equals_source"] is True
        linear = subject["methods"]["linear"]
        assert linear["psnr_db"][-1] is None and linear["mse"][-1] == 0.0  # inf PSNR at ES -> null
        assert linear["psnr_identical_frames"] == 1
        assert math.isfinite(linear["summary"]["psnr_db"])  # PSNR of the mean MSE stays finite


def test_psnr_and_nmse_match_a_direct_computation(workdir, image_run):
    """Initial over the whole image: frame k vs source, both mapped by the source's [min, max] -> [-1, 1]."""
    _, report = image_run
    for dataset_subject, subject in zip(scan_dataset(workdir / "data"), report["subjects"]):
        frames = [sitk.GetArrayFromImage(f).astype(np.float64) for f in dataset_subject.load_sequence().frames]
        lo, hi = frames[0].min(), frames[0].max()
        norm = [2 * (f - lo) / (hi - lo) - 1 for f in frames]
        expected = [psnr(norm[0], norm[k], data_range=2.0) for k in range(1, len(frames))]
        initial = subject["methods"]["initial"]
        assert initial["psnr_db"] == pytest.approx(expected)
        mses = [np.mean((norm[0] - norm[k]) ** 2) for k in range(1, len(frames))]
        assert initial["summary"]["psnr_db"] == pytest.approx(10 * math.log10(4 / np.mean(mses)))
        nmses = [np.sum((norm[0] - norm[k]) ** 2) / np.sum(norm[k] ** 2) for k in range(1, len(frames))]
        assert initial["nmse"] == pytest.approx(nmses)
        blend = [(1 - g) * norm[0] + g * norm[-1] for g in subject["gammas"]]
        assert subject["methods"]["linear"]["mse"] == pytest.approx(
            [np.mean((blend[k] - norm[k]) ** 2) for k in range(1, len(frames))], abs=1e-9)


def test_table1_has_a_row_per_method_and_the_paper_columns(workdir, full_run):
    out, _ = full_run
    text = (out / "table1.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| Method"))
    for column in ("PSNR (dB)", "NMSE (ratio)", "Dice LV blood pool", "Dice LV myocardium", "Dice LV epicardium",
                   "Dice RV", "Dice total", "Folding (%)", "Time / subject (s)"):
        assert column in header
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| Method")]
    for method in _expected_methods(workdir):
        assert any(r.startswith(f"| {METHODS[method]} |") for r in rows)
    assert "plain ratio" in text and "1e-8" in text  # NMSE's scale is stated, not faked


def test_plots_are_png_files(full_run):
    out, _ = full_run
    for name in REPORT_FILES:
        assert (out / name).is_file()
    for name in REPORT_FILES[2:]:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".report")]  # no staging left behind


def test_paired_tests_against_ddm(workdir, full_run):
    _, report = full_run
    stats = report["statistics"]
    assert set(stats) == set(_expected_methods(workdir)) - {"ddm"}
    for method, metrics in stats.items():
        assert set(metrics) == {"psnr_db", "nmse", "dice_total"}
        for result in metrics.values():
            assert set(result) == {"n", "mean_difference", "ttest_p", "wilcoxon_p", "note"}
            for p in (result["ttest_p"], result["wilcoxon_p"]):
                assert p is None or 0 <= p <= 1
            if result["ttest_p"] is None:
                assert result["note"]  # a missing p-value always says why
    assert stats["linear"]["dice_total"]["n"] == 0


def test_paired_p_values_degenerate_cases():
    one = _paired_p_values(np.array([1.0]), np.array([0.0]))
    assert math.isnan(one[0]) and math.isnan(one[1]) and "at least" in one[2]
    same = _paired_p_values(np.array([1.0, 2.0]), np.array([1.0, 2.0]))
    assert math.isnan(same[0]) and "zero" in same[2]
    shifted = _paired_p_values(np.array([1.0, 2.0, 3.0]), np.array([0.0, 1.0, 2.0]))
    assert math.isnan(shifted[0]) and 0 < shifted[1] <= 1 and "variance" in shifted[2]
    t_p, w_p, note = _paired_p_values(np.array([1.0, 2.0, 3.0, 5.0]), np.array([0.0, 1.0, 2.5, 1.0]))
    assert 0 < t_p < 1 and 0 < w_p <= 1 and note == ""


def test_python_api_returns_the_report_and_rewrites_an_existing_folder(workdir, image_run):
    out, _ = image_run
    (out / "stale.txt").write_text("kept: the report replaces its own files only")
    report = evaluate(workdir / "data", out, methods=["initial"], subjects=1, log=lambda m: None)
    assert report == _strict_json(out / "report.json")
    assert report["n_subjects"] == 1 and report["settings"]["methods"] == ["initial"]
    assert (out / "stale.txt").exists()


def test_a_method_without_its_model_is_skipped_with_a_note(workdir, tmp_path, capsys):
    out = tmp_path / "report"
    rc = cli.main(["evaluate", str(workdir / "data"), "--out", str(out), "--methods", "initial,ddm,vm",
                   "--subjects", "1"])
    assert rc == 0
    report = _strict_json(out / "report.json")
    assert report["settings"]["methods"] == ["initial"]
    assert set(report["settings"]["skipped_methods"]) == {"ddm", "vm"}
    assert "skipping DDM" in capsys.readouterr().err
    assert "DDM was skipped" in (out / "table1.md").read_text()


def test_parse_methods():
    assert parse_methods("ddm, VM-diff,initial") == ["initial", "ddm", "vmdiff"]
    with pytest.raises(InputError, match="unknown method"):
        parse_methods("ddm,foo")
    with pytest.raises(InputError, match="empty"):
        parse_methods(" , ")


# ------------------------------------------------------------------------------------------ bad input

def _bad_inputs(workdir: Path, tmp: Path) -> dict[str, list[str]]:
    data = str(workdir / "data")
    (tmp / "empty").mkdir()
    broken = tmp / "broken" / "patient001"
    broken.mkdir(parents=True)
    (broken / "Info.cfg").write_text("ED: 1\n")
    same = tmp / "same" / "patient001"
    shutil.copytree(workdir / "data" / "patient001", same)
    info = same / "Info.cfg"
    info.write_text(re.sub(r"ES: *\d+", "ES: " + re.search(r"ED: *(\d+)", info.read_text()).group(1),
                           info.read_text()))
    (tmp / "notes.txt").write_text("not a model")
    save_tensors(tmp / "foreign.safetensors", {"w": torch.zeros(2)}, {"format": "someone-else"})
    vm = workdir / "vm.safetensors"
    cases = {
        "missing data folder": [str(tmp / "nope")],
        "no patient folders": [str(tmp / "empty")],
        "no usable subject": [str(tmp / "broken"), "--methods", "initial"],
        "no subject with a sequence (ED = ES)": [str(tmp / "same"), "--methods", "initial"],
        "missing model file": [data, "--model", str(tmp / "missing.safetensors")],
        "model file not ours (text)": [data, "--model", str(tmp / "notes.txt")],
        "model file not ours (safetensors)": [data, "--model", str(tmp / "foreign.safetensors")],
        "unknown method": [data, "--methods", "initial,bogus"],
        "no method left": [data, "--methods", "ddm"],
        "zero subjects": [data, "--methods", "initial", "--subjects", "0"],
    }
    if vm.exists():
        cases["VM file given as DDM"] = [data, "--model", str(vm)]
    return cases


def test_bad_inputs_exit_2_with_one_line(workdir, tmp_path, capsys):
    for name, args in _bad_inputs(workdir, tmp_path).items():
        out = tmp_path / f"out_{len(name)}"
        rc = cli.main(["evaluate", *args, "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, name
        errors = [line for line in err if line.startswith("ddm4d evaluate: error:")]
        assert len(errors) == 1 and "Traceback" not in "\n".join(err), (name, err)
        assert not out.exists(), name  # nothing half-written


def test_unwritable_out_exits_2_and_what_a_killed_run_left_is_cleaned(workdir, tmp_path, capsys):
    data = str(workdir / "data")
    if Path("/proc/self").is_dir():  # a system folder: no one can write there, root included
        assert cli.main(["evaluate", data, "--methods", "initial", "--out", "/proc/ddm4d-report"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot be written" in err[0], err
    out = tmp_path / "report"
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()  # a finished process: its staging folder is a leftover
    killed = tmp_path / f".report.ddm4d-{process.pid}-abcd1234.tmp"
    killed.mkdir()
    (killed / ".ddm4d-temporary").write_text(f"ddm4d temporary folder of {out}\npid {process.pid} "
                                             f"host {socket.gethostname()}\n")
    look_alike = tmp_path / f".report.ddm4d-{process.pid}-efgh5678.tmp"
    look_alike.mkdir()
    (look_alike / "mine.txt").write_text("kept")
    assert cli.main(["evaluate", data, "--methods", "initial", "--subjects", "1", "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["report", look_alike.name])
    assert ".ddm4d-temporary" not in os.listdir(out)


def test_bad_input_through_the_console_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ddm4d", "evaluate", str(tmp_path / "nope"), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddm4d evaluate: error:") and "not found" in lines[0]


# ------------------------------------------------------------------------------------------ real data

REAL_CINE = Path(__file__).resolve().parents[2] / "shared/data/real-cine-2d/heart_cine_16frames.dcm"
REAL_ED, REAL_ES = 0, 6  # 0-based: the sample's README suggests frames 0 and 6 as a pair


def test_real_2d_cine_without_labels(tmp_path):
    """A real single-slice cine in the ACDC layout, no labels: intensity metrics only, Dice missing."""
    if not REAL_CINE.is_file():
        pytest.skip(f"the real cine sample is not there ({REAL_CINE}); it lives in ../shared/data/real-cine-2d")
    import warnings

    from ddm4d.io import read_cine, write_cine, write_image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the sample has no PixelSpacing; io warns and assumes 1 mm
        frames = read_cine(REAL_CINE)
    patient = tmp_path / "data" / "patient001"
    patient.mkdir(parents=True)
    write_cine(frames, patient / "patient001_4d.nii.gz")
    for index in (REAL_ED, REAL_ES):
        write_image(frames[index], patient / f"patient001_frame{index + 1:02d}.nii.gz")
    (patient / "Info.cfg").write_text(f"ED: {REAL_ED + 1}\nES: {REAL_ES + 1}\nNbFrame: {len(frames)}\n")

    report = evaluate(tmp_path / "data", tmp_path / "out", methods="initial,linear", log=lambda m: None)
    subject = report["subjects"][0]
    assert subject["n_frames"] == REAL_ES - REAL_ED + 1 and subject["labelled_frames"] == []
    initial, linear = (subject["methods"][m]["summary"] for m in ("initial", "linear"))
    assert math.isfinite(initial["psnr_db"]) and math.isfinite(linear["psnr_db"])
    # on real cine the blend of both ends is closer to the in-between frames than the source alone
    assert linear["psnr_db"] > initial["psnr_db"] and linear["nmse"] < initial["nmse"]
    assert initial["dice_total"] is None and subject["methods"]["initial"]["dice_es"] is None
