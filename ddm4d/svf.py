"""Stationary velocity fields: one path from source to target whose every point is diffeomorphic.

A velocity field v (batch, ndim, *spatial), in voxels, defines the path phi_gamma = exp(gamma v):
gamma = 0 is the identity, gamma = 1 the full deformation, and exp(-v) its exact inverse. exp is
computed by scaling and squaring (Arsigny et al. 2006), as VoxelMorph-diff does. Fields use the
convention of ddm4d.warp: pull, one channel per tensor axis, frame(p) = image(p + phi(p)).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .warp import warp

#: squarings of exp(v): v is divided by 2^7 = 128, small enough for one linear step per voxel
INTEGRATION_STEPS = 7


def compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """The field of "move by `inner`, then by `outer`": p + inner(p) + outer(p + inner(p)) - p."""
    return inner + warp(outer, inner)


def integrate(v: torch.Tensor, steps: int = INTEGRATION_STEPS) -> torch.Tensor:
    """exp(v) by scaling and squaring."""
    phi = v / (2 ** steps)
    for _ in range(steps):
        phi = compose(phi, phi)
    return phi


def invert(phi: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """The inverse displacement u with (id + phi) o (id + u) = id, by the fixed point u = -phi(p + u).

    Converges where the deformation is invertible and moderate (|grad phi| < 1), which is where a
    cardiac field between two phases lives; a path's own inverse is exact: integrate(-v)."""
    u = -phi
    for _ in range(iterations):
        u = -warp(phi, u)
    return u


def resize_field(v: torch.Tensor, size) -> torch.Tensor:
    """A field resampled to another grid over the same extent (voxel edges aligned, as an image
    pyramid's levels are), in the new grid's voxels."""
    old = v.shape[2:]
    size = [int(s) for s in size]
    if list(old) == size:
        return v
    mode = "bilinear" if len(size) == 2 else "trilinear"
    out = F.interpolate(v, size=size, mode=mode, align_corners=False)
    factors = torch.tensor([n / o for n, o in zip(size, old)], device=v.device, dtype=v.dtype)
    return out * factors.view(1, -1, *([1] * len(size)))


def resize_image(x: torch.Tensor, size) -> torch.Tensor:
    """An image on a coarser (area average) or finer (linear) grid over the same extent."""
    size = [int(s) for s in size]
    if list(x.shape[2:]) == size:
        return x
    if all(n <= o for n, o in zip(size, x.shape[2:])):
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode="bilinear" if len(size) == 2 else "trilinear", align_corners=False)


def logarithm(phi: torch.Tensor, iterations: int = 8, steps: int = INTEGRATION_STEPS) -> torch.Tensor:
    """A velocity v with exp(v) close to phi: v <- v + (phi - exp(v)) from v = phi, kept while the
    residual shrinks. Used to start a path from a field that a network or a registration produced."""
    v = phi.clone()
    residual = phi - integrate(v, steps)  # one integration per iteration: the residual serves the test and the step
    error = float(residual.abs().mean())
    for _ in range(iterations):
        candidate = v + residual
        candidate_residual = phi - integrate(candidate, steps)
        candidate_error = float(candidate_residual.abs().mean())
        if not candidate_error < error:
            break
        v, residual, error = candidate, candidate_residual, candidate_error
    return v
