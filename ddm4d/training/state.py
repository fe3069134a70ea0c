"""What a checkpoint holds: weights, EMA, optimiser, counters and every RNG state; never pickled."""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checkpoint import load_tensors, save_tensors
from ..errors import InputError
from .options import RUN
from .reporting import Reporter
from .. import runfolder as rf


class EMA:
    """Exponential moving average of the parameters (on by default, --ema 0: off), with a warm-up ramp."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {n: p.detach().clone().float() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (RUN.ema_warmup + self.updates))
        for name, p in model.named_parameters():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - decay)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with the averaged parameters in place of the trained ones."""
        state = dict(model.state_dict())
        for name, value in self.shadow.items():
            state[name] = value.to(state[name].dtype)
        return state


@dataclass
class TrainState:
    """The loop's counters; JSON in the checkpoint metadata."""

    iteration: int = 0
    best_loss: float | None = None
    best_iteration: int | None = None
    elapsed_s: float = 0.0
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    ema_updates: int = 0
    world_size: int = 1


def _numpy_rng_json() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}


def _set_numpy_rng(state: dict[str, Any]) -> None:
    np.random.set_state((state["name"], np.asarray(state["keys"], dtype=np.uint32), state["pos"],
                         state["has_gauss"], state["cached"]))


def save_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None,
                        state: TrainState, fingerprint: dict[str, Any]) -> Path:
    """Model, EMA and optimiser tensors, RNG states (uint8 tensors / JSON) and counters; never pickled."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.shadow.items()})
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in opt["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta = {"format": rf.STATE_FORMAT, "version": rf.RUN_FORMAT_VERSION, "state": dataclasses.asdict(state),
            "param_groups": opt["param_groups"], "optim_scalars": scalars, "numpy_rng": _numpy_rng_json(),
            "python_rng": _python_rng_json(), "fingerprint": fingerprint}
    return save_tensors(path, tensors, meta)


def _python_rng_json() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _split_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        group, _, rest = key.partition(".")
        parts.setdefault(group, {})[rest] = value
    return parts


def restore_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None,
                           device: torch.device) -> TrainState:
    """Load a checkpoint into model/optimiser/EMA and the global RNGs; InputError when it does not fit."""
    tensors, meta = load_tensors(path, "cpu")
    if meta.get("format") != rf.STATE_FORMAT or "state" not in meta:
        raise InputError(f"{path} is not a ddm4d training checkpoint")
    parts = _split_tensors(tensors)
    try:
        model.load_state_dict(parts.get("model", {}), strict=True)
        state_tensors: dict[int, dict[str, Any]] = {}
        for key, value in parts.get("optim", {}).items():
            index, _, name = key.partition(".")
            state_tensors.setdefault(int(index), {})[name] = value
        for index, values in meta.get("optim_scalars", {}).items():
            state_tensors.setdefault(int(index), {}).update(values)
        groups = meta["param_groups"]
        for g in groups:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        optimizer.load_state_dict({"state": state_tensors, "param_groups": groups})
        if ema is not None:
            shadow = parts.get("ema", {})
            if set(shadow) != set(ema.shadow):
                raise ValueError("the checkpoint has no EMA weights for this model")
            ema.shadow = {k: v.to(device).float() for k, v in shadow.items()}
    except (ValueError, RuntimeError, KeyError) as err:
        raise InputError(f"{path} does not fit this model ({str(err).splitlines()[0]})") from None
    known = {f.name for f in dataclasses.fields(TrainState)}
    state = TrainState(**{k: v for k, v in meta["state"].items() if k in known})
    if ema is not None:
        ema.updates = state.ema_updates
    torch.set_rng_state(parts["rng"]["torch"])
    cuda_states = [v for k, v in sorted(parts["rng"].items()) if k.startswith("cuda.")]
    if cuda_states and device.type == "cuda":
        torch.cuda.set_rng_state_all(cuda_states[:torch.cuda.device_count()])
    _set_numpy_rng(meta["numpy_rng"])
    version, internal, gauss = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return state


def load_latest_state(folder: Path, model, optimizer, ema, device,
                      reporter: Reporter) -> tuple[TrainState, Path] | None:
    """The newest readable checkpoint; a damaged one is reported and the one before it is used."""
    files = rf.checkpoint_files(folder)
    for _, path in reversed(files):
        try:
            return restore_training_state(path, model, optimizer, ema, device), path
        except InputError as err:
            reporter.warn(f"checkpoint {path.name} is unreadable ({err}); trying the previous one")
    if files:
        raise InputError(f"no readable checkpoint in {folder} ({len(files)} damaged); start a new run with "
                         "another --out")
    return None
