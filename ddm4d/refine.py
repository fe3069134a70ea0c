"""Per-case refinement: one stationary velocity field per pair, so every frame lies on one
diffeomorphic path exp(gamma v) from the source (gamma 0) to the target (gamma 1).

Why not fit the network: optimising the whole DDM through diffusion noise is slow and was not
converged within its budget on real scans. Registration's instance optimisation is fast and well
understood: Adam on a multi-scale velocity field, started from the model's estimate (or from zero).
The symmetric objective compares both images in the middle of the path, S o exp(v/2) against
T o exp(-v/2), which is where symmetric generation cross-fades them.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from .config import RefineConfig
from .errors import Cancelled, InputError
from .fade import smooth as gaussian
from .geometry import ModelMapping, _det_entries, jacobian_determinant, to_model_grid
from .losses import local_ncc
from .svf import compose, integrate, resize_field, resize_image
from .warp import warp


@dataclass
class Refinement:
    """The refined velocity (1, ndim, *spatial) on the refinement grid and how it got there."""

    velocity: torch.Tensor
    start: str  # the name of the start it took (generation: "model" or "reversed model"), or "zero"
    objective: list[float] = field(default_factory=list)  # per level, at its end
    steps: list[int] = field(default_factory=list)  # per level: fewer than RefineConfig's where it converged
    seconds: float = 0.0
    smoothed: bool = False  # the last level's v smoothed where its path compressed too far (RefineConfig.upsample_*)


def refinement_grid(source: sitk.Image, target: sitk.Image, config: RefineConfig = RefineConfig(),
                    spatial_dims: int | None = None) -> tuple[np.ndarray, np.ndarray, ModelMapping]:
    """Source and target (normalised to [-1, 1]) on a grid that covers the source's whole field of
    view at its own resolution, at most `config.max_size` voxels per axis."""
    size = list(source.GetSize()) + [1] * (3 - source.GetDimension())
    spacing = list(source.GetSpacing()) + [1.0] * (3 - source.GetDimension())
    dims = spatial_dims or (2 if size[2] == 1 else 3)
    grid_size = [min(n, cap) for n, cap in zip(size[:dims], config.max_size)]
    grid_spacing = [n * s / g for n, s, g in zip(size[:dims], spacing[:dims], grid_size)]
    return to_model_grid(source, target, grid_size, grid_spacing)


def _axis_spacing(mapping: ModelMapping) -> list[float]:
    """Spacing (mm) per tensor axis ((z,) y, x) of the mapping's grid."""
    sp = list(reversed(mapping.grid.GetSpacing()))
    return sp[1:] if mapping.spatial_dims == 2 else sp


