"""The chest around the heart (body, lungs, spine, aorta, liver), coil shading, and the heart's
placement in it."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .defaults import TISSUES, PhantomDefaults
from .grid import _ellipsoid, _Grid, _rotation
from .heart import _Heart, _HeartState, _rv_ellipse


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
