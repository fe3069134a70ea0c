"""Classical baselines that every motion figure is measured against (SimpleITK, no training).

- `demons`: diffeomorphic demons from the source to the target; frame gamma = the source warped
  by gamma times the displacement (a registration "scaled by gamma").
- `symmetric demons`: demons both ways; the source warped by gamma of its field, the target by
  1 - gamma of its own, cross-faded with weights (1 - gamma, gamma). On real ED -> ES cines this
  beats a plain linear blend, so it is the figure a motion model must beat.

Fields are physical (LPS mm, pull) on the source grid, like ddm4d.generation's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .geometry import resample_to_reference, same_geometry, warp_image


@dataclass(frozen=True)
class DemonsConfig:
    """Multi-resolution diffeomorphic demons: in-plane shrink factors, iterations per level, the
    Gaussian smoothing of the field (voxels) and histogram matching of the moving image."""

    shrink: tuple[int, ...] = (4, 2, 1)
    iterations: tuple[int, ...] = (50, 50, 30)
    field_sigma: float = 1.5
    histogram_matching: bool = True


def _shrink_factors(image: sitk.Image, factor: int) -> list[int]:
    """In-plane `factor`; a thick-slice axis shrinks only while it stays finer than in-plane."""
    spacing = image.GetSpacing()
    finest = min(spacing[:2])
    return [max(1, min(n // 4 or 1, int(round(factor * finest / s)) or 1)) for n, s in zip(image.GetSize(), spacing)]


def demons_field(fixed: sitk.Image, moving: sitk.Image, config: DemonsConfig = DemonsConfig()) -> sitk.Image:
    """Displacement (LPS mm, pull, on `fixed`'s grid) with moving(x + u(x)) ~ fixed(x)."""
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    if not same_geometry(fixed, moving):
        moving = resample_to_reference(moving, fixed, "linear")
    if fixed.GetDimension() == 3 and fixed.GetSize()[2] == 1:
        # a single slice (often oblique): register its pixels in-plane with an axis-aligned 2D grid,
        # then turn the in-plane displacement (along the image axes) into LPS: D @ (ux, uy, 0)
        plane = [sitk.GetImageFromArray(sitk.GetArrayViewFromImage(im)[0]) for im in (fixed, moving)]
        for im in plane:
            im.SetSpacing(fixed.GetSpacing()[:2])
        u = sitk.GetArrayFromImage(demons_field(*plane, config))  # (y, x, 2): along the image axes
        u3 = np.concatenate([u, np.zeros(u.shape[:-1] + (1,))], axis=-1) @ np.asarray(fixed.GetDirection()).reshape(3, 3).T
        field = sitk.GetImageFromArray(u3[None], isVector=True)
        field.CopyInformation(fixed)
        return field
    if config.histogram_matching:
        moving = sitk.HistogramMatching(moving, fixed, 256, 7, True)
    field = None
    for factor, iterations in zip(config.shrink, config.iterations):
        shrink = _shrink_factors(fixed, factor)
        sigma = [0.5 * f * s for f, s in zip(shrink, fixed.GetSpacing())]
        f = sitk.Shrink(sitk.SmoothingRecursiveGaussian(fixed, sigma), shrink) if max(shrink) > 1 else fixed
        m = sitk.Shrink(sitk.SmoothingRecursiveGaussian(moving, sigma), shrink) if max(shrink) > 1 else moving
        demons = sitk.DiffeomorphicDemonsRegistrationFilter()
        demons.SetNumberOfIterations(int(iterations))
        demons.SetStandardDeviations(float(config.field_sigma))
        demons.SmoothDisplacementFieldOn()
        if field is None:
            field = demons.Execute(f, m)
        else:
            field = demons.Execute(f, m, sitk.Resample(field, f, sitk.Transform(), sitk.sitkLinear, 0.0,
                                                       sitk.sitkVectorFloat64))
    if field.GetSize() != fixed.GetSize():
        field = sitk.Resample(field, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
    return sitk.Cast(field, sitk.sitkVectorFloat64)


def _scaled(field: sitk.Image, scale: float) -> sitk.Image:
    array = sitk.GetArrayFromImage(field) * float(scale)
    out = sitk.GetImageFromArray(array, isVector=True)
    out.CopyInformation(field)
    return out


def demons_frames(source: sitk.Image, target: sitk.Image, gammas: Sequence[float], symmetric: bool = False,
                  config: DemonsConfig = DemonsConfig()) -> tuple[list[sitk.Image], list[sitk.Image]]:
    """Frames on the source grid and the source's fields (gamma times the demons field)."""
    source, target = _on_source_grid(source, target)
    forward = demons_field(target, source, config)  # source(x + u) ~ target(x)
    backward = demons_field(source, target, config) if symmetric else None
    frames, fields = [], []
    for g in gammas:
        field = _scaled(forward, g)
        frame = warp_image(source, field, "linear")
        if backward is not None:
            frame = cross_fade(frame, warp_image(target, _scaled(backward, 1.0 - g), "linear"), g)
        frames.append(frame)
        fields.append(field)
    return frames, fields


def linear_blend(source: sitk.Image, target: sitk.Image, gammas: Sequence[float]) -> list[sitk.Image]:
    """(1 - gamma) source + gamma target on the source grid: no motion, a strong PSNR baseline."""
    source, target = _on_source_grid(source, target)
    return [cross_fade(source, target, g) for g in gammas]


def cross_fade(first: sitk.Image, second: sitk.Image, gamma: float) -> sitk.Image:
    """(1 - gamma) first + gamma second, voxel by voxel, in float32 (two images on one grid): the
    blend, and how symmetric methods join the source moved forward with the target moved back."""
    g = float(gamma)
    return sitk.Cast(first, sitk.sitkFloat32) * (1.0 - g) + sitk.Cast(second, sitk.sitkFloat32) * g


def _on_source_grid(source: sitk.Image, target: sitk.Image) -> tuple[sitk.Image, sitk.Image]:
    """Both as float32, the target resampled onto the source's grid where it is on another."""
    source, target = sitk.Cast(source, sitk.sitkFloat32), sitk.Cast(target, sitk.sitkFloat32)
    if not same_geometry(source, target):
        target = resample_to_reference(target, source, "linear")
    return source, target
