"""The analytic heart: its contraction curve, its size and shape at ED, and at any contraction s."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .defaults import DEFAULTS, PhantomDefaults


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


def _rv_ellipse(heart: _Heart, state: _HeartState, i: int):
    """RV cavity ellipsoid (centre, radii) in the twisted heart frame at frame i; it shrinks
    towards the ED septum (not the LV axis) so the crescent thins but stays on the septum."""
    k, anchor, centre_z = float(state.rv_scale[i]), heart.epicardial_radius, float(state.base_centre[i])
    centre = (anchor + k * (heart.rv_offset - anchor), 0.0, centre_z)
    radii = (k * heart.rv_depth, k * heart.rv_width, heart.rv_length * centre_z / heart.epicardial_length)
    return centre, radii
