"""Losses of DDM: diffusion (noise regression), local normalised cross-correlation, smoothness."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _window_counts(n: int, half: int, device, dtype) -> torch.Tensor:
    """How many voxels of an axis of length n a window centred on each voxel holds."""
    index = torch.arange(n, device=device, dtype=dtype)
    return (index + half).clamp(max=n - 1) - (index - half).clamp(min=0) + 1


def box_mean(x: torch.Tensor, window: int | tuple[int, ...]) -> torch.Tensor:
    """Mean over a window box around each voxel, counting only voxels inside the image.

    Why not zero padding: images here lie in [-1, 1], so a zero pad is mid-grey; both images of a
    pair would share that fixed edge near every border, which inflates their correlation there and
    dilutes the gradient. Averaging over the voxels that exist gives the border the same signal as the
    inside. A cumulative sum and one difference per axis: the cost does not grow with the window.
    `window` is one odd size for every axis or one per spatial axis.
    """
    ndim = x.dim() - 2
    windows = (window,) * ndim if isinstance(window, int) else tuple(window)
    count = torch.ones((), device=x.device, dtype=x.dtype)
    for axis, w in zip(range(2, 2 + ndim), windows):
        half = w // 2
        n = x.shape[axis]
        pad = [0, 0] * (x.dim() - 1 - axis) + [half + 1, half]
        c = F.pad(x, pad).cumsum(axis)
        x = c.narrow(axis, w, n) - c.narrow(axis, 0, n)
        shape = [1] * x.dim()
        shape[axis] = n
        count = count * _window_counts(n, half, x.device, x.dtype).view(shape)
    return x / count


def local_ncc_map(x: torch.Tensor, y: torch.Tensor, window: int | tuple[int, ...] = 9,
                  eps: float = 1e-5) -> torch.Tensor:
    """Squared local correlation coefficient per voxel, in [0, 1] (1: linearly related windows).

    `eps` regularises the denominator as the authors' code does on window sums (eps / n^2 on means,
    n the full window's voxel count), so flat windows count as 0 rather than dividing by zero.
    """
    x, y = x.float(), y.float()
    ndim = x.dim() - 2
    windows = (window,) * ndim if isinstance(window, int) else tuple(window)
    n = 1.0
    for w in windows:
        n *= w
    stats = box_mean(torch.cat([x, y, x * x, y * y, x * y], dim=1), windows)
    mx, my, mxx, myy, mxy = stats.chunk(5, dim=1)
    cross = mxy - mx * my
    var_x = (mxx - mx * mx).clamp_min(0)
    var_y = (myy - my * my).clamp_min(0)
    return cross * cross / (var_x * var_y + eps / (n * n))


def local_ncc(x: torch.Tensor, y: torch.Tensor, window: int | tuple[int, ...] = 9, eps: float = 1e-5) -> torch.Tensor:
    """Mean squared local normalised cross-correlation in [0, 1] (VoxelMorph's NCC; 1 = identical)."""
    return local_ncc_map(x, y, window, eps).mean()


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
