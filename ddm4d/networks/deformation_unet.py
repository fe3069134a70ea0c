"""G_deform: the VoxelMorph-1 UNet (Balakrishnan et al. 2019) as DDM's code builds it.

Encoder 16, 32, 32, 32, 32 (strided convolutions), decoder 32, 32, 32, 8, 8 and a field head with one
channel per spatial axis; LeakyReLU 0.2. 361,299 parameters in 3D, the count of the authors' code.
"""
from __future__ import annotations

import torch
from torch import nn

from .blocks import conv_nd, conv_transpose_nd


class DeformationUNet(nn.Module):
    """[source, code] (batch, 2, *spatial) -> displacement phi (batch, spatial_dims, *spatial) in voxels,
    channel i along tensor axis 2 + i. Spatial sizes must be divisible by 16."""

    def __init__(self, spatial_dims: int = 3, in_channels: int = 2,
                 encoder_channels: tuple[int, ...] = (16, 32, 32, 32, 32),
                 decoder_channels: tuple[int, ...] = (32, 32, 32, 8, 8, 3), leaky_slope: float = 0.2):
        super().__init__()
        e, d = encoder_channels, decoder_channels
        # in place: the conv output is not kept beside its activation (less peak memory; autograd
        # supports it for a positive slope)
        act = lambda: nn.LeakyReLU(leaky_slope, inplace=True)  # noqa: E731

        def conv_act(i: int, o: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(conv_nd(spatial_dims, i, o, 3, stride), act())

        self.encoder = nn.ModuleList([conv_act(in_channels, e[0])] + [conv_act(e[i], e[i + 1], 2) for i in range(4)])
        self.up = nn.ModuleList([conv_transpose_nd(spatial_dims, c, c) for c in (e[4], d[0], d[1])])
        self.merge = nn.ModuleList([conv_act(e[4] + e[3], d[0]), conv_act(d[0] + e[2], d[1]), conv_act(d[1] + e[1], d[2])])
        self.keep = conv_act(d[2], d[3])
        self.up_full = conv_transpose_nd(spatial_dims, d[3], d[3])
        self.merge_full = conv_act(d[3] + e[0], d[4])
        self.flow = conv_nd(spatial_dims, d[4], d[5])
        # start near the identity transform, as VoxelMorph does
        nn.init.normal_(self.flow.weight, std=1e-5)
        nn.init.zeros_(self.flow.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for layer in self.encoder:
            x = layer(x)
            skips.append(x)
        x = skips.pop()
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([skips.pop(), up(x)], dim=1))
        x = self.keep(x)
        x = self.merge_full(torch.cat([skips.pop(), self.up_full(x)], dim=1))
        return self.flow(x)
