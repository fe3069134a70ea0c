"""What `ddm4d train` takes: the run's own defaults and the options (torch-free: the Slicer
training module reads RUN)."""
from __future__ import annotations

import signal
from dataclasses import dataclass

from ..errors import InputError
from ..config import PRECISIONS
from ..methods import METHODS


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
    precision: str | None = None  # of the networks' passes: auto, fp32 or bf16 (None: the stored run's, else auto)


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
    if o.precision is not None and o.precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {o.precision}")
    if o.pairs is not None and o.pairs not in PAIR_MODES:
        raise InputError(f"--pairs must be one of {', '.join(PAIR_MODES)}, got {o.pairs}")
    if o.progress not in ("bar", "json"):
        raise InputError(f"--progress must be bar or json, got {o.progress}")
    if o.size is not None and (len(o.size) not in (2, 3) or min(o.size) < 1):
        raise InputError(f"--size takes 2 (X Y) or 3 (X Y Z) positive voxel counts, got {list(o.size)}")
    if o.spacing is not None and (len(o.spacing) not in (2, 3) or min(o.spacing) <= 0):
        raise InputError(f"--spacing takes 2 or 3 positive values in mm, got {list(o.spacing)}")
