"""`ddm4d train`: train DDM (or the VM / VM-diff baselines) on an ACDC-layout folder or a pairs CSV.

Why it is built this way:
- Runs take hours, so every run lives in one folder (RUN_DIR) that is always resumable: checkpoints are
  safetensors + JSON written atomically (temp file, fsync, rename), so a crash or `kill -9` never leaves a
  half-written checkpoint; a damaged last checkpoint falls back to the one before it.
- Resuming is exact: the checkpoint holds model, EMA and optimiser tensors, the iteration, and the global
  torch / numpy / python RNG states; the per-iteration randomness (diffusion step t, noise, augmentation,
  order of pairs) is derived from (seed, rank, iteration, epoch), so an interrupted + resumed run ends with
  bit-identical weights to an uninterrupted one (same device and thread count).
- SIGINT / SIGTERM finish the current iteration, write a checkpoint, then exit with 130 / 143 (128 +
  signal number, the shell convention) -- only after the checkpoint is on disk. A second signal aborts at
  once (the previous checkpoints are intact).
- `--progress json` prints one JSON event per line on stdout (the Slicer training module reads them;
  warnings go to stderr); RUN_DIR/log.jsonl records the same events. Field names are a contract:
    start      run_dir, method, device, iteration (>0 on resume), total_iterations, epochs, subjects,
               validation_subjects, config (DDMConfig), run (run settings), world_size
    iteration  iteration (completed steps), epoch (1-based), loss, diffusion, ncc, smooth, lr, elapsed_s,
               eta_s, it_per_s   (every --log-every iterations, and the last one)
    epoch      epoch (the one just finished), iteration, loss (its mean)
    checkpoint iteration, path
    validation iteration, loss, ncc, best
    done       iteration, model (RUN_DIR/model.safetensors), elapsed_s, stopped (true after a signal)
    error      message
- Scale: under `torchrun` (env RANK / WORLD_SIZE / LOCAL_RANK) training uses DistributedDataParallel,
  shards every epoch's pairs across ranks like DistributedSampler, and only rank 0 writes files or prints.
  RUN_DIR must be on a file system every rank can read (for --resume).

RUN_DIR layout: config.json, model.safetensors (the EMA weights, on by default, with the raw ones in
model_raw.safetensors; with --ema 0 the raw ones), model_best.safetensors (best validation loss),
checkpoints/ckpt_<iteration>.safetensors (the last --keep-last) and checkpoints/best.safetensors,
log.jsonl, loss_curve.png, tensorboard/ (when the tensorboard package is installed), cache/ (with
--disk-cache), .lock (pid of the training process).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .baselines import BaselineModel, load_any_model, model_method, save_any_model
from .checkpoint import STATE_FORMAT, atomic_write, load_tensors, save_tensors
from .config import DDMConfig
from .data import Dataset, Subject, scan_dataset
from .device import autocast, resolve_device
from .errors import InputError
from .files import check_writable, process_alive, remove_temporary_files
from .geometry import to_model_grid

RUN_FORMAT = "ddm4d-run"
RUN_FORMAT_VERSION = 1
#: the files of RUN_DIR that a run writes over: config.json identifies a run folder as ddm4d's, and
#: without it none of these may be there (train never overwrites a file it did not write)
RUN_FILES = ("config.json", "log.jsonl", "model.safetensors", "model_raw.safetensors", "loss_curve.png")
METHODS = ("ddm", "vm", "vmdiff")
#: exit codes after a clean stop: 128 + signal number
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


@dataclass(frozen=True)
class RunDefaults:
    """Defaults of the run itself (the model's and the paper's numbers live in DDMConfig)."""

    seed: int = 0
    checkpoint_every: int = 500  # iterations
    keep_last: int = 3  # checkpoints kept besides best.safetensors
    validation_fraction: float = 0.1
    log_every: int = 1
    # EMA of the weights, saved as the model (the raw weights beside it): measured on the phantom
    # (README, Results), 0.999 beat the raw weights of the same run on PSNR, Dice total and EF
    ema: float = 0.999
    ema_warmup: float = 10.0  # EMA decay ramps as (1 + n) / (ema_warmup + n) up to --ema
    # training pairs: "cine" draws i -> j from every frame of each subject's cine (both directions, the
    # identity included) with a real in-between frame as supervision; "ed-es" is the paper's ED -> ES
    pairs: str = "cine"
    identity_fraction: float = 0.1  # of "cine" draws: source = target, which must not move
    flip_probability: float = 0.5  # --augment: per spatial axis, the same flip for source and target
    intensity_scale: float = 0.1  # --augment: x * U(1 - s, 1 + s) + U(-shift, shift), then clipped
    intensity_shift: float = 0.1


RUN = RunDefaults()
# streams of derived seeds, so no two kinds of draw ever share one
_STREAM_TRAIN, _STREAM_AUGMENT, _STREAM_ORDER, _STREAM_VALIDATION, _STREAM_PAIRS = range(5)
PAIR_MODES = ("cine", "ed-es")


# ============================================================================================ options

@dataclass
class TrainOptions:
    """Everything `ddm4d train` takes. None means "not given": the default, or the stored value on --resume."""

    data: str
    out: str
    epochs: int | None = None
    iterations: int | None = None
    loss_lambda: float | None = None
    lr: float | None = None
    batch_size: int | None = None
    device: str = "auto"
    resume: bool = False
    progress: str = "bar"
    seed: int | None = None
    checkpoint_every: int | None = None
    keep_last: int | None = None
    validation_fraction: float | None = None
    validate_every: int | None = None
    log_every: int | None = None
    ema: float | None = None
    augment: bool | None = None
    method: str | None = None
    size: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None
    spatial_dims: int | None = None
    init: str | None = None
    disk_cache: bool = False
    paper_loss: bool | None = None
    pairs: str | None = None


def _check_options(o: TrainOptions) -> None:
    """User mistakes in the options, each with the fix."""
    positive = {"--epochs": o.epochs, "--iterations": o.iterations, "--batch-size": o.batch_size,
                "--checkpoint-every": o.checkpoint_every, "--keep-last": o.keep_last,
                "--validate-every": o.validate_every, "--log-every": o.log_every}
    for name, value in positive.items():
        if value is not None and value < 1:
            raise InputError(f"{name} must be at least 1, got {value}")
    if o.epochs is not None and o.iterations is not None:
        raise InputError("give --epochs or --iterations, not both")
    if o.lr is not None and not o.lr > 0:
        raise InputError(f"--lr must be positive, got {o.lr}; the paper uses 2e-4")
    if o.loss_lambda is not None and not o.loss_lambda >= 0:
        raise InputError(f"--lambda must be >= 0, got {o.loss_lambda}; the paper uses 20")
    if o.seed is not None and o.seed < 0:
        raise InputError(f"--seed must be a non-negative integer, got {o.seed}")
    if o.validation_fraction is not None and not 0 <= o.validation_fraction < 1:
        raise InputError(f"--validation-fraction must be in [0, 1), got {o.validation_fraction}")
    if o.ema is not None and not 0 <= o.ema < 1:
        raise InputError(f"--ema DECAY must be in [0, 1), e.g. {RUN.ema} (0 turns the average off); got {o.ema}")
    if o.method is not None and o.method not in METHODS:
        raise InputError(f"--method must be one of {', '.join(METHODS)}, got {o.method}")
    if o.pairs is not None and o.pairs not in PAIR_MODES:
        raise InputError(f"--pairs must be one of {', '.join(PAIR_MODES)}, got {o.pairs}")
    if o.progress not in ("bar", "json"):
        raise InputError(f"--progress must be bar or json, got {o.progress}")
    if o.size is not None and (len(o.size) not in (2, 3) or min(o.size) < 1):
        raise InputError(f"--size takes 2 (X Y) or 3 (X Y Z) positive voxel counts, got {list(o.size)}")
    if o.spacing is not None and (len(o.spacing) not in (2, 3) or min(o.spacing) <= 0):
        raise InputError(f"--spacing takes 2 or 3 positive values in mm, got {list(o.spacing)}")


# ====================================================================================== distribution

@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    active: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")), False)

    def start(self, device: torch.device) -> None:
        """init_process_group: nccl on GPUs, gloo on CPU (PyTorch's own engine, never a home-made one)."""
        if self.world_size > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend)
            self.active = True

    def all_ok(self, ok: bool, device: torch.device) -> bool:
        """True when every rank is ok: keeps ranks from waiting forever on one that failed."""
        if not self.active:
            return ok
        flag = torch.tensor([1.0 if ok else 0.0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item() > 0)

    def stop(self) -> None:
        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        self.active = False


def _process_device(requested: str, dist: Dist) -> torch.device:
    device = resolve_device(requested)
    if device.type == "cuda" and dist.world_size > 1:
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    return device


# =========================================================================================== reporting

class Reporter:
    """Events to stdout (json mode) or a tqdm bar (stderr), and to log.jsonl; silent off rank 0."""

    def __init__(self, mode: str = "bar", enabled: bool = True):
        self.mode, self.enabled = mode, enabled
        self.log = None
        self.bar = None
        self.tensorboard = None

    def open_log(self, path: Path) -> None:
        if self.enabled:
            self.log = open(path, "a", encoding="utf-8")

    def open_tensorboard(self, folder: Path, start: int) -> None:
        """TensorBoard event files when the tensorboard package is installed; skipped silently otherwise."""
        if not self.enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # ImportError, or a tensorboard too old for this torch
            return
        self.tensorboard = SummaryWriter(str(folder), purge_step=start or None)

    def emit(self, event: dict[str, Any], to_log: bool = True) -> None:
        if not self.enabled:
            return
        line = json.dumps(event)
        if self.mode == "json":
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        if self.log is not None and to_log:
            self.log.write(line + "\n")
            self.log.flush()
        self._tensorboard(event)
        self._bar(event)

    def warn(self, message: str) -> None:
        if self.enabled:
            self._stderr(f"ddm4d train: warning: {message}")

    def note(self, message: str) -> None:
        """A human line on stderr (bar mode only: json mode keeps stderr for warnings)."""
        if self.enabled and self.mode == "bar":
            self._stderr(message)

    def _stderr(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def _bar(self, event: dict[str, Any]) -> None:
        if self.mode != "bar":
            return
        kind = event["event"]
        if kind == "start":
            from tqdm import tqdm
            self.bar = tqdm(total=event["total_iterations"], initial=event["iteration"], file=sys.stderr,
                            unit="it", dynamic_ncols=True, desc=f"train {event['method']}")
        elif kind == "iteration" and self.bar is not None:
            self.bar.set_postfix(loss=f"{event['loss']:.4f}", ncc=f"{event['ncc']:.4f}", refresh=False)
            self.bar.update(event["iteration"] - self.bar.n)
        elif kind == "validation":
            self.note(f"validation at {event['iteration']}: loss {event['loss']:.4f}, ncc {event['ncc']:.4f}"
                      + (" (best)" if event["best"] else ""))
        elif kind == "done":
            self.close_bar()
            state = "stopped" if event["stopped"] else "done"
            self.note(f"{state} at iteration {event['iteration']}: {event['model']}")

    def _tensorboard(self, event: dict[str, Any]) -> None:
        tb = self.tensorboard
        if tb is None:
            return
        if event["event"] == "iteration":
            for key in ("loss", "diffusion", "ncc", "smooth", "lr"):
                tb.add_scalar(f"train/{key}", event[key], event["iteration"])
        elif event["event"] == "validation":
            tb.add_scalar("validation/loss", event["loss"], event["iteration"])
            tb.add_scalar("validation/ncc", event["ncc"], event["iteration"])

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.close_bar()
        for handle in (self.log, self.tensorboard):
            if handle is not None:
                handle.close()
        self.log = self.tensorboard = None


# ============================================================================================ run dir

_pid_alive = process_alive  # (ddm4d.files: shared with the cleaning of generate's temporary folders)


class RunLock:
    """RUN_DIR/.lock holding "pid host": one training per RUN_DIR; a dead holder's lock is taken over."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.held = False

    def acquire(self, warn: Callable[[str], None]) -> None:
        me = f"{os.getpid()} {socket.gethostname()}\n"
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale(warn)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.held = True
            return
        raise InputError(f"could not take the lock {self.path}; another training seems to start on "
                         f"{self.path.parent} at the same time")

    def _take_over_if_stale(self, warn: Callable[[str], None]) -> None:
        try:
            text = self.path.read_text().split()
        except FileNotFoundError:
            return
        if text and (len(text) != 2 or not text[0].isdigit()):
            raise InputError(f"{self.path} was not written by ddm4d train; train into another --out (or delete that "
                             "file if it is yours and nothing uses it)")
        pid = int(text[0]) if text else None  # empty: a lock whose writer died before writing into it
        host = text[1] if len(text) > 1 else socket.gethostname()
        if pid is not None and (host != socket.gethostname() or _pid_alive(pid)):
            where = "" if host == socket.gethostname() else f" on {host}"
            raise InputError(f"{self.path.parent} is in use by training process {pid}{where}; wait for it, "
                             f"stop it, or train into another --out (delete {self.path} if no training runs)")
        warn(f"taking over the stale lock {self.path} (process {pid} is no longer running)")
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def release(self) -> None:
        if self.held:
            try:
                if self.path.read_text().split()[0] == str(os.getpid()):
                    self.path.unlink()
            except (OSError, IndexError):
                pass
            self.held = False


def _checkpoint_files(folder: Path) -> list[tuple[int, Path]]:
    """(iteration, path) of ckpt_<iteration>.safetensors, oldest first (temp files are ignored)."""
    found = []
    for p in folder.glob("ckpt_*.safetensors"):
        number = p.name[len("ckpt_"):-len(".safetensors")]
        if number.isdigit():
            found.append((int(number), p))
    return sorted(found)


def _read_run_config(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "config.json"
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path} is unreadable ({err}); it is not a ddm4d run folder, use another --out") from None
    if stored.get("format") != RUN_FORMAT:
        raise InputError(f"{path} is not a ddm4d training configuration; use another --out")
    return stored


# ================================================================================================ data

def _warn_problems(dataset: Dataset, reporter: Reporter) -> None:
    for problem in dataset.problems:
        reporter.warn(f"skipping {problem}")


def detect_spatial_dims(subjects: list[Subject]) -> int:
    """2 when every subject is a single slice (2D cine), else 3."""
    return 2 if subjects and all(len(s.size) >= 3 and s.size[2] == 1 for s in subjects) else 3


def _cache_key(subject: Subject, config: DDMConfig) -> str:
    """Changes when a file or the model grid changes, so a stale cached array is never used."""
    files = {k: [str(p), p.stat().st_size, p.stat().st_mtime_ns] for k, p in sorted(subject.paths.items())
             if p.is_file()}
    text = json.dumps([files, list(config.image_size), list(config.spacing)], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _load_cached(path: Path | None) -> np.ndarray | None:
    if path is None or not path.is_file():
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None


def _save_cached(path: Path, array: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
    atomic_write(path, write)


def preprocess_subject(subject: Subject, config: DDMConfig) -> np.ndarray:
    """ED -> ES pair on the model grid, normalised to [-1, 1]: float32 (2, *spatial) = [source, target]."""
    pair = subject.load_pair()
    source, target, _ = to_model_grid(pair.source, pair.target, config.image_size, config.spacing,
                                      source_name=f"{subject.id} ED", target_name=f"{subject.id} ES")
    return np.stack([source, target]).astype(np.float32)


def preprocess_cycle(subject: Subject, config: DDMConfig) -> np.ndarray:
    """Every frame of the subject's cine on the model grid around its ED frame, each normalised to
    [-1, 1]: float16 (n_frames, *spatial) (half the memory; the networks see float32). A subject
    without a cine (a CSV pair, an ACDC folder without its 4D file) gives [ED, ES]."""
    if subject.kind == "pairs" or not subject.has_cine:
        return preprocess_subject(subject, config).astype(np.float16)
    cycle = subject.load_cycle()
    ed = cycle[subject.ed]
    _, _, mapping = to_model_grid(ed, ed, config.image_size, config.spacing,
                                  source_name=f"{subject.id} ED", target_name=f"{subject.id} ED")
    return np.stack([mapping.image_to_model(frame) for frame in cycle]).astype(np.float16)


def prepare_pairs(subjects: list[Subject], config: DDMConfig, cache_dir: Path | None, write_cache: bool,
                  reporter: Reporter, whole_cine: bool = False) -> tuple[list[str], Any]:
    """All data in memory once (an epoch never re-reads NIfTI); a subject that fails is skipped, warned.

    ED -> ES pairs: one (n, 2, *spatial) tensor. `whole_cine`: one (n_frames, *spatial) tensor per
    subject, every frame of its cine."""
    ids, arrays = [], []
    for subject in subjects:
        kind = "cycle" if whole_cine else "pair"
        path = cache_dir / f"{subject.id}-{kind}-{_cache_key(subject, config)}.npy" if cache_dir else None
        array = _load_cached(path)
        if array is None:
            try:
                array = preprocess_cycle(subject, config) if whole_cine else preprocess_subject(subject, config)
            except (InputError, RuntimeError, ValueError) as err:
                reporter.warn(f"skipping {subject.id}: {err}")
                continue
            if path is not None and write_cache:
                _save_cached(path, array)
        ids.append(subject.id)
        arrays.append(array)
    if whole_cine:
        return ids, [torch.from_numpy(a) for a in arrays]
    stack = torch.from_numpy(np.stack(arrays)) if arrays else torch.empty(0)
    return ids, stack


def draw_frames(n_frames: int, rng: np.random.Generator, identity_fraction: float = RUN.identity_fraction
                ) -> tuple[int, int, int | None, float]:
    """(source, target, in-between frame or None, its gamma) drawn from a cine of n_frames frames.

    Both directions are drawn (j < i is the cine played backwards) and, with `identity_fraction`,
    source = target. The in-between frame is one of those strictly between, at gamma = |k - i| / |j - i|:
    frames are taken as evenly timed, so gamma is normalised time."""
    if n_frames < 2 or rng.random() < identity_fraction:
        i = int(rng.integers(n_frames))
        return i, i, None, 0.0
    i, j = (int(v) for v in rng.choice(n_frames, size=2, replace=False))
    if abs(j - i) < 2:
        return i, j, None, 0.0
    step = 1 if j > i else -1
    k = int(rng.choice(np.arange(i + step, j, step)))
    return i, j, k, abs(k - i) / abs(j - i)


# =============================================================================================== model

def _model_config(o: TrainOptions, dims: int, stored: DDMConfig | None, init_config: DDMConfig | None) -> DDMConfig:
    """The paper's DDMConfig for the data's dimensionality, with the options given on top."""
    base = stored or init_config or DDMConfig.for_dims(dims)
    overrides: dict[str, Any] = {}
    if o.loss_lambda is not None:
        overrides["loss_lambda"] = float(o.loss_lambda)
    if o.lr is not None:
        overrides["lr"] = float(o.lr)
    if o.batch_size is not None:
        overrides["batch_size"] = int(o.batch_size)
    if o.paper_loss is not None:
        overrides["subtracted_field_loss"] = not o.paper_loss
    if o.size is not None:
        if len(o.size) != dims:
            raise InputError(f"--size has {len(o.size)} values but this is a {dims}D model; give "
                             f"{'X Y' if dims == 2 else 'X Y Z'} (or set --spatial-dims)")
        overrides["image_size"] = tuple(int(v) for v in o.size)
    if o.spacing is not None:
        if len(o.spacing) != dims:
            raise InputError(f"--spacing has {len(o.spacing)} values but this is a {dims}D model")
        overrides["spacing"] = tuple(float(v) for v in o.spacing)
    if base.spatial_dims != dims:
        raise InputError(f"the data is {dims}D but the model is {base.spatial_dims}D; pass --spatial-dims "
                         f"{base.spatial_dims}, or start a new run with another --out")
    return dataclasses.replace(base, **overrides)


def build_model(method: str, config: DDMConfig) -> nn.Module:
    if method == "ddm":
        from .model import DDM
        return DDM(config)
    return BaselineModel(config, method)


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


class _LossModule(nn.Module):
    """DDP hooks forward(); the models expose training_losses(), so this routes one to the other."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, source, target, middle=None, gamma=None, generator=None):
        if middle is None:
            return self.model.training_losses(source, target, generator=generator)
        return self.model.training_losses(source, target, generator=generator, middle=middle, gamma=gamma)


# ========================================================================================= checkpoints

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
    meta = {"format": STATE_FORMAT, "version": RUN_FORMAT_VERSION, "state": dataclasses.asdict(state),
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
    if meta.get("format") != STATE_FORMAT or "state" not in meta:
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
    files = _checkpoint_files(folder)
    for _, path in reversed(files):
        try:
            return restore_training_state(path, model, optimizer, ema, device), path
        except InputError as err:
            reporter.warn(f"checkpoint {path.name} is unreadable ({err}); trying the previous one")
    if files:
        raise InputError(f"no readable checkpoint in {folder} ({len(files)} damaged); start a new run with "
                         "another --out")
    return None


# ================================================================================================ plot

def save_loss_curve(path: Path, history: list[tuple[int, float, float]],
                    validation: list[tuple[int, float, float]]) -> None:
    """Training and validation loss and NCC against iteration, written atomically (no pyplot state)."""
    from .plotting import figure, save_png

    fig = figure(8, 5.5, dpi=100)
    ax_loss, ax_ncc = fig.subplots(2, 1, sharex=True)
    if history:
        it, loss, ncc = zip(*history)
        ax_loss.plot(it, loss, lw=0.8, color="tab:blue", label="training")
        ax_ncc.plot(it, ncc, lw=0.8, color="tab:blue")
    if validation:
        it, loss, ncc = zip(*validation)
        ax_loss.plot(it, loss, "o-", ms=3, color="tab:orange", label="validation")
        ax_ncc.plot(it, ncc, "o-", ms=3, color="tab:orange")
    ax_loss.set_ylabel("loss")
    ax_ncc.set_ylabel("local NCC")
    ax_ncc.set_xlabel("iteration")
    ax_loss.legend(loc="upper right")
    for ax in (ax_loss, ax_ncc):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)


def _history_from_log(log_path: Path, upto: int) -> tuple[list, list, list[str]]:
    """Iteration and validation points of log.jsonl up to `upto`, and the lines kept (a resume cuts the rest)."""
    history, validation, kept = [], [], []
    if not log_path.is_file():
        return history, validation, kept
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if event.get("iteration", 0) > upto:
            continue
        kept.append(line)
        if event.get("event") == "iteration":
            history.append((event["iteration"], event["loss"], event["ncc"]))
        elif event.get("event") == "validation":
            validation.append((event["iteration"], event["loss"], event["ncc"]))
    return history, validation, kept


# ============================================================================================ training

def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def epoch_order(seed: int, epoch: int, n: int, per_iteration: int) -> np.ndarray:
    """The epoch's shuffled pair indices, padded by wrapping to whole iterations (like DistributedSampler)."""
    order = np.random.default_rng(_derived_seed(seed, _STREAM_ORDER, epoch)).permutation(n)
    length = math.ceil(n / per_iteration) * per_iteration
    return np.resize(order, length)


def augment_batch(batch: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Light augmentation of (B, 2, *spatial) pairs: random flips and intensity scale/shift, same for both."""
    out = []
    ndim = batch.dim() - 2
    for pair in batch:
        flips = [1 + a for a in range(ndim) if rng.random() < RUN.flip_probability]
        if flips:
            pair = torch.flip(pair, flips)
        scale = 1.0 + rng.uniform(-RUN.intensity_scale, RUN.intensity_scale)
        shift = rng.uniform(-RUN.intensity_shift, RUN.intensity_shift)
        out.append((pair * scale + shift).clamp(-1.0, 1.0))
    return torch.stack(out)


@torch.no_grad()
def validate(model: nn.Module, pairs: torch.Tensor, seed: int, device: torch.device) -> tuple[float, float]:
    """Mean loss and NCC over the validation pairs, with a fixed t and noise per pair (comparable over time)."""
    model.eval()
    losses, nccs = [], []
    for i in range(pairs.shape[0]):
        pair = pairs[i:i + 1].to(device)
        generator = torch.Generator(device=device).manual_seed(_derived_seed(seed, _STREAM_VALIDATION, i))
        with autocast(device):
            out = model.training_losses(pair[:, :1], pair[:, 1:], generator=generator)
        losses.append(float(out["loss"]))
        nccs.append(float(out["ncc"]))
    return float(np.mean(losses)), float(np.mean(nccs))


@dataclass
class Run:
    """Everything the loop needs, resolved from the options, the data and RUN_DIR."""

    options: TrainOptions
    run_dir: Path
    method: str
    config: DDMConfig
    seed: int
    ema_decay: float | None
    augment: bool
    validation_fraction: float
    checkpoint_every: int
    keep_last: int
    validate_every: int
    log_every: int
    total_iterations: int
    iterations_per_epoch: int
    train_ids: list[str]
    validation_ids: list[str]
    train_pairs: Any  # (n, 2, *spatial) ED -> ES pairs, or with pairs "cine" a list of (n_frames, *spatial)
    validation_pairs: torch.Tensor
    device: torch.device
    dist: Dist
    stored: dict[str, Any] | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict)
    init_model: nn.Module | None = None
    pairs: str = RUN.pairs

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_iterations / self.iterations_per_epoch)


def _fingerprint(method, config: DDMConfig, seed, validation_fraction, augment, ema, train_ids, val_ids,
                 pairs: str = RUN.pairs) -> dict:
    """What must not change between a run and its --resume (the total length may)."""
    model = {k: v for k, v in config.to_dict().items() if k not in ("epochs", "notes")}
    return {"method": method, "config": json.loads(json.dumps(model)), "seed": seed,
            "validation_fraction": validation_fraction, "augment": augment, "ema": ema,
            "train_subjects": list(train_ids), "validation_subjects": list(val_ids), "pairs": pairs}


def _compare_fingerprints(stored: dict, current: dict, run_dir: Path) -> None:
    diffs = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key), current.get(key)
        if key == "config" and isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{k}: {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            if key.endswith("subjects"):
                diffs.append(f"{key.replace('_', ' ')} changed (the data set differs)")
            else:
                diffs.append(f"{key}: {a} -> {b}")
    if diffs:
        raise InputError(f"--resume: {run_dir} was trained with other settings ({'; '.join(diffs)}); drop the "
                         "differing options to continue it, or train into another --out")


def _stored_value(stored: dict | None, key: str, default):
    return stored["run"].get(key, default) if stored and "run" in stored else default


def _choose(given, stored: dict | None, key: str, default):
    return given if given is not None else _stored_value(stored, key, default)


def _stored_run(run_dir: Path, resume: bool) -> dict[str, Any] | None:
    """config.json of the run to resume; a new run may not reuse a folder that has checkpoints."""
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"--out {run_dir} is a file; pass a folder for the run")
    if not resume and _checkpoint_files(run_dir / "checkpoints"):
        raise InputError(f"{run_dir} already holds a training run (checkpoints/); use --resume to continue "
                         "it, or another --out")
    stored = _read_run_config(run_dir)  # InputError for a config.json that is not a ddm4d run's
    foreign = [name for name in RUN_FILES if stored is None and (run_dir / name).exists()]
    if foreign:
        raise InputError(f"--out {run_dir} holds {', '.join(foreign)}, not written by ddm4d train (no ddm4d "
                         "config.json beside); choose an empty or new folder")
    return stored if resume else None


def _spatial_dims(o: TrainOptions, stored: dict | None, dataset: Dataset) -> int:
    """--spatial-dims, else the stored run's, else from the data (single-slice data -> 2D)."""
    detected = detect_spatial_dims(dataset.subjects)
    dims = o.spatial_dims or (stored["config"]["spatial_dims"] if stored else detected)
    if dims == 2 and detected != 2:
        thick = [s.id for s in dataset.subjects if len(s.size) >= 3 and s.size[2] != 1]
        raise InputError(f"--spatial-dims 2 needs single-slice data, but {', '.join(thick[:3])} have several "
                         "slices; use --spatial-dims 3")
    return dims


def _total_iterations(o: TrainOptions, stored: dict | None, config: DDMConfig, per_epoch: int) -> int:
    """--iterations, else --epochs, else the stored run's length, else the paper's epochs."""
    if o.iterations is not None:
        return o.iterations
    if o.epochs is not None:
        return o.epochs * per_epoch
    return _stored_value(stored, "total_iterations", None) or config.epochs * per_epoch


def resolve_run(o: TrainOptions, dist: Dist, device: torch.device, reporter: Reporter) -> Run:
    """Options + data + RUN_DIR -> a Run; all user mistakes surface here, before any training."""
    run_dir = Path(o.out).expanduser().resolve()
    stored = _stored_run(run_dir, o.resume)
    dataset = scan_dataset(o.data)
    _warn_problems(dataset, reporter)
    dataset.require_subjects(1)
    dims = _spatial_dims(o, stored, dataset)

    init_model = load_any_model(o.init) if o.init and not (o.resume and stored) else None
    method = o.method or (stored["method"] if stored else None) or (model_method(init_model) if init_model else "ddm")
    if init_model is not None and model_method(init_model) != method:
        raise InputError(f"--init {o.init} is a {model_method(init_model)} model but --method is {method}")
    stored_config = DDMConfig.from_dict(stored["config"]) if stored else None
    config = _model_config(o, dims, stored_config, init_model.config if init_model else None)

    seed = _choose(o.seed, stored, "seed", RUN.seed)
    fraction = _choose(o.validation_fraction, stored, "validation_fraction", RUN.validation_fraction)
    augment = bool(_choose(o.augment, stored, "augment", False))
    ema = _choose(o.ema, stored, "ema", RUN.ema) or None  # 0: off
    train_set, val_set = dataset.split(fraction, seed)

    cache_dir = run_dir / "cache" if o.disk_cache else None
    # a run from before "pairs" existed trained on ED -> ES
    pairs = _choose(o.pairs, stored, "pairs", RUN.pairs if not stored else "ed-es")
    train_ids, train_pairs = prepare_pairs(train_set.subjects, config, cache_dir, dist.main, reporter,
                                           whole_cine=(pairs == "cine"))
    val_ids, val_pairs = prepare_pairs(val_set.subjects, config, cache_dir, dist.main, reporter)
    if not train_ids:
        raise InputError(f"{o.data}: no subject could be prepared for training (see the warnings above)")

    per_epoch = math.ceil(len(train_ids) / (config.batch_size * dist.world_size))
    total = _total_iterations(o, stored, config, per_epoch)
    config = dataclasses.replace(config, epochs=math.ceil(total / per_epoch))
    checkpoint_every = _choose(o.checkpoint_every, stored, "checkpoint_every", RUN.checkpoint_every)
    run = Run(
        options=o, run_dir=run_dir, method=method, config=config, seed=seed, ema_decay=ema, augment=augment,
        validation_fraction=fraction, checkpoint_every=checkpoint_every,
        keep_last=_choose(o.keep_last, stored, "keep_last", RUN.keep_last),
        validate_every=_choose(o.validate_every, stored, "validate_every", checkpoint_every),
        log_every=_choose(o.log_every, stored, "log_every", RUN.log_every),
        total_iterations=total, iterations_per_epoch=per_epoch, train_ids=train_ids, validation_ids=val_ids,
        train_pairs=train_pairs, validation_pairs=val_pairs, device=device, dist=dist, stored=stored,
        init_model=init_model, pairs=pairs)
    run.fingerprint = _fingerprint(method, config, seed, fraction, augment, ema, train_ids, val_ids, pairs)
    if stored:
        _compare_fingerprints(stored.get("fingerprint", {}), run.fingerprint, run_dir)
    return run


def _run_config_json(run: Run) -> dict[str, Any]:
    from . import __version__
    return {
        "format": RUN_FORMAT, "version": RUN_FORMAT_VERSION, "ddm4d_version": __version__,
        "method": run.method, "config": run.config.to_dict(),
        "run": {"data": str(Path(run.options.data).expanduser().resolve()), "seed": run.seed,
                "validation_fraction": run.validation_fraction, "augment": run.augment, "ema": run.ema_decay,
                "total_iterations": run.total_iterations, "iterations_per_epoch": run.iterations_per_epoch,
                "epochs": run.epochs, "checkpoint_every": run.checkpoint_every, "keep_last": run.keep_last,
                "validate_every": run.validate_every, "log_every": run.log_every, "world_size": run.dist.world_size,
                "init": run.options.init, "pairs": run.pairs},
        "subjects": {"train": run.train_ids, "validation": run.validation_ids},
        "fingerprint": run.fingerprint,
    }


class StopFlag:
    """SIGINT/SIGTERM ask for a clean stop after the current iteration; a second signal aborts at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self, reporter: Reporter) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach only the main thread; a caller's thread stops by other means

        def handler(signum, frame):
            if self.signum is not None:
                raise KeyboardInterrupt
            self.signum = signum
            reporter.warn(f"{signal.Signals(signum).name}: stopping after this iteration and saving a checkpoint "
                          "(send it again to abort at once)")

        for sig in SIGNAL_EXIT:
            self._previous[sig] = signal.signal(sig, handler)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


class Trainer:
    """The loop: one optimiser step per iteration, checkpoints, validation, events."""

    def __init__(self, run: Run, reporter: Reporter, stop: StopFlag):
        self.run, self.reporter, self.stop = run, reporter, stop
        cfg = run.config
        _seed_everything(run.seed)  # the initial weights; a resume restores the RNG states after this
        self.model = build_model(run.method, cfg).to(run.device)
        if run.init_model is not None:
            self.model.load_state_dict(run.init_model.state_dict())
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, betas=cfg.adam_betas)
        self.ema = EMA(self.model, run.ema_decay) if run.ema_decay else None
        self.state = TrainState(world_size=run.dist.world_size)
        self.step_module: nn.Module = _LossModule(self.model)
        self.history: list[tuple[int, float, float]] = []
        self.validation: list[tuple[int, float, float]] = []
        self.last_saved = -1

    # -- set-up ---------------------------------------------------------------------------------------
    def resume(self) -> None:
        run = self.run
        found = load_latest_state(run.checkpoints, self.model, self.optimizer, self.ema, run.device, self.reporter)
        if found is None:
            self.reporter.warn(f"--resume: {run.run_dir} has no checkpoint yet; starting from iteration 0")
            return
        self.state, path = found
        self.last_saved = self.state.iteration
        if self.state.world_size != run.dist.world_size:
            self.reporter.warn(f"resuming with {run.dist.world_size} process(es) where the run used "
                               f"{self.state.world_size}: it continues, but not identically to an uninterrupted run")
            self.state.world_size = run.dist.world_size
        self.reporter.note(f"resuming from {path.name} (iteration {self.state.iteration})")

    def wrap_distributed(self) -> None:
        if self.run.dist.active:
            from torch.nn.parallel import DistributedDataParallel
            ids = [self.run.device.index] if self.run.device.type == "cuda" else None
            self.step_module = DistributedDataParallel(self.step_module, device_ids=ids)

    # -- one iteration -------------------------------------------------------------------------------
    def batch(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(B, 2, *spatial) source and target, and with pairs "cine" (B, 1, *spatial) in-between frames
        and their gammas (B,); a draw without one has source and gamma 0 there (no gradient)."""
        run = self.run
        b, world = run.config.batch_size, run.dist.world_size
        epoch, position = divmod(iteration, run.iterations_per_epoch)
        order = epoch_order(run.seed, epoch, len(run.train_ids), b * world)
        start = position * b * world + run.dist.rank * b
        chosen = order[start:start + b]
        middle = gammas = None
        if run.pairs == "cine":
            rng = np.random.default_rng(_derived_seed(run.seed, _STREAM_PAIRS, run.dist.rank, iteration))
            stacks, gammas_list, any_middle = [], [], False
            for index in chosen:
                cycle = run.train_pairs[int(index)]
                i, j, k, gamma = draw_frames(cycle.shape[0], rng)
                any_middle |= k is not None
                stacks.append(torch.stack([cycle[i], cycle[j], cycle[i if k is None else k]]))
                gammas_list.append(gamma)
            triples = torch.stack(stacks).float()
            if run.augment:
                rng_aug = np.random.default_rng(_derived_seed(run.seed, _STREAM_AUGMENT, run.dist.rank, iteration))
                triples = augment_batch(triples, rng_aug)
            triples = triples.to(run.device, non_blocking=True)
            pairs = triples[:, :2]
            if any_middle:
                middle = triples[:, 2:]
                gammas = torch.tensor(gammas_list, device=run.device)
            return pairs, middle, gammas
        pairs = run.train_pairs[torch.from_numpy(chosen.copy())]
        if run.augment:
            rng = np.random.default_rng(_derived_seed(run.seed, _STREAM_AUGMENT, run.dist.rank, iteration))
            pairs = augment_batch(pairs, rng)
        return pairs.to(run.device, non_blocking=True), None, None

    def step(self, iteration: int) -> torch.Tensor:
        """One optimiser step; returns [loss, diffusion, ncc, smooth, stop] summed over ranks."""
        run = self.run
        pairs, middle, gammas = self.batch(iteration)
        generator = torch.Generator(device=run.device)
        generator.manual_seed(_derived_seed(run.seed, _STREAM_TRAIN, run.dist.rank, iteration))
        self.model.train()
        with autocast(run.device):
            out = self.step_module(pairs[:, :1], pairs[:, 1:], middle, gammas, generator=generator)
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
            self.state.ema_updates = self.ema.updates
        stats = torch.stack([out[k].detach().float() for k in ("loss", "diffusion", "ncc", "smooth")]
                            + [torch.tensor(float(self.stop.signum is not None), device=run.device)])
        if run.dist.active:
            torch.distributed.all_reduce(stats)
            stats[:4] /= run.dist.world_size
        return stats.cpu()

    # -- outputs ---------------------------------------------------------------------------------------
    def output_model(self) -> nn.Module:
        """The weights a user gets: the EMA when on, else the trained ones."""
        if self.ema is None:
            return self.model
        with torch.random.fork_rng(devices=[]):  # building a model draws initial weights: keep the RNG as is
            averaged = build_model(self.run.method, self.run.config)
        averaged.to(self.run.device).load_state_dict(self.ema.state_dict(self.model))
        return averaged

    def _info(self) -> dict[str, Any]:
        run = self.run
        return {"iteration": self.state.iteration, "epoch": self.state.iteration / run.iterations_per_epoch,
                "method": run.method, "ema": run.ema_decay, "data": str(run.options.data),
                "train_subjects": len(run.train_ids), "seed": run.seed}

    def save_models(self, name: str = "model.safetensors") -> Path:
        run = self.run
        path = save_any_model(self.output_model(), run.run_dir / name, **self._info())
        if self.ema is not None and name == "model.safetensors":
            save_any_model(self.model, run.run_dir / "model_raw.safetensors", **self._info())
        return path

    def checkpoint(self) -> None:
        """Training state, then the latest weights, the loss curve and the pruning of old checkpoints."""
        run = self.run
        self.last_saved = self.state.iteration
        if not run.dist.main:
            return
        path = run.checkpoints / f"ckpt_{self.state.iteration:08d}.safetensors"
        save_training_state(path, self.model, self.optimizer, self.ema, self.state, run.fingerprint)
        self.save_models()
        for _, old in _checkpoint_files(run.checkpoints)[:-run.keep_last]:
            old.unlink(missing_ok=True)
        save_loss_curve(run.run_dir / "loss_curve.png", self.history, self.validation)
        self.reporter.emit({"event": "checkpoint", "iteration": self.state.iteration, "path": str(path)})

    def validate(self) -> None:
        run = self.run
        if not run.dist.main or run.validation_pairs.shape[0] == 0:
            return
        loss, ncc = validate(self.output_model(), run.validation_pairs, run.seed, run.device)
        best = self.state.best_loss is None or loss < self.state.best_loss
        if best:
            self.state.best_loss, self.state.best_iteration = loss, self.state.iteration
            save_training_state(run.checkpoints / "best.safetensors", self.model, self.optimizer, self.ema,
                                self.state, run.fingerprint)
            self.save_models("model_best.safetensors")
        self.validation.append((self.state.iteration, loss, ncc))
        self.reporter.emit({"event": "validation", "iteration": self.state.iteration, "loss": loss,
                            "ncc": ncc, "best": best})

    # -- the loop --------------------------------------------------------------------------------------
    def iteration_event(self, stats: torch.Tensor, epoch: int, started: float, start_iteration: int) -> dict:
        run = self.run
        now = time.perf_counter()
        session = now - started
        done = self.state.iteration - start_iteration
        rate = done / session if session > 0 else 0.0
        remaining = run.total_iterations - self.state.iteration
        loss, diffusion, ncc, smooth = (float(v) for v in stats[:4])
        return {"event": "iteration", "iteration": self.state.iteration, "epoch": epoch, "loss": loss,
                "diffusion": diffusion, "ncc": ncc, "smooth": smooth,
                "lr": float(self.optimizer.param_groups[0]["lr"]), "elapsed_s": round(self.state.elapsed_s, 3),
                "eta_s": round(remaining / rate, 3) if rate > 0 else 0.0, "it_per_s": round(rate, 4)}

    def train(self) -> bool:
        """Run to total_iterations or a signal; True when stopped by a signal."""
        run = self.run
        start_iteration = self.state.iteration
        started = time.perf_counter()
        elapsed_before = self.state.elapsed_s
        stopped = not run.dist.all_ok(self.stop.signum is None, run.device)  # a signal before the first step
        while self.state.iteration < run.total_iterations and not stopped:
            iteration = self.state.iteration
            stats = self.step(iteration)
            self.state.iteration = iteration + 1
            self.state.elapsed_s = elapsed_before + time.perf_counter() - started
            stopped = bool(stats[4] > 0)
            epoch = iteration // run.iterations_per_epoch + 1
            self.state.epoch_loss_sum += float(stats[0])
            self.state.epoch_loss_count += 1
            event = self.iteration_event(stats, epoch, started, start_iteration)
            if self.state.iteration % run.log_every == 0 or self.state.iteration == run.total_iterations:
                self.history.append((event["iteration"], event["loss"], event["ncc"]))
                self.reporter.emit(event)
            if self.state.iteration % run.iterations_per_epoch == 0:
                self.reporter.emit({"event": "epoch", "epoch": epoch, "iteration": self.state.iteration,
                                    "loss": self.state.epoch_loss_sum / max(self.state.epoch_loss_count, 1)})
                self.state.epoch_loss_sum, self.state.epoch_loss_count = 0.0, 0
            last = self.state.iteration == run.total_iterations
            if self.state.iteration % run.validate_every == 0 or last:
                self.validate()
            if self.state.iteration % run.checkpoint_every == 0 or last:
                self.checkpoint()
        if self.last_saved != self.state.iteration:
            self.checkpoint()
        return stopped


# ================================================================================================ API

@dataclass
class TrainResult:
    exit_code: int
    run_dir: Path | None
    model: Path | None
    iteration: int
    stopped: bool


def _prepare_run_dir(run: Run, reporter: Reporter, start_iteration: int) -> tuple[list, list]:
    """config.json, a log.jsonl cut back to the resume point, the history for the loss curve."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    run.checkpoints.mkdir(exist_ok=True)
    for folder in (run.run_dir, run.checkpoints):
        remove_temporary_files(folder)  # left by killed writes (ours only); never read as a checkpoint
    config_json = json.dumps(_run_config_json(run), indent=2)
    atomic_write(run.run_dir / "config.json", lambda tmp: Path(tmp).write_text(config_json))
    log = run.run_dir / "log.jsonl"
    if start_iteration > 0 or run.options.resume:
        history, validation, kept = _history_from_log(log, start_iteration)
    else:
        history, validation, kept = [], [], []
    text = "".join(line + "\n" for line in kept)
    atomic_write(log, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    reporter.open_log(log)
    reporter.open_tensorboard(run.run_dir / "tensorboard", start_iteration)
    return history, validation


def run_training(options: TrainOptions) -> TrainResult:
    """Train as `ddm4d train` does; raises InputError for user mistakes (after an "error" event)."""
    dist = Dist.from_env()
    reporter = Reporter(options.progress if options.progress in ("bar", "json") else "bar", enabled=dist.main)
    lock: RunLock | None = None
    created: Path | None = None
    stop = StopFlag()
    try:
        _check_options(options)
        device = _process_device(options.device, dist)
        dist.start(device)
        ok = False
        try:
            if dist.main:
                lock, created = _lock_run_dir(Path(options.out), reporter)
            run = resolve_run(options, dist, device, reporter)
            ok = True
        finally:
            if not dist.all_ok(ok, device) and ok:
                raise InputError("another process of this training failed to start (see its message)")
        created = None
        stop.install(reporter)
        trainer = Trainer(run, reporter, stop)
        if options.resume:
            trainer.resume()
        start = trainer.state.iteration
        if dist.main:
            trainer.history, trainer.validation = _prepare_run_dir(run, reporter, start)
        trainer.wrap_distributed()
        if start >= run.total_iterations:
            reporter.warn(f"the run is already at iteration {start} of {run.total_iterations}; pass a larger "
                          "--iterations or --epochs to train further")
        reporter.emit({"event": "start", "run_dir": str(run.run_dir), "method": run.method, "device": str(device),
                       "iteration": start, "total_iterations": run.total_iterations, "epochs": run.epochs,
                       "subjects": len(run.train_ids), "validation_subjects": len(run.validation_ids),
                       "config": run.config.to_dict(), "run": _run_config_json(run)["run"],
                       "world_size": dist.world_size})
        stopped = trainer.train()
        model_path = run.run_dir / "model.safetensors"
        reporter.emit({"event": "done", "iteration": trainer.state.iteration, "model": str(model_path),
                       "elapsed_s": round(trainer.state.elapsed_s, 3), "stopped": stopped})
        code = SIGNAL_EXIT.get(stop.signum, 0) if stopped else 0
        return TrainResult(code, run.run_dir, model_path, trainer.state.iteration, stopped)
    except InputError as err:
        reporter.emit({"event": "error", "message": str(err)})
        raise
    except KeyboardInterrupt:
        reporter.emit({"event": "error", "message": "aborted by a second interrupt"})
        raise
    except Exception as err:
        reporter.emit({"event": "error", "message": f"{type(err).__name__}: {err}"})
        raise
    finally:
        stop.restore()
        reporter.close()
        if lock is not None:
            lock.release()
        if created is not None:
            _remove_if_empty(created)
        dist.stop()


def _lock_run_dir(run_dir: Path, reporter: Reporter) -> tuple[RunLock | None, Path | None]:
    """Take RUN_DIR/.lock (creating RUN_DIR); returns the lock and RUN_DIR when this call created it."""
    run_dir = run_dir.expanduser().resolve()
    if run_dir.exists() and not run_dir.is_dir():
        return None, None  # resolve_run explains
    check_writable(run_dir, "--out")
    created = None if run_dir.exists() else run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir)
    lock.acquire(reporter.warn)
    return lock, created


def _remove_if_empty(folder: Path) -> None:
    """A run that failed before it started leaves no empty RUN_DIR behind."""
    try:
        folder.rmdir()
    except OSError:
        pass


def train(data: str | os.PathLike, out: str | os.PathLike, **options: Any) -> TrainResult:
    """Python API: ``train("data/", "runs/a", iterations=1000, method="vm", progress="json")``."""
    return run_training(TrainOptions(data=str(data), out=str(out), **options))


# ================================================================================================ CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DDMConfig()
    parser.add_argument("data", metavar="DATA_DIR", help="ACDC-layout folder (patient*/) or a pairs CSV")
    parser.add_argument("--out", required=True, metavar="RUN_DIR",
                        help="run folder (checkpoints, log, model); train never overwrites a file it did not write")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, metavar="E", help=f"epochs over the training pairs (default {d.epochs})")
    length.add_argument("--iterations", type=int, metavar="I", help="optimiser steps in total (instead of --epochs)")
    parser.add_argument("--lambda", dest="loss_lambda", type=float, metavar="L",
                        help=f"weight of the deformation loss (default {d.loss_lambda:g})")
    parser.add_argument("--lr", type=float, help=f"Adam learning rate (default {d.lr:g}, betas {d.adam_betas})")
    parser.add_argument("--batch-size", type=int, metavar="B",
                        help=f"pairs per step and process (default {d.batch_size})")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its last checkpoint")
    parser.add_argument("--progress", choices=("bar", "json"), default="bar",
                        help="bar: a progress bar on stderr; json: one JSON event per line on stdout")
    parser.add_argument("--seed", type=int, metavar="S", help=f"random seed (default {RUN.seed})")
    parser.add_argument("--checkpoint-every", type=int, metavar="K",
                        help=f"iterations between checkpoints (default {RUN.checkpoint_every})")
    parser.add_argument("--keep-last", type=int, metavar="N", help=f"checkpoints kept (default {RUN.keep_last}; "
                        "the best one is kept besides)")
    parser.add_argument("--validation-fraction", type=float, metavar="F",
                        help=f"fraction of subjects held out for validation (default {RUN.validation_fraction})")
    parser.add_argument("--validate-every", type=int, metavar="K", help="iterations between validations "
                        "(default: --checkpoint-every)")
    parser.add_argument("--log-every", type=int, metavar="K", help="iterations between iteration events (default 1)")
    parser.add_argument("--ema", type=float, metavar="DECAY", help="decay of the exponential moving average of "
                        f"the weights that is saved as the model (default {RUN.ema}; 0: off, the raw weights)")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                        help="random flips and small intensity scale/shift (off by default)")
    parser.add_argument("--method", choices=METHODS, help="ddm (default), or the baselines vm / vmdiff (VoxelMorph)")
    parser.add_argument("--size", type=int, nargs="+", metavar="N", help="model grid in voxels, X Y [Z] "
                        f"(default {' '.join(map(str, d.image_size))}; 2D: 128 128)")
    parser.add_argument("--spacing", type=float, nargs="+", metavar="MM", help="model grid spacing in mm, X Y [Z] "
                        f"(default {' '.join(f'{v:g}' for v in d.spacing)})")
    parser.add_argument("--spatial-dims", type=int, choices=(2, 3), help="2 or 3 (default: from the data; "
                        "single-slice data gives a 2D model)")
    parser.add_argument("--init", metavar="MODEL", help="start from the weights of this model file")
    parser.add_argument("--paper-loss", action="store_true", default=None,
                        help="the paper's loss on phi(c); by default the loss sees phi(c) - phi(0), the field that "
                        "generation outputs (one more deformation pass per step)")
    parser.add_argument("--pairs", choices=PAIR_MODES, help="cine (default): pairs i -> j from every frame of each "
                        "cine, both directions and the identity, with a real in-between frame as supervision at its "
                        "time; ed-es: the paper's ED -> ES pairs only")
    parser.add_argument("--disk-cache", action="store_true", help="also cache the preprocessed pairs as "
                        "RUN_DIR/cache/*.npy for later runs")


def main(args: argparse.Namespace) -> int:
    """Exit codes: 0 done, 2 bad input, 130 stopped by SIGINT, 143 stopped by SIGTERM (checkpoint saved)."""
    names = {f.name for f in dataclasses.fields(TrainOptions)}
    values = {k: v for k, v in vars(args).items() if k in names}
    for key in ("size", "spacing"):
        if values.get(key) is not None:
            values[key] = tuple(values[key])
    result = run_training(TrainOptions(**values))
    if args.progress == "bar" and result.model is not None and not result.stopped:
        print(result.model)
    return result.exit_code
