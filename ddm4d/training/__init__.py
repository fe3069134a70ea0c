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
  warnings go to stderr); RUN_DIR/log.jsonl records the same events. Field names are a contract
  (`ddm4d.runfolder.EVENT_FIELDS`, checked at every emit).
- Scale: under `torchrun` (env RANK / WORLD_SIZE / LOCAL_RANK) training uses DistributedDataParallel,
  shards every epoch's pairs across ranks like DistributedSampler, and only rank 0 writes files or prints.
  RUN_DIR must be on a file system every rank can read (for --resume).

RUN_DIR (file names, lock, formats, event fields) is described and owned by `ddm4d.runfolder`, which the
Slicer training module imports too. The package follows the run: options, pairs (data in memory), run
(options + data + RUN_DIR), state (checkpoints), reporting, loop, cli. Names are imported lazily, so
`ddm4d.training.options` (RUN) stays torch-free.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "options": ("METHODS", "PAIR_MODES", "RUN", "RunDefaults", "SIGNAL_EXIT", "TrainOptions"),
    "distributed": ("Dist",),
    "reporting": ("Reporter", "save_loss_curve"),
    "pairs": ("detect_spatial_dims", "draw_frames", "prepare_pairs", "preprocess_cycle", "preprocess_subject"),
    "state": ("EMA", "TrainState", "load_latest_state", "restore_training_state", "save_training_state"),
    "run": ("Run", "RunLock", "resolve_run"),
    "loop": ("StopFlag", "Trainer", "augment_batch", "build_model", "epoch_order", "validation_loss"),
    "cli": ("TrainResult", "add_arguments", "main", "run_training", "train"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
