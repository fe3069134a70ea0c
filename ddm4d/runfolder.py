"""The run folder of `ddm4d train` (RUN_DIR): names, formats, the lock, the progress events.

One owner for what the trainer writes and what the Slicer training module reads: both import this
module, so renaming a file here renames it on both sides. No torch (the Slicer GUI imports it), nothing
unpickled: safetensors headers are read with plain Python.

RUN_DIR layout: config.json, model.safetensors (the EMA weights with --ema, the raw ones beside them in
model_raw.safetensors), model_best.safetensors (best validation loss), checkpoints/ckpt_<iteration>
.safetensors (the last --keep-last) and checkpoints/best.safetensors, log.jsonl, loss_curve.png,
tensorboard/, cache/ (with --disk-cache), .lock ("pid host" of the training process), .stop (a request
to stop, written by a client).
"""
from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

from .files import process_alive

# file formats (the "format" field of a file's JSON metadata)
MODEL_FORMAT = "ddm4d-model"
BASELINE_FORMAT = "ddm4d-baseline"  # a VM / VM-diff baseline model
STATE_FORMAT = "ddm4d-training-state"
RUN_FORMAT = "ddm4d-run"  # config.json
RUN_FORMAT_VERSION = 1

CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"
MODEL_FILE = "model.safetensors"  # the latest weights (EMA ones with --ema), rewritten at every checkpoint
RAW_MODEL_FILE = "model_raw.safetensors"  # with --ema: the raw weights beside the EMA ones
BEST_MODEL_FILE = "model_best.safetensors"  # the weights of the best validation loss
LOSS_CURVE_FILE = "loss_curve.png"
LOCK_FILE = ".lock"
CHECKPOINTS_DIRECTORY = "checkpoints"
BEST_CHECKPOINT_FILE = "best.safetensors"  # in CHECKPOINTS_DIRECTORY: the training state of the best model
TENSORBOARD_DIRECTORY = "tensorboard"
CACHE_DIRECTORY = "cache"
# files of a run: a folder holding one of them without a config.json was not written by ddm4d train
RUN_FILES = (CONFIG_FILE, LOG_FILE, MODEL_FILE, RAW_MODEL_FILE, LOSS_CURVE_FILE)

CHECKPOINT_PATTERN = r"ckpt_(\d+)\.safetensors"  # training states in CHECKPOINTS_DIRECTORY
# a client (the Slicer module) asks the trainer to save a checkpoint and exit by writing this file: the
# same on every platform, and it reaches the trainer behind a launcher that forwards no signals
STOP_FILE = ".stop"
STOP_TEXT = "ddm4d train: save a checkpoint and stop\n"


def checkpoint_name(iteration: int) -> str:
    """The file name of the training state after `iteration` steps (matches CHECKPOINT_PATTERN)."""
    return f"ckpt_{iteration:08d}.safetensors"


def checkpoint_files(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """(iteration, path) of each ckpt_<iteration>.safetensors in `folder`, oldest first; temporary files
    of interrupted writes do not match. An unreadable or missing folder has none."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    found = [(int(m.group(1)), Path(folder) / name) for name in names
             if (m := re.fullmatch(CHECKPOINT_PATTERN, name))]
    return sorted(found)


# ---------------------------------------------------------------------------------------- stopping

def request_stop(run_dir: str | os.PathLike) -> Path:
    """Ask the trainer writing into RUN_DIR to stop after its current iteration, with a checkpoint."""
    path = Path(run_dir) / STOP_FILE
    path.write_text(STOP_TEXT, encoding="utf-8")
    return path


def stop_requested(run_dir: str | os.PathLike, since: float | None = None) -> bool:
    """RUN_DIR holds a stop request (written at `since`, a time.time(), or later: an older one is stale)."""
    path = Path(run_dir) / STOP_FILE
    try:
        if since is not None and path.stat().st_mtime < since - 1.0:  # 1 s: coarse file-system clocks
            return False
        with open(path, encoding="utf-8", errors="replace") as file:
            return file.read(len(STOP_TEXT)) == STOP_TEXT
    except OSError:
        return False


def clear_stop(run_dir: str | os.PathLike) -> None:
    """Remove a stop request (only one: a file of that name that is not one stays)."""
    if stop_requested(run_dir):
        try:
            (Path(run_dir) / STOP_FILE).unlink()
        except OSError:
            pass


# ------------------------------------------------------------------------------------------ the lock

def lock_text(pid: int | None = None, host: str | None = None) -> str:
    """What RUN_DIR/.lock holds: "pid host" of the training process."""
    return f"{os.getpid() if pid is None else pid} {host or socket.gethostname()}\n"


def parse_lock(text: str) -> tuple[int | None, str | None]:
    """(pid, host) of a lock's text; (None, None) when it holds no pid (a writer that died before
    writing). :raises ValueError: text that ddm4d did not write."""
    words = text.split()
    if not words:
        return None, None
    if len(words) != 2 or not words[0].isdigit():
        raise ValueError("not a ddm4d lock")
    return int(words[0]), words[1]


def read_lock(path: str | os.PathLike) -> tuple[int | None, str | None]:
    """(pid, host) of a lock file; (None, None) when it is missing, empty or not ours."""
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            return parse_lock(file.read(4096))
    except (OSError, ValueError):
        return None, None


def lock_alive(pid: int | None, host: str | None) -> bool:
    """The lock's holder still runs. On another host it cannot be checked, so it counts as running."""
    if pid is None:
        return False
    if host is not None and host != socket.gethostname():
        return True
    return process_alive(pid)


