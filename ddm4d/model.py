"""The Diffusion Deformable Model: G_diffuse + G_deform, the training loss and batched generation.

It answers :class:`ddm4d.interface.Model` (method "ddm"), as the VM / VM-diff baselines do.

Shapes: source and target are (batch, 1, *spatial) in [-1, 1], spatial = ([z,] y, x), any sizes (padded
internally to the networks' stride and cropped back). Fields phi are (batch, ndim, *spatial) in voxels.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .config import DDMConfig
from .diffusion import NoiseSchedule
from .interface import Generation, check_one_pair, fields_over_gammas, gamma_tensor
from .losses import diffusion_loss, local_ncc, smoothness
from .methods import DDM_METHOD
from .networks import DeformationUNet, DiffusionUNet
from .networks.blocks import crop_to, pad_to_multiple
from .warp import warp

# PyTorch's CPU 3D convolution uses oneDNN only when batch*channels*D*H > 20480 and otherwise a slow
# generic path; with z (32 slices) last, D*H = 128*128 and nearly every layer qualifies. The networks
# therefore see volumes as (y, x, z); fields come back in (z, y, x) order (see benchmarks/variants.py).
_NET_AXES_3D = (0, 1, 3, 4, 2)      # (b, c, z, y, x) -> (b, c, y, x, z)
_FROM_NET_AXES_3D = (0, 1, 4, 2, 3)
_FIELD_CHANNELS_FROM_NET = [2, 0, 1]  # (dy, dx, dz) -> (dz, dy, dx)

# Activation memory of one gamma in the deformation pass, bytes per voxel (measured, fp32, no grad,
# with headroom); used to split the gammas into chunks that fit.
DEFORM_BYTES_PER_VOXEL = 400
CPU_DEFORM_BUDGET_BYTES = int(0.45 * 2**30)


def deform_chunk_size(source: torch.Tensor) -> int:
    """How many gammas fit at once: half the free GPU memory, or a CPU budget of 0.45 GiB (larger
    chunks were no faster on the CPU, only heavier)."""
    per_gamma = DEFORM_BYTES_PER_VOXEL * math.prod(source.shape[2:])
    if source.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(source.device)
        budget = 0.5 * free
    else:
        budget = CPU_DEFORM_BUDGET_BYTES
    return max(1, int(budget // per_gamma))


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last_3d) if x.dim() == 5 else x


class DDM(nn.Module):
    """G_diffuse and G_deform of one configuration; a :class:`ddm4d.interface.Model`."""

    method = DDM_METHOD

    def __init__(self, config: DDMConfig | None = None):
        super().__init__()
        self.config = config = config or DDMConfig()
        self.info: dict[str, Any] = {}
        self.diffusion = DiffusionUNet(
            config.spatial_dims, in_channels=3, out_channels=1, channels=config.diffusion_channels,
            channel_mults=config.channel_mults, res_blocks=config.res_blocks,
            attention_heads=config.attention_heads, norm_groups=config.norm_groups, dropout=config.dropout)
        self.deformation = DeformationUNet(
            config.spatial_dims, in_channels=2, encoder_channels=config.encoder_channels,
            decoder_channels=config.decoder_channels, leaky_slope=config.leaky_slope)
        self.schedule = NoiseSchedule(config.timesteps, config.beta_start, config.beta_end)
        if config.spatial_dims == 3:
            # channels-last weights keep oneDNN on its fast path (benchmarks/variants.py)
            self.diffusion.to(memory_format=torch.channels_last_3d)
            self.deformation.to(memory_format=torch.channels_last_3d)

    def _to_net(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(_NET_AXES_3D) if x.dim() == 5 else x

    def _field_from_net(self, phi: torch.Tensor) -> torch.Tensor:
        return phi.permute(_FROM_NET_AXES_3D)[:, _FIELD_CHANNELS_FROM_NET] if phi.dim() == 5 else phi

    def _image_from_net(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(_FROM_NET_AXES_3D) if x.dim() == 5 else x

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _check(self, source: torch.Tensor, target: torch.Tensor | None = None) -> None:
        expected = self.config.spatial_dims + 2
        if source.dim() != expected:
            raise ValueError(f"this is a {self.config.spatial_dims}D model: expected source of shape "
                             f"(batch, 1, {'z, ' if expected == 5 else ''}y, x), got {tuple(source.shape)}")
        if target is not None and target.shape != source.shape:
            raise ValueError(f"source {tuple(source.shape)} and target {tuple(target.shape)} differ in shape")

    # -- the two modules, on padded inputs --------------------------------------------------------
    def _code(self, source: torch.Tensor, target: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        inputs, sizes = pad_to_multiple(torch.cat([source, target, x_t], dim=1), self.config.stride)
        return crop_to(self.diffusion(_channels_last(inputs), t), sizes)

    def _deform(self, source: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """phi = G_deform([source, code]) for a batch of (scaled) latent codes, in the networks' axis
        order (see _NET_AXES_3D); source may have batch 1."""
        if source.shape[0] == 1 and code.shape[0] > 1:
            source = source.expand(code.shape[0], *source.shape[1:])
        inputs, sizes = pad_to_multiple(torch.cat([source, code.to(source.dtype)], dim=1), self.config.stride)
        return crop_to(self.deformation(_channels_last(inputs)), sizes)

    # -- training -----------------------------------------------------------------------------------
    def training_losses(self, source: torch.Tensor, target: torch.Tensor, t: torch.Tensor | None = None,
                        noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                        subtract_gamma0: bool | None = None, middle: torch.Tensor | None = None,
                        gamma: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """L = L_diffuse + lambda * (-NCC(S o phi, T) + lambda_R * |grad phi|^2)  (DDM eq. 5-7).

        As in the authors' code, the deformation branch takes the code predicted at the sampled step t.
        With `subtract_gamma0` (default: config.subtract_gamma0 and config.subtracted_field_loss) phi is
        G_deform(S, c) - G_deform(S, 0), the field that generation outputs in that mode; off is the
        paper's loss. With a real in-between frame `middle` at normalised time `gamma` (batch,), the
        field at gamma c must bring the source onto it too (weight config.inbetween_weight; not in the
        paper): this is what makes gamma mean time and the code carry the target.
        Returns the total `loss` and its parts `diffusion`, `ncc` (a similarity, higher is better),
        `smooth` and, with `middle`, `ncc_middle`.
        """
        self._check(source, target)
        cfg = self.config
        if subtract_gamma0 is None:
            subtract_gamma0 = cfg.subtract_gamma0 and cfg.subtracted_field_loss
        source, target = self._to_net(source), self._to_net(target)
        if noise is not None:
            noise = self._to_net(noise)
        if t is None:
            t = self.schedule.sample_timesteps(source.shape[0], source.device, generator)
        if noise is None:
            noise = torch.randn(target.shape, device=target.device, dtype=target.dtype, generator=generator)
        x_t = self.schedule.q_sample(target, t, noise)
        code = self._code(source, target, x_t, t)
        batch = source.shape[0]
        # one deformation pass for every code: c, gamma c (with `middle`) and the zero code (subtracted
        # field). G_deform has no normalisation, so the batch does not couple them. Against a separate
        # zero-code pass recomputed in backward, a 128 x 128 x 32 step is 5% (bf16) and 8% (fp32) faster
        # (interleaved in one process), its peak memory 0.1-0.3 GiB higher, still below the authors'
        # (benchmarks/bench.py)
        codes = [code]
        if middle is not None:
            codes.append(gamma.to(code.dtype).view(-1, *([1] * (code.dim() - 1))) * code)
        if subtract_gamma0:
            codes.append(torch.zeros_like(code))
        phi_all = self._deform(source.repeat(len(codes), *([1] * (source.dim() - 1))), torch.cat(codes))
        if subtract_gamma0:
            phi0 = phi_all[-batch:]
            phi_all = phi_all[:-batch] - phi0.repeat(len(codes) - 1, *([1] * (phi0.dim() - 1)))
        phi = phi_all[:batch]
        warped = warp(source, phi)
        l_diffuse = diffusion_loss(code, noise)
        ncc = local_ncc(warped, target, cfg.ncc_window)
        smooth = smoothness(phi)
        loss = l_diffuse + cfg.loss_lambda * (-ncc + cfg.lambda_r * smooth)
        out = {"loss": loss, "diffusion": l_diffuse, "ncc": ncc, "smooth": smooth}
        if middle is not None:
            ncc_middle = local_ncc(warp(source, phi_all[batch:]), self._to_net(middle), cfg.ncc_window)
            out["loss"] = loss - cfg.loss_lambda * cfg.inbetween_weight * ncc_middle
            out["ncc_middle"] = ncc_middle
        return out

    # -- inference ----------------------------------------------------------------------------------
    @torch.no_grad()
    def latent_code(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """c = G_diffuse(S, T, x_0 = T; t = 0): the code of the full source-to-target deformation."""
        self._check(source, target)
        t = torch.zeros(source.shape[0], dtype=torch.long, device=source.device)
        return self._image_from_net(self._code(self._to_net(source), self._to_net(target), self._to_net(target), t))

    @torch.no_grad()
    def generate(self, source: torch.Tensor, target: torch.Tensor, gammas, subtract_gamma0: bool | None = None,
                 chunk_size: int | None = None, code: torch.Tensor | None = None) -> Generation:
        """Frames S o phi_gamma with phi_gamma = G_deform(S, gamma c) for all gammas, batched over gamma.

        `subtract_gamma0` (default from the config, on) uses phi_gamma - phi_0 so that gamma = 0 gives
        the source exactly; off is the paper's plain behaviour. `chunk_size` bounds how many gammas go
        through the deformation network at once (default: as many as fit in memory). A `code` computed
        before by :meth:`latent_code` is reused.
        """
        self._check(source, target)
        check_one_pair(source)
        gammas = gamma_tensor(gammas, source.device)
        subtract = self.config.subtract_gamma0 if subtract_gamma0 is None else subtract_gamma0
        if code is None:
            code = self.latent_code(source, target)

        gammas_run = gammas
        if subtract and not bool((gammas == 0).any()):
            gammas_run = torch.cat([gammas.new_zeros(1), gammas])
        net_source, net_code = self._to_net(source), self._to_net(code)

        def field_at(g: torch.Tensor) -> torch.Tensor:
            return self._field_from_net(self._deform(net_source, g.to(code.dtype) * net_code)).float()

        phi = fields_over_gammas(field_at, gammas_run, chunk_size or self.auto_chunk_size(source),
                                 source.dim()).contiguous()
        if subtract:
            phi = phi - phi[int(torch.nonzero(gammas_run == 0)[0])]
        if gammas_run.numel() != gammas.numel():
            phi = phi[1:]
        return Generation(gammas=gammas, fields=phi, code=code, source=source)

    def auto_chunk_size(self, source: torch.Tensor) -> int:
        """How many gammas go through the deformation network at once (see deform_chunk_size)."""
        return deform_chunk_size(source)
