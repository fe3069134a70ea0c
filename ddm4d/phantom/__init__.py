"""Synthetic 4D cardiac cine MR, written in the ACDC layout with labels on every frame.

Why: DDM generates the frames *between* end-diastole (ED) and end-systole (ES). Real data label
only ED and ES, so nothing measures the in-between frames; this phantom has ground truth for every
frame (labels, LV cavity and myocardial volumes) and needs no download.

How: the heart is analytic, defined in a continuous heart frame in mm: the LV cavity and the LV
epicardium are half prolate ellipsoids cut by an oblique base plane through their common centre
(such a plane halves an ellipsoid whatever its tilt, so volumes stay closed-form); the RV is an
ellipsoid wrapped around the septum. A contraction curve s(t) (0 at ED, 1 at ES) drives the radii,
the long-axis length (the apex stays put, the base descends) and the twist; the cavity volume
follows the requested ejection fraction exactly and the wall thickness is solved per frame so the
myocardial volume is conserved. Each frame is evaluated on the voxel grid with numpy; intensities
use a box-filter partial volume across each surface (labels take the voxel centre, i.e. the
majority), then coil shading and Rician noise, so it looks like bSSFP cine MR at a glance.

Coordinates: the "grid frame" is the scanner slice frame in mm, axes along the image x (columns),
y (rows) and z (slices), centred on the grid; physical LPS = origin + direction · (spacing · index).
"""
from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .. import files
from ..errors import InputError
from ..io import write_image

LABEL_BACKGROUND, LABEL_RV, LABEL_MYOCARDIUM, LABEL_LV = 0, 1, 2, 3
LABEL_NAMES = {LABEL_RV: "RV cavity", LABEL_MYOCARDIUM: "LV myocardium", LABEL_LV: "LV cavity"}
# static (non-cardiac) tissue classes of PhantomSubject.tissues, for masks in tests and analyses
TISSUES = ("air", "fat", "muscle", "mediastinum", "lung", "liver", "bone", "aorta")
# what make_subject accepts
FRAME_LIMITS = (2, 200)  # frames per cycle
IN_PLANE_LIMITS = (16, 1024)  # voxels along x and y
SLICE_LIMITS = (1, 1024)  # voxels along z (1: a single short-axis slice)
EJECTION_FRACTION_LIMITS = (0.05, 0.9)
MAX_PATIENTS = 999  # ACDC names folders patient001 .. patient999
#: phantom.json's "format": a patient folder holding it was written by ddm4d phantom, which may rewrite it
PHANTOM_FORMAT = "ddm4d-phantom"


@dataclass(frozen=True)
class Intensities:
    """bSSFP-like signal per tissue (arbitrary units, blood ~900): blood and fat bright, lungs dark."""

    air: float = 0.0
    fat: float = 640.0
    muscle: float = 210.0
    mediastinum: float = 360.0
    lung: float = 40.0
    liver: float = 330.0
    bone_marrow: float = 470.0
    bone_cortex: float = 110.0
    aorta: float = 820.0
    lv_blood: float = 900.0
    rv_blood: float = 840.0
    myocardium: float = 230.0
    epicardial_fat: float = 600.0


@dataclass(frozen=True)
class PhantomDefaults:
    """Every anatomical and acquisition default of the phantom; pairs are (low, high) ranges a subject
    draws from uniformly. Lengths in mm, angles in degrees, fractions of the field of view (FOV) as
    noted. Grouped here so a variation of the phantom is one `dataclasses.replace` away."""

    # acquisition (ACDC-like geometry)
    in_plane_size: tuple[int, int] = (128, 160)
    in_plane_spacing_mm: tuple[float, float] = (1.3, 1.7)
    field_of_view_mm: tuple[float, float] = (200.0, 250.0)
    slices: tuple[int, int] = (8, 12)
    slice_thickness_mm: tuple[float, float] = (5.0, 10.0)
    stack_margin_mm: float = 5.0  # stack reaches this far beyond apex and base
    direction_rotation_deg: tuple[float, float] = (3.0, 15.0)  # image direction vs identity
    origin_extent_mm: float = 150.0  # origin components drawn in [-extent, extent]
    # cardiac cycle
    frames: tuple[int, int] = (12, 25)
    end_systole_phase: tuple[float, float] = (0.35, 0.45)  # fraction of the cycle
    early_filling_share: float = 0.75  # of the refill done in rapid filling; the rest is atrial kick
    early_filling_phase: float = 0.4  # fraction of diastole that rapid filling lasts
    atrial_kick_phase: float = 0.75  # fraction of diastole where the atrial kick starts
    # left ventricle at ED
    ejection_fraction: tuple[float, float] = (0.30, 0.70)
    lv_cavity_radius_mm: tuple[float, float] = (18.0, 23.0)
    lv_ellipticity: tuple[float, float] = (0.8, 1.0)  # minor / major short-axis radius
    lv_cavity_length_mm: tuple[float, float] = (50.0, 64.0)  # cavity apex to base-plane centre
    lv_wall_mm: tuple[float, float] = (6.5, 9.5)
    apex_wall_ratio: float = 0.8  # apical wall thickness / lateral wall thickness
    long_axis_shortening_per_ef: float = 0.35  # cavity length shortening at ES = this * EF
    base_plane_tilt_deg: tuple[float, float] = (12.0, 22.0)  # mitral plane vs short-axis plane
    long_axis_tilt_deg: tuple[float, float] = (0.0, 6.0)  # LV long axis vs slice normal
    twist_apex_deg: tuple[float, float] = (6.0, 10.0)  # apex and base rotate in opposite senses
    twist_base_deg: tuple[float, float] = (2.0, 5.0)
    papillary_radius_mm: tuple[float, float] = (3.0, 4.5)
    papillary_angles_deg: tuple[float, float] = (140.0, -115.0)  # from the RV direction
    papillary_inset: float = 0.6  # column centre inside the endocardium, in column radii
    papillary_level: float = 0.55  # column centre below the base centre, in cavity lengths
    papillary_half_length: float = 0.3  # in cavity lengths
    lv_offset_fov: tuple[tuple[float, float], tuple[float, float]] = ((0.03, 0.08), (-0.09, -0.04))
    # right ventricle
    rv_direction_deg: tuple[float, float] = (185.0, 215.0)  # LV to RV in the image (x right, y down)
    rv_depth_ratio: tuple[float, float] = (0.95, 1.1)  # RV radial semi-axis / LV epicardial radius
    rv_offset_ratio: tuple[float, float] = (0.6, 0.7)  # RV centre distance / RV radial semi-axis
    rv_width_ratio: tuple[float, float] = (1.3, 1.5)  # RV tangential / radial semi-axis
    rv_length_ratio: tuple[float, float] = (0.75, 0.9)  # RV long semi-axis / LV epicardial length
    rv_ef_ratio: tuple[float, float] = (0.8, 1.0)  # RV in-plane contraction relative to the LV's
    rv_wall_mm: float = 3.0
    atrium_radius_ratio: tuple[float, float] = (0.7, 0.85)  # of the LV epicardial radius
    # atrial centres in the heart frame (x towards the RV, y posterior), in LV epicardial radii;
    # they sit above the base plane by `atrium_rise` of their radius, the RA `ra_size` of the LA
    la_offset: tuple[float, float] = (-0.15, 0.35)
    ra_offset: tuple[float, float] = (0.55, 0.45)
    atrium_rise: float = 0.3
    ra_size: float = 0.85
    epicardial_fat_mm: tuple[float, float] = (2.0, 4.5)
    # body (fractions of the FOV: the operator fits the FOV to the chest)
    body_half_width_fov: tuple[float, float] = (0.44, 0.48)
    body_half_height_fov: tuple[float, float] = (0.36, 0.40)
    body_shift_fov: tuple[float, float] = (0.0, 0.04)  # body centre below the FOV centre
    subcutaneous_fat_mm: tuple[float, float] = (4.0, 12.0)  # drawn separately laterally and front-back
    chest_wall_muscle_mm: tuple[float, float] = (8.0, 14.0)
    lung_half_width_ratio: tuple[float, float] = (0.33, 0.40)  # of the body half width
    lung_half_height_ratio: tuple[float, float] = (0.68, 0.78)  # of the body half height
    lung_overlap: float = 0.15  # share of a lung's width tucked under the chest wall (cut off)
    lung_drop: float = 0.1  # lung centres below the body centre, in body half heights
    mediastinum_margin_mm: float = 3.0  # tissue between the heart and the lungs
    vertebra_radius_mm: tuple[float, float] = (12.0, 16.0)
    vertebra_shift_mm: float = 8.0  # off the midline, either side
    vertebra_depth: float = 1.8  # centre in front of the back muscles, in vertebra radii
    vertebra_cortex_mm: float = 2.0
    paraspinal_radii: tuple[float, float] = (2.6, 1.8)  # back muscles, in vertebra radii
    paraspinal_drop: float = 0.8  # their centre behind the vertebra's, in vertebra radii
    posterior_mediastinum: tuple[float, float, float, float] = (1.0, -1.0, 2.4, 1.2)  # x, y, rx, ry
    aorta_radius_mm: tuple[float, float] = (9.0, 12.0)
    aorta_gap: float = 1.2  # aorta centre beside the vertebra, in aorta radii past its edge
    aorta_rise: float = 0.6  # in front of the vertebra centre, in vertebra radii
    liver_radii_mm: tuple[float, float, float] = (70.0, 55.0, 60.0)
    liver_offset: tuple[float, float] = (-0.6, 0.4)  # from the LV centre, in liver radii
    liver_dome_above_apex_mm: tuple[float, float] = (5.0, 25.0)
    # image formation
    intensities: Intensities = field(default_factory=Intensities)
    intensity_jitter: float = 0.1  # each tissue's signal varies by +- this fraction per subject
    coil_shading: float = 0.35  # depth of the multiplicative coil sensitivity
    coil_width_fov: float = 0.6  # coil sensitivity fall-off (Gaussian sigma), in FOV widths
    coil_distance: float = 1.1  # coils front and back, in body half heights from its centre
    coil_z_weight: float = 0.5  # sensitivity falls off more slowly along the slice axis
    noise: float = 0.035  # Rician noise sigma as a fraction of the LV blood signal
    height_cm: tuple[float, float] = (155.0, 192.0)
    weight_kg: tuple[float, float] = (52.0, 98.0)


