"""Reading and writing images with one clear error per user mistake.

Everything returned here is a SimpleITK image in LPS millimetres (ITK's convention). Numpy arrays
taken from these images are in (z, y, x) order. Volumes come back as float32 scalar 3D images; a 2D
file becomes a single-slice 3D volume of size (nx, ny, 1) so the rest of ddm4d sees one kind of image.

Why the extra checks: SimpleITK reads a truncated NIfTI without complaint (the missing part comes back
as zeros), reads a multi-frame DICOM cine as a 3D volume whose "slices" are time frames, and reports
1 mm when a DICOM has no pixel spacing. Each of these would silently produce wrong results downstream.
"""
from __future__ import annotations

import gzip
import os
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .files import atomic_write

__all__ = [
    "GeometryWarning", "ImageInfo", "read_image", "read_labels", "read_cine", "write_image",
    "write_cine", "cine_image", "read_info", "check_complete", "WRITE_EXTENSIONS",
]

#: extensions write_image accepts (single-file formats only, so the write can be atomic)
WRITE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")

_TIME_TAGS = ("0018|1063", "0018|1065")  # FrameTime, FrameTimeVector
_TIME_POINTER_TAGS = ("(0018,1063)", "(0018,1065)", "(0018,1060)")  # … and TriggerTime


class GeometryWarning(UserWarning):
    """The file's geometry is incomplete (e.g. no pixel spacing) and a default was assumed."""


@dataclass(frozen=True)
class ImageInfo:
    """Header facts read without loading pixels (sizes and spacings in ITK order x, y, z[, t]; mm)."""

    path: Path
    dimension: int
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    components: int
    pixel_id: int
    n_frames: int = 1  # > 1 for a multi-frame DICOM cine (its third axis is then time)
    metadata: dict | None = None


# --------------------------------------------------------------------------------------------- helpers

def _name(path: Path) -> str:
    return str(path)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for ext in (".seq.nrrd", ".nii.gz"):
        if name.endswith(ext):
            return ext
    return path.suffix.lower()


def _require_exists(path: Path) -> None:
    if not path.exists():
        hint = ""
        if path.parent.is_dir():
            near = sorted(p.name for p in path.parent.iterdir() if p.name.split(".")[0] == path.name.split(".")[0])
            if near:
                hint = f" (found {', '.join(near[:5])} in the same folder)"
        raise InputError(f"{_name(path)}: file not found{hint}; check the path")


@dataclass(frozen=True)
class _NiftiHeader:
    endian: str
    datatype: int
    bitpix: int
    voxels: int
    vox_offset: int


def _nifti_header(path: Path) -> _NiftiHeader | None:
    """The facts of a NIfTI-1/2 header that ITK's reader does not report; None if not NIfTI."""
    opener = gzip.open if _suffix(path) == ".nii.gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(540)
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{_name(path)}: cannot be decompressed ({exc}); the file is corrupt or truncated, "
                         "export it again") from None
    if len(head) < 348:
        return None
    for endian in "<>":
        (sizeof_hdr,) = struct.unpack(endian + "i", head[:4])
        if sizeof_hdr == 348:  # NIfTI-1
            dims = struct.unpack(endian + "8h", head[40:56])
            (datatype, bitpix) = struct.unpack(endian + "2h", head[70:74])
            (vox_offset,) = struct.unpack(endian + "f", head[108:112])
            break
        if sizeof_hdr == 540 and len(head) >= 540:  # NIfTI-2
            (datatype, bitpix) = struct.unpack(endian + "2h", head[12:16])
            dims = struct.unpack(endian + "8q", head[16:80])
            (vox_offset,) = struct.unpack(endian + "q", head[168:176])
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0:
        return None
    n = 1
    for d in dims[1:ndim + 1]:
        n *= max(int(d), 1)
    return _NiftiHeader(endian, int(datatype), int(bitpix), n, int(vox_offset))


def _nifti_expected_bytes(path: Path) -> int | None:
    """Bytes a complete (uncompressed) .nii file must hold, from its header; None if not NIfTI-1/2."""
    header = _nifti_header(path)
    return None if header is None else header.vox_offset + header.voxels * header.bitpix // 8


#: NIfTI datatype codes of real floating-point voxels (float32, float64), the ones that can hold NaN
_NIFTI_FLOATS = {16: "f4", 64: "f8"}
_SCAN_BYTES = 1 << 22  # read the voxel data in pieces of this size when counting NaN


