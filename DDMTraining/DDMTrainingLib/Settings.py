"""Hyper-parameters of a training run and their ``ddm4d train`` options.

Defaults are the paper's, read from ``ddm4d.config.DDMConfig`` (never repeated here as numbers);
options left at None are not passed, so the trainer's own default applies.
"""
import dataclasses
import math
from typing import Optional

from ddm4d.config import DDMConfig
from ddm4d.training.options import RUN  # torch-free: the run defaults of ddm4d train

from .Constants import DEVICES

_PAPER = DDMConfig()
DEFAULT_EMA = RUN.ema  # ddm4d train's default EMA decay


@dataclasses.dataclass
class TrainingSettings:
    """What the GUI (or a console user) chooses for one run.

    :param epochs: passes over the training subjects (paper: 800); ignored when ``iterations`` is set.
    :param iterations: total optimisation steps instead of epochs (None: use epochs).
    :param lossLambda: weight of the deformation loss (paper: 20).
    :param learningRate: Adam learning rate (paper: 2e-4).
    :param batchSize: pairs per step (paper: 1).
    :param checkpointEvery: save a checkpoint every this many iterations (None: the trainer's default).
    :param device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
    :param seed: random seed (None: the trainer's default).
    :param ema: decay of the exponential moving average of the weights saved as the model (ddm4d
      train's default, 0.999; None: no average, the raw weights).
    :param augment: random augmentation of the training pairs.
    :param validationFraction: share of subjects held out for validation (None: the trainer's default).
    :param size: model grid size, x y [z] voxels (None: the paper's 128 x 128 x 32, or the trainer's);
      z = 1 means a 2D grid (single-slice data).
    """

    epochs: int = _PAPER.epochs
    iterations: Optional[int] = None
    lossLambda: float = _PAPER.loss_lambda
    learningRate: float = _PAPER.lr
    batchSize: int = _PAPER.batch_size
    checkpointEvery: Optional[int] = None
    device: str = "auto"
    seed: Optional[int] = None
    ema: Optional[float] = DEFAULT_EMA
    augment: bool = False
    validationFraction: Optional[float] = None
    size: Optional[tuple] = None

    @staticmethod
    def paperImageSize():
        return tuple(_PAPER.image_size)

    def validate(self):
        """Raise ValueError, saying what to change, when a value cannot work; returns self."""
        def whole(name, value, minimum):
            if isinstance(value, bool) or not isinstance(value, int) and not (
                    isinstance(value, float) and value.is_integer()) or value < minimum:
                raise ValueError(f"{name} must be a whole number of at least {minimum}, got {value!r}")

        def number(name, value, low, high, includeLow=True):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
                    value > high or value < low or (value == low and not includeLow):
                bracket = "[" if includeLow else "("
                raise ValueError(f"{name} must be in {bracket}{low:g}, {high:g}], got {value!r}")

        if self.iterations is None:
            whole("epochs", self.epochs, 1)
        else:
            whole("iterations", self.iterations, 1)
        number("lambda (deformation loss weight)", self.lossLambda, 0.0, 1e6)
        number("learning rate", self.learningRate, 0.0, 1.0, includeLow=False)
        whole("batch size", self.batchSize, 1)
        if self.checkpointEvery is not None:
            whole("checkpoint interval", self.checkpointEvery, 1)
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.seed is not None:
            whole("seed", self.seed, 0)
        if self.ema is not None:
            number("EMA decay", self.ema, 0.0, 1.0, includeLow=False)
            if self.ema >= 1.0:
                raise ValueError(f"EMA decay must be below 1 (e.g. 0.999), got {self.ema!r}")
        if self.validationFraction is not None:
            number("validation fraction", self.validationFraction, 0.0, 1.0)
            if self.validationFraction >= 1.0:
                raise ValueError(f"validation fraction must be below 1 (e.g. 0.1), got {self.validationFraction!r}")
        if self.size is not None:
            size = tuple(self.size)
            if len(size) not in (2, 3):
                raise ValueError(f"model grid size needs 2 or 3 values (x y [z]), got {size}")
            for value in size:
                whole("each model grid size", value, 1)
        return self

    def trainOptions(self):
        """The ``ddm4d train`` options for these settings (a list of strings)."""
        self.validate()
        options = ["--iterations", str(int(self.iterations))] if self.iterations is not None \
            else ["--epochs", str(int(self.epochs))]
        options += ["--lambda", f"{self.lossLambda:.10g}", "--lr", f"{self.learningRate:.10g}",
                    "--batch-size", str(int(self.batchSize)), "--device", self.device]
        if self.checkpointEvery is not None:
            options += ["--checkpoint-every", str(int(self.checkpointEvery))]
        if self.seed is not None:
            options += ["--seed", str(int(self.seed))]
        options += ["--ema", "0" if self.ema is None else f"{self.ema:.10g}"]
        if self.augment:
            options.append("--augment")
        if self.validationFraction is not None:
            options += ["--validation-fraction", f"{self.validationFraction:.10g}"]
        if self.size is not None:
            size = [int(v) for v in self.size]
            if len(size) == 3 and size[2] == 1:
                size = size[:2]  # one slice: a 2D model grid (X Y), as single-slice data needs
            options += ["--size"] + [str(v) for v in size]
        return options

    def resumeOptions(self):
        """The options a resume may change: the run's length, the device and the checkpoint interval.

        The rest (model grid, loss weights, seed, split, EMA, augmentation) the trainer takes from the
        run's config.json; passing other values would make it refuse the resume.
        """
        self.validate()
        options = ["--iterations", str(int(self.iterations))] if self.iterations is not None \
            else ["--epochs", str(int(self.epochs))]
        options += ["--device", self.device]
        if self.checkpointEvery is not None:
            options += ["--checkpoint-every", str(int(self.checkpointEvery))]
        return options

    # ---------------------------------------------------------------------------------- remembering

    def toDict(self):
        """Plain values (for qt.QSettings or JSON); None stays None."""
        values = dataclasses.asdict(self)
        if values["size"] is not None:
            values["size"] = [int(v) for v in values["size"]]
        return values

    @classmethod
    def fromDict(cls, values):
        """Settings from :meth:`toDict` output, tolerant of what qt.QSettings gives back (strings,
        'true'/'false', '' or '@Invalid()' for None); unknown keys are ignored, bad values give the default.
        """
        settings = cls()
        fields = {field.name: field for field in dataclasses.fields(cls)}
        for name, value in (values or {}).items():
            if name not in fields:
                continue
            default = getattr(settings, name)
            try:
                setattr(settings, name, _convert(name, value, default))
            except (TypeError, ValueError):
                pass
        try:
            settings.validate()
        except ValueError:
            return cls()
        return settings


_OPTIONAL_INTS = {"iterations", "checkpointEvery", "seed"}
_OPTIONAL_FLOATS = {"ema", "validationFraction"}


def _convert(name, value, default):
    if value is None or (isinstance(value, str) and value.strip() in ("", "None", "@Invalid()")):
        if name in _OPTIONAL_INTS | _OPTIONAL_FLOATS | {"size"}:
            return None
        raise ValueError(name)
    if name == "size":
        if isinstance(value, str):
            value = value.replace(",", " ").split()
        return tuple(int(float(v)) for v in value)
    if name == "augment":
        return value.strip().lower() in ("1", "true", "yes", "on") if isinstance(value, str) else bool(value)
    if name == "device":
        return str(value)
    if name in ("epochs", "batchSize") or name in _OPTIONAL_INTS:
        return int(float(value))
    return float(value)
