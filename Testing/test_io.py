"""Reading every supported input, refusing each bad one with a message naming the file, atomic writes."""
from __future__ import annotations

import gzip
import locale
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import ddm4d.io as dio
from ddm4d.errors import InputError
from ddm4d.io import GeometryWarning, read_cine, read_image, read_info, read_labels, write_cine, write_image

REAL_CINE_DIR = Path(__file__).resolve().parents[2] / "shared/data/real-cine-2d"
DIRECTION = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # 90 degrees about z: axis mix-ups show


def volume(array=None, spacing=(0.8, 0.9, 3.0), origin=(10.0, -5.0, 20.0), direction=DIRECTION) -> sitk.Image:
    if array is None:
        array = (np.arange(5 * 12 * 10).reshape(5, 12, 10) % 97).astype(np.int16)
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing[: img.GetDimension()])
    img.SetOrigin(origin[: img.GetDimension()])
    if img.GetDimension() == 3:
        img.SetDirection(direction)
    return img


def same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6))


def write_dicom_series(folder: Path, img: sitk.Image, times: int = 1) -> None:
    """One DICOM file per slice (and per phase when times > 1, same positions: a classic cine).

    ITK's DICOM writer leaves the process's C locale at "C" (ASCII), which would break text decoding in
    every later test of this process (subprocess output with non-ASCII characters): restored after."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        _write_dicom_series(folder, img, times)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_dicom_series(folder: Path, img: sitk.Image, times: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    n = 0
    for t in range(times):
        for k in range(img.GetSize()[2]):
            s = img[:, :, k] + 100 * t
            n += 1
            tags = {
                "0008|0060": "MR", "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
                "0020|000e": "1.2.826.0.1.3680043.2.1125.1.2", "0008|0018": f"1.2.826.0.1.3680043.2.1125.1.2.{n}",
                "0020|0013": str(n), "0018|1060": f"{40.0 * t:.1f}", "0018|0050": "3.0",
                "0020|0032": "\\".join(f"{v:.6f}" for v in img.TransformIndexToPhysicalPoint((0, 0, k))),
                "0020|0037": "\\".join(f"{v:.6f}" for v in np.asarray(img.GetDirection()).reshape(3, 3).T.ravel()[:6]),
            }
            for key, value in tags.items():
                s.SetMetaData(key, value)
            writer.SetFileName(str(folder / f"im{n:03d}.dcm"))
            writer.Execute(s)


# ---------------------------------------------------------------------------------------------- reading

@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_read_image_formats_keep_geometry_and_values(tmp_path, ext):
    img = volume()
    path = tmp_path / f"vol{ext}"
    sitk.WriteImage(img, str(path))
    out = read_image(path)
    assert out.GetPixelID() == sitk.sitkFloat32 and out.GetDimension() == 3
    assert same_geometry(out, img)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(img).astype(np.float32))


def test_2d_file_becomes_a_single_slice_volume(tmp_path):
    sitk.WriteImage(volume(np.arange(120, dtype=np.float32).reshape(12, 10)), str(tmp_path / "slice.nii.gz"))
    out = read_image(tmp_path / "slice.nii.gz")
    assert out.GetSize() == (10, 12, 1) and out.GetSpacing()[:2] == pytest.approx((0.8, 0.9))


def test_dicom_series_folder(tmp_path):
    img = volume()
    write_dicom_series(tmp_path / "series", img)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # it has PixelSpacing: no GeometryWarning
        out = read_image(tmp_path / "series")
    assert same_geometry(out, img)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(img))
    info = read_info(tmp_path / "series")
    assert info.size == (10, 12, 5) and info.dimension == 3


def test_dicom_cine_series_folder_is_grouped_by_phase(tmp_path):
    img = volume()
    write_dicom_series(tmp_path / "cine", img, times=3)
    frames = read_cine(tmp_path / "cine")
    assert len(frames) == 3
    base = sitk.GetArrayFromImage(img).astype(np.float32)
    for t, frame in enumerate(frames):
        assert same_geometry(frame, img)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(frame), base + 100 * t)


def test_real_multiframe_cine_is_split_into_time_frames_with_a_spacing_warning():
    path = REAL_CINE_DIR / "heart_cine_16frames.dcm"
    if not path.is_file():
        pytest.skip(f"the real cine sample is not there ({path}); it lives in ../shared/data/real-cine-2d")
    with pytest.warns(GeometryWarning, match="PixelSpacing"):
        frames = read_cine(path)
    assert len(frames) == 16
    assert all(f.GetSize() == (256, 256, 1) and f.GetPixelID() == sitk.sitkFloat32 for f in frames)
    assert all(f.GetOrigin() == frames[0].GetOrigin() and f.GetSpacing() == frames[0].GetSpacing() for f in frames)
    assert frames[0].GetSpacing()[:2] == (1.0, 1.0)
    a0, a6 = (sitk.GetArrayFromImage(frames[i]) for i in (0, 6))
    assert not np.array_equal(a0, a6)  # the heart moves
    with pytest.raises(InputError, match="--source-frame and --target-frame") as info:
        read_image(path)
    assert "heart_cine_16frames.dcm" in str(info.value) and "16 frames" in str(info.value)


def test_read_cine_splits_a_4d_nifti_with_the_3d_geometry(tmp_path):
    frames = [volume(np.full((5, 12, 10), t, np.float32) + np.arange(10, dtype=np.float32)) for t in range(4)]
    path = write_cine(frames, tmp_path / "cine_4d.nii.gz")
    back = read_cine(path)
    assert len(back) == 4
    for t, f in enumerate(back):
        assert f.GetDimension() == 3 and same_geometry(f, frames[0])
        np.testing.assert_array_equal(sitk.GetArrayFromImage(f), sitk.GetArrayFromImage(frames[t]))
    with pytest.raises(InputError, match="not a cine"):
        read_cine(write_image(frames[1], tmp_path / "one.nii.gz"))


def test_read_cine_reads_a_slicer_sequence_nrrd(tmp_path):
    a = np.stack([np.full((3, 4, 5), 10 * t, np.int16) + np.arange(5, dtype=np.int16) for t in range(4)], axis=-1)
    header = ("NRRD0004\ntype: short\ndimension: 4\nspace: left-posterior-superior\nsizes: 4 5 4 3\n"
              "space directions: none (2,0,0) (0,2,0) (0,0,3)\nkinds: list domain domain domain\n"
              "endian: little\nencoding: raw\nspace origin: (1,2,3)\n\n")
    path = tmp_path / "frames.seq.nrrd"
    path.write_bytes(header.encode() + a.astype("<i2").tobytes())
    frames = read_cine(path)
    assert len(frames) == 4 and frames[2].GetSize() == (5, 4, 3)
    assert frames[2].GetSpacing() == (2.0, 2.0, 3.0) and frames[2].GetOrigin() == (1.0, 2.0, 3.0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(frames[2]), a[..., 2])


def test_read_labels_gives_uint8(tmp_path):
    lab = volume(np.random.default_rng(0).integers(0, 4, size=(5, 12, 10)).astype(np.int16))
    sitk.WriteImage(lab, str(tmp_path / "gt.nii.gz"))
    out = read_labels(tmp_path / "gt.nii.gz")
    assert out.GetPixelID() == sitk.sitkUInt8 and same_geometry(out, lab)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(lab))
    sitk.WriteImage(volume(np.full((5, 12, 10), 0.5, np.float32)), str(tmp_path / "soft.nii.gz"))
    with pytest.raises(InputError, match="soft.nii.gz"):
        read_labels(tmp_path / "soft.nii.gz")


# ------------------------------------------------------------------------------------------- bad inputs

def _bad(tmp_path: Path, kind: str) -> Path:
    if kind == "missing":
        return tmp_path / "missing_volume.nii.gz"
    if kind == "garbage":
        p = tmp_path / "garbage.nrrd"
        p.write_bytes(b"this is not an image\x00\x01" * 20)
        return p
    if kind == "garbage-gz":
        p = tmp_path / "garbage.nii.gz"
        p.write_bytes(b"this is not an image\x00\x01" * 20)
        return p
    if kind in ("truncated", "truncated-nii", "truncated-mha"):
        ext = {"truncated": ".nii.gz", "truncated-nii": ".nii", "truncated-mha": ".mha"}[kind]
        p = tmp_path / f"cut{ext}"
        sitk.WriteImage(volume(np.random.default_rng(0).random((5, 12, 10)).astype(np.float32)), str(p))
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
        return p
    if kind == "4d":
        p = tmp_path / "cine4d.nii.gz"
        sitk.WriteImage(sitk.JoinSeries([volume(), volume()]), str(p))
        return p
    if kind in ("nan", "inf"):
        a = np.ones((5, 12, 10), np.float32)
        a[2, 3, 4] = np.nan if kind == "nan" else np.inf
        p = tmp_path / f"with_{kind}.nrrd"
        sitk.WriteImage(volume(a), str(p))
        return p
    if kind in ("nan-nii", "all-nan-nii"):  # ITK's NIfTI reader turns NaN into 0: counted from the raw data
        a = np.ones((5, 12, 10), np.float32)
        if kind == "nan-nii":
            a[2, 3, 4], a[1, 1, 1] = np.nan, -np.inf
        else:
            a[...] = np.nan
        p = tmp_path / f"{kind}.nii.gz"
        sitk.WriteImage(volume(a), str(p))
        return p
    if kind == "constant":
        p = tmp_path / "blank.mha"
        sitk.WriteImage(volume(np.zeros((5, 12, 10), np.float32)), str(p))
        return p
    if kind == "vector":
        p = tmp_path / "field.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(np.ones((5, 12, 10, 3)), isVector=True), str(p))
        return p
    if kind == "empty-folder":
        p = tmp_path / "no_dicom_here"
        p.mkdir()
        return p
    raise AssertionError(kind)


@pytest.mark.parametrize("kind, words", [
    ("missing", ["not found"]),
    ("garbage", ["cannot be read"]),
    ("garbage-gz", ["corrupt"]),
    ("truncated", ["truncated"]),
    ("truncated-nii", ["truncated"]),
    ("truncated-mha", ["cannot be read"]),
    ("4d", ["4D (2 frames, 0..1)", "--source-frame and --target-frame"]),
    ("nan", ["NaN"]),
    ("inf", ["infinite"]),
    ("nan-nii", ["2 of its 600 voxels are NaN or infinite"]),
    ("all-nan-nii", ["every voxel (600) is NaN or infinite"]),
    ("constant", ["constant"]),
    ("vector", ["3 components"]),
    ("empty-folder", ["DICOM"]),
])
def test_bad_inputs_raise_one_clear_input_error_naming_the_file(tmp_path, kind, words):
    path = _bad(tmp_path, kind)
    with pytest.raises(InputError) as info:
        read_image(path)
    message = str(info.value)
    assert path.name in message
    for w in words:
        assert w in message
    assert "\n" not in message


# ---------------------------------------------------------------------------------------------- writing

def test_write_image_is_atomic_creates_folders_and_reads_back(tmp_path):
    img = sitk.Cast(volume(), sitk.sitkFloat32)
    target = tmp_path / "deep" / "er" / "frame_000.nii.gz"
    assert write_image(img, target) == target
    assert os.listdir(target.parent) == ["frame_000.nii.gz"]  # no temporary left behind
    back = read_image(target)
    assert same_geometry(back, img)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(img))
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # usual permissions, not mkstemp's 0600
    write_image(img * 2, target)  # overwrite in place
    assert os.listdir(target.parent) == ["frame_000.nii.gz"]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(target)), 2 * sitk.GetArrayFromImage(img))
    for ext in (".nrrd", ".mha", ".nii"):
        p = write_image(img, tmp_path / f"v{ext}")
        assert same_geometry(read_image(p), img)
    with pytest.raises(InputError, match="extension"):
        write_image(img, tmp_path / "v.png")


def test_failed_write_leaves_neither_temporary_nor_partial_file(tmp_path, monkeypatch):
    img = sitk.Cast(volume(), sitk.sitkFloat32)
    target = tmp_path / "out.nii.gz"
    write_image(img, target)
    before = target.read_bytes()

    def exploding(image, name, *args, **kwargs):
        Path(name).write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(dio.sitk, "WriteImage", exploding)
    for level in (None, 1):  # ITK's own gzip, and ours around the .nii ITK writes
        with pytest.raises(RuntimeError, match="disk full"):
            write_image(img * 3, target, level)
        assert os.listdir(tmp_path) == ["out.nii.gz"] and target.read_bytes() == before


def test_a_nifti_gz_is_compressed_at_the_level_asked_and_is_the_gzipped_nii(tmp_path):
    """ITK's NIfTI writer gzips at one level whatever it is asked; write_image honours 1-9, and the
    file is the .nii ITK writes, gzipped, without a name or time in its header (the same image gives
    the same bytes)."""
    img = sitk.Cast(volume(), sitk.sitkFloat32)
    noise = sitk.GetImageFromArray(np.random.default_rng(1).normal(0, 5, img.GetSize()[::-1]).astype(np.float32))
    noise.CopyInformation(img)
    noisy = img + noise
    raw = write_image(noisy, tmp_path / "raw.nii").read_bytes()
    sizes = {}
    for level in (1, 9):
        path = write_image(noisy, tmp_path / f"level{level}.nii.gz", level)
        data = path.read_bytes()
        assert gzip.decompress(data) == raw
        assert data[3] == 0 and data[4:8] == b"\0\0\0\0"  # FLG: no file name; MTIME 0
        assert write_image(noisy, tmp_path / "again.nii.gz", level).read_bytes() == data
        sizes[level] = len(data)
        back = read_image(path)
        assert same_geometry(back, noisy)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(noisy))
    assert sizes[1] > sizes[9]
    assert sorted(os.listdir(tmp_path)) == ["again.nii.gz", "level1.nii.gz", "level9.nii.gz", "raw.nii"]


def test_displacement_field_written_by_write_image_is_a_sitk_transform(tmp_path):
    ref = sitk.Cast(volume(), sitk.sitkFloat32)
    u = np.random.default_rng(0).normal(size=(5, 12, 10, 3))
    field = sitk.GetImageFromArray(u, isVector=True)
    field.CopyInformation(ref)
    for ext in (".nii.gz", ".nrrd", ".mha"):
        back = sitk.ReadImage(str(write_image(field, tmp_path / f"field{ext}")))
        assert back.GetNumberOfComponentsPerPixel() == 3 and same_geometry(back, ref)
        np.testing.assert_allclose(sitk.GetArrayFromImage(back), u, atol=1e-6)
        sitk.DisplacementFieldTransform(sitk.Cast(back, sitk.sitkVectorFloat64))
