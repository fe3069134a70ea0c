"""Tests of the synthetic 4D cardiac phantom (ddm4d.phantom): layout, determinism, physiology, CLI."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from ddm4d import phantom
from ddm4d.errors import InputError

SMALL = dict(size=(64, 64, 10), n_frames=8)  # fast, still ~3.3 mm voxels over a chest-sized FOV
MEDIUM = dict(size=(96, 96, 10), n_frames=10)  # fine enough for volumes within a few percent


def arrays(images: list[sitk.Image]) -> np.ndarray:
    """(t, z, y, x) array of a list of 3D frames."""
    return np.stack([sitk.GetArrayFromImage(i) for i in images])


def voxel_ml(image: sitk.Image) -> float:
    return float(np.prod(image.GetSpacing())) / 1000.0


def read_info(path) -> dict[str, str]:
    pairs = (line.split(":", 1) for line in path.read_text().splitlines() if line.strip())
    return {key.strip(): value.strip() for key, value in pairs}


@pytest.fixture(scope="module")
def subject() -> phantom.PhantomSubject:
    return phantom.make_subject(11, ejection_fraction=0.6, **MEDIUM)


@pytest.fixture(scope="module")
def labels(subject) -> np.ndarray:
    return arrays(subject.labels)


def mid_slice(labels: np.ndarray, ed: int) -> int:
    slices = np.flatnonzero((labels[ed] == phantom.LABEL_LV).any(axis=(1, 2)))
    return int(np.median(slices))


# ----------------------------------------------------------------------------- determinism


def test_same_seed_gives_byte_identical_arrays():
    a = phantom.make_subject(5, **SMALL)
    b = phantom.make_subject(5, **SMALL)
    assert arrays(a.images).tobytes() == arrays(b.images).tobytes()
    assert arrays(a.labels).tobytes() == arrays(b.labels).tobytes()
    for x, y in zip(a.images, b.images):
        assert (x.GetSpacing(), x.GetOrigin(), x.GetDirection()) == (y.GetSpacing(), y.GetOrigin(), y.GetDirection())
    assert (a.ed, a.es, a.ejection_fraction) == (b.ed, b.es, b.ejection_fraction)


def test_different_seeds_differ():
    a, b = phantom.make_subject(1, **SMALL), phantom.make_subject(2, **SMALL)
    assert not np.array_equal(arrays(a.labels), arrays(b.labels))
    assert a.images[0].GetOrigin() != b.images[0].GetOrigin()
    assert a.ejection_fraction != b.ejection_fraction


def test_fixing_the_frame_count_leaves_the_anatomy_unchanged():
    """Independent random streams: an option changes what it names and nothing else."""
    a, b = phantom.make_subject(3, size=(48, 48, 6), n_frames=4), phantom.make_subject(3, size=(48, 48, 6), n_frames=7)
    assert np.array_equal(sitk.GetArrayFromImage(a.labels[0]), sitk.GetArrayFromImage(b.labels[0]))
    assert a.images[0].GetOrigin() == b.images[0].GetOrigin()


# ----------------------------------------------------------------------------- geometry and layout


@pytest.mark.parametrize("seed", [0, 1])
def test_default_geometry_is_acdc_like(seed):
    s = phantom.make_subject(seed, n_frames=2)
    image = s.images[0]
    nx, ny, nz = image.GetSize()
    sx, sy, sz = image.GetSpacing()
    assert 128 <= nx <= 160 and 128 <= ny <= 160 and 8 <= nz <= 12
    assert 1.3 <= sx <= 1.7 and sx == sy and 5.0 <= sz <= 10.0
    direction = np.array(image.GetDirection()).reshape(3, 3)
    assert np.allclose(direction @ direction.T, np.eye(3), atol=1e-9)
    assert not np.allclose(direction, np.eye(3), atol=1e-3), "direction should be a small rotation, not identity"
    assert np.linalg.norm(image.GetOrigin()) > 1.0
    assert sitk.GetArrayViewFromImage(image).dtype == np.int16
    assert sitk.GetArrayViewFromImage(s.labels[0]).dtype == np.uint8


def test_default_timing_is_drawn_within_the_documented_ranges():
    for seed in range(6):
        s = phantom.make_subject(seed, size=(32, 32, 2))
        assert 12 <= s.n_frames <= 25 and s.ed == 0
        assert 0.3 <= s.es / s.n_frames <= 0.5
        assert 0.3 <= s.ejection_fraction <= 0.7
        assert s.contraction[s.ed] == 0.0 and s.contraction[s.es] == pytest.approx(1.0)
        assert np.all((s.contraction >= 0) & (s.contraction <= 1))


def test_single_slice_subject_has_a_mid_ventricular_slice():
    s = phantom.make_subject(4, size=(64, 64, 1), n_frames=4)
    label = sitk.GetArrayFromImage(s.labels[0])
    assert label.shape == (1, 64, 64)
    assert {phantom.LABEL_RV, phantom.LABEL_MYOCARDIUM, phantom.LABEL_LV} <= set(np.unique(label))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("acdc")
    folders = phantom.write_dataset(out, n_subjects=2, seed=7, size=(48, 48, 6))
    return out, folders


def test_write_dataset_writes_the_acdc_layout(dataset):
    out, folders = dataset
    assert [f.name for f in folders] == ["patient001", "patient002"]
    for folder in folders:
        name = folder.name
        info = read_info(folder / "Info.cfg")
        assert set(info) >= {"ED", "ES", "Group", "Height", "NbFrame", "Weight"}
        ed, es, n = int(info["ED"]), int(info["ES"]), int(info["NbFrame"])
        assert ed == 1 and 1 < es < n
        image4d = sitk.ReadImage(str(folder / f"{name}_4d.nii.gz"))
        labels4d = sitk.ReadImage(str(folder / f"{name}_4d_gt.nii.gz"))
        assert image4d.GetDimension() == 4 and image4d.GetSize()[3] == n
        assert labels4d.GetSize() == image4d.GetSize()
        for frame in (ed, es):
            stem = folder / f"{name}_frame{frame:02d}"
            image3d = sitk.ReadImage(f"{stem}.nii.gz")
            label3d = sitk.ReadImage(f"{stem}_gt.nii.gz")
            extracted = sitk.Extract(image4d, [*image4d.GetSize()[:3], 0], [0, 0, 0, frame - 1])
            assert np.array_equal(sitk.GetArrayFromImage(extracted), sitk.GetArrayFromImage(image3d))
            assert np.array_equal(sitk.GetArrayFromImage(labels4d)[frame - 1], sitk.GetArrayFromImage(label3d))
            assert np.allclose(extracted.GetOrigin(), image3d.GetOrigin(), atol=1e-4)
            assert np.allclose(extracted.GetSpacing(), image3d.GetSpacing(), atol=1e-6)
            assert np.allclose(extracted.GetDirection(), image3d.GetDirection(), atol=1e-6)
            assert set(np.unique(sitk.GetArrayFromImage(label3d))) <= {0, 1, 2, 3}
        assert (folder / "phantom.json").is_file()
        assert not list(folder.glob(".*")), "temporary files must not be left behind"


def test_written_files_match_the_subject_of_the_documented_seed(dataset):
    _, folders = dataset
    subject = phantom.make_subject(phantom.subject_seed(7, 1), size=(48, 48, 6))
    written = sitk.ReadImage(str(folders[0] / "patient001_4d.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(written), arrays(subject.images))


def test_rewriting_with_other_frames_leaves_no_stale_frame_files(tmp_path):
    phantom.write_dataset(tmp_path, n_subjects=1, seed=1, size=(32, 32, 4), n_frames=20)
    phantom.write_dataset(tmp_path, n_subjects=1, seed=1, size=(32, 32, 4), n_frames=5)
    folder = tmp_path / "patient001"
    info = read_info(folder / "Info.cfg")
    frames = sorted(p.name for p in folder.glob("patient001_frame*.nii.gz"))
    expected = {f"patient001_frame{int(info[k]):02d}{gt}.nii.gz" for k in ("ED", "ES") for gt in ("", "_gt")}
    assert set(frames) == expected


def test_write_dataset_refuses_a_file_as_output_folder(tmp_path):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    with pytest.raises(InputError, match="is a file"):
        phantom.write_dataset(target, n_subjects=1)
    with pytest.raises(InputError, match="cannot create"):
        phantom.write_dataset(target / "below", n_subjects=1)


def test_a_patient_folder_phantom_did_not_write_is_refused_before_any_work(tmp_path):
    """A real patient's files are never overwritten, nor its frame files deleted: refused, all intact,
    and nothing written for the other subjects either (every folder is checked first)."""
    real = tmp_path / "patient002"
    real.mkdir()
    files = {"Info.cfg": "ED: 1\nES: 12\n", "patient002_frame01.nii.gz": "real", "patient002_frame12.nii.gz": "real"}
    for name, text in files.items():
        (real / name).write_text(text)
    with pytest.raises(InputError, match="patient002 holds files that ddm4d phantom did not write"):
        phantom.write_dataset(tmp_path, n_subjects=2, seed=0, size=(32, 32, 1))
    assert {p.name: p.read_text() for p in real.iterdir()} == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patient002"]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_frames=1),
        dict(ejection_fraction=0.95),
        dict(size=(8, 64, 4)),
        dict(size=(64, 64, 0)),
        dict(spacing=(1.5, 1.5, 0.0)),
        dict(noise=-0.1),
    ],
)
def test_impossible_options_raise_input_error(kwargs):
    with pytest.raises(InputError):
        phantom.make_subject(0, **kwargs)


def test_negative_seed_and_zero_subjects_raise_input_error(tmp_path):
    with pytest.raises(InputError):
        phantom.make_subject(-1)
    with pytest.raises(InputError):
        phantom.write_dataset(tmp_path, n_subjects=0)


# ----------------------------------------------------------------------------- anatomy and motion


def test_myocardial_volume_is_conserved_over_the_cycle(subject, labels):
    myocardium = (labels == phantom.LABEL_MYOCARDIUM).sum(axis=(1, 2, 3)) * voxel_ml(subject.images[0])
    assert np.ptp(myocardium) / myocardium.mean() < 0.10
    assert np.ptp(subject.myocardium_ml) / subject.myocardium_ml.mean() < 1e-6  # analytic: exact


@pytest.mark.parametrize("seed, ejection_fraction", [(21, 0.35), (22, 0.5), (23, 0.65)])
def test_lv_cavity_volumes_follow_the_requested_ejection_fraction(seed, ejection_fraction):
    s = phantom.make_subject(seed, ejection_fraction=ejection_fraction, **MEDIUM)
    cavity = (arrays(s.labels) == phantom.LABEL_LV).sum(axis=(1, 2, 3))
    measured = (cavity[s.ed] - cavity[s.es]) / cavity[s.ed]
    assert abs(measured - ejection_fraction) < 0.03
    assert s.ejection_fraction == ejection_fraction
    assert s.lv_cavity_ml[s.es] / s.lv_cavity_ml[s.ed] == pytest.approx(1 - ejection_fraction)
    assert cavity.argmin() == s.es


def test_rv_exists_in_every_frame_and_touches_the_lv_myocardium(labels):
    structure = ndimage.generate_binary_structure(3, 1)
    for frame in labels:
        rv = frame == phantom.LABEL_RV
        assert rv.sum() > 50
        grown = ndimage.binary_dilation(frame == phantom.LABEL_MYOCARDIUM, structure)
        assert (grown & rv).sum() > 10, "the RV cavity should lie against the septum"


def test_rv_contracts(subject, labels):
    rv = (labels == phantom.LABEL_RV).sum(axis=(1, 2, 3))
    assert rv[subject.es] < 0.85 * rv[subject.ed]


def test_myocardium_is_a_closed_ring_on_the_mid_slice(subject, labels):
    for t in (subject.ed, subject.es):
        section = labels[t, mid_slice(labels, subject.ed)]
        outside_ring, _ = ndimage.label(section != phantom.LABEL_MYOCARDIUM)  # 4-connected
        cavity_parts = set(np.unique(outside_ring[section == phantom.LABEL_LV]))
        border = np.concatenate([outside_ring[0], outside_ring[-1], outside_ring[:, 0], outside_ring[:, -1]])
        assert not cavity_parts & set(border), "the LV cavity leaks through the myocardium"
        assert (section == phantom.LABEL_LV).sum() > 20


def test_intensities_look_like_bssfp_cine(subject, labels):
    image = arrays(subject.images)[subject.ed].astype(float)
    label = labels[subject.ed]
    blood = image[label == phantom.LABEL_LV].mean()
    myocardium = image[label == phantom.LABEL_MYOCARDIUM].mean()
    rv_blood = image[label == phantom.LABEL_RV].mean()
    lung = image[subject.tissues == phantom.TISSUES.index("lung")].mean()
    air = image[subject.tissues == phantom.TISSUES.index("air")].mean()
    assert blood > 2 * myocardium and rv_blood > 1.5 * myocardium
    assert lung < 0.5 * myocardium and air < lung + 30


def test_partial_volume_blends_edges_while_labels_stay_crisp():
    """Without noise and coil shading a binary rendering would give the LV two grey values."""
    flat = dataclasses.replace(phantom.DEFAULTS, coil_shading=0.0)
    s = phantom.make_subject(8, noise=0.0, defaults=flat, **SMALL)
    image, label = s.image_array()[0], s.label_array()[0]
    lv = np.isin(label, [phantom.LABEL_MYOCARDIUM, phantom.LABEL_LV])
    assert len(np.unique(image[lv])) > 20
    assert set(np.unique(label)) == {0, 1, 2, 3}


def test_radial_motion_keeps_the_lv_centre_and_shrinks_the_cavity(subject, labels):
    k = mid_slice(labels, subject.ed)
    spacing = np.array(subject.images[0].GetSpacing()[:2])
    ed, es = labels[subject.ed, k] == phantom.LABEL_LV, labels[subject.es, k] == phantom.LABEL_LV
    centre_ed = np.array(ndimage.center_of_mass(ed))[::-1] * spacing
    centre_es = np.array(ndimage.center_of_mass(es))[::-1] * spacing
    radius_ed = np.sqrt(ed.sum() * spacing.prod() / np.pi)
    assert np.linalg.norm(centre_ed - centre_es) < 0.25 * radius_ed
    assert es.sum() < 0.75 * ed.sum()
    wall_ed = (labels[subject.ed, k] == phantom.LABEL_MYOCARDIUM).sum()
    assert (labels[subject.es, k] == phantom.LABEL_MYOCARDIUM).sum() > 0.8 * wall_ed


def test_the_long_axis_shortens_from_ed_to_es(subject, labels):
    def lv_slices(t):
        return (labels[t] == phantom.LABEL_LV).any(axis=(1, 2)).sum()

    assert lv_slices(subject.es) < lv_slices(subject.ed)


def test_apex_and_base_twist_in_opposite_directions(subject):
    apex, base = subject.twist_deg[:, 0], subject.twist_deg[:, 1]
    assert apex[subject.ed] == 0 and base[subject.ed] == 0
    assert 3 < apex[subject.es] < 15 and -8 < base[subject.es] < -1
    assert np.argmax(apex) == subject.es


def test_noise_is_rician_and_can_be_switched_off():
    noisy = phantom.make_subject(9, **SMALL)
    clean = phantom.make_subject(9, noise=0.0, **SMALL)
    air = ndimage.binary_erosion(noisy.tissues == phantom.TISSUES.index("air"), iterations=2)  # off the edges
    background = sitk.GetArrayFromImage(noisy.images[0])[air].astype(float)
    assert background.std() > 5 and background.min() >= 0 and background.mean() > 10  # magnitude: positive bias
    assert np.all(sitk.GetArrayFromImage(clean.images[0])[air] == 0)
    assert not np.array_equal(sitk.GetArrayFromImage(noisy.images[0]), sitk.GetArrayFromImage(noisy.images[1]))


# ----------------------------------------------------------------------------- montage and CLI


def assert_png(path, min_width=400, min_height=150):
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as png:
        png.verify()
    with Image.open(path) as png:
        assert png.width >= min_width and png.height >= min_height


def test_save_montage_from_a_subject_and_from_a_folder(subject, dataset, tmp_path):
    assert_png(phantom.save_montage(subject, tmp_path / "subject.png"))
    out, _ = dataset
    assert_png(phantom.save_montage(out, tmp_path / "nested" / "folder.png"))
    with pytest.raises(InputError):
        phantom.save_montage(subject, tmp_path / "montage.jpg")


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "ddm4d", "phantom", *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_writes_the_layout(tmp_path):
    result = run_cli(tmp_path / "out", "--subjects", 2, "--seed", 3, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and "patient001" in lines[0] and "EF" in lines[0]
    for name in ("patient001", "patient002"):
        folder = tmp_path / "out" / name
        info = read_info(folder / "Info.cfg")
        assert (folder / f"{name}_4d.nii.gz").is_file() and (folder / f"{name}_4d_gt.nii.gz").is_file()
        assert (folder / f"{name}_frame{int(info['ES']):02d}_gt.nii.gz").is_file()


def test_cli_montage_option(tmp_path):
    result = run_cli(tmp_path / "out", "--subjects", 1, "--size", 48, 48, 6, "--frames", 4,
                     "--montage", tmp_path / "m.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert_png(tmp_path / "m.png", min_width=200)


@pytest.mark.parametrize("case", ["zero subjects", "file as folder", "bad size", "system folder", "foreign patient"])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, case):
    taken = tmp_path / "taken.txt"
    taken.write_text("x")
    if case == "system folder" and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux /proc, a folder no one can write")
    (tmp_path / "data" / "patient001").mkdir(parents=True)
    (tmp_path / "data" / "patient001" / "notes.txt").write_text("a real patient's")
    args = {
        "zero subjects": (tmp_path / "out", "--subjects", 0),
        "file as folder": (taken, "--subjects", 1),
        "bad size": (tmp_path / "out", "--size", 4, 4, 4),
        "system folder": ("/proc/ddm4d-phantom", "--subjects", 1),
        "foreign patient": (tmp_path / "data", "--subjects", 1),
    }[case]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "error" in result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "data" / "patient001" / "notes.txt").read_text() == "a real patient's"
