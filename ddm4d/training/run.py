"""The run: options + data + RUN_DIR resolved into everything the loop needs, and the RUN_DIR itself
(lock, stored configuration, fingerprint for --resume)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..checkpoint import atomic_write, load_any_model
from ..config import DDMConfig
from ..data import Dataset, scan_dataset
from ..errors import InputError
from .. import runfolder as rf
from ..files import check_writable, remove_temporary_files
from .distributed import Dist
from .options import RUN, TrainOptions
from .pairs import _warn_problems, detect_spatial_dims, prepare_pairs
from .reporting import Reporter, _history_from_log


class RunLock:
    """RUN_DIR/.lock holding "pid host": one training per RUN_DIR; a dead holder's lock is taken over."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / rf.LOCK_FILE
        self.held = False

    def acquire(self, warn: Callable[[str], None]) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale(warn)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(rf.lock_text())
            self.held = True
            return
        raise InputError(f"could not take the lock {self.path}; another training seems to start on "
                         f"{self.path.parent} at the same time")

    def _take_over_if_stale(self, warn: Callable[[str], None]) -> None:
        try:
            pid, host = rf.parse_lock(self.path.read_text())  # (None, None): its writer died before writing
        except FileNotFoundError:
            return
        except ValueError:
            raise InputError(f"{self.path} was not written by ddm4d train; train into another --out (or delete that "
                             "file if it is yours and nothing uses it)") from None
        if rf.lock_alive(pid, host):
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
                if rf.parse_lock(self.path.read_text())[0] == os.getpid():
                    self.path.unlink()
            except (OSError, ValueError):
                pass
            self.held = False


def _read_run_config(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / rf.CONFIG_FILE
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path} is unreadable ({err}); it is not a ddm4d run folder, use another --out") from None
    if stored.get("format") != rf.RUN_FORMAT:
        raise InputError(f"{path} is not a ddm4d training configuration; use another --out")
    return stored


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
    precision: str = "auto"  # of the networks' passes (ddm4d.device.uses_bf16: on the CPU fp32 unless bf16)

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / rf.CHECKPOINTS_DIRECTORY

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
    if not resume and rf.checkpoint_files(run_dir / rf.CHECKPOINTS_DIRECTORY):
        raise InputError(f"{run_dir} already holds a training run (checkpoints/); use --resume to continue "
                         "it, or another --out")
    stored = _read_run_config(run_dir)  # InputError for a config.json that is not a ddm4d run's
    foreign = [name for name in rf.RUN_FILES if stored is None and (run_dir / name).exists()]
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
    method = o.method or (stored["method"] if stored else None) or (init_model.method if init_model else "ddm")
    if init_model is not None and init_model.method != method:
        raise InputError(f"--init {o.init} is a {init_model.method} model but --method is {method}")
    stored_config = DDMConfig.from_dict(stored["config"]) if stored else None
    config = _model_config(o, dims, stored_config, init_model.config if init_model else None)

    seed = _choose(o.seed, stored, "seed", RUN.seed)
    fraction = _choose(o.validation_fraction, stored, "validation_fraction", RUN.validation_fraction)
    augment = bool(_choose(o.augment, stored, "augment", False))
    ema = _choose(o.ema, stored, "ema", RUN.ema) or None  # 0: off
    train_set, val_set = dataset.split(fraction, seed)

    cache_dir = run_dir / rf.CACHE_DIRECTORY if o.disk_cache else None
    # a run from before "pairs" existed trained on ED -> ES
    pairs = _choose(o.pairs, stored, "pairs", RUN.pairs if not stored else "ed-es")
    precision = _choose(o.precision, stored, "precision", "auto")
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
        init_model=init_model, pairs=pairs, precision=precision)
    run.fingerprint = _fingerprint(method, config, seed, fraction, augment, ema, train_ids, val_ids, pairs)
    if stored:
        _compare_fingerprints(stored.get("fingerprint", {}), run.fingerprint, run_dir)
    return run


def _run_config_json(run: Run) -> dict[str, Any]:
    from .. import __version__
    return {
        "format": rf.RUN_FORMAT, "version": rf.RUN_FORMAT_VERSION, "ddm4d_version": __version__,
        "method": run.method, "config": run.config.to_dict(),
        "run": {"data": str(Path(run.options.data).expanduser().resolve()), "seed": run.seed,
                "validation_fraction": run.validation_fraction, "augment": run.augment, "ema": run.ema_decay,
                "total_iterations": run.total_iterations, "iterations_per_epoch": run.iterations_per_epoch,
                "epochs": run.epochs, "checkpoint_every": run.checkpoint_every, "keep_last": run.keep_last,
                "validate_every": run.validate_every, "log_every": run.log_every, "world_size": run.dist.world_size,
                "init": run.options.init, "pairs": run.pairs, "precision": run.precision},
        "subjects": {"train": run.train_ids, "validation": run.validation_ids},
        "fingerprint": run.fingerprint,
    }


def _prepare_run_dir(run: Run, reporter: Reporter, start_iteration: int) -> tuple[list, list]:
    """config.json, a log.jsonl cut back to the resume point, the history for the loss curve."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    run.checkpoints.mkdir(exist_ok=True)
    for folder in (run.run_dir, run.checkpoints):
        remove_temporary_files(folder)  # left by killed writes (ours only); never read as a checkpoint
    config_json = json.dumps(_run_config_json(run), indent=2)
    atomic_write(run.run_dir / rf.CONFIG_FILE, lambda tmp: Path(tmp).write_text(config_json))
    log = run.run_dir / rf.LOG_FILE
    if start_iteration > 0 or run.options.resume:
        history, validation, kept = _history_from_log(log, start_iteration)
    else:
        history, validation, kept = [], [], []
    text = "".join(line + "\n" for line in kept)
    atomic_write(log, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    reporter.open_log(log)
    reporter.open_tensorboard(run.run_dir / rf.TENSORBOARD_DIRECTORY, start_iteration)
    return history, validation


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