def _nifti_nonfinite(path: Path) -> tuple[int, int]:
    """(NaN or infinite voxels, all voxels) in a NIfTI file's raw data: ITK's NIfTI reader turns NaN
    and inf into 0 (an all-NaN image then looks constant, some NaN look like real zeros)."""
    header = _nifti_header(path) if _suffix(path) in (".nii", ".nii.gz") else None
    if header is None or header.datatype not in _NIFTI_FLOATS:
        return 0, 0 if header is None else header.voxels
    dtype = np.dtype(header.endian + _NIFTI_FLOATS[header.datatype])
    step = _SCAN_BYTES - _SCAN_BYTES % dtype.itemsize
    bad, left = 0, header.voxels * dtype.itemsize
    opener = gzip.open if _suffix(path) == ".nii.gz" else open
    with opener(path, "rb") as f:
        f.seek(header.vox_offset)
        while left > 0:
            chunk = f.read(min(step, left))
            if not chunk:
                break
            values = np.frombuffer(chunk[:len(chunk) - len(chunk) % dtype.itemsize], dtype=dtype)
            bad += int(values.size - np.count_nonzero(np.isfinite(values)))
            left -= len(chunk)
    return bad, header.voxels


def check_complete(path: str | os.PathLike) -> None:
    """Refuse a truncated NIfTI file (SimpleITK would read it, filling the missing voxels with zeros).

    Cheap: compares the size the header promises with the file size (.nii) or with the gzip trailer's
    uncompressed size (.nii.gz), decompressing the whole stream only when those disagree.
    Other formats are left to their readers, which do report truncation.
    """
    path = Path(path)
    ext = _suffix(path)
    if ext not in (".nii", ".nii.gz") or not path.is_file():
        return
    expected = _nifti_expected_bytes(path)
    if expected is None:
        return
    truncated = f"{_name(path)}: the file is truncated (its header promises {expected} bytes of image data " \
                "but the file ends early); copy or export it again"
    if ext == ".nii":
        if path.stat().st_size < expected:
            raise InputError(truncated)
        return
    size = path.stat().st_size
    if size >= 18 and expected < 2 ** 32:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            (isize,) = struct.unpack("<I", f.read(4))
        if isize == expected:
            return
    # trailer disagrees (or the file is huge): decompress to be sure, counting the bytes
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                total += len(chunk)
    except (EOFError, OSError, zlib.error):
        raise InputError(truncated) from None
    if total < expected:
        raise InputError(truncated)


def _dicom_series_files(folder: Path) -> list[str]:
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's "No Series were found": we say it better
    try:
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    if not ids:
        raise InputError(f"{_name(folder)}: is a folder without a DICOM series; pass an image file "
                         "(.nii.gz, .nrrd, .mha) or a folder holding the DICOM files of one series")
    if len(ids) > 1:
        raise InputError(f"{_name(folder)}: holds {len(ids)} DICOM series ({', '.join(ids[:4])}…); "
                         "put each series in its own folder and pass that folder")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0]))


