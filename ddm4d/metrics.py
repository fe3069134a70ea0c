"""Image and segmentation metrics of the paper's Table 1, in plain numpy.

Why numpy only: the same numbers must come out of the CLI, the Slicer modules and notebooks, with
no device or framework in between. Units are stated per function.

- :func:`psnr`  peak signal-to-noise ratio, dB (:func:`psnr_from_mse` for a pooled MSE).
- :func:`nmse`  normalised mean squared error ||pred - ref||^2 / ||ref||^2, a plain ratio (unitless).
  The paper's table header says "NMSE (x1e-8)"; its scale is not defined in the paper or in the
  authors' published code, so ddm4d reports the plain ratio and says so instead of guessing a factor.
- :func:`dice`  Dice overlap per cardiac structure of ACDC label maps (unitless, 0..1).
- :func:`label_volumes_ml`  structure volumes in millilitres (1 mL = 1000 mm^3).
- :func:`ejection_fraction`  (EDV - ESV) / EDV as a fraction (0..1), from LV blood-pool volumes.

ACDC labels: 0 background, 1 RV cavity, 2 LV myocardium, 3 LV cavity (blood pool).
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "ACDC_STRUCTURES", "STRUCTURE_NAMES", "mse", "psnr", "psnr_from_mse", "nmse", "dice", "dice_coefficient",
    "label_volumes_ml", "ejection_fraction",
]

_LABEL_RV, _LABEL_MYOCARDIUM, _LABEL_LV = 1, 2, 3
_MM3_PER_ML = 1000.0

#: structure name -> the ACDC label values it is made of
ACDC_STRUCTURES: dict[str, tuple[int, ...]] = {
    "lv_blood_pool": (_LABEL_LV,),
    "lv_myocardium": (_LABEL_MYOCARDIUM,),
    "lv_epicardium": (_LABEL_MYOCARDIUM, _LABEL_LV),  # everything inside the LV epicardial surface
    "rv": (_LABEL_RV,),
    "total": (_LABEL_RV, _LABEL_MYOCARDIUM, _LABEL_LV),  # all foreground as one mask
}

#: human-readable names for tables and plots
STRUCTURE_NAMES: dict[str, str] = {
    "lv_blood_pool": "LV blood pool",
    "lv_myocardium": "LV myocardium",
    "lv_epicardium": "LV epicardium",
    "rv": "RV",
    "total": "total",
}


def _pair(pred, ref) -> tuple[np.ndarray, np.ndarray]:
    """Both as float64 arrays of one shape (float64: sums over millions of voxels stay exact enough)."""
    p = np.asarray(pred, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    if p.shape != r.shape:
        raise ValueError(f"pred has shape {p.shape} but ref has {r.shape}; compare images on one grid")
    if p.size == 0:
        raise ValueError("cannot compare empty arrays")
    if not (np.isfinite(p).all() and np.isfinite(r).all()):
        raise ValueError("pred and ref must be finite (no NaN or inf)")
    return p, r


def mse(pred, ref) -> float:
    """Mean squared error, in squared intensity units of the arrays."""
    p, r = _pair(pred, ref)
    return float(np.mean((p - r) ** 2))


def psnr_from_mse(mse_value: float, data_range: float) -> float:
    """10 log10(data_range^2 / MSE) in dB; +inf for MSE 0 (identical images).

    Also the way to average PSNR over frames without infinities: the PSNR of the mean MSE.
    """
    if not (mse_value >= 0):
        raise ValueError(f"MSE must be >= 0, got {mse_value}")
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    if mse_value == 0.0:
        return math.inf
    return 10.0 * math.log10(float(data_range) ** 2 / float(mse_value))


def psnr(pred, ref, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB: 10 log10(data_range^2 / MSE).

    `data_range` is the span of possible intensities in the units of the arrays; default: the
    reference's max - min. ddm4d's evaluation normalises both images with one map to the model's
    [-1, 1] range and passes data_range=2 (see ddm4d.evaluation). Identical arrays give +inf.
    """
    p, r = _pair(pred, ref)
    error = float(np.mean((p - r) ** 2))
    if error == 0.0:
        return math.inf
    span = float(r.max() - r.min()) if data_range is None else float(data_range)
    if span <= 0:
        raise ValueError("the reference is constant, so its max - min gives no data range; pass data_range")
    return psnr_from_mse(error, span)


