"""The voxel grid a subject is drawn on, and the partial-volume coverage of the analytic shapes on it.

The "grid frame" is the scanner slice frame in mm, axes along the image x (columns), y (rows) and z
(slices), centred on the grid; physical LPS = origin + direction · (spacing · index).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .defaults import SLICE_LIMITS, PhantomDefaults


@dataclass(frozen=True)
class _Grid:
    size: tuple[int, int, int]  # (nx, ny, nz), ITK order
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 3x3 row-major

    @property
    def shape(self) -> tuple[int, int, int]:
        """numpy (z, y, x) shape."""
        return self.size[2], self.size[1], self.size[0]

    @property
    def extent_mm(self) -> np.ndarray:
        return np.asarray(self.size, float) * np.asarray(self.spacing, float)

    def axes_mm(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Voxel-centre coordinates along x, y, z (grid frame, centred), broadcastable to (z, y, x)."""
        x, y, z = (
            ((np.arange(n, dtype=np.float32) - (n - 1) / 2) * s).astype(np.float32)
            for n, s in zip(self.size, self.spacing)
        )
        return x[None, None, :], y[None, :, None], z[:, None, None]

    def to_image(self, array: np.ndarray) -> sitk.Image:
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


def _rotation(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    """Rodrigues' rotation matrix about a unit axis."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle_rad) * k + (1 - np.cos(angle_rad)) * (k @ k)


def _random_unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def _draw_grid(rng, d: PhantomDefaults, size, spacing, needed_length_mm: float) -> _Grid:
    """ACDC-like grid: FOV fitted to the chest, slices covering the heart base to apex.

    A given size without spacing keeps a chest-sized FOV (small test grids get coarse voxels); a
    given spacing without size picks the size that covers that FOV and the heart."""
    n_draw = int(rng.integers(d.in_plane_size[0], d.in_plane_size[1] + 1))
    fov_fraction = rng.uniform()
    fov_draw = d.field_of_view_mm[0] + fov_fraction * np.ptp(d.field_of_view_mm)
    thickness_draw = rng.uniform(*d.slice_thickness_mm)
    rotation_axis, rotation_angle = _random_unit(rng), np.deg2rad(rng.uniform(*d.direction_rotation_deg))
    origin = rng.uniform(-d.origin_extent_mm, d.origin_extent_mm, size=3)

    if size is not None:
        nx, ny, nz = size
    else:
        nx = ny = n_draw
        nz = None
    if spacing is not None:
        sx, sy, sz = spacing
        if size is None:
            nx = ny = int(round(fov_draw / sx))
            nz = int(np.clip(np.ceil(needed_length_mm / sz), *SLICE_LIMITS))
    else:
        if size is None:  # the in-plane spacing of ACDC within the chest-sized FOV
            lo = max(d.field_of_view_mm[0], d.in_plane_spacing_mm[0] * nx)
            hi = min(d.field_of_view_mm[1], d.in_plane_spacing_mm[1] * nx)
            sx = sy = (lo + fov_fraction * (hi - lo)) / nx
            nz = int(np.clip(np.ceil(needed_length_mm / thickness_draw), *d.slices))
        else:
            sx, sy = fov_draw / nx, fov_draw / ny
        sz = float(min(d.slice_thickness_mm[1], max(thickness_draw, needed_length_mm / nz)))
    direction = _rotation(rotation_axis, rotation_angle)
    return _Grid(
        size=(int(nx), int(ny), int(nz)),
        spacing=(float(sx), float(sy), float(sz)),
        origin=tuple(float(o) for o in origin),
        direction=tuple(float(v) for v in direction.ravel()),
    )


# ----------------------------------------------------------------------------------- shapes


def _coverage(signed_distance, footprint):
    """Fraction of a voxel inside a surface: a box filter across the boundary (partial volume).

    ``signed_distance`` (mm, > 0 outside) is taken at the voxel centre; ``footprint`` is the voxel's
    width along the surface normal, so thick slices blur through-plane edges more than in-plane."""
    return np.clip(0.5 - signed_distance / footprint, 0.0, 1.0)


def _ellipsoid(coords, centre, radii, in_plane_mm, through_plane_mm, grow=0.0):
    """Coverage of an axis-aligned ellipsoid, or of an elliptic cylinder given two coordinates.

    With n = (x − c)/r² (half the gradient of F² = Σ((x − c)/r)²), the first-order signed distance
    is (F² − 1) / (2|n|) and the footprint along n/|n| is (s_xy·|n_xy| + s_z·|n_z|) / |n|; |n|
    cancels in their ratio, which stays finite everywhere (−inf, i.e. fully inside, at the centre)."""
    f2, in_plane, through = 0.0, 0.0, 0.0
    for axis, (x, c, r) in enumerate(zip(coords, centre, radii)):
        offset = x - c
        n = offset / ((r + grow) ** 2)
        f2 = f2 + offset * n
        if axis < 2:
            in_plane = in_plane + n * n
        else:
            through = np.abs(n) * through_plane_mm
    footprint = in_plane_mm * np.sqrt(in_plane) + through
    return np.clip(0.5 - (f2 - 1.0) / (2.0 * footprint + 1e-9), 0.0, 1.0)


def _below_plane(coords, point, normal, in_plane_mm, through_plane_mm, grow=0.0):
    """Coverage of the half-space on the apex side of a plane (the base cut)."""
    distance = sum(n * (x - p) for x, p, n in zip(coords, point, normal)) - grow
    footprint = in_plane_mm * np.hypot(normal[0], normal[1]) + through_plane_mm * abs(normal[2])
    return _coverage(distance, footprint + 1e-3)


def _rotate_in_plane(x, y, angle):
    """Coordinates in a frame rotated by ``angle`` (scalar or per voxel) about the z axis."""
    c, s = np.cos(angle), np.sin(angle)
    return c * x + s * y, -s * x + c * y
