"""`ddm4d train` from the command line and the Python API."""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from .. import runfolder as rf
from ..config import PRECISIONS, DDMConfig
from ..errors import InputError
from .distributed import Dist, _process_device
from .loop import StopFlag, Trainer
from .options import METHODS, PAIR_MODES, RUN, SIGNAL_EXIT, TrainOptions, _check_options
from .reporting import Reporter
from .run import Run, RunLock, _lock_run_dir, _prepare_run_dir, _remove_if_empty, _run_config_json, resolve_run


@dataclass
class TrainResult:
    exit_code: int
    run_dir: Path | None
    model: Path | None
    iteration: int
    stopped: bool


@dataclass
class _Session:
    """What a run holds while it runs, let go in one place: the lock, a RUN_DIR this call created (removed
    again when the run never started), the signal handlers and the process group."""

    dist: Dist
    reporter: Reporter
    stop: StopFlag = field(default_factory=StopFlag)
    lock: RunLock | None = None
    created: Path | None = None

    def start(self, options: TrainOptions) -> Run:
        """Options checked, RUN_DIR locked and the run resolved, on every rank or on none."""
        _check_options(options)
        device = _process_device(options.device, self.dist)
        self.dist.start(device)
        ok = False
        try:
            if self.dist.main:
                self.lock, self.created = _lock_run_dir(Path(options.out), self.reporter)
            run = resolve_run(options, self.dist, device, self.reporter)
            ok = True
        finally:  # every rank takes part, also one that failed: no rank waits forever
            everyone_ok = self.dist.all_ok(ok, device)
        if not everyone_ok:
            raise InputError("another process of this training failed to start (see its message)")
        self.created = None  # the run has started: its RUN_DIR stays
        self.stop.install(self.reporter)
        self.stop.watch(run.run_dir)
        return run

    def close(self) -> None:
        self.stop.restore()
        self.reporter.close()
        if self.lock is not None:
            self.lock.release()
        if self.created is not None:
            _remove_if_empty(self.created)
        self.dist.stop()


def run_training(options: TrainOptions) -> TrainResult:
    """Train as `ddm4d train` does; raises InputError for user mistakes (after an "error" event)."""
    dist = Dist.from_env()
    reporter = Reporter(options.progress if options.progress in ("bar", "json") else "bar", enabled=dist.main)
    session = _Session(dist, reporter)
    try:
        run = session.start(options)
        trainer = Trainer(run, reporter, session.stop)
        if options.resume:
            trainer.resume()
        start = trainer.state.iteration
        if dist.main:
            trainer.history, trainer.validation = _prepare_run_dir(run, reporter, start)
        trainer.wrap_distributed()
        if start >= run.total_iterations:
            reporter.warn(f"the run is already at iteration {start} of {run.total_iterations}; pass a larger "
                          "--iterations or --epochs to train further")
        reporter.emit({"event": "start", "run_dir": str(run.run_dir), "method": run.method,
                       "device": str(run.device), "iteration": start, "total_iterations": run.total_iterations,
                       "epochs": run.epochs, "subjects": len(run.train_ids),
                       "validation_subjects": len(run.validation_ids), "config": run.config.to_dict(),
                       "run": _run_config_json(run)["run"], "world_size": dist.world_size})
        stopped = trainer.train()
        model_path = run.run_dir / rf.MODEL_FILE
        reporter.emit({"event": "done", "iteration": trainer.state.iteration, "model": str(model_path),
                       "elapsed_s": round(trainer.state.elapsed_s, 3), "stopped": stopped})
        code = SIGNAL_EXIT.get(session.stop.signum, 0) if stopped else 0
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
        session.close()


def train(data: str | os.PathLike, out: str | os.PathLike, **options: Any) -> TrainResult:
    """Python API: ``train("data/", "runs/a", iterations=1000, method="vm", progress="json")``."""
    return run_training(TrainOptions(data=str(data), out=str(out), **options))


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
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else the CPU), cpu, cuda, or mps (Apple's GPU) (default auto)")
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
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="the networks' passes: auto = bf16 on a GPU, fp32 on the CPU; bf16 = bf16 also on a "
                        "CPU (faster with AMX, benchmarks/train_bf16.md; slower with AVX512-BF16 alone); fp32")
    parser.add_argument("--pairs", choices=PAIR_MODES, help="cine (default): pairs i -> j from every frame of each "
                        "cine, both directions and the identity, with a real in-between frame as supervision at its "
                        "time; ed-es: the paper's ED -> ES pairs only")
    parser.add_argument("--disk-cache", action="store_true", help="also cache the preprocessed pairs as "
                        "RUN_DIR/cache/*.npy for later runs")


def main(args: argparse.Namespace) -> int:
    """Exit codes: 0 done (or stopped by a stop request in RUN_DIR), 2 bad input, 130 stopped by SIGINT, 143
    stopped by SIGTERM (a checkpoint saved on every stop)."""
    names = {f.name for f in dataclasses.fields(TrainOptions)}
    values = {k: v for k, v in vars(args).items() if k in names}
    for key in ("size", "spacing"):
        if values.get(key) is not None:
            values[key] = tuple(values[key])
    result = run_training(TrainOptions(**values))
    if args.progress == "bar" and result.model is not None and not result.stopped:
        print(result.model)
    return result.exit_code