DEFAULTS = PhantomDefaults()


@dataclass
class PhantomSubject:
    """One synthetic subject: per-frame 3D images and labels plus the analytic truth behind them.

    ``ed`` and ``es`` are 0-based frame indices; volumes are the analytic (continuous) ones in ml.
    """

    images: list[sitk.Image]
    labels: list[sitk.Image]
    ed: int
    es: int
    ejection_fraction: float  # requested LV ejection fraction, (EDV - ESV) / EDV
    seed: int
    contraction: np.ndarray  # s(t): 0 at ED, 1 at ES
    lv_cavity_ml: np.ndarray
    myocardium_ml: np.ndarray
    tissues: np.ndarray  # static tissue class per voxel (z, y, x), indices into TISSUES
    twist_deg: np.ndarray  # (t, 2): rotation of the apex and of the base about the long axis
    height_cm: float = 170.0
    weight_kg: float = 70.0

    @property
    def n_frames(self) -> int:
        return len(self.images)

    def image_array(self) -> np.ndarray:
        """All frames as one (t, z, y, x) int16 array."""
        return np.stack([sitk.GetArrayFromImage(image) for image in self.images])

    def label_array(self) -> np.ndarray:
        """All label frames as one (t, z, y, x) uint8 array."""
        return np.stack([sitk.GetArrayFromImage(label) for label in self.labels])

    def info_cfg(self) -> str:
        """The ACDC Info.cfg text (1-based ED/ES frame numbers)."""
        return (
            f"ED: {self.ed + 1}\nES: {self.es + 1}\nGroup: PHANTOM\nHeight: {self.height_cm:.1f}\n"
            f"NbFrame: {self.n_frames}\nWeight: {self.weight_kg:.1f}\n"
        )


# ----------------------------------------------------------------------------------- geometry


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


# ----------------------------------------------------------------------------------- timing


def contraction_curve(n_frames: int, es: int, d: PhantomDefaults = DEFAULTS) -> np.ndarray:
    """s(t) per frame: 0 at ED (frame 0), 1 at ES, then rapid filling, diastasis and atrial kick.

    Why the shape: ejection is a smooth half cosine; diastole refills most of the volume early and
    the rest with the atrial kick just before the next ED, as a cine volume curve does."""
    t = np.arange(n_frames) / n_frames
    t_es = es / n_frames
    s = np.empty(n_frames)
    systole = t <= t_es
    s[systole] = 0.5 * (1 - np.cos(np.pi * t[systole] / t_es))
    phase = (t[~systole] - t_es) / (1 - t_es)  # 0..1 over diastole
    early = _smoothstep(phase / d.early_filling_phase)
    kick = _smoothstep((phase - d.atrial_kick_phase) / (1 - d.atrial_kick_phase))
    s[~systole] = 1 - d.early_filling_share * early - (1 - d.early_filling_share) * kick
    return s


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


# ----------------------------------------------------------------------------------- heart


@dataclass(frozen=True)
class _Heart:
    """Subject-specific heart at ED; `_HeartState` gives it at a contraction s."""

    cavity_radii: tuple[float, float]  # (a, b) short-axis semi-axes of the LV cavity
    cavity_length: float  # cavity apex to base-plane centre
    wall: float
    apex_wall_ratio: float
    long_axis_shortening: float  # cavity length factor at ES is 1 - this
    ejection_fraction: float
    base_normal: np.ndarray  # base plane normal in the heart frame (towards the atria)
    lv_axis_angle: float  # LV ellipse orientation in the heart frame (rad)
    twist_apex: float  # rad, at s = 1
    twist_base: float
    rv_depth: float
    rv_offset: float
    rv_width: float
    rv_length: float
    rv_ejection_fraction: float
    rv_wall: float
    epicardial_fat: float
    papillary_radius: float
    papillary_angles: tuple[float, float]  # rad, heart frame
    atrium_radius_ratio: float  # atrial radius / LV epicardial radius
    layout: PhantomDefaults  # the fixed relative positions (atria, papillary muscles)

    @property
    def epicardial_length(self) -> float:
        return self.cavity_length + self.apex_wall_ratio * self.wall

    @property
    def epicardial_radius(self) -> float:
        a, b = self.cavity_radii
        return float(np.sqrt((a + self.wall) * (b + self.wall)))

    def stack_length(self) -> float:
        """Long-axis span from the apex to the highest point of the oblique base (mm)."""
        tan_tilt = np.hypot(*self.base_normal[:2]) / self.base_normal[2]
        return self.epicardial_length + (self.epicardial_radius + self.rv_wall) * tan_tilt


