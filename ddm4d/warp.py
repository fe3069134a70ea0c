"""Spatial transformer (Jaderberg et al. 2015) for dense pull fields in voxels.

Convention: phi has shape (batch, ndim, *spatial), channel i is the displacement along tensor axis 2 + i
in voxels, and warp(image, phi)(p) = image(p + phi(p)) with (bi/tri)linear interpolation.
Sampling points outside the image take the nearest border value (the background of a cardiac image).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def identity_grid(sizes: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Voxel coordinates, shape (ndim, *sizes)."""
    axes = [torch.arange(s, device=device, dtype=dtype) for s in sizes]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def warp(image: torch.Tensor, phi: torch.Tensor, mode: str = "bilinear", padding_mode: str = "border") -> torch.Tensor:
    """Sample `image` (batch or 1, C, *spatial) at p + phi(p); returns (batch, C, *spatial).

    >>> img = torch.arange(16.).reshape(1, 1, 4, 4)
    >>> phi = torch.zeros(1, 2, 4, 4); phi[:, 1] = 1.0        # one voxel along x
    >>> warp(img, phi)[0, 0, 0].tolist()
    [1.0, 2.0, 3.0, 3.0]
    """
    sizes = tuple(phi.shape[2:])
    ndim = len(sizes)
    if phi.shape[1] != ndim or tuple(image.shape[2:]) != sizes:
        raise ValueError(f"field of shape {tuple(phi.shape)} does not fit image of shape {tuple(image.shape)}")
    if image.shape[0] == 1 and phi.shape[0] > 1:
        image = image.expand(phi.shape[0], *image.shape[1:])
    # the grid in grid_sample's layout ((x, y[, z]) last, normalised to [-1, 1] with align_corners:
    # -1 and 1 are the centres of the corner voxels) built with one copy of phi; in place when no
    # gradient is needed, since at 10 frames of 128x128x32 each temporary is 63 MB
    scale = torch.tensor([2.0 / max(s - 1, 1) for s in reversed(sizes)], device=phi.device)
    base = identity_grid(sizes, phi.device).movedim(0, -1).flip(-1) * scale - 1.0
    offsets = phi.float().movedim(1, -1).flip(-1)
    # a NaN displacement (a diverged fit) would reach grid_sample, whose CPU backward crashes the
    # process on NaN coordinates (torch 2.13): such voxels do not move, and get no gradient
    if offsets.requires_grad and torch.is_grad_enabled():
        grid = torch.addcmul(base, torch.nan_to_num(offsets, nan=0.0), scale)
    else:
        grid = torch.nan_to_num_(offsets, nan=0.0).mul_(scale).add_(base)
    return F.grid_sample(image.float(), grid, mode=mode, padding_mode=padding_mode, align_corners=True)


class SpatialTransformer(nn.Module):
    """Module wrapper of :func:`warp`, for use inside networks."""

    def __init__(self, mode: str = "bilinear", padding_mode: str = "border"):
        super().__init__()
        self.mode, self.padding_mode = mode, padding_mode

    def forward(self, image: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        return warp(image, phi, self.mode, self.padding_mode)