def _file_reader(path: Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(_unreadable(path, exc)) from None
    return reader


def _unreadable(path: Path, exc: Exception) -> str:
    last = [line for line in str(exc).splitlines() if line.strip()]
    why = last[-1].strip() if last else type(exc).__name__
    if "Unable to determine ImageIO" in why:
        why = "not an image format SimpleITK knows"
    elif "No such file" in why and path.exists():
        why = "its pixel data could not be read completely"
    return (f"{_name(path)}: cannot be read as an image ({why}); pass a NIfTI, NRRD, MHA or DICOM file "
            "(or a DICOM series folder) — the file may be corrupt or truncated")


def _metadata(reader) -> dict[str, str]:
    try:
        return {k: reader.GetMetaData(k).strip() for k in reader.GetMetaDataKeys()}
    except RuntimeError:
        return {}


def _multiframe_cine_frames(meta: dict[str, str]) -> int:
    """Number of time frames when the DICOM is a multi-frame cine (time along the third axis), else 0."""
    try:
        n = int(float(meta.get("0028|0008", "0") or 0))
    except ValueError:
        return 0
    if n <= 1:
        return 0
    pointer = meta.get("0028|0009", "").replace(" ", "").upper()
    if any(t in meta for t in _TIME_TAGS) or any(p.upper() in pointer for p in _TIME_POINTER_TAGS):
        return n
    return 0


def _is_dicom(path: Path, meta: dict[str, str]) -> bool:
    return path.is_dir() or "0008|0016" in meta or "0028|0010" in meta or _suffix(path) in (".dcm", ".ima")


def _warn_missing_spacing(path: Path, meta: dict[str, str]) -> None:
    if "0028|0030" not in meta and "0018|1164" not in meta:
        warnings.warn(f"{_name(path)}: has no PixelSpacing (0028,0030); the spacing is unknown and 1 mm is "
                      "assumed, so sizes in mm (and the model grid) are only approximate",
                      GeometryWarning, stacklevel=3)


def read_info(path: str | os.PathLike) -> ImageInfo:
    """Header of an image file or DICOM series folder, without its pixels (for cheap data-set checks)."""
    path = Path(path)
    _require_exists(path)
    if path.is_dir():
        files = _dicom_series_files(path)
        reader = _file_reader(Path(files[0]))
        meta = _metadata(reader)
        size = list(reader.GetSize())
        frames = _multiframe_cine_frames(meta) if len(files) == 1 else 0
        if len(files) > 1 and reader.GetDimension() == 3:
            size[2] = len(files)
        return ImageInfo(path, reader.GetDimension(), tuple(size), reader.GetSpacing(), reader.GetOrigin(),
                         reader.GetDirection(), reader.GetNumberOfComponents(), reader.GetPixelID(),
                         max(frames, 1), meta)
    reader = _file_reader(path)
    meta = _metadata(reader)
    frames = _multiframe_cine_frames(meta) if _is_dicom(path, meta) else 0
    return ImageInfo(path, reader.GetDimension(), tuple(reader.GetSize()), reader.GetSpacing(),
                     reader.GetOrigin(), reader.GetDirection(), reader.GetNumberOfComponents(),
                     reader.GetPixelID(), max(frames, 1), meta)


def _execute(path: Path, reader) -> sitk.Image:
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise InputError(_unreadable(path, exc)) from None


def _load(path: Path) -> tuple[sitk.Image, dict[str, str]]:
    """Pixels and metadata of a file or a DICOM series folder (no checks beyond readability)."""
    _require_exists(path)
    if path.is_dir():
        files = _dicom_series_files(path)
        meta = _metadata(_file_reader(Path(files[0])))
        if len(files) == 1:
            reader = sitk.ImageFileReader()
            reader.SetFileName(files[0])
        else:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
        return _execute(path, reader), meta
    check_complete(path)
    bad, total = _nifti_nonfinite(path)
    if bad:
        raise InputError(_nonfinite_message(path, bad, total))
    reader = _file_reader(path)
    meta = _metadata(reader)
    return _execute(path, reader), meta


def _check_scalar(path: Path, image: sitk.Image) -> None:
    n = image.GetNumberOfComponentsPerPixel()
    if n != 1:
        raise InputError(f"{_name(path)}: has {n} components per voxel (a vector, RGB or displacement-field "
                         "image); pass a scalar (grayscale) volume")
    if "complex" in image.GetPixelIDTypeAsString():
        raise InputError(f"{_name(path)}: has complex voxels; pass a magnitude (real-valued) volume")


def _nonfinite_message(path: Path, bad: int, total: int) -> str:
    what = f"every voxel ({total}) is" if bad == total else f"{bad} of its {total} voxels are"
    return (f"{_name(path)}: {what} NaN or infinite; fix or mask them (e.g. replace NaN by 0) before using "
            "the image")


def _check_values(path: Path, array: np.ndarray) -> None:
    finite = np.isfinite(array)
    if not finite.all():
        raise InputError(_nonfinite_message(path, int(array.size - np.count_nonzero(finite)), int(array.size)))
    lo, hi = float(array.min()), float(array.max())
    if lo == hi:
        raise InputError(f"{_name(path)}: is constant (every voxel is {lo:g}), an empty image; check that "
                         "the right file was exported")


def _as_3d(image: sitk.Image) -> sitk.Image:
    if image.GetDimension() == 2:
        return sitk.JoinSeries([image])  # (nx, ny, 1), z spacing 1 mm, 3x3 direction extended by identity
    return image


def _frame(array: np.ndarray, origin, spacing, direction) -> sitk.Image:
    frame = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    frame.SetOrigin(tuple(float(v) for v in origin))
    frame.SetSpacing(tuple(float(v) for v in spacing))
    frame.SetDirection(tuple(float(v) for v in direction))
    return frame


def _direction_3x3(image: sitk.Image) -> tuple[float, ...]:
    d = np.asarray(image.GetDirection(), dtype=float)
    dim = image.GetDimension()
    return tuple(d.reshape(dim, dim)[:3, :3].ravel())


# ----------------------------------------------------------------------------------------------- reading

def read_image(path: str | os.PathLike) -> sitk.Image:
    """One 3D volume as a float32 scalar image (LPS mm); a 2D file becomes a single slice (nx, ny, 1).

    Accepts what SimpleITK reads (NIfTI, NRRD, MHA, DICOM file or series folder, …); refuses 4D data,
    multi-frame cines, vector images, truncated files, NaN/inf and constant images with an InputError.
    """
    path = Path(path)
    image, meta = _load(path)
    _check_scalar(path, image)
    dim = image.GetDimension()
    if dim == 4:
        t = image.GetSize()[3]
        if t != 1:
            raise InputError(f"{_name(path)}: is 4D ({t} frames, 0..{t - 1}); choose frames with --source-frame "
                             "and --target-frame (Python: source_frame=, target_frame=)")
        image = _frame(sitk.GetArrayViewFromImage(image)[0], image.GetOrigin()[:3], image.GetSpacing()[:3],
                       _direction_3x3(image))
    elif dim not in (2, 3):
        raise InputError(f"{_name(path)}: is {dim}D; pass a 3D volume (or a single 2D slice)")
    if _is_dicom(path, meta):
        frames = _multiframe_cine_frames(meta)
        if frames:
            raise InputError(f"{_name(path)}: is a multi-frame DICOM cine ({frames} frames, 0..{frames - 1}); "
                             "choose frames with --source-frame and --target-frame (Python: source_frame=, "
                             "target_frame=)")
        _warn_missing_spacing(path, meta)
    image = _as_3d(sitk.Cast(image, sitk.sitkFloat32))
    _check_values(path, sitk.GetArrayViewFromImage(image))
    return image


def read_labels(path: str | os.PathLike) -> sitk.Image:
    """A label map (0 background, 1, 2, … structures) as a uint8 3D image with its exact geometry."""
    path = Path(path)
    image, _ = _load(path)
    _check_scalar(path, image)
    if image.GetDimension() not in (2, 3):
        raise InputError(f"{_name(path)}: a label map must be 3D (or 2D), got {image.GetDimension()}D; "
                         "pass the labels of one frame")
    array = sitk.GetArrayViewFromImage(image)
    _check_label_values(path, array, max_label=255)
    out = sitk.Cast(image, sitk.sitkUInt8) if image.GetPixelID() != sitk.sitkUInt8 else image
    return _as_3d(out)


def _check_label_values(path: Path, array: np.ndarray, max_label: int,
                        allowed: Sequence[int] | None = None) -> None:
    if not np.isfinite(array).all() or (array != np.round(array)).any():
        raise InputError(f"{_name(path)}: is not a label map (it holds non-integer values); pass the "
                         "segmentation file (e.g. *_gt.nii.gz), not an intensity image")
    values = np.unique(array).astype(np.int64)
    if allowed is not None:
        bad = sorted(set(values.tolist()) - set(allowed))
        if bad:
            raise InputError(f"{_name(path)}: holds label value(s) {bad}; expected only {sorted(allowed)}")
    elif values.min() < 0 or values.max() > max_label:
        raise InputError(f"{_name(path)}: holds label values from {values.min()} to {values.max()}; "
                         f"labels must be integers in 0..{max_label}")


def read_cine(path: str | os.PathLike) -> list[sitk.Image]:
    """Frames of a cine as float32 3D images sharing one geometry (the 3D part of the file's, LPS mm).

    A 4D file (x, y, z, t) is split along t. A multi-frame DICOM cine (NumberOfFrames > 1 with a
    FrameTime / frame increment pointer) is read by SimpleITK as a volume whose third axis is time: it
    is split into single-slice frames (nx, ny, 1) that all keep the acquisition's slice position and
    take the slice thickness as z spacing. Missing PixelSpacing: a GeometryWarning, 1 mm assumed.
    A DICOM series folder whose files repeat slice positions (one file per slice and phase) is
    grouped into frames by trigger time / instance number. A Slicer sequence (.seq.nrrd, its list axis
    read as vector components) gives one frame per item.
    """
    path = Path(path)
    _require_exists(path)
    if path.is_dir():
        files = _dicom_series_files(path)
        if len(files) > 1:
            return _read_dicom_cine_series(path, files)
    image, meta = _load(path)
    if image.GetDimension() in (2, 3) and image.GetNumberOfComponentsPerPixel() > 1 \
            and _suffix(path) == ".seq.nrrd":
        # Slicer's .seq.nrrd: the list axis is read as vector components, one per sequence item
        frames_img = [sitk.VectorIndexSelectionCast(image, i, sitk.sitkFloat32)
                      for i in range(image.GetNumberOfComponentsPerPixel())]
        frames = [_as_3d(f) for f in frames_img]
        _check_values(path, np.stack([sitk.GetArrayViewFromImage(f) for f in frames]))
        return frames
    _check_scalar(path, image)
    dim = image.GetDimension()
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    if dim == 4:
        origin, spacing, direction = image.GetOrigin()[:3], image.GetSpacing()[:3], _direction_3x3(image)
        frames = [_frame(array[t], origin, spacing, direction) for t in range(array.shape[0])]
    elif dim == 3 and _is_dicom(path, meta) and _multiframe_cine_frames(meta):
        _warn_missing_spacing(path, meta)
        spacing = list(image.GetSpacing())
        spacing[2] = _slice_thickness(meta)
        origin, direction = image.GetOrigin(), image.GetDirection()
        frames = [_frame(array[t:t + 1], origin, spacing, direction) for t in range(array.shape[0])]
    else:
        raise InputError(f"{_name(path)}: is a {dim}D image, not a cine; pass a 4D file (x, y, z, t) such "
                         "as patient001_4d.nii.gz, a multi-frame DICOM cine, or use read_image for one volume")
    _check_values(path, array)
    return frames


def _slice_thickness(meta: dict[str, str]) -> float:
    for tag in ("0018|0050", "0018|0088"):  # SliceThickness, SpacingBetweenSlices
        try:
            value = float(meta.get(tag, "").split("\\")[0])
        except ValueError:
            continue
        if value > 0:
            return value
    return 1.0


def _read_dicom_cine_series(folder: Path, files: list[str]) -> list[sitk.Image]:
    """Classic cine series: one file per (slice position, phase); frames ordered by trigger time."""
    entries = []
    for f in files:
        r = _file_reader(Path(f))
        meta = _metadata(r)
        pos = tuple(round(float(v), 3) for v in meta.get("0020|0032", "0\\0\\0").split("\\")[:3])
        try:
            when = float(meta.get("0018|1060", "") or meta.get("0020|0013", "0"))
        except ValueError:
            when = 0.0
        entries.append((pos, when, f, meta))
    positions = sorted({e[0] for e in entries})
    per_pos = {p: sorted((e for e in entries if e[0] == p), key=lambda e: e[1]) for p in positions}
    counts = {len(v) for v in per_pos.values()}
    if len(counts) != 1 or counts == {1}:
        raise InputError(f"{_name(folder)}: is a DICOM series of {len(files)} files that is not a cine (each "
                         "slice position must appear once per phase); pass one volume with read_image")
    n_t = counts.pop()
    frames = []
    for t in range(n_t):
        names = [per_pos[p][t][2] for p in positions]
        if len(names) > 1:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(_sort_along_normal(names))
        else:
            reader = sitk.ImageFileReader()
            reader.SetFileName(names[0])
        image = _execute(folder, reader)
        _check_scalar(folder, image)
        frames.append(_as_3d(sitk.Cast(image, sitk.sitkFloat32)))
    _warn_missing_spacing(folder, entries[0][3])
    ref = frames[0]
    for f in frames[1:]:  # identical geometry for every frame (ITK may differ in the last digits)
        f.CopyInformation(ref)
    _check_values(folder, np.stack([sitk.GetArrayViewFromImage(f) for f in frames]))
    return frames


def _sort_along_normal(names: list[str]) -> list[str]:
    def key(name: str) -> float:
        r = _file_reader(Path(name))
        meta = _metadata(r)
        iop = [float(v) for v in meta.get("0020|0037", "1\\0\\0\\0\\1\\0").split("\\")[:6]]
        normal = np.cross(iop[:3], iop[3:])
        ipp = [float(v) for v in meta.get("0020|0032", "0\\0\\0").split("\\")[:3]]
        return float(np.dot(normal, ipp))
    return sorted(names, key=key)


# ----------------------------------------------------------------------------------------------- writing

def write_image(image: sitk.Image, path: str | os.PathLike, compression: int | None = None) -> Path:
    """Write by extension (.nii.gz, .nii, .nrrd, .mha) atomically: a reader never sees a partial file.

    The image goes to a temporary file in the destination folder, then os.replace puts it in place;
    parent folders are created. `compression`: None, ITK's default (NRRD and MHA compressed, NIfTI by
    its name: .nii.gz or .nii); 0, none (NRRD and MHA raw); 1-9, compressed at that zlib level. Returns
    the path.
    """
    if not isinstance(image, sitk.Image):
        raise TypeError(f"write_image needs a SimpleITK image, got {type(image).__name__}")
    path = Path(path)
    ext = _suffix(path)
    if ext not in WRITE_EXTENSIONS:
        raise InputError(f"{_name(path)}: unsupported output extension {ext or '(none)'!r}; use one of "
                         f"{', '.join(WRITE_EXTENSIONS)}")
    if compression is not None and not 0 <= compression <= 9:
        raise ValueError(f"compression must be 0 (none) to 9, got {compression}")
    compress = ext in (".nrrd", ".mha") if compression is None else compression > 0
    if ext == ".nii.gz" and compress and compression is not None:
        return atomic_write(path, lambda tmp: _write_nifti_gz(image, tmp, compression), suffix=ext)
    level = -1 if compression is None else compression
    return atomic_write(path, lambda tmp: sitk.WriteImage(image, tmp, useCompression=compress,
                                                          compressionLevel=level), suffix=ext)


def _write_nifti_gz(image: sitk.Image, path: str, level: int) -> None:
    """A .nii.gz at zlib `level`: the .nii ITK writes, gzipped (a .nii.gz is exactly that).

    Why not ITK's: its NIfTI writer compresses at one level whatever it is asked, 2.5x slower than
    level 1 (a float32 frame of 128 x 128 x 32: 69 against 28 ms); writing .nii.gz files was most of
    `ddm4d generate`'s writing time. No file name and time stamp in the gzip header: the same image
    gives the same bytes."""
    raw = path[:-len(".gz")]  # the temporary's name with .nii last, which ITK's NIfTI writer takes
    try:
        sitk.WriteImage(image, raw, useCompression=False)
        with open(raw, "rb") as src, open(path, "wb") as out, \
                gzip.GzipFile(filename="", mode="wb", compresslevel=level, fileobj=out, mtime=0) as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
    finally:
        try:
            os.unlink(raw)
        except FileNotFoundError:
            pass


def write_cine(frames: Sequence[sitk.Image], path: str | os.PathLike, frame_time: float = 1.0,
               compression: int | None = None) -> Path:
    """Write 3D frames of one geometry as a 4D file (x, y, z, t); `frame_time` is the t spacing.

    2D frames become single slices (x, y, 1, t): NIfTI keeps time on its fourth axis, and read_cine
    reads the file back."""
    return write_image(cine_image(frames, frame_time), path, compression)


def cine_image(frames: Sequence[sitk.Image], frame_time: float = 1.0) -> sitk.Image:
    """The 4D image write_cine writes: the frames joined along t, 2D frames as single slices."""
    frames = list(frames)
    if not frames:
        raise ValueError("write_cine needs at least one frame")
    ref = frames[0]
    for i, f in enumerate(frames[1:], 1):
        if f.GetSize() != ref.GetSize() or not np.allclose(f.GetSpacing(), ref.GetSpacing()) \
                or not np.allclose(f.GetOrigin(), ref.GetOrigin(), atol=1e-4) \
                or not np.allclose(f.GetDirection(), ref.GetDirection(), atol=1e-6):
            raise ValueError(f"write_cine: frame {i} has a different geometry from frame 0")
    if ref.GetDimension() not in (2, 3):
        raise ValueError(f"write_cine needs 2D or 3D frames, got {ref.GetDimension()}D")
    same = [sitk.Image(_as_3d(f)) for f in frames]  # copies: the caller's frames keep their geometry
    ref = same[0]
    for f in same[1:]:
        f.CopyInformation(ref)
    return sitk.JoinSeries(same, 0.0, float(frame_time))