# --------------------------------------------------------------------------------- safetensors header

def read_safetensors_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata of a .safetensors file, each value decoded from JSON where it is JSON.

    Reads the 8-byte length and the JSON header only. :raises ValueError: not a safetensors file.
    """
    try:
        with open(path, "rb") as file:
            head = file.read(8)
            if len(head) < 8:
                raise ValueError(f"{path} is not a safetensors file (too short)")
            length = int.from_bytes(head, "little")
            if length <= 0 or length > os.path.getsize(path) - 8:
                raise ValueError(f"{path} is not a safetensors file")
            header = json.loads(file.read(length).decode("utf-8"))
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path} is not a safetensors file") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file")
    metadata = {}
    for key, value in (header.get("__metadata__") or {}).items():
        try:
            metadata[key] = json.loads(value)
        except (TypeError, ValueError):
            metadata[key] = value
    return metadata


# ---------------------------------------------------------------------------------- progress events

# `ddm4d train --progress json`: one JSON object per stdout line (and per line of log.jsonl), with an
# "event" field. Every field the trainer emits, with its type (float: any number). start: iteration > 0 on
# a resume, config is the DDMConfig, run the run settings; iteration: completed steps, epoch 1-based,
# emitted every --log-every iterations and at the last; epoch: the one just finished, loss its mean;
# done: model is RUN_DIR/model.safetensors, stopped is true after a signal.
EVENT_FIELDS: dict[str, dict[str, type]] = {
    "start": {"run_dir": str, "method": str, "device": str, "iteration": int, "total_iterations": int,
              "epochs": int, "subjects": int, "validation_subjects": int, "config": dict, "run": dict,
              "world_size": int},
    "iteration": {"iteration": int, "epoch": int, "loss": float, "diffusion": float, "ncc": float,
                  "smooth": float, "lr": float, "elapsed_s": float, "eta_s": float, "it_per_s": float},
    "epoch": {"epoch": int, "iteration": int, "loss": float},
    "checkpoint": {"iteration": int, "path": str},
    "validation": {"iteration": int, "loss": float, "ncc": float, "best": bool},
    "done": {"iteration": int, "model": str, "elapsed_s": float, "stopped": bool},
    "error": {"message": str},
}
# what a reader relies on: a line with these is an event (a reader of an older trainer's log still works)
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "start": ("run_dir", "iteration", "total_iterations"),
    "iteration": ("iteration", "loss"),
    "epoch": ("epoch", "iteration", "loss"),
    "checkpoint": ("iteration", "path"),
    "validation": ("iteration", "loss"),
    "done": ("iteration",),
    "error": ("message",),
}


def check_event(event: dict) -> dict:
    """The event itself when it carries every field of EVENT_FIELDS for its kind, so that the trainer and
    its readers cannot drift apart. :raises ValueError: an unknown event or a missing field."""
    name = event.get("event")
    if name not in EVENT_FIELDS:
        raise ValueError(f"unknown progress event {name!r}")
    missing = [f for f in EVENT_FIELDS[name] if f not in event]
    if missing:
        raise ValueError(f"progress event {name!r} lacks {', '.join(missing)}")
    return event


def json_object(line: str) -> dict | None:
    """The JSON object one output line of a ddm4d command holds, or None (log text)."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        parsed = json.loads(text)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def parse_event(line: str) -> dict | None:
    """The event of one output line, or None when the line is not a progress event (log text): a JSON
    object whose "event" is known and carries that event's REQUIRED_FIELDS."""
    parsed = json_object(line)
    if parsed is None:
        return None
    name = parsed.get("event")
    if name not in REQUIRED_FIELDS or any(f not in parsed for f in REQUIRED_FIELDS[name]):
        return None
    return parsed
