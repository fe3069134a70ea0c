"""ACDC-layout folders and pairs CSVs: loading, frame order, and every broken subject reported, not fatal."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ddm4d.data import Dataset, Subject, frame_order, scan_dataset
from ddm4d.errors import InputError

SIZE = (16, 16, 4)  # x, y, z
SPACING = (1.5, 1.5, 8.0)
ORIGIN = (-12.0, 30.0, 5.0)


def image(array: np.ndarray, spacing=SPACING) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing[:array.ndim])
    img.SetOrigin(ORIGIN[:array.ndim])
    return img


def frame_array(t: int) -> np.ndarray:
    """Frame t of a tiny cine: its mean identifies t (100 * t + 50 on average)."""
    rng = np.random.default_rng(t)
    return (rng.uniform(0, 100, size=SIZE[::-1]) + 100.0 * t).astype(np.float32)


def label_array(t: int) -> np.ndarray:
    lab = np.zeros(SIZE[::-1], np.uint8)
    lab[1:3, 4:12, 4:12] = 3
    lab[1:3, 6:10, 6:10] = 2
    lab[0, 0, : t + 1] = 1  # the number of ones along this row identifies the frame
    return lab


def frame_of(img: sitk.Image) -> int:
    return int(round((sitk.GetArrayViewFromImage(img).mean() - 50.0) / 100.0))


def label_frame_of(img: sitk.Image) -> int:
    return int((sitk.GetArrayViewFromImage(img)[0, 0] == 1).sum()) - 1


def write_patient(root: Path, name: str, ed: int = 1, es: int = 4, n_frames: int = 6, gt: bool = True,
                  gt4d: bool = False, cine: bool = True, info: str | None = None) -> Path:
    """An ACDC-like patient folder; ed/es are 1-based as in Info.cfg."""
    folder = root / name
    folder.mkdir(parents=True)
    text = info if info is not None else f"ED: {ed}\nES: {es}\nGroup: NOR\nHeight: 180.0\nNbFrame: {n_frames}\n"
    (folder / "Info.cfg").write_text(text)
    frames = [image(frame_array(t)) for t in range(n_frames)]
    if cine:
        sitk.WriteImage(sitk.JoinSeries(frames), str(folder / f"{name}_4d.nii.gz"))
    if gt4d:
        sitk.WriteImage(sitk.JoinSeries([image(label_array(t)) for t in range(n_frames)]),
                        str(folder / f"{name}_4d_gt.nii.gz"))
    for number in {ed, es}:
        if 1 <= number <= n_frames:
            sitk.WriteImage(frames[number - 1], str(folder / f"{name}_frame{number:02d}.nii.gz"))
            if gt:
                sitk.WriteImage(image(label_array(number - 1)), str(folder / f"{name}_frame{number:02d}_gt.nii.gz"))
    return folder


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ------------------------------------------------------------------------------------------------- ACDC

def test_scan_load_pair_and_summary(tmp_path):
    write_patient(tmp_path, "patient001", ed=1, es=4)
    write_patient(tmp_path, "patient002", ed=2, es=5, gt=False)
    ds = scan_dataset(tmp_path)
    assert [s.id for s in ds.subjects] == ["patient001", "patient002"] and ds.problems == []
    s1, s2 = ds.subjects
    assert (s1.ed, s1.es, s1.n_frames) == (0, 3, 6) and s1.has_labels and s1.has_cine
    assert not s2.has_labels
    pair = s1.load_pair()
    assert frame_of(pair.source) == 0 and frame_of(pair.target) == 3
    assert pair.source.GetPixelID() == sitk.sitkFloat32 and pair.source.GetSize() == SIZE
    assert pair.source_labels.GetPixelID() == sitk.sitkUInt8
    assert label_frame_of(pair.source_labels) == 0 and label_frame_of(pair.target_labels) == 3
    pair2 = ds["patient002"].load_pair()
    assert frame_of(pair2.source) == 1 and pair2.source_labels is None and pair2.target_labels is None
    summary = ds.summary()
    assert summary["n_subjects"] == 2 and summary["n_problems"] == 0
    assert summary["sizes"] == {"16x16x4": 2} and summary["spacings_mm"] == {"1.5x1.5x8": 2}
    assert summary["n_with_labels"] == 1 and summary["frames_per_cycle"] == {"min": 6, "max": 6}
    json.dumps(summary)  # the Slicer module receives it as JSON


def test_sequence_ed_to_es_with_labels_at_the_ends(tmp_path):
    write_patient(tmp_path, "patient001", ed=2, es=5)
    seq = scan_dataset(tmp_path).subjects[0].load_sequence()
    assert seq.frame_indices == [1, 2, 3, 4]
    assert [frame_of(f) for f in seq.frames] == [1, 2, 3, 4]
    assert [lab is None for lab in seq.labels] == [False, True, True, False]
    assert label_frame_of(seq.labels[0]) == 1 and label_frame_of(seq.labels[-1]) == 4
    assert seq.gammas == [0.0, 1 / 3, 2 / 3, 1.0]
    assert all(f.GetSize() == SIZE and f.GetSpacing() == SPACING for f in seq.frames)


def test_sequence_wraps_around_when_es_comes_before_ed(tmp_path):
    write_patient(tmp_path, "patient001", ed=5, es=2, gt4d=True)
    subject = scan_dataset(tmp_path).subjects[0]
    assert "gt4d" in subject.paths
    seq = subject.load_sequence()
    assert seq.frame_indices == [4, 5, 0, 1]
    assert [frame_of(f) for f in seq.frames] == [4, 5, 0, 1]
    assert [label_frame_of(lab) for lab in seq.labels] == [4, 5, 0, 1]
    assert all(lab.GetPixelID() == sitk.sitkUInt8 for lab in seq.labels)
    assert frame_order(4, 1, 6) == [4, 5, 0, 1] and frame_order(0, 0, 3) == [0]


def test_broken_patients_are_reported_and_skipped(tmp_path):
    write_patient(tmp_path, "patient001")
    (write_patient(tmp_path, "patient002") / "Info.cfg").unlink()
    truncate(write_patient(tmp_path, "patient003") / "patient003_frame01.nii.gz")
    p4 = write_patient(tmp_path, "patient004")
    sitk.WriteImage(image(frame_array(3)[1]), str(p4 / "patient004_frame04.nii.gz"))  # a 2D frame
    p5 = write_patient(tmp_path, "patient005")
    bad = label_array(0)
    bad[2, 2, 2] = 7
    sitk.WriteImage(image(bad), str(p5 / "patient005_frame01_gt.nii.gz"))
    write_patient(tmp_path, "patient006", info="ED: 9\nES: 4\nNbFrame: 6\n")
    write_patient(tmp_path, "patient007", info="ED: one\nES: 4\nNbFrame: 6\n")
    p8 = write_patient(tmp_path, "patient008")
    (p8 / "patient008_frame04.nii.gz").unlink()
    write_patient(tmp_path, "patient009", ed=2, es=6)
    (tmp_path / "notes").mkdir()  # not a patient folder: ignored

    ds = scan_dataset(tmp_path)
    assert [s.id for s in ds.subjects] == ["patient001", "patient009"]
    problems = {p.subject: p for p in ds.problems}
    assert sorted(problems) == [f"patient00{i}" for i in range(2, 9)]

    def check(subject, file_name, *words):
        p = problems[subject]
        assert Path(p.file).name == file_name, p
        for w in words:
            assert w in p.message, p
        assert file_name in str(p)

    check("patient002", "Info.cfg", "missing", "ED")
    check("patient003", "patient003_frame01.nii.gz", "truncated")
    check("patient004", "patient004_frame04.nii.gz", "2D", "3D")
    check("patient005", "patient005_frame01_gt.nii.gz", "[7]", "[0, 1, 2, 3]")
    check("patient006", "Info.cfg", "ED: 9", "NbFrame")
    check("patient007", "Info.cfg", "ED: one", "whole number")
    check("patient008", "patient008_frame04.nii.gz", "missing", "ES: 4")
    # the good ones still load
    assert frame_of(ds["patient009"].load_pair().target) == 5
    summary = ds.summary()
    assert summary["n_subjects"] == 2 and summary["n_skipped"] == 7 and len(summary["problems"]) == 7


def test_cine_with_wrong_frame_count_is_a_problem(tmp_path):
    write_patient(tmp_path, "patient001", info="ED: 1\nES: 4\nNbFrame: 8\n")  # the 4D file has 6 frames
    ds = scan_dataset(tmp_path)
    assert not ds.subjects
    assert ds.problems[0].file.endswith("patient001_4d.nii.gz") and "NbFrame: 8" in ds.problems[0].message
    with pytest.raises(InputError, match="0 usable subject"):
        ds.require_subjects()


def test_empty_folder_is_an_input_error(tmp_path):
    with pytest.raises(InputError) as info:
        scan_dataset(tmp_path)
    message = str(info.value)
    assert f"no patient folders or pairs found in {tmp_path}" in message
    assert "ACDC layout" in message and "source,target" in message
    with pytest.raises(InputError, match="not found"):
        scan_dataset(tmp_path / "nothing-here")


def test_acdc_root_with_training_and_testing_subfolders_gets_a_hint(tmp_path):
    write_patient(tmp_path / "training", "patient001")
    with pytest.raises(InputError, match="training"):
        scan_dataset(tmp_path)


# -------------------------------------------------------------------------------------------------- CSV

def test_pairs_csv_with_relative_paths_labels_and_a_missing_file(tmp_path):
    data = tmp_path / "cases"
    data.mkdir()
    sitk.WriteImage(image(frame_array(0)), str(data / "a_ed.nrrd"))
    sitk.WriteImage(image(frame_array(3)), str(data / "a_es.mha"))
    sitk.WriteImage(image(label_array(0)), str(data / "a_ed_gt.nii.gz"))
    sitk.WriteImage(image(label_array(3)), str(data / "a_es_gt.nii.gz"))
    sitk.WriteImage(image(frame_array(1)[0], spacing=SPACING[:2]), str(data / "b_ed.nii.gz"))  # 2D slice
    sitk.WriteImage(image(frame_array(2)[0], spacing=SPACING[:2]), str(data / "b_es.nii.gz"))
    csv_path = tmp_path / "pairs.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["source", "target", "source_labels", "target_labels"])
        w.writerow(["cases/a_ed.nrrd", "cases/a_es.mha", "cases/a_ed_gt.nii.gz", "cases/a_es_gt.nii.gz"])
        w.writerow(["cases/b_ed.nii.gz", "cases/b_es.nii.gz", "", ""])
        w.writerow(["cases/c_ed.nii.gz", "cases/a_es.mha", "", ""])  # missing source
    ds = scan_dataset(csv_path)
    assert ds.kind == "pairs"
    assert [s.id for s in ds.subjects] == ["pair001", "pair002"]
    assert len(ds.problems) == 1
    problem = ds.problems[0]
    assert problem.subject == "pair003" and Path(problem.file).name == "c_ed.nii.gz" and "missing" in problem.message
    a, b = ds.subjects
    pair = a.load_pair()
    assert frame_of(pair.source) == 0 and frame_of(pair.target) == 3 and label_frame_of(pair.target_labels) == 3
    seq = a.load_sequence()
    assert len(seq) == 2 and [frame_of(f) for f in seq.frames] == [0, 3] and seq.gammas == [0.0, 1.0]
    single = b.load_pair()
    assert single.source.GetSize() == (16, 16, 1) and single.source_labels is None
    assert b.size == (16, 16, 1)
    # the same CSV found inside a folder without patient folders
    assert [s.id for s in scan_dataset(tmp_path).subjects] == ["pair001", "pair002"]


def test_pairs_csv_without_the_right_columns_or_rows(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("fixed,moving\na.nii.gz,b.nii.gz\n")
    with pytest.raises(InputError, match="source,target") as info:
        scan_dataset(bad)
    assert "bad.csv" in str(info.value)
    empty = tmp_path / "empty.csv"
    empty.write_text("source,target\n")
    with pytest.raises(InputError, match="no patient folders or pairs found"):
        scan_dataset(empty)


# ------------------------------------------------------------------------------------------------ split

def _fake_dataset(n: int) -> Dataset:
    subjects = [Subject(f"patient{i:03d}", Path("."), 0, 1, 2, {}) for i in range(1, n + 1)]
    return Dataset(Path("."), subjects)


def test_split_is_deterministic_and_disjoint():
    ds = _fake_dataset(20)
    shuffled = Dataset(Path("."), random.Random(5).sample(ds.subjects, 20))
    train, val = ds.split(0.25, seed=3)
    train2, val2 = shuffled.split(0.25, seed=3)  # same ids, any order: same split
    assert len(val) == 5 and len(train) == 15
    assert {s.id for s in val} == {s.id for s in val2}
    assert not ({s.id for s in train} & {s.id for s in val})
    assert {s.id for s in ds.split(0.25, seed=4)[1]} != {s.id for s in val}
    assert len(_fake_dataset(3).split(0.1, seed=0)[1]) == 1  # at least one validation subject
    assert len(_fake_dataset(3).split(0.0, seed=0)[1]) == 0
    with pytest.raises(InputError):
        ds.split(1.0)


# ------------------------------------------------------------------------------------- with the phantom

def test_phantom_dataset_scans_clean(tmp_path):
    from ddm4d import phantom

    phantom.write_dataset(tmp_path, n_subjects=2, seed=0, size=(24, 24, 6), n_frames=8)
    ds = scan_dataset(tmp_path)
    assert ds.problems == [] and len(ds.subjects) == 2
    subject = ds.subjects[0]
    assert "gt4d" in subject.paths
    seq = subject.load_sequence()
    assert len(seq) == len(subject.frame_indices) and all(lab is not None for lab in seq.labels)
    assert seq.frame_indices[0] == subject.ed and seq.frame_indices[-1] == subject.es