@dataclass(frozen=True)
class _HeartState:
    """The heart at one contraction level: radii, lengths and twist in the heart frame (mm, rad)."""

    a: np.ndarray
    b: np.ndarray
    cavity_length: np.ndarray
    wall: np.ndarray
    apex_wall: np.ndarray
    base_centre: np.ndarray  # z of the base-plane centre (= ellipsoid centre) above the apex
    rv_scale: np.ndarray  # in-plane RV scale about the ED septum
    twist_apex: np.ndarray
    twist_base: np.ndarray

    def cavity_ml(self) -> np.ndarray:
        return _half_ellipsoid_ml(self.a, self.b, self.cavity_length)

    def epicardium_ml(self) -> np.ndarray:
        return _half_ellipsoid_ml(self.a + self.wall, self.b + self.wall, self.cavity_length + self.apex_wall)


def _half_ellipsoid_ml(a, b, c):
    """Volume (ml) of half an ellipsoid: any plane through the centre halves it."""
    return 2.0 / 3.0 * np.pi * a * b * c / 1000.0


def _draw_heart(rng, d: PhantomDefaults, ejection_fraction: float | None) -> _Heart:
    """Per-subject heart; every value is drawn even when overridden, so options don't shift the rest."""
    ef = rng.uniform(*d.ejection_fraction)
    ef = ef if ejection_fraction is None else ejection_fraction
    a = rng.uniform(*d.lv_cavity_radius_mm)
    b = a * rng.uniform(*d.lv_ellipticity)
    tilt, azimuth = np.deg2rad(rng.uniform(*d.base_plane_tilt_deg)), rng.uniform(0, 2 * np.pi)
    wall = rng.uniform(*d.lv_wall_mm)
    epi_radius = np.sqrt((a + wall) * (b + wall))
    rv_depth = rng.uniform(*d.rv_depth_ratio) * epi_radius
    cavity_length = rng.uniform(*d.lv_cavity_length_mm)
    return _Heart(
        cavity_radii=(a, b),
        cavity_length=cavity_length,
        wall=wall,
        apex_wall_ratio=d.apex_wall_ratio,
        long_axis_shortening=d.long_axis_shortening_per_ef * ef,
        ejection_fraction=ef,
        base_normal=np.array([np.sin(tilt) * np.cos(azimuth), np.sin(tilt) * np.sin(azimuth), np.cos(tilt)]),
        lv_axis_angle=rng.uniform(0, np.pi),
        twist_apex=np.deg2rad(rng.uniform(*d.twist_apex_deg)),
        twist_base=-np.deg2rad(rng.uniform(*d.twist_base_deg)),
        rv_depth=rv_depth,
        rv_offset=rng.uniform(*d.rv_offset_ratio) * rv_depth,
        rv_width=rng.uniform(*d.rv_width_ratio) * rv_depth,
        rv_length=rng.uniform(*d.rv_length_ratio) * (cavity_length + d.apex_wall_ratio * wall),
        rv_ejection_fraction=min(0.85, rng.uniform(*d.rv_ef_ratio) * ef),
        rv_wall=d.rv_wall_mm,
        epicardial_fat=rng.uniform(*d.epicardial_fat_mm),
        papillary_radius=rng.uniform(*d.papillary_radius_mm),
        papillary_angles=tuple(np.deg2rad(d.papillary_angles_deg)),
        atrium_radius_ratio=rng.uniform(*d.atrium_radius_ratio),
        layout=d,
    )


def _heart_state(heart: _Heart, s: np.ndarray) -> _HeartState:
    """Radii, length, wall and twist at contraction s (array): cavity volume = EDV·(1 − EF·s) and
    the long axis shortens by a fixed share; the wall is solved so the myocardial volume is constant."""
    s = np.asarray(s, float)
    length_factor = 1 - heart.long_axis_shortening * s
    radial_factor = np.sqrt((1 - heart.ejection_fraction * s) / length_factor)
    a = heart.cavity_radii[0] * radial_factor
    b = heart.cavity_radii[1] * radial_factor
    length = heart.cavity_length * length_factor
    wall = _wall_for_volume(heart, a, b, length)
    apex_wall = heart.apex_wall_ratio * wall
    rv_length_factor = np.sqrt(length_factor)
    rv_scale = np.sqrt((1 - heart.rv_ejection_fraction * s) / rv_length_factor)
    return _HeartState(
        a=a, b=b, cavity_length=length, wall=wall, apex_wall=apex_wall,
        base_centre=length + apex_wall, rv_scale=rv_scale,
        twist_apex=heart.twist_apex * s, twist_base=heart.twist_base * s,
    )


def _wall_for_volume(heart: _Heart, a, b, length) -> np.ndarray:
    """Wall thickness w with (a+w)(b+w)(L+k·w) − a·b·L equal to its ED value (Newton on a cubic
    that increases in w, so it converges from the ED thickness in a few steps)."""
    k, w0 = heart.apex_wall_ratio, heart.wall
    a0, b0 = heart.cavity_radii
    target = (a0 + w0) * (b0 + w0) * (heart.cavity_length + k * w0) - a0 * b0 * heart.cavity_length
    w = np.full_like(a, w0)
    for _ in range(30):
        pa, pb, pl = a + w, b + w, length + k * w
        residual = pa * pb * pl - a * b * length - target
        w = w - residual / (pb * pl + pa * pl + k * pa * pb)
    return w


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


# ----------------------------------------------------------------------------------- anatomy


@dataclass(frozen=True)
class _Body:
    """Static chest anatomy in the grid frame (mm)."""

    half_size: tuple[float, float]
    centre: tuple[float, float]
    fat: tuple[float, float]  # subcutaneous fat, lateral and front-back
    muscle: float
    lung_half_size: tuple[float, float]
    lung_offset: tuple[float, float]  # of the lung centres from the body centre (x mirrored)
    vertebra_centre: tuple[float, float]
    vertebra_radius: float
    aorta_centre: tuple[float, float]
    aorta_radius: float
    liver_centre: tuple[float, float, float]
    liver_radii: tuple[float, float, float]


