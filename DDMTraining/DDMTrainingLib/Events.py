"""The JSON-lines progress of ``ddm4d train --progress json``: parsing, and the state it describes.

One JSON object per stdout line, with an ``"event"`` field (start, iteration, epoch, checkpoint,
validation, done, error; see ``ddm4d.runfolder.EVENT_FIELDS``). Anything else on stdout is log text.
"""
import math

from ddm4d import runfolder


def parseEventLine(line):
    """The event dict of one output line, or None when the line is not a progress event (log text).

    A line is an event when it is a JSON object whose ``"event"`` names a known event that carries its
    required fields (``ddm4d.runfolder``, shared with the trainer)."""
    return runfolder.parse_event(line)


def formatDuration(seconds):
    """'1 h 02 min', '3 min 05 s', '12 s', or '' when unknown."""
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
        return ""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


def _number(value, digits=4):
    return f"{value:.{digits}g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


class TrainingStatus:
    """What the events of one run say so far: progress, losses, last checkpoint, outcome.

    Pure bookkeeping (no process, no Qt); the widget shows :meth:`progressText` and :meth:`lossText`.
    """

    def __init__(self):
        self.runDirectory = None
        self.device = None
        self.startIteration = 0
        self.iteration = 0
        self.totalIterations = None
        self.epoch = None
        self.epochs = None
        self.elapsedS = None
        self.etaS = None
        self.itPerS = None
        self.losses = {}  # name -> last value of the iteration event
        self.validation = None  # last validation event
        self.lastCheckpoint = None  # path of the last checkpoint event
        self.model = None  # model path of the done event
        self.done = False
        self.stopped = False
        self.errorMessage = None

    def update(self, event):
        """Take one event (a dict from :func:`parseEventLine`)."""
        name = event.get("event")
        if "iteration" in event and isinstance(event["iteration"], (int, float)):
            self.iteration = int(event["iteration"])
        if name == "start":
            self.runDirectory = event.get("run_dir")
            self.device = event.get("device")
            self.startIteration = self.iteration
            self.totalIterations = event.get("total_iterations")
            self.epochs = event.get("epochs")
            self.done = self.stopped = False
            self.errorMessage = None
        elif name == "iteration":
            self.epoch = event.get("epoch", self.epoch)
            self.elapsedS = event.get("elapsed_s", self.elapsedS)
            self.etaS = event.get("eta_s", self.etaS)
            self.itPerS = event.get("it_per_s", self.itPerS)
            self.losses = {key: event[key] for key in ("loss", "diffusion", "ncc", "smooth", "lr") if key in event}
        elif name == "epoch":
            self.epoch = event.get("epoch", self.epoch)
        elif name == "checkpoint":
            self.lastCheckpoint = event.get("path")
        elif name == "validation":
            self.validation = event
        elif name == "done":
            self.done = True
            self.stopped = bool(event.get("stopped", False))
            self.model = event.get("model")
            self.elapsedS = event.get("elapsed_s", self.elapsedS)
        elif name == "error":
            self.errorMessage = str(event.get("message"))

    @property
    def fraction(self):
        """Progress in [0, 1], or None before the start event."""
        if not self.totalIterations:
            return None
        return max(0.0, min(1.0, self.iteration / float(self.totalIterations)))

    def progressText(self):
        """'iteration 120 / 7200 (epoch 2 / 800), 3.1 it/s, 38 min 05 s left'."""
        if self.totalIterations is None:
            return "starting..."
        parts = [f"iteration {self.iteration} / {self.totalIterations}"]
        if self.epoch is not None and self.epochs:
            parts[0] += f" (epoch {self.epoch} / {self.epochs})"
        if isinstance(self.itPerS, (int, float)) and self.itPerS > 0:
            parts.append(f"{self.itPerS:.3g} it/s")
        if self.done:
            parts.append("stopped" if self.stopped else "done")
        elif formatDuration(self.etaS):
            parts.append(f"{formatDuration(self.etaS)} left")
        return ", ".join(parts)

    def lossText(self):
        """'loss 0.812 (diffusion 0.41, NCC -0.52, smooth 0.003)'; validation appended when known."""
        if not self.losses:
            return ""
        losses = self.losses
        text = (f"loss {_number(losses.get('loss'))} (diffusion {_number(losses.get('diffusion'))}, "
                f"NCC {_number(losses.get('ncc'))}, smooth {_number(losses.get('smooth'))})")
        if self.validation is not None:
            text += f"; validation loss {_number(self.validation.get('loss'))}"
            if self.validation.get("best"):
                text += " (best)"
        return text
