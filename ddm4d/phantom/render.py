"""One frame: the heart's compartments painted over the static chest, coil shading, Rician noise."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .anatomy import _coil_shading, _heart_bed, _heart_box, _static_anatomy
from .defaults import LABEL_LV, LABEL_MYOCARDIUM, LABEL_RV, PhantomDefaults
from .grid import _below_plane, _ellipsoid, _Grid, _rotate_in_plane
from .heart import _Heart, _HeartState, _rv_ellipse


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
