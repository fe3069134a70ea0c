"""Layer factories and small blocks shared by both UNets; one code path for 2D and 3D."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def conv_nd(spatial_dims: int, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1,
            bias: bool = True) -> nn.Module:
    cls = {2: nn.Conv2d, 3: Conv3d}[spatial_dims]
    return cls(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias)


def _bf16_on_cpu(x: torch.Tensor) -> bool:
    if x.device.type != "cpu":
        return False
    if x.dtype == torch.bfloat16:
        return True
    try:
        return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled() and torch.get_autocast_cpu_dtype() == torch.bfloat16


class Conv3d(nn.Conv3d):
    """nn.Conv3d; a strided convolution whose output is one voxel thick along an axis runs in fp32
    where the CPU would run it in bf16. Why: oneDNN's bf16 kernel for a stride-2 convolution whose
    output's last axis is 1 (torch 2.13, CPUs with AMX) reads memory it never wrote: values off by up
    to 1e36 or NaN, different from run to run, in the output and in the weights' gradient. The bundled
    3D model's grid (16 slices) makes such a layer at the bottom of G_deform, where it is 4 x 4 x 1
    voxels and fp32 costs nothing. Same parameters and names as nn.Conv3d: model files are unchanged."""

    def _output_size(self, x: torch.Tensor) -> list[int]:
        return [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                zip(x.shape[2:], self.padding, self.dilation, self.kernel_size, self.stride)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if max(self.stride) > 1 and isinstance(self.padding, tuple) and _bf16_on_cpu(x) \
                and 1 in self._output_size(x):
            with torch.autocast("cpu", enabled=False):
                return self._conv_forward(x.float(), self.weight.float(), _float(self.bias)).to(torch.bfloat16)
        return super().forward(x)


class ConvTranspose3d(nn.ConvTranspose3d):
    """nn.ConvTranspose3d; from an input one voxel thick along an axis it runs in fp32 where the CPU
    would run it in bf16: the gradient of its input is a stride-2 convolution down to that one voxel,
    the bf16 kernel of Conv3d's note (training's input gradients off by up to 1e36 in a sweep; bf16
    training of the bundled 3D model's grid ended in NaN). Same parameters and names."""

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if _bf16_on_cpu(x) and 1 in x.shape[2:] and output_size is None:
            with torch.autocast("cpu", enabled=False):
                return F.conv_transpose3d(x.float(), self.weight.float(), _float(self.bias), self.stride, self.padding,
                                          self.output_padding, self.groups, self.dilation).to(torch.bfloat16)
        return super().forward(x, output_size)


def _float(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.float()


def conv_transpose_nd(spatial_dims: int, in_ch: int, out_ch: int) -> nn.Module:
    """Exact x2 upsampling transposed convolution (kernel 3, stride 2), as VoxelMorph-1 in DDM's code."""
    cls = {2: nn.ConvTranspose2d, 3: ConvTranspose3d}[spatial_dims]
    return cls(in_ch, out_ch, 3, stride=2, padding=1, output_padding=1)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm; in bf16 on the CPU computed in the standard layout, because PyTorch's CPU kernels
    for bf16 channels-last 3D input (the layout that keeps the convolutions on oneDNN) are 3-5x slower,
    most of all backward: a bf16 training iteration at 128 x 128 x 32 spent a quarter of its time there
    (1.86 s against 2.42 s per iteration with this). In fp32 the two layout copies cost what they save,
    so fp32 keeps PyTorch's kernel. Same parameters and names as nn.GroupNorm: model files are unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.dim() == 5 and not x.is_contiguous() \
                and x.is_contiguous(memory_format=torch.channels_last_3d):
            y = F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)
            return y.contiguous(memory_format=torch.channels_last_3d)
        return super().forward(x)


class SinusoidalEmbedding(nn.Module):
    """Transformer-style embedding of the integer diffusion step t (Vaswani et al. 2017)."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"embedding dimension must be even, got {dim}")
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([args.sin(), args.cos()], dim=1)


class ResidualBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added in between (DDPM's ResNet block)."""

    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int, time_dim: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = GroupNorm(min(groups, in_ch), in_ch)
        self.conv1 = conv_nd(spatial_dims, in_ch, out_ch)
        self.time = nn.Linear(time_dim, out_ch)
        self.norm2 = GroupNorm(min(groups, out_ch), out_ch)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv_nd(spatial_dims, out_ch, out_ch)
        self.skip = conv_nd(spatial_dims, in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(temb).view(*temb.shape[:1], -1, *([1] * (x.dim() - 2)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + self.skip(x)


class LinearAttention(nn.Module):
    """Linear self-attention (Shen et al. 2021): softmax over features for queries and over
    positions for keys, so cost grows linearly with the number of voxels."""

    def __init__(self, spatial_dims: int, channels: int, heads: int, groups: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels cannot be split into {heads} heads")
        self.heads = heads
        self.norm = GroupNorm(min(groups, channels), channels)
        self.to_qkv = conv_nd(spatial_dims, channels, 3 * channels, 1, bias=False)
        self.to_out = conv_nd(spatial_dims, channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        q, k, v = self.to_qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, -1).unbind(1)
        q = q.softmax(dim=-2) * (c // self.heads) ** -0.5
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q).reshape(b, c, *spatial)
        return x + self.to_out(out)


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = "replicate") -> tuple[torch.Tensor, tuple[int, ...]]:
    """Pad the spatial axes at their far end up to a multiple of `multiple`; returns the original sizes."""
    sizes = tuple(x.shape[2:])
    pads: list[int] = []
    for s in reversed(sizes):
        pads += [0, (-s) % multiple]
    if any(pads):
        x = F.pad(x, pads, mode=mode)
    return x, sizes


def crop_to(x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    return x[(slice(None), slice(None)) + tuple(slice(0, s) for s in sizes)]