def _draw_body(rng, d: PhantomDefaults, fov_mm: np.ndarray, lv_centre, apex_z, apex_direction) -> _Body:
    """Chest scaled to the FOV: fat and muscle rings, lungs either side, spine, aorta, liver below."""
    half = (rng.uniform(*d.body_half_width_fov) * fov_mm[0], rng.uniform(*d.body_half_height_fov) * fov_mm[1])
    centre = (0.0, rng.uniform(*d.body_shift_fov) * fov_mm[1])
    fat = (rng.uniform(*d.subcutaneous_fat_mm), rng.uniform(*d.subcutaneous_fat_mm))
    muscle = rng.uniform(*d.chest_wall_muscle_mm)
    lung_half = (rng.uniform(*d.lung_half_width_ratio) * half[0], rng.uniform(*d.lung_half_height_ratio) * half[1])
    lung_offset = (half[0] - fat[0] - muscle - (1 - d.lung_overlap) * lung_half[0], d.lung_drop * half[1])
    vertebra_radius = rng.uniform(*d.vertebra_radius_mm)
    vertebra = (centre[0] + rng.uniform(-d.vertebra_shift_mm, d.vertebra_shift_mm),
                centre[1] + half[1] - fat[1] - muscle - d.vertebra_depth * vertebra_radius)
    aorta_radius = rng.uniform(*d.aorta_radius_mm)
    aorta = (vertebra[0] + vertebra_radius + d.aorta_gap * aorta_radius, vertebra[1] - d.aorta_rise * vertebra_radius)
    dome = rng.uniform(*d.liver_dome_above_apex_mm)
    radii = d.liver_radii_mm
    liver_z = apex_z + apex_direction * (radii[2] - dome)  # the dome reaches `dome` mm above the apex
    liver = (lv_centre[0] + d.liver_offset[0] * radii[0], lv_centre[1] + d.liver_offset[1] * radii[1], liver_z)
    return _Body(half, centre, fat, muscle, lung_half, lung_offset, vertebra, vertebra_radius,
                 aorta, aorta_radius, liver, radii)


def _draw_intensities(rng, d: PhantomDefaults) -> dict[str, float]:
    base = d.intensities
    names = list(base.__dataclass_fields__)
    jitter = rng.uniform(1 - d.intensity_jitter, 1 + d.intensity_jitter, size=len(names))
    return {n: getattr(base, n) * j for n, j in zip(names, jitter)}


def _static_anatomy(grid: _Grid, d: PhantomDefaults, body: _Body, intensity: dict, ed_bed) -> tuple[np.ndarray, ...]:
    """Chest without the heart: image (float32, z y x), tissue classes (by majority) and the share
    of each voxel's signal that is lung, which the beating heart's mediastinal bed replaces.

    ``ed_bed`` (the bed at ED, the largest) only marks the tissue classes, so a lung mask is lung
    in every frame."""
    x, y, z = grid.axes_mm()
    sx, sz = grid.spacing[0], grid.spacing[2]
    bx, by = body.centre
    hw, hh = body.half_size
    inner = (hw - body.fat[0], hh - body.fat[1])
    cavity = _ellipsoid((x, y), (bx, by), inner, sx, sz, grow=-body.muscle)
    vx, vy = body.vertebra_centre
    r = body.vertebra_radius
    back = ((vx, vy + d.paraspinal_drop * r), (d.paraspinal_radii[0] * r, d.paraspinal_radii[1] * r))
    px, py, prx, pry = d.posterior_mediastinum
    posterior = ((vx + px * r, vy + py * r), (prx * r, pry * r))
    layers = [  # (tissue class, signal, coverage) painted in order
        ("fat", "fat", _ellipsoid((x, y), (bx, by), (hw, hh), sx, sz)),
        ("muscle", "muscle", _ellipsoid((x, y), (bx, by), inner, sx, sz)),
        ("mediastinum", "mediastinum", cavity),
    ]
    for side in (-1, 1):
        centre = (bx + side * body.lung_offset[0], by + body.lung_offset[1])
        layers.append(("lung", "lung", np.minimum(cavity, _ellipsoid((x, y), centre, body.lung_half_size, sx, sz))))
    liver = _ellipsoid((x, y, z), body.liver_centre, body.liver_radii, sx, sz)
    layers += [
        ("liver", "liver", np.minimum(cavity, liver)),
        ("muscle", "muscle", _ellipsoid((x, y), *back, sx, sz)),
        ("mediastinum", "mediastinum", _ellipsoid((x, y), *posterior, sx, sz)),  # around aorta and spine
        ("bone", "bone_cortex", _ellipsoid((x, y), (vx, vy), (r, r), sx, sz)),
        ("bone", "bone_marrow", _ellipsoid((x, y), (vx, vy), (r, r), sx, sz, grow=-d.vertebra_cortex_mm)),
        ("aorta", "aorta", _ellipsoid((x, y), body.aorta_centre, (body.aorta_radius,) * 2, sx, sz)),
    ]

    image = np.full(grid.shape, intensity["air"], np.float32)
    tissues = np.zeros(grid.shape, np.uint8)
    lung_share = np.zeros(grid.shape, np.float32)
    for name, signal, coverage in layers:
        coverage = np.broadcast_to(coverage, grid.shape)
        image += coverage * (intensity[signal] - image)
        lung_share *= 1 - coverage
        if name == "lung":
            lung_share += coverage
        tissues[coverage >= 0.5] = TISSUES.index(name)
    tissues[(tissues == TISSUES.index("lung")) & (ed_bed >= 0.5)] = TISSUES.index("mediastinum")
    return image, tissues, lung_share


def _coil_shading(grid: _Grid, d: PhantomDefaults, body: _Body) -> np.ndarray:
    """Smooth multiplicative bias of an anterior and a posterior coil array (mean 1 in the body).

    Why: phased-array coils make tissue near the chest surface brighter than the heart."""
    x, y, z = grid.axes_mm()
    width = d.coil_width_fov * grid.extent_mm[0]
    sensitivity = np.zeros(grid.shape, np.float32)
    for side in (-1, 1):
        coil_y = body.centre[1] + side * d.coil_distance * body.half_size[1]
        distance2 = (x - body.centre[0]) ** 2 + (y - coil_y) ** 2 + d.coil_z_weight * z**2
        sensitivity += np.exp(-distance2 / (2 * width**2))
    return (1 - d.coil_shading) + d.coil_shading * sensitivity / sensitivity.mean()


