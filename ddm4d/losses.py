"""Losses of DDM: diffusion (noise regression), local normalised cross-correlation, smoothness."""
from __future__ import annotations

import torch
import torch.nn.functional as F

def box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over a window^ndim box with zero padding: a cumulative sum and one difference per axis,
    so the cost does not grow with the window (the authors' code convolves with a 9^3 kernel)."""
    ndim = x.dim() - 2
    half = window // 2
    for axis in range(2, 2 + ndim):
        pad = [0, 0] * (x.dim() - 1 - axis) + [half + 1, half]
        c = F.pad(x, pad).cumsum(axis)
        n = x.shape[axis]
        x = c.narrow(axis, window, n) - c.narrow(axis, 0, n)
    return x / float(window**ndim)


def local_ncc(x: torch.Tensor, y: torch.Tensor, window: int = 9, eps: float = 1e-5) -> torch.Tensor:
    """Mean squared local normalised cross-correlation in [0, 1] (VoxelMorph's NCC; 1 = identical).

    Window sums with zero padding; `eps` regularises the denominator on window sums, as the authors'
    code does (flat windows count as 0).
    """
    x, y = x.float(), y.float()
    n = float(window ** (x.dim() - 2))
    stats = box_mean(torch.cat([x, y, x * x, y * y, x * y], dim=1), window)
    mx, my, mxx, myy, mxy = stats.chunk(5, dim=1)
    cross = mxy - mx * my
    var_x = (mxx - mx * mx).clamp_min(0)
    var_y = (myy - my * my).clamp_min(0)
    cc = cross * cross / (var_x * var_y + eps / (n * n))
    return cc.mean()


def smoothness(phi: torch.Tensor) -> torch.Tensor:
    """Mean squared forward difference of the field, averaged over axes (VoxelMorph's Grad 'l2')."""
    ndim = phi.dim() - 2
    total = phi.new_zeros(())
    for axis in range(2, 2 + ndim):
        total = total + torch.diff(phi.float(), dim=axis).pow(2).mean()
    return total / ndim


def diffusion_loss(predicted_noise: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """L_diffuse = mean ||G(x_t, t; S, T) - eps||^2."""
    return F.mse_loss(predicted_noise.float(), noise.float())