class _Objective:
    """-local NCC + smoothness (+ a fold penalty, RefineConfig.fold_weight) of one pyramid level;
    anisotropy in mm handled per axis."""

    def __init__(self, source, target, spacing: Sequence[float], config: RefineConfig, symmetric: bool):
        self.source, self.target, self.symmetric = source, target, symmetric
        self.config = config
        finest = min(spacing)
        # window and regulariser in units of the finest axis, so a thick-slice axis is not over-smoothed
        self.window = tuple(max(3, 2 * int(round(config.window * finest / s / 2)) + 1) if s > 1.5 * finest
                            else config.window for s in spacing)
        self.window = tuple(min(w, 2 * (n // 2) + 1) for w, n in zip(self.window, source.shape[2:]))
        ratio = torch.tensor([s / finest for s in spacing], device=source.device)
        self.to_finest = ratio.view(1, -1, *([1] * len(spacing)))  # v in voxels -> in finest voxels
        self.axis_ratio = ratio.tolist()

    def images(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The two images compared, and the fields that moved them."""
        steps = self.config.squarings(v.dim() - 2)
        if self.symmetric:
            # both halves in one batch: grid_sample on the CPU runs a batch of two in about 60% of the
            # time of two single calls (128 x 128 x 32 pair: a refinement step 560 -> 360 ms)
            halves = integrate(torch.cat([v, -v]) / 2, steps)
            moved = warp(torch.cat([self.source, self.target]), halves)
            return moved[:1], moved[1:], halves
        phi = integrate(v, steps)
        return warp(self.source, phi), self.target, phi

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        a, b, phi = self.images(v)
        w = v * self.to_finest
        smooth = sum(torch.diff(w, dim=2 + i).pow(2).mean() / (r * r) for i, r in enumerate(self.axis_ratio))
        loss = -local_ncc(a, b, self.window) + self.config.smoothness * smooth / len(self.axis_ratio)
        if self.config.fold_weight > 0:
            # the whole paths exp(v) and exp(-v), which generation uses, from the halves: halves that
            # do not fold can compose into a path that does (on a grid, between voxels)
            path = compose(phi, phi) if self.symmetric else phi
            folds = torch.relu(self.config.fold_margin - jacobian_det(path))
            loss = loss + self.config.fold_weight * folds.pow(2).mean()
        return loss


def jacobian_det(phi: torch.Tensor) -> torch.Tensor:
    """det(I + grad u) at every voxel of voxel fields (N, ndim, *spatial), differentiable: central
    differences, one-sided at the edges (geometry.jacobian_determinant's), none along a one-voxel axis."""
    ndim = phi.dim() - 2
    grad = [[torch.gradient(phi[:, i], dim=1 + j)[0] if phi.shape[2 + j] > 1 else torch.zeros_like(phi[:, i])
             for j in range(ndim)] for i in range(ndim)]
    for i in range(ndim):
        grad[i][i] = grad[i][i] + 1.0
    return _det_entries(grad)


def _level_size(shape: Sequence[int], spacing: Sequence[float], factor: int) -> list[int]:
    """A level's grid: `factor` coarser in-plane, thick axes only as far as they stay near isotropic."""
    finest = min(spacing)
    out = []
    for n, s in zip(shape, spacing):
        f = max(1.0, factor * finest / s)
        out.append(n if n <= 8 else max(8, int(math.ceil(n / f))))
    return out


class Adam:
    """Adam (Kingma & Ba 2015) on one tensor, with torch.optim.Adam's defaults and arithmetic.

    Why not torch.optim.Adam: constructing any torch optimizer imports torch._dynamo, 1.3-2.5 s on
    these CPUs, paid by every `ddm4d generate` process, against about 2 s for a whole slice's refinement."""

    def __init__(self, param: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.param, self.lr, self.betas, self.eps = param, lr, betas, eps
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        grad = self.param.grad
        self.t += 1
        b1, b2 = self.betas
        self.m.lerp_(grad, 1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (self.v.sqrt() / math.sqrt(1 - b2 ** self.t)).add_(self.eps)
        self.param.addcdiv_(self.m, denom, value=-self.lr / (1 - b1 ** self.t))

    def zero_grad(self) -> None:
        self.param.grad = None


def _converged(means: Sequence[float], tolerance: float) -> bool:
    """The objective's mean over the last window of steps gained less than `tolerance` on the window
    before. Why: a fixed count spends its last third on an objective that has flattened (3D phantom
    pairs: the last 40 of 100 steps gained 0.1%)."""
    return tolerance > 0 and len(means) >= 2 and means[-2] - means[-1] < tolerance


def refine_velocity(source: torch.Tensor, target: torch.Tensor, spacing: Sequence[float],
                    start: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
                    config: RefineConfig = RefineConfig(),
                    symmetric: bool = True, progress: Callable[[float, str], None] | None = None,
                    cancel: Callable[[], bool] | None = None) -> Refinement:
    """Optimise v for the pair (tensors (1, 1, *spatial) in [-1, 1]; `spacing` in mm per tensor axis).

    `start` (a velocity on the same grid, or several by name) is used when it scores better than zero,
    else the path starts from the identity: a model that does not fit this scan cannot make refinement
    worse. Of several, the one that scores best is taken.
    """
    t0 = time.perf_counter()
    if float(source.std()) == 0 or float(target.std()) == 0:
        raise InputError("refinement needs images with content; the source or the target is constant "
                         "in the region the model sees")
    shape = list(source.shape[2:])
    ndim = len(shape)
    zero = source.new_zeros(1, ndim, *shape)
    v, origin = zero, "zero"
    starts = {"model": start} if isinstance(start, torch.Tensor) else dict(start or {})
    if starts:
        full = _Objective(source, target, spacing, config, symmetric)
        with torch.no_grad():
            best = float(full(zero))
            for name, candidate in starts.items():
                value = float(full(candidate))
                if value < best:
                    best, v, origin = value, candidate.detach().float(), name
    finest = min(spacing)
    frozen = [i for i, sp in enumerate(spacing) if sp > config.thick_slice_ratio * finest]
    keep = torch.ones(1, ndim, *([1] * ndim), device=source.device)
    keep[:, frozen] = 0.0
    objective: list[float] = []
    taken: list[int] = []
    smoothed = False
    levels, level_steps = (config.levels, config.steps) if ndim == 2 else (config.levels_3d, config.steps_3d)
    total = max(1, sum(level_steps))
    done = 0
    for level, (factor, steps) in enumerate(zip(levels, level_steps)):
        size = _level_size(shape, spacing, factor)
        level_spacing = [s * n / m for s, n, m in zip(spacing, shape, size)]
        s_l, t_l = resize_image(source, size), resize_image(target, size)
        loss_fn = _Objective(s_l, t_l, level_spacing, config, symmetric)
        v_l = resize_field(v, size).detach().clone().requires_grad_(True)
        if frozen:
            v_l.register_hook(lambda grad: grad * keep)
        optimizer = Adam(v_l, lr=config.lr)
        # each window's objectives stay on the device and are read once a window: a read per step would
        # make a GPU wait for every step (averaged in float64 on the CPU: Apple's MPS has no float64)
        window, means, loss, n = [], [], None, 0
        for n in range(1, steps + 1):
            if cancel is not None and cancel():
                raise Cancelled("refinement cancelled")
            loss = loss_fn(v_l)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            window.append(loss.detach())
            done += 1
            if progress is not None and done % 20 == 0:
                progress(done / total, f"refining {done}/{total}: objective {float(loss.detach()):.4f}")
            if n % config.patience == 0:
                means.append(float(torch.stack(window).cpu().double().mean()))
                window = []
                if _converged(means, config.tolerance):
                    done += steps - n  # the level's remaining steps count as done for the progress
                    break
        if loss is not None:
            objective.append(float(loss.detach()))
        taken.append(n)
        if level == len(levels) - 1:
            v, smoothed = _unfolded(v_l.detach(), shape, config, symmetric, frozen)
        else:
            v = resize_field(v_l.detach(), shape)  # a level's field on the full grid: the next level's start
    return Refinement(velocity=v, start=origin, objective=objective, steps=taken, seconds=time.perf_counter() - t0,
                      smoothed=smoothed)


def _folds(v: torch.Tensor, config: RefineConfig, symmetric: bool, floor: float) -> bool:
    """exp(v) compresses to det J <= `floor` somewhere on v's grid, or, where the target is warped too
    (symmetric), exp(-v) folds (det J <= 0)."""
    steps = config.squarings(v.dim() - 2)
    return min_det(integrate(v, steps)) <= floor or (symmetric and min_det(integrate(-v, steps)) <= 0)


def _unfolded(last: torch.Tensor, shape: Sequence[int], config: RefineConfig, symmetric: bool,
              frozen: Sequence[int]) -> tuple[torch.Tensor, bool]:
    """The last level's velocity on the full grid (linearly resized), smoothed where its path folds.

    Upsampled from a coarser last level (volumes), v is smoothed as upsample_velocity says where exp(v)
    compresses below `upsample_min_det`: upsampling makes steps the fit never saw. On its own grid
    (slices), noise can make a fit rough from one pixel to the next: refinement alone on the real cine
    with Rician noise (benchmarks/motion.py, real128-noisy) folded 1-2 background pixels near the image
    edge in 6 of 60 pairs (det J down to -0.15; 7 squarings instead of 5 folded as much), and one
    Gaussian of `upsample_smoothing` pixels along the fitted axes unfolded every one (det J >= 0.11).
    There only a fold counts: a heart that contracts strongly compresses below 0.05 without folding,
    and smoothing it shrank the 2D phantoms' motion (|EF error| +0.07 to +0.27 points). Further passes,
    up to MAX_UNFOLD_PASSES in all, only while the path still folds."""
    v = resize_field(last, shape)
    upsampled = list(last.shape[2:]) != list(shape)
    floor = config.upsample_min_det if upsampled else 0.0
    if config.upsample_smoothing <= 0 or not _folds(v, config, symmetric, floor):
        return v, False
    passes = MAX_UNFOLD_PASSES
    if upsampled:
        v, passes = upsample_velocity(last, shape, config.upsample_smoothing), passes - 1
    sigmas = [0.0 if axis in frozen or n == 1 else config.upsample_smoothing for axis, n in enumerate(shape)]
    for _ in range(passes):
        if not _folds(v, config, symmetric, floor):
            break
        v = gaussian(v[0], sigmas)[None]
    return v, True


MAX_UNFOLD_PASSES = 3


def upsample_velocity(v: torch.Tensor, size: Sequence[int], smoothing: float) -> torch.Tensor:
    """v (1, ndim, *spatial) on a finer grid: linear, then a Gaussian of `smoothing` of v's own voxels
    along each axis that grew, so exp(v) on the fine grid is as smooth as it was on the coarse one."""
    coarse = v.shape[2:]
    fine = resize_field(v, size)
    sigmas = [smoothing * n / o if n > o else 0.0 for n, o in zip(size, coarse)]  # gaussian skips zeros
    return gaussian(fine[0], sigmas)[None]


def min_det(phi: torch.Tensor) -> float:
    """The smallest Jacobian determinant of a voxel field (1, ndim, *spatial) (central differences)."""
    return float(jacobian_determinant(phi[0].detach().cpu().numpy()).min())


def path_fields(velocity: torch.Tensor, gammas: Sequence[float], steps: int | None = None,
                backward: bool = False) -> torch.Tensor:
    """Fields of the path at each gamma: exp(gamma v) from the source, or, with `backward`, the
    target's exp(-(1 - gamma) v); shape (len(gammas), ndim, *spatial). `steps`: squarings (default
    RefineConfig's for the velocity's dimensions)."""
    if steps is None:
        steps = RefineConfig().squarings(velocity.dim() - 2)
    g = torch.as_tensor([float(x) for x in gammas], dtype=velocity.dtype, device=velocity.device)
    scales = (g - 1.0) if backward else g
    return integrate(velocity * scales.view(-1, *([1] * (velocity.dim() - 1))), steps)
