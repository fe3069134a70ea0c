"""The images `ddm4d generate` takes: volumes or frames of a cine, checked, as float32 3D images of its own
(a 2D input becomes a single slice, marked so that the results go back to 2D), and labels on the source grid.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .geometry import _check_overlap, resample_to_reference, same_geometry
from .io import read_cine, read_image, read_info, read_labels


def read_pair(source, target, source_frame: int | None, target_frame: int | None) -> tuple[sitk.Image, sitk.Image]:
    """Source and target images, each a volume or one frame of a cine."""
    if target is None:
        if source_frame is None or target_frame is None:
            raise InputError("give a target, or a cine as source with --source-frame and --target-frame")
        target = source
    cines: dict[int, list[sitk.Image]] = {}

    def frame_of(value, index: int | None, what: str) -> sitk.Image:
        if index is None:
            return as_image(value, what)
        if isinstance(value, sitk.Image):
            raise InputError(f"--{what}-frame needs a cine (a 4D file, a multi-frame DICOM or a DICOM cine "
                             f"series), but the {what} is one image")
        key = id(value) if not isinstance(value, (str, os.PathLike)) else hash(str(value))
        if key not in cines:
            cines[key] = [as_image(f, what) for f in value] if isinstance(value, (list, tuple)) else read_cine(value)
        frames = cines[key]
        if not 0 <= int(index) < len(frames):
            raise InputError(f"--{what}-frame {index} is out of range: the cine has {len(frames)} frames "
                             f"(0..{len(frames) - 1})")
        return as_image(frames[int(index)], what)

    return frame_of(source, source_frame, "source"), frame_of(target, target_frame, "target")


def as_image(value, what: str) -> sitk.Image:
    """A float32 3D image of our own (a 2D input becomes a single slice, marked so that the result
    goes back to 2D: see in_input_dims)."""
    if isinstance(value, sitk.Image):
        if value.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(f"the {what} image has {value.GetNumberOfComponentsPerPixel()} components; give a scalar volume")
        if value.GetDimension() == 4:
            raise InputError(f"the {what} image is 4D; pass one frame")
        planar = value.GetDimension() == 2 or value.HasMetaDataKey(PLANAR_KEY)  # (a frame as_image made)
        img = sitk.Cast(value, sitk.sitkFloat32)
        if planar:
            img = sitk.JoinSeries(img)
        arr = sitk.GetArrayViewFromImage(img)
        finite = np.count_nonzero(np.isfinite(arr))
        if finite < arr.size:
            bad = f"every voxel ({arr.size}) is" if finite == 0 else f"{arr.size - finite} of its {arr.size} voxels are"
            raise InputError(f"the {what} image: {bad} NaN or infinite; fix or mask them (e.g. replace NaN by 0) "
                             "first")
        if float(arr.max()) == float(arr.min()):
            raise InputError(f"the {what} image is constant (empty); give an image with content")
    else:
        img = read_image(value)
        planar = not Path(value).is_dir() and read_info(value).dimension == 2
    return _mark_planar(img, planar)


def as_labels(seg, source: sitk.Image) -> sitk.Image:
    labels = seg if isinstance(seg, sitk.Image) else read_labels(seg)
    if labels.GetDimension() == 2:
        labels = sitk.JoinSeries(labels)
    labels = sitk.Cast(labels, sitk.sitkUInt8)
    if not same_geometry(labels, source):
        _check_overlap(source, labels, "the source image", "the label map (--seg)",
                       fix="pass the labels drawn on this source, or fix the origin/direction of one of the files")
        labels = resample_to_reference(labels, source, "nearest", 0)
    return labels


#: metadata key on generate's own copy of a source that was a true 2D image (no third axis)
PLANAR_KEY = "ddm4d_planar_input"


def _mark_planar(image: sitk.Image, planar: bool) -> sitk.Image:
    if planar:
        image.SetMetaData(PLANAR_KEY, "1")
    elif image.HasMetaDataKey(PLANAR_KEY):  # read from a file, not set by us
        image.EraseMetaData(PLANAR_KEY)
    return image


def in_input_dims(source: sitk.Image, *image_lists: list[sitk.Image]) -> tuple[list[sitk.Image], ...]:
    """2D in, 2D out: frames, fields and labels made on single slices go back to the exact 2D geometry
    of a 2D source (fields with their two in-plane components). The one place that converts."""
    if not source.HasMetaDataKey(PLANAR_KEY):
        return image_lists
    return tuple([_to_2d(img) for img in images] for images in image_lists)


def _to_2d(image: sitk.Image) -> sitk.Image:
    vector = image.GetNumberOfComponentsPerPixel() > 1
    array = sitk.GetArrayFromImage(image)[0]  # (y, x[, components x y z])
    out = sitk.GetImageFromArray(array[..., :2] if vector else array, isVector=vector)
    d = image.GetDirection()
    out.SetOrigin(image.GetOrigin()[:2])
    out.SetSpacing(image.GetSpacing()[:2])
    out.SetDirection((d[0], d[1], d[3], d[4]))
    return out