@dataclass(frozen=True)
class _Placement:
    """Heart frame in the grid frame: p_grid = apex + rotation @ p_heart (z_heart: apex to base)."""

    apex: np.ndarray
    rotation: np.ndarray

    def heart_coords(self, grid: _Grid, box=(slice(None),) * 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Heart-frame coordinates (mm) of the voxels in ``box`` (numpy z, y, x slices)."""
        x, y, z = grid.axes_mm()
        bz, by, bx = box
        dx, dy, dz = x[:, :, bx] - self.apex[0], y[:, by, :] - self.apex[1], z[bz] - self.apex[2]
        r = self.rotation
        return tuple((r[0, i] * dx + r[1, i] * dy + r[2, i] * dz).astype(np.float32) for i in range(3))

    def to_grid(self, points: np.ndarray) -> np.ndarray:
        """Heart-frame points (n, 3) in the grid frame."""
        return self.apex + points @ self.rotation.T


def _heart_box(grid: _Grid, placement: _Placement, heart: _Heart, bed_margin: float) -> tuple[slice, slice, slice]:
    """Voxel box (z, y, x slices) that holds the heart in every frame, so frames render only there.

    The heart is largest at ED (the RV scales down, the epicardium moves in); its outline is sampled
    on discs around the LV axis and the RV centre, turned by up to twice the largest twist."""
    angles = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    ring = np.column_stack([np.cos(angles), np.sin(angles)])
    margin = heart.rv_wall + heart.epicardial_fat + bed_margin
    lv = (max(heart.cavity_radii) + heart.wall + margin) * ring
    rv = np.array([heart.rv_offset, 0.0]) + (max(heart.rv_depth, heart.rv_width) + margin) * ring
    atria = (heart.atrium_radius_ratio + 0.5) * heart.epicardial_radius * ring  # generous: LA and RA
    twist = 2 * max(abs(heart.twist_apex), abs(heart.twist_base))
    outline = np.concatenate([_turn(np.concatenate([lv, rv, atria]), t) for t in (-twist, 0.0, twist)])
    points = np.concatenate([np.column_stack([outline, np.full(len(outline), z)]) for z in (0.0, heart.stack_length())])
    grid_mm = placement.to_grid(points)
    centre_index = (np.asarray(grid.size) - 1) / 2
    index = grid_mm / np.asarray(grid.spacing) + centre_index
    low = np.maximum(np.floor(index.min(axis=0)).astype(int) - 2, 0)
    high = np.minimum(np.ceil(index.max(axis=0)).astype(int) + 3, np.asarray(grid.size))
    return tuple(slice(int(lo), int(hi)) for lo, hi in zip(low[::-1], high[::-1]))


def _turn(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _draw_placement(rng, d: PhantomDefaults, heart: _Heart, fov_mm) -> tuple[_Placement, np.ndarray]:
    """Orientation (RV direction in the image, long-axis tilt) and position of the heart.

    Returns the placement and the LV centre in the image plane; the long axis points from the apex
    (last slices) towards the base (first slices), centred in the stack."""
    psi = np.deg2rad(rng.uniform(*d.rv_direction_deg))
    tilt, azimuth = np.deg2rad(rng.uniform(*d.long_axis_tilt_deg)), rng.uniform(0, 2 * np.pi)
    offset = np.array([rng.uniform(*d.lv_offset_fov[0]) * fov_mm[0], rng.uniform(*d.lv_offset_fov[1]) * fov_mm[1]])
    x_axis = np.array([np.cos(psi), np.sin(psi), 0.0])
    z_axis = np.array([0.0, 0.0, -1.0])
    y_axis = np.cross(z_axis, x_axis)
    in_plane = np.column_stack([x_axis, y_axis, z_axis])
    tilt_axis = np.array([np.cos(azimuth), np.sin(azimuth), 0.0])
    rotation = _rotation(tilt_axis, tilt) @ in_plane
    middle = 0.5 * heart.stack_length()
    apex = np.array([offset[0], offset[1], 0.0]) - rotation[:, 2] * middle
    return _Placement(apex=apex, rotation=rotation), offset


def _heart_bed(coords, heart: _Heart, state: _HeartState, i: int, margin: float, spacing) -> np.ndarray:
    """Mediastinal tissue around the heart at frame i (cylinders along its long axis): it pushes the
    lungs aside, and the lungs follow the heart in as it contracts."""
    hx, hy, _ = coords
    lv_radius = max(state.a[i], state.b[i]) + state.wall[i] + margin
    lv = _ellipsoid((hx, hy), (0.0, 0.0), (lv_radius, lv_radius), spacing[0], spacing[2])
    centre, radii = _rv_ellipse(heart, state, i)
    grow = heart.rv_wall + heart.epicardial_fat + margin
    rv = _ellipsoid((hx, hy), centre[:2], radii[:2], spacing[0], spacing[2], grow=grow)
    return np.maximum(lv, rv)


def _rv_ellipse(heart: _Heart, state: _HeartState, i: int):
    """RV cavity ellipsoid (centre, radii) in the twisted heart frame at frame i; it shrinks
    towards the ED septum (not the LV axis) so the crescent thins but stays on the septum."""
    k, anchor, centre_z = float(state.rv_scale[i]), heart.epicardial_radius, float(state.base_centre[i])
    centre = (anchor + k * (heart.rv_offset - anchor), 0.0, centre_z)
    radii = (k * heart.rv_depth, k * heart.rv_width, heart.rv_length * centre_z / heart.epicardial_length)
    return centre, radii


# ----------------------------------------------------------------------------------- rendering


def _render_heart(coords, heart: _Heart, state: _HeartState, i: int, in_plane_mm, through_mm):
    """Coverage of each cardiac compartment at frame i, in painting order, plus the label masks."""
    hx, hy, hz = coords
    centre_z = float(state.base_centre[i])
    # twist: linear in the long-axis position, apex one way and base the other
    fraction = np.clip(hz / centre_z, 0.0, 1.0)
    twist = state.twist_apex[i] + (state.twist_base[i] - state.twist_apex[i]) * fraction
    tx, ty = _rotate_in_plane(hx, hy, twist)
    lx, ly = _rotate_in_plane(tx, ty, heart.lv_axis_angle)
    a, b, length = float(state.a[i]), float(state.b[i]), float(state.cavity_length[i])
    wall, apex_wall = float(state.wall[i]), float(state.apex_wall[i])
    base = (0.0, 0.0, centre_z)
    geometry = (in_plane_mm, through_mm)

    below = _below_plane((hx, hy, hz), base, heart.base_normal, *geometry)
    below_fat = _below_plane((hx, hy, hz), base, heart.base_normal, *geometry, grow=heart.epicardial_fat)
    lv_coords = (lx, ly, hz)
    cavity = np.minimum(below, _ellipsoid(lv_coords, base, (a, b, length), *geometry))
    epi_radii = (a + wall, b + wall, length + apex_wall)
    epicardium = np.minimum(below, _ellipsoid(lv_coords, base, epi_radii, *geometry))

    rv_centre, rv_radii = _rv_ellipse(heart, state, i)
    rv_coords = (tx, ty, hz)
    rv_cavity = np.minimum(below, _ellipsoid(rv_coords, rv_centre, rv_radii, *geometry))
    rv_wall = np.minimum(below, _ellipsoid(rv_coords, rv_centre, rv_radii, *geometry, grow=heart.rv_wall))
    # epicardial fat shows best over the thin RV free wall and in the grooves beside the septum
    fat = _ellipsoid(rv_coords, rv_centre, rv_radii, *geometry, grow=heart.rv_wall + heart.epicardial_fat)
    fat = np.minimum(below_fat, fat)
    atria = _atria((hx, hy, hz), heart, base, 1.0 - below, geometry)
    papillary = _papillary_muscles(lv_coords, heart, a, b, length, centre_z, geometry)
    papillary = np.minimum(papillary, cavity)

    layers = [
        ("lv_blood", atria),
        ("epicardial_fat", fat),
        ("myocardium", rv_wall),
        ("rv_blood", rv_cavity),
        ("myocardium", epicardium),
        ("lv_blood", cavity),
        ("myocardium", papillary),
    ]
    labels = np.zeros(hx.shape, np.uint8)
    labels[rv_cavity >= 0.5] = LABEL_RV
    labels[epicardium >= 0.5] = LABEL_MYOCARDIUM
    labels[cavity >= 0.5] = LABEL_LV  # papillary muscles belong to the cavity, as in ACDC
    return layers, labels


def _atria(coords, heart: _Heart, base, above, geometry):
    """Blood of the left and right atria just above the (descending) base plane: the basal slices
    show atrium where the ventricle was, as they do at end-systole in real cine."""
    r, d = heart.epicardial_radius, heart.layout
    coverages = []
    for offset, size in ((d.la_offset, 1.0), (d.ra_offset, d.ra_size)):
        radius = size * heart.atrium_radius_ratio * r
        centre = (offset[0] * r, offset[1] * r, base[2] + d.atrium_rise * radius)
        coverages.append(_ellipsoid(coords, centre, (radius,) * 3, *geometry))
    return np.minimum(above, np.maximum(*coverages))


def _papillary_muscles(lv_coords, heart: _Heart, a, b, length, centre_z, geometry):
    """Two muscle columns hugging the wall of the mid-to-apical cavity; they turn with the twist."""
    r, d = heart.papillary_radius, heart.layout
    columns = []
    for angle in heart.papillary_angles:
        angle = angle - heart.lv_axis_angle  # angles are given from the RV direction
        c, s = np.cos(angle), np.sin(angle)
        wall_radius = a * b / np.hypot(b * c, a * s)
        distance = wall_radius - d.papillary_inset * r
        centre = (distance * c, distance * s, centre_z - d.papillary_level * length)
        columns.append(_ellipsoid(lv_coords, centre, (r, r, d.papillary_half_length * length), *geometry))
    return np.maximum(*columns)


@dataclass(frozen=True)
class _Scene:
    """What every frame shares: the grid, the chest without the heart, the coil shading, and the
    voxel box (with its heart-frame coordinates) that the beating heart is rendered into."""

    grid: _Grid
    static: np.ndarray
    tissues: np.ndarray
    shading: np.ndarray
    box: tuple[slice, slice, slice]
    coords: tuple[np.ndarray, np.ndarray, np.ndarray]
    lung_share: np.ndarray  # within the box
    intensity: dict
    bed_margin: float


def _build_scene(grid, d: PhantomDefaults, heart, states, placement, body, intensity) -> _Scene:
    margin = d.mediastinum_margin_mm
    ed_bed = _heart_bed(placement.heart_coords(grid), heart, states, 0, margin, grid.spacing)
    static, tissues, lung_share = _static_anatomy(grid, d, body, intensity, ed_bed)
    box = _heart_box(grid, placement, heart, margin)
    return _Scene(
        grid=grid, static=static, tissues=tissues, shading=_coil_shading(grid, d, body), box=box,
        coords=placement.heart_coords(grid, box), lung_share=lung_share[box], intensity=intensity,
        bed_margin=margin,
    )


def _render_frame(scene: _Scene, heart: _Heart, states: _HeartState, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Noiseless image (float32) and labels of frame i: the heart and its bed painted over the chest."""
    grid, intensity = scene.grid, scene.intensity
    layers, heart_labels = _render_heart(scene.coords, heart, states, i, grid.spacing[0], grid.spacing[2])
    image = scene.static.copy()
    region = image[scene.box]  # a view: painting it paints the image
    bed = _heart_bed(scene.coords, heart, states, i, scene.bed_margin, grid.spacing) * scene.lung_share
    region += bed * (intensity["mediastinum"] - intensity["lung"])
    for name, coverage in layers:
        region += coverage * (intensity[name] - region)
    image *= scene.shading
    label = np.zeros(grid.shape, np.uint8)
    label[scene.box] = heart_labels
    return image, label


def _rician(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise, as an MR magnitude image has."""
    real = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    imaginary = sigma * rng.standard_normal(image.shape, dtype=np.float32)
    return np.sqrt(real * real + imaginary * imaginary)


# ----------------------------------------------------------------------------------- public API


def _check_options(n_frames=None, ejection_fraction=None, size=None, spacing=None, noise=0.0) -> None:
    """Refuse impossible subject options with a message that names the option and a fix."""
    if n_frames is not None and not (_is_int(n_frames) and FRAME_LIMITS[0] <= n_frames <= FRAME_LIMITS[1]):
        raise InputError(f"frames (--frames / n_frames) must be an integer in {FRAME_LIMITS[0]}..{FRAME_LIMITS[1]}, "
                         f"got {n_frames}; try 20")
    low, high = EJECTION_FRACTION_LIMITS
    if ejection_fraction is not None and not (low <= ejection_fraction <= high):
        raise InputError(f"ejection_fraction must be a fraction in {low}..{high}, got {ejection_fraction}; try 0.55")
    if size is not None and not (
        len(size) == 3 and all(_is_int(n) for n in size)
        and all(IN_PLANE_LIMITS[0] <= n <= IN_PLANE_LIMITS[1] for n in size[:2])
        and SLICE_LIMITS[0] <= size[2] <= SLICE_LIMITS[1]
    ):
        raise InputError(f"size (--size NX NY NZ) needs NX, NY in {IN_PLANE_LIMITS[0]}..{IN_PLANE_LIMITS[1]} and NZ in "
                         f"{SLICE_LIMITS[0]}..{SLICE_LIMITS[1]}, got {' '.join(map(str, size))}; try 128 128 10")
    if spacing is not None and not (len(spacing) == 3 and all(v > 0 for v in spacing)):
        raise InputError(f"spacing must be three positive millimetre values (x, y, z), got {spacing}; try 1.5 1.5 8")
    if not noise >= 0:
        raise InputError(f"noise must be >= 0 (a fraction of the blood signal), got {noise}; try 0.035")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_seed(seed) -> None:
    if not (_is_int(seed) and seed >= 0):
        raise InputError(f"seed (--seed) must be a non-negative integer, got {seed!r}; try 0")


def make_subject(
    seed: int,
    *,
    n_frames: int | None = None,
    ejection_fraction: float | None = None,
    size: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
    noise: float = DEFAULTS.noise,
    defaults: PhantomDefaults = DEFAULTS,
) -> PhantomSubject:
    """One synthetic cine subject, deterministic for (seed, options).

    Anything not given is drawn from ``defaults`` (frames, EF, grid). ``size`` is (nx, ny, nz) and
    ``spacing`` (x, y, z) mm, ITK order; ``noise`` is the Rician sigma relative to the blood signal
    (0 gives a noiseless image). Anatomy, timing, geometry and noise use independent random streams,
    so fixing e.g. the EF leaves the rest of the subject unchanged."""
    _check_seed(seed)
    _check_options(n_frames, ejection_fraction, size, spacing, noise)
    anatomy_rng, timing_rng, grid_rng, noise_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(4)
    )
    heart = _draw_heart(anatomy_rng, defaults, ejection_fraction)
    n_drawn = int(timing_rng.integers(defaults.frames[0], defaults.frames[1] + 1))
    es_phase = timing_rng.uniform(*defaults.end_systole_phase)
    n = int(n_frames) if n_frames is not None else n_drawn
    es = int(np.clip(round(es_phase * n), 1, max(1, n - 1)))
    contraction = contraction_curve(n, es, defaults)
    states = _heart_state(heart, contraction)

    needed = heart.stack_length() + 2 * defaults.stack_margin_mm
    grid = _draw_grid(grid_rng, defaults, size, spacing, needed)
    fov = grid.extent_mm[:2]
    placement, lv_centre = _draw_placement(anatomy_rng, defaults, heart, fov)
    apex_direction = -np.sign(placement.rotation[2, 2])  # along z, from the base towards the apex
    body = _draw_body(anatomy_rng, defaults, fov, lv_centre, placement.apex[2], apex_direction)
    intensity = _draw_intensities(anatomy_rng, defaults)
    height, weight = anatomy_rng.uniform(*defaults.height_cm), anatomy_rng.uniform(*defaults.weight_kg)

    scene = _build_scene(grid, defaults, heart, states, placement, body, intensity)
    sigma = noise * intensity["lv_blood"]
    images, labels = [], []
    for i in range(n):
        image, label = _render_frame(scene, heart, states, i)
        if sigma > 0:
            image = _rician(image, sigma, noise_rng)
        images.append(grid.to_image(np.rint(np.clip(image, 0, np.iinfo(np.int16).max)).astype(np.int16)))
        labels.append(grid.to_image(label))
    return PhantomSubject(
        images=images, labels=labels, ed=0, es=es, ejection_fraction=float(heart.ejection_fraction),
        seed=int(seed), contraction=contraction, lv_cavity_ml=states.cavity_ml(),
        myocardium_ml=states.epicardium_ml() - states.cavity_ml(), tissues=scene.tissues,
        twist_deg=np.degrees(np.column_stack([states.twist_apex, states.twist_base])),
        height_cm=round(float(height), 1), weight_kg=round(float(weight), 1),
    )


def subject_seed(seed: int, index: int) -> int:
    """The seed of subject ``index`` of a data set seeded ``seed`` (independent streams per subject)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint64)[0] >> 1)


