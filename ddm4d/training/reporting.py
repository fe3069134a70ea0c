"""Progress: JSON events (stdout, log.jsonl), a tqdm bar, TensorBoard, the loss curve."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .. import runfolder as rf


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
        line = json.dumps(rf.check_event(event))
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


def save_loss_curve(path: Path, history: list[tuple[int, float, float]],
                    validation: list[tuple[int, float, float]]) -> None:
    """Training and validation loss and NCC against iteration, written atomically (no pyplot state)."""
    from ..plotting import figure, save_png

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
