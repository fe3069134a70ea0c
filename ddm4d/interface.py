"""What every ddm4d model answers: DDM (:mod:`ddm4d.model`) and the VM / VM-diff baselines (:mod:`ddm4d.baselines`).

Generation, evaluation, training and the model files take "a model" and use only :class:`Model` (plus
what every ``torch.nn.Module`` has: ``.to``, ``.train``, ``.eval``, ``.parameters``, ``.state_dict``), so
the paper's comparison runs one code path. Also here: what ``generate`` returns and the pieces of it
the models share.

Shapes: source and target (batch, 1, *spatial) in [-1, 1], spatial = ([z,] y, x); fields (batch, ndim,
*spatial) in voxels of the model grid, pull, channel i along tensor axis 2 + i.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Protocol, runtime_checkable

import torch

from .config import DDMConfig
from .warp import warp


@dataclass
class Generation:
    """What :meth:`Model.generate` returns: gammas (G,), fields (G, ndim, *spatial), the code the fields
    were made from (:meth:`Model.latent_code`) and the source they move; frames (G, 1, *spatial) = the
    source warped by each field, made on first use: ``ddm4d generate`` maps the fields to the source's
    own geometry and warps there, so it never needs frames on the model grid (0.1 s of 11 frames at
    128 x 128 x 32 on 2 cores)."""

    gammas: torch.Tensor
    fields: torch.Tensor
    code: torch.Tensor
    source: torch.Tensor

    @cached_property
    def frames(self) -> torch.Tensor:
        with torch.no_grad():
            return warp(self.source.float(), self.fields)


@runtime_checkable
class Model(Protocol):
    """The interface of a ddm4d model; ``isinstance(m, Model)`` checks that every member is there."""

    #: which model this is: "ddm", "vm" or "vmdiff" (ddm4d.methods.METHODS); it chooses the file format
    method: str
    #: the model grid (image_size, spacing), the dimensionality and the loss weights; saved with the weights
    config: DDMConfig
    #: free metadata saved with the weights (training iteration, data, ...); {} for a new model
    info: dict[str, Any]

    def training_losses(self, source: torch.Tensor, target: torch.Tensor, t: torch.Tensor | None = None,
                        noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                        middle: torch.Tensor | None = None,
                        gamma: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The training loss of a batch of pairs: ``loss`` and its logged parts ``diffusion``, ``ncc``,
        ``smooth`` (and ``ncc_middle`` with `middle`, a real in-between frame at normalised time `gamma`,
        shape (batch,)). `t`, `noise` and `generator` steer DDM's diffusion step; the baselines ignore them."""
        ...

    def latent_code(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """What generation scales by gamma, for one pair: DDM's latent code c, the baselines' network
        output f. Computed once and handed to :meth:`generate` as `code`."""
        ...

    def generate(self, source: torch.Tensor, target: torch.Tensor, gammas, subtract_gamma0: bool | None = None,
                 chunk_size: int | None = None, code: torch.Tensor | None = None) -> Generation:
        """Frames and fields at every gamma in [0, 1] of one pair (batch 1), batched over gamma, at most
        `chunk_size` gammas per pass (default :meth:`auto_chunk_size`). `code` from :meth:`latent_code`
        is reused; `subtract_gamma0` makes gamma = 0 the exact identity (DDM's option, default from its
        config; a baseline's gamma = 0 is the identity anyway)."""
        ...

    def auto_chunk_size(self, source: torch.Tensor) -> int:
        """How many gammas fit through one pass at once for this source (a memory budget)."""
        ...


def gamma_tensor(gammas, device: torch.device) -> torch.Tensor:
    """Gammas as a flat float tensor, checked to be a non-empty list of values in [0, 1]."""
    gammas = torch.as_tensor(gammas, dtype=torch.float32, device=device).flatten()
    if gammas.numel() == 0 or bool(((gammas < 0) | (gammas > 1)).any()):
        raise ValueError(f"gammas must be a non-empty list of values in [0, 1], got {gammas.tolist()}")
    return gammas


def check_one_pair(source: torch.Tensor) -> None:
    """generate takes one pair: batch 1."""
    if source.shape[0] != 1:
        raise ValueError(f"generate takes one source/target pair (batch 1), got batch {source.shape[0]}")


def fields_over_gammas(field_at: Callable[[torch.Tensor], torch.Tensor], gammas: torch.Tensor, chunk_size: int,
                       dims: int) -> torch.Tensor:
    """``field_at(g)`` for all gammas, concatenated; `chunk_size` gammas per call bound the memory of a
    pass. g has shape (k, 1, ..., 1), `dims` axes, so that it scales a (1, channels, *spatial) code."""
    fields = []
    for start in range(0, gammas.numel(), chunk_size):
        g = gammas[start:start + chunk_size].view(-1, *([1] * (dims - 1)))
        fields.append(field_at(g))
    return torch.cat(fields)
