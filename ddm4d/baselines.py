"""The paper's baselines, VM and VM-diff, built from the VoxelMorph PyPI package behind DDM's interface.

Why a wrapper: generation, evaluation and training take "a model" (:class:`ddm4d.interface.Model`);
:class:`BaselineModel` answers it as :class:`ddm4d.model.DDM` does, so the Table 1 comparison runs one
code path.

- VM: ``voxelmorph.nn.models.VxmPairwise`` without integration; the frame at gamma warps the source
  with gamma * phi (the registration field scaled, as in the paper).
- VM-diff: the same network predicts a stationary velocity field v; the frame at gamma warps the source
  with exp(gamma * v), integrated by scaling and squaring (VoxelMorph's own integrator).

Conventions were checked against the installed package (Testing/test_baselines.py): VoxelMorph's field
has one channel per tensor axis in tensor order, in voxels, and pulls (``meshgrid + disp`` sampled
with ``align_corners=True``) -- the convention of :mod:`ddm4d.warp`, so no conversion is needed.

Loss: DDM's own deformation term, lambda * (-NCC_9(S o phi, T) + lambda_R * |grad f|^2) from
:mod:`ddm4d.losses`, where f is the network output (the displacement for VM, the velocity for VM-diff,
as VoxelMorph regularises the pre-integration field). neurite's NCC expects intensities in [0, 1];
ours is the same local NCC but works on the [-1, 1] images both models see, so the baselines and DDM
are trained on identical inputs with an identical similarity. The constant lambda does not change
Adam's updates (up to its eps); it keeps the logged losses on DDM's scale.

Model files: safetensors weights + JSON metadata ``{"format": "ddm4d-baseline", "method", "config",
"integration_steps", "nb_features", "info"}``; nothing is ever unpickled. Any model file, DDM's or a
baseline's, loads with :func:`ddm4d.checkpoint.load_any_model`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import load_tensors, save_tensors
from .config import DDMConfig
from .errors import InputError
from .interface import Generation, check_one_pair, fields_over_gammas, gamma_tensor
from .losses import local_ncc, smoothness
from .methods import BASELINE_METHODS
from .runfolder import BASELINE_FORMAT
from .model import deform_chunk_size
from .networks.blocks import crop_to, pad_to_multiple
from .warp import warp

__all__ = ["BASELINE_FORMAT", "VMDIFF_INTEGRATION_STEPS", "BaselineModel", "load_baseline", "save_baseline",
           "vxm_features"]

#: scaling-and-squaring steps of VM-diff (VoxelMorph's default int_steps)
VMDIFF_INTEGRATION_STEPS = 7


def vxm_features(config: DDMConfig) -> list[list[int]]:
    """Our deformation network's sizes in ``BasicUNet`` terms (encoder, decoder) at the same depth.

    BasicUNet convolves then pools at each encoder level and opens the decoder with a bottleneck of
    ``decoder[0]`` channels; its last decoder size is repeated once. With encoder[:4] and decoder[:4]
    it has our resolutions and widths: 16, 32, 32, 32 down to 1/8, 32 at 1/16, then 32, 32, 8, 8 back
    up (VoxelMorph-1 adds one more 32 at 1/2 that BasicUNet cannot express).
    """
    return [list(config.encoder_channels[:4]), list(config.decoder_channels[:4])]


def _voxelmorph():
    """Imported on first use: an optional dependency (pip install 'ddm4d[baselines]')."""
    try:
        import voxelmorph
    except ImportError as err:
        raise InputError(f"the VM/VM-diff baselines need the voxelmorph package ({err}); "
                         "install it with: pip install 'ddm4d[baselines]'") from None
    return voxelmorph


class BaselineModel(nn.Module):
    """VM ("vm") or VM-diff ("vmdiff"), a :class:`ddm4d.interface.Model` like :class:`ddm4d.model.DDM`.

    Shapes: source and target (batch, 1, *spatial) in [-1, 1]; fields (batch, ndim, *spatial) in voxels
    of the model grid, pull, channel i along tensor axis 2 + i.
    """

    def __init__(self, config: DDMConfig | None = None, method: str = "vm",
                 integration_steps: int | None = None):
        super().__init__()
        if method not in BASELINE_METHODS:
            raise ValueError(f"method must be one of {BASELINE_METHODS}, got {method!r}")
        vxm = _voxelmorph()
        self.config = config = config or DDMConfig()
        self.method = method
        if method == "vm":
            integration_steps = 0
        elif integration_steps is None:
            integration_steps = VMDIFF_INTEGRATION_STEPS
        if method == "vmdiff" and integration_steps < 1:
            raise ValueError("VM-diff integrates a velocity field: integration_steps must be >= 1")
        self.integration_steps = int(integration_steps)
        self.nb_features = vxm_features(config)
        self.stride = 2 ** len(self.nb_features[0])
        self.network = vxm.nn.models.VxmPairwise(
            config.spatial_dims, source_channels=1, target_channels=1, nb_features=self.nb_features,
            activations=nn.LeakyReLU(config.leaky_slope), integration_steps=self.integration_steps)
        self.info: dict[str, Any] = {}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _check(self, source: torch.Tensor, target: torch.Tensor) -> None:
        expected = self.config.spatial_dims + 2
        if source.dim() != expected or target.shape != source.shape:
            raise ValueError(f"this is a {self.config.spatial_dims}D {self.method} model: expected source and "
                             f"target of one shape (batch, 1, *spatial) with {expected} axes, got "
                             f"{tuple(source.shape)} and {tuple(target.shape)}")

    def network_field(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The network output f: displacement (VM) or stationary velocity (VM-diff), in voxels."""
        self._check(source, target)
        inputs, sizes = pad_to_multiple(torch.cat([source, target], dim=1), self.stride)
        flow = self.network(inputs[:, :1], inputs[:, 1:], return_field_type="velocity")
        self.network.__dict__.pop("velocity", None)  # VxmPairwise keeps the last output; it blocks deepcopy
        return crop_to(flow, sizes)

    def displacement(self, flow: torch.Tensor) -> torch.Tensor:
        """phi from the network output: itself (VM) or exp(flow) by scaling and squaring (VM-diff)."""
        if self.integration_steps == 0:
            return flow
        return self.network.velocity_field_integrator(flow.float())

    # -- training -----------------------------------------------------------------------------------
    def training_losses(self, source: torch.Tensor, target: torch.Tensor, t=None, noise=None,
                        generator=None, middle: torch.Tensor | None = None,
                        gamma: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """lambda * (-NCC(S o phi, T) + lambda_R |grad f|^2); `t`, `noise`, `generator` are DDM's, unused.
        With a real in-between frame `middle` at `gamma`, the field at gamma (gamma f, or exp(gamma f))
        must bring the source onto it too, as in DDM's training."""
        cfg = self.config
        flow = self.network_field(source, target)
        phi = self.displacement(flow)
        ncc = local_ncc(warp(source, phi), target, cfg.ncc_window)
        smooth = smoothness(flow)
        loss = cfg.loss_lambda * (-ncc + cfg.lambda_r * smooth)
        out = {"loss": loss, "diffusion": loss.new_zeros(()), "ncc": ncc, "smooth": smooth}
        if middle is not None:
            scale = gamma.to(flow.dtype).view(-1, *([1] * (flow.dim() - 1)))
            ncc_middle = local_ncc(warp(source, self.displacement(scale * flow)), middle, cfg.ncc_window)
            out["loss"] = loss - cfg.loss_lambda * cfg.inbetween_weight * ncc_middle
            out["ncc_middle"] = ncc_middle
        return out

    # -- inference ----------------------------------------------------------------------------------
    @torch.no_grad()
    def latent_code(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The network output f (float32): what generation scales by gamma."""
        return self.network_field(source, target).float()

    @torch.no_grad()
    def generate(self, source: torch.Tensor, target: torch.Tensor, gammas, subtract_gamma0: bool | None = None,
                 chunk_size: int | None = None, code: torch.Tensor | None = None) -> Generation:
        """Frames S o phi_gamma: phi_gamma = gamma f (VM) or exp(gamma f) (VM-diff), batched over gamma.

        gamma = 0 is the identity for both, so `subtract_gamma0` (DDM's correction) changes nothing and
        is accepted only for the shared interface. `code` is f from :meth:`latent_code`, reused.
        """
        self._check(source, target)
        check_one_pair(source)
        gammas = gamma_tensor(gammas, source.device)
        flow = self.latent_code(source, target) if code is None else code.float()
        phi = fields_over_gammas(lambda g: self.displacement(g * flow), gammas,
                                 chunk_size or self.auto_chunk_size(source), source.dim())
        return Generation(gammas=gammas, fields=phi, code=flow, source=source)

    def auto_chunk_size(self, source: torch.Tensor) -> int:
        """How many gammas to integrate at once (same memory budget as DDM's deformation pass)."""
        return deform_chunk_size(source)


# --------------------------------------------------------------------------------------------- files

def save_baseline(model: BaselineModel, path: str | os.PathLike, **info: Any) -> Path:
    """Weights and everything needed to rebuild a baseline, in one safetensors file (atomic write)."""
    meta = {"format": BASELINE_FORMAT, "method": model.method, "config": model.config.to_dict(),
            "integration_steps": model.integration_steps, "nb_features": model.nb_features, "info": info}
    return save_tensors(path, dict(model.state_dict()), meta)


def load_baseline(path: str | os.PathLike, device: str | torch.device = "cpu") -> BaselineModel:
    """A :class:`BaselineModel` from a file written by :func:`save_baseline`, in eval mode."""
    path = Path(path)
    tensors, meta = load_tensors(path, "cpu")
    if meta.get("format") != BASELINE_FORMAT or meta.get("method") not in BASELINE_METHODS:
        raise InputError(f"{path} is not a ddm4d baseline model file; pass one written by "
                         "`ddm4d train --method vm|vmdiff`")
    try:
        config = DDMConfig.from_dict(meta["config"])
        model = BaselineModel(config, meta["method"], meta.get("integration_steps"))
        model.load_state_dict(tensors, strict=True)
    except (KeyError, ValueError, RuntimeError) as err:
        raise InputError(f"{path}: baseline configuration and weights do not fit this ddm4d ({err})") from None
    model.info = meta.get("info", {})
    return model.to(device).eval()