def nmse(pred, ref) -> float:
    """Normalised mean squared error ||pred - ref||^2 / ||ref||^2 (a plain ratio, not scaled by 1e8).

    Not shift invariant: the value depends on where zero lies in the intensity scale, so compare
    NMSE only between methods evaluated on the same normalisation.
    """
    p, r = _pair(pred, ref)
    denominator = float(np.sum(r * r))
    if denominator == 0.0:
        raise ValueError("the reference is all zero, so NMSE (divided by ||ref||^2) is undefined")
    return float(np.sum((p - r) ** 2)) / denominator


def dice_coefficient(a, b) -> float:
    """2|A and B| / (|A| + |B|) of two boolean masks; NaN when both are empty (nothing to compare)."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    if total == 0:
        return math.nan
    return 2.0 * int(np.count_nonzero(a & b)) / total


def _structures(labels) -> Mapping[str, tuple[int, ...]]:
    """Accept a name -> values mapping, or a sequence of label values (each its own structure)."""
    if labels is None:
        return ACDC_STRUCTURES
    if isinstance(labels, Mapping):
        return {str(k): tuple(int(v) for v in np.atleast_1d(vs)) for k, vs in labels.items()}
    return {str(int(v)): (int(v),) for v in labels}


def dice(a, b, labels: Mapping[str, Iterable[int]] | Sequence[int] | None = None) -> dict[str, float]:
    """Dice per structure of two label maps on one grid (e.g. warped ED labels vs ES labels).

    `labels` maps a structure name to the label values that form it; default :data:`ACDC_STRUCTURES`
    (LV blood pool 3, LV myocardium 2, LV epicardium 2+3, RV 1, total = all foreground). A plain
    sequence of values gives one structure per value, named by the value. A structure absent from
    both maps gets NaN.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {a.shape} vs {b.shape}; resample one onto the other")
    return {name: dice_coefficient(np.isin(a, values), np.isin(b, values))
            for name, values in _structures(labels).items()}


def _labels_and_voxel_mm3(label_image, spacing) -> tuple[np.ndarray, float]:
    if hasattr(label_image, "GetSpacing"):  # a SimpleITK image carries its own spacing
        import SimpleITK as sitk

        spacing = label_image.GetSpacing() if spacing is None else spacing
        label_image = sitk.GetArrayViewFromImage(label_image)
    if spacing is None:
        raise ValueError("label_volumes_ml needs the voxel spacing (mm) for a plain array")
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.size == 0 or np.any(spacing <= 0):
        raise ValueError(f"spacing must be positive millimetres, got {spacing.tolist()}")
    return np.asarray(label_image), float(np.prod(spacing))


def label_volumes_ml(label_image, spacing: Sequence[float] | None = None,
                     labels: Mapping[str, Iterable[int]] | None = None) -> dict[str, float]:
    """Volume of each structure in mL: voxel count x voxel volume (product of `spacing`, mm^3) / 1000.

    `label_image` is a SimpleITK image (its spacing is used) or an array with `spacing` in mm (any
    axis order: only the product matters). Structures as in :func:`dice`, default ACDC.
    """
    array, voxel_mm3 = _labels_and_voxel_mm3(label_image, spacing)
    return {name: int(np.count_nonzero(np.isin(array, values))) * voxel_mm3 / _MM3_PER_ML
            for name, values in _structures(labels).items()}


def ejection_fraction(volumes: Sequence[float]) -> float:
    """(EDV - ESV) / EDV as a fraction, with EDV = max and ESV = min of the LV blood-pool volumes.

    `volumes` are the cavity volumes of the frames of one cycle (or just [EDV, ESV]), in any one
    unit. Max/min rather than first/last so a sequence that does not start exactly at ED still works.
    """
    v = np.asarray(volumes, dtype=np.float64).ravel()
    if v.size < 2:
        raise ValueError(f"ejection_fraction needs at least two volumes (ED and ES), got {v.size}")
    if not np.isfinite(v).all() or v.min() < 0:
        raise ValueError("volumes must be finite and non-negative")
    edv, esv = float(v.max()), float(v.min())
    if edv == 0.0:
        raise ValueError("all volumes are zero; the LV cavity is missing from the labels")
    return (edv - esv) / edv