def _patient_name(index: int) -> str:
    return f"patient{index:03d}"


def write_subject(subject: PhantomSubject, patient_dir: str | os.PathLike) -> Path:
    """Write one subject in the ACDC layout (plus the 4D labels and a phantom.json of the truth).

    Every file is written atomically (ddm4d.files), so a reader never sees a half-written file; frame
    files of an earlier run that are no longer ED/ES go. The folder must be new, empty or written by
    ddm4d phantom (its phantom.json): a real patient's files are never overwritten."""
    folder = Path(patient_dir)
    _check_patient_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = folder.name
    files.write_text(folder / "Info.cfg", subject.info_cfg())
    write_image(sitk.JoinSeries(subject.images), folder / f"{name}_4d.nii.gz")
    write_image(sitk.JoinSeries(subject.labels), folder / f"{name}_4d_gt.nii.gz")
    keep = set()
    for index in sorted({subject.ed, subject.es}):
        stem = f"{name}_frame{index + 1:02d}"
        write_image(subject.images[index], folder / f"{stem}.nii.gz")
        write_image(subject.labels[index], folder / f"{stem}_gt.nii.gz")
        keep |= {f"{stem}.nii.gz", f"{stem}_gt.nii.gz"}
    stale = re.compile(rf"{re.escape(name)}_frame\d+(_gt)?\.nii\.gz")
    for path in folder.iterdir():
        if stale.fullmatch(path.name) and path.name not in keep:
            path.unlink()
    truth = {
        "format": PHANTOM_FORMAT,
        "seed": subject.seed,
        "n_frames": subject.n_frames,
        "ed": subject.ed + 1,
        "es": subject.es + 1,
        "ejection_fraction": subject.ejection_fraction,
        "contraction": [round(float(v), 6) for v in subject.contraction],
        "lv_cavity_ml": [round(float(v), 4) for v in subject.lv_cavity_ml],
        "myocardium_ml": [round(float(v), 4) for v in subject.myocardium_ml],
        "twist_deg_apex_base": [[round(float(v), 4) for v in row] for row in subject.twist_deg],
        "labels": {str(k): v for k, v in LABEL_NAMES.items()},
        "note": "ed/es are 1-based frame numbers, as in Info.cfg; volumes are analytic",
    }
    files.write_text(folder / "phantom.json", json.dumps(truth, indent=1) + "\n")
    return folder


