"""G_diffuse: the time-conditioned DDPM UNet that maps [source, target, x_t] and t to the latent code.

Layout as in the authors' configuration (inner 8 channels, multipliers 1, 2, 4, 4; one residual block
per level down, two up; a middle of two blocks with linear attention after the first): 715,665
parameters in 3D, the count of the authors' code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import GroupNorm, LinearAttention, ResidualBlock, SinusoidalEmbedding, conv_nd


class DiffusionUNet(nn.Module):
    """Input (batch, in_channels, *spatial) with spatial sizes divisible by 2**(len(channel_mults)-1)."""

    def __init__(self, spatial_dims: int = 3, in_channels: int = 3, out_channels: int = 1, channels: int = 8,
                 channel_mults: tuple[int, ...] = (1, 2, 4, 4), res_blocks: int = 1, attention_heads: int = 4,
                 norm_groups: int = 8, dropout: float = 0.0):
        super().__init__()
        self.spatial_dims = spatial_dims
        time_dim = channels
        self.time_mlp = nn.Sequential(SinusoidalEmbedding(channels), nn.Linear(channels, 4 * channels), nn.SiLU(),
                                      nn.Linear(4 * channels, time_dim))
        block = lambda i, o: ResidualBlock(spatial_dims, i, o, time_dim, norm_groups, dropout)  # noqa: E731

        self.inc = conv_nd(spatial_dims, in_channels, channels)
        self.downs = nn.ModuleList()
        skip_channels = [channels]
        ch = channels
        for level, mult in enumerate(channel_mults):
            for _ in range(res_blocks):
                self.downs.append(block(ch, channels * mult))
                ch = channels * mult
                skip_channels.append(ch)
            if level < len(channel_mults) - 1:
                self.downs.append(conv_nd(spatial_dims, ch, ch, 3, stride=2))
                skip_channels.append(ch)

        self.mid1 = block(ch, ch)
        self.mid_attention = LinearAttention(spatial_dims, ch, attention_heads, norm_groups)
        self.mid2 = block(ch, ch)

        self.ups = nn.ModuleList()
        for level in reversed(range(len(channel_mults))):
            for _ in range(res_blocks + 1):
                self.ups.append(block(ch + skip_channels.pop(), channels * channel_mults[level]))
                ch = channels * channel_mults[level]
            if level > 0:
                self.ups.append(conv_nd(spatial_dims, ch, ch))  # after nearest x2 upsampling
        self.out_norm = GroupNorm(min(norm_groups, ch), ch)
        self.out = conv_nd(spatial_dims, ch, out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time_mlp(t)
        h = self.inc(x)
        skips = [h]
        for layer in self.downs:
            h = layer(h, temb) if isinstance(layer, ResidualBlock) else layer(h)
            skips.append(h)
        h = self.mid2(self.mid_attention(self.mid1(h, temb)), temb)
        for layer in self.ups:
            if isinstance(layer, ResidualBlock):
                h = layer(torch.cat([h, skips.pop()], dim=1), temb)
            else:
                h = layer(F.interpolate(h, scale_factor=2, mode="nearest"))
        return self.out(F.silu(self.out_norm(h)))
