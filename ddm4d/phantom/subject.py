"""make_subject: one deterministic synthetic cine subject, and the PhantomSubject it returns."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .anatomy import _draw_body, _draw_intensities, _draw_placement
from .defaults import (DEFAULTS, EJECTION_FRACTION_LIMITS, FRAME_LIMITS, IN_PLANE_LIMITS, SLICE_LIMITS,
                       PhantomDefaults)
from .grid import _draw_grid
from .heart import _draw_heart, _heart_state, contraction_curve
from .render import _build_scene, _render_frame, _rician


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