def _written_by_phantom(folder: Path) -> bool:
    """phantom.json of ddm4d phantom (its format, or the keys of one written before the format was)."""
    try:
        truth = json.loads((folder / "phantom.json").read_text())
    except (OSError, ValueError):
        return False
    legacy = {"seed", "n_frames", "ed", "es", "contraction", "note"}
    return isinstance(truth, dict) and (truth.get("format") == PHANTOM_FORMAT or legacy <= truth.keys())


def _check_patient_folder(folder: Path) -> None:
    """Refuse a patient folder that holds files ddm4d phantom did not write (e.g. a real patient's)."""
    if folder.is_dir() and any(folder.iterdir()) and not _written_by_phantom(folder):
        shown = sorted(p.name for p in folder.iterdir())
        raise InputError(f"{folder} holds files that ddm4d phantom did not write ({', '.join(shown[:3])}"
                         f"{', …' if len(shown) > 3 else ''}); choose an empty or new output folder")
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} exists and is a file; choose an empty or new output folder")


def _prepare_output(out_dir) -> Path:
    """Create the output folder or say clearly why it cannot be used."""
    files.check_writable(out_dir, "output folder")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create output folder {out} ({err.strerror}); choose a writable folder") from None
    return out


def _iter_dataset(out_dir, n_subjects, seed, first_index, **subject_kwargs):
    """Yield (patient folder, subject) as each subject is generated and written."""
    if not (_is_int(n_subjects) and n_subjects >= 1):
        raise InputError(f"the number of subjects (--subjects) must be at least 1, got {n_subjects}; try 5")
    if not (_is_int(first_index) and first_index >= 1 and first_index + n_subjects - 1 <= MAX_PATIENTS):
        raise InputError(f"patient numbers must lie in 1..{MAX_PATIENTS}, got {first_index}.."
                         f"{first_index + n_subjects - 1}; write fewer subjects")
    _check_seed(seed)
    _check_options(**{k: v for k, v in subject_kwargs.items() if k != "defaults"})
    out = _prepare_output(out_dir)
    for index in range(first_index, first_index + int(n_subjects)):  # all of them before any work
        _check_patient_folder(out / _patient_name(index))
    for index in range(first_index, first_index + int(n_subjects)):
        subject = make_subject(subject_seed(seed, index), **subject_kwargs)
        yield write_subject(subject, out / _patient_name(index)), subject


def write_dataset(out_dir, n_subjects: int = 5, seed: int = 0, first_index: int = 1, **subject_kwargs) -> list[Path]:
    """Write patient001, patient002, … in the ACDC layout; returns the patient folders.

    Subject i is ``make_subject(subject_seed(seed, i), **subject_kwargs)``, so a data set is
    reproducible and extending it (a larger ``n_subjects``) keeps the earlier subjects."""
    return [folder for folder, _ in _iter_dataset(out_dir, n_subjects, seed, first_index, **subject_kwargs)]


# ----------------------------------------------------------------------------------- montage


def _load_patient(folder: Path) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(images t z y x, labels t z y x, ed, es) of an ACDC-layout patient folder with 4D labels."""
    name = folder.name
    image_file, label_file = folder / f"{name}_4d.nii.gz", folder / f"{name}_4d_gt.nii.gz"
    if not image_file.is_file() or not label_file.is_file():
        raise InputError(f"{folder} has no {image_file.name} and {label_file.name}; write it with `ddm4d phantom`")
    info = dict(
        line.split(":", 1) for line in (folder / "Info.cfg").read_text().splitlines() if ":" in line
    )
    images = sitk.GetArrayFromImage(sitk.ReadImage(str(image_file)))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(label_file)))
    return images, labels, int(info["ED"]) - 1, int(info["ES"]) - 1


def _patient_folder(path: Path) -> Path:
    if (path / "Info.cfg").is_file():
        return path
    patients = sorted(p for p in path.glob("patient*") if (p / "Info.cfg").is_file())
    if not patients:
        raise InputError(f"no patient folder with Info.cfg under {path}; pass a data set written by `ddm4d phantom`")
    return patients[0]


def save_montage(subject_or_dir, png_path, n_columns: int = 8) -> Path:
    """PNG of a mid-ventricular slice over the cycle (top) and the same with labels overlaid
    (bottom), so a person can check at a glance that the phantom looks and moves like cine MR.

    Accepts a PhantomSubject, a patient folder or a data-set folder (its first patient)."""
    from matplotlib.colors import ListedColormap

    from ..plotting import figure as new_figure, save_png

    if isinstance(subject_or_dir, PhantomSubject):
        s = subject_or_dir
        images, labels = s.image_array(), s.label_array()
        ed, es, title = s.ed, s.es, f"phantom (EF {s.ejection_fraction:.2f})"
    else:
        folder = _patient_folder(Path(subject_or_dir))
        images, labels, ed, es = _load_patient(folder)
        title = folder.name
    n = images.shape[0]
    frames = sorted({ed, es} | set(np.linspace(0, n - 1, min(n, n_columns)).round().astype(int).tolist()))
    frames = frames[: max(n_columns, 2)] if len(frames) <= n_columns else _thin(frames, n_columns, {ed, es})
    lv_slices = np.flatnonzero((labels[ed] == LABEL_LV).any(axis=(1, 2)))
    mid = int(np.median(lv_slices)) if lv_slices.size else images.shape[1] // 2
    crop = _zoom_on_heart(labels[ed, mid])
    images, labels = images[:, mid][(slice(None), *crop)], labels[:, mid][(slice(None), *crop)]
    high = float(np.percentile(images, 99.5)) or 1.0
    colours = ListedColormap([(0, 0, 0, 0), (0.2, 0.5, 1, 0.45), (0.1, 0.9, 0.2, 0.45), (1, 0.2, 0.2, 0.45)])

    figure = new_figure(2.0 * len(frames), 4.3, dpi=110)
    axes = figure.subplots(2, len(frames), squeeze=False)
    for column, t in enumerate(frames):
        tag = " (ED)" if t == ed else " (ES)" if t == es else ""
        for row in range(2):
            ax = axes[row, column]
            ax.imshow(images[t], cmap="gray", vmin=0, vmax=high, interpolation="nearest")
            if row == 1:
                ax.imshow(labels[t], cmap=colours, vmin=0, vmax=3, interpolation="nearest")
            ax.set_axis_off()
        axes[0, column].set_title(f"frame {t + 1}{tag}", fontsize=8)
    figure.suptitle(f"{title}: slice {mid + 1}; labels RV blue, myocardium green, LV red", fontsize=9)
    figure.tight_layout()
    png_path = _check_png_path(png_path)
    return save_png(figure, png_path)


def _check_png_path(png_path) -> Path:
    path = Path(png_path)
    if path.suffix.lower() != ".png":
        raise InputError(f"the montage must be a .png file, got {path}; try montage.png")
    if path.is_dir():
        raise InputError(f"the montage path {path} is a folder; give a file name such as {path / 'montage.png'}")
    existing = next((p for p in path.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise InputError(f"cannot write the montage {path}: {existing} is a file; choose another path")
    return path


def _zoom_on_heart(labels: np.ndarray, zoom: float = 2.2) -> tuple[slice, slice]:
    """Square (y, x) window ``zoom`` times the labelled heart, clipped to the slice: the heart
    fills the panel and the lungs either side stay in view."""
    ys, xs = np.nonzero(labels)
    if ys.size == 0:
        return slice(None), slice(None)
    half = int(np.ceil(zoom * max(np.ptp(ys), np.ptp(xs)) / 2))
    cy, cx = (ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2
    return tuple(slice(max(c - half, 0), min(c + half + 1, n)) for c, n in zip((cy, cx), labels.shape))


def _thin(frames: list[int], count: int, keep: set[int]) -> list[int]:
    """At most ``count`` frames spread over the list, always keeping ED and ES."""
    others = [f for f in frames if f not in keep]
    picks = np.linspace(0, len(others) - 1, max(count - len(keep), 0)).round().astype(int)
    return sorted(keep | {others[i] for i in picks})


# ----------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write patient001, patient002, … into (a "
                        "patient folder holding files that ddm4d phantom did not write is refused, never overwritten)")
    parser.add_argument("--subjects", type=int, default=5, metavar="N", help="number of subjects (default 5)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed of the data set (default 0)")
    parser.add_argument("--frames", type=int, metavar="N", help="frames per cycle (default: drawn in 12..25)")
    parser.add_argument("--size", type=int, nargs=3, metavar=("NX", "NY", "NZ"),
                        help="grid size in voxels (default: ACDC-like, drawn per subject)")
    parser.add_argument("--montage", metavar="PNG", help="also save a montage of the first subject to this PNG")


def main(args: argparse.Namespace) -> int:
    """Write the data set and print one line per subject (folder, frames, ED/ES, EF)."""
    if args.montage:
        _check_png_path(args.montage)
    kwargs = {"n_frames": args.frames, "size": tuple(args.size) if args.size else None}
    first = None
    for folder, subject in _iter_dataset(args.out_dir, args.subjects, args.seed, 1, **kwargs):
        first = first or folder
        print(f"{folder}: {subject.n_frames} frames, ED {subject.ed + 1}, ES {subject.es + 1}, "
              f"EF {subject.ejection_fraction:.2f}", flush=True)
    if args.montage:
        print(f"montage: {save_montage(first, args.montage)}")
    return 0
