"""The training loop: one optimiser step per iteration, checkpoints, validation, a clean stop on request."""
from __future__ import annotations

import math
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..baselines import BaselineModel
from ..checkpoint import save_any_model
from ..config import DDMConfig
from ..device import autocast
from .options import RUN, SIGNAL_EXIT, _STREAM_AUGMENT, _STREAM_ORDER, _STREAM_PAIRS, _STREAM_TRAIN, _STREAM_VALIDATION
from .pairs import draw_frames
from .reporting import Reporter, save_loss_curve
from .. import runfolder as rf
from .run import Run
from .state import EMA, TrainState, load_latest_state, save_training_state


def build_model(method: str, config: DDMConfig) -> nn.Module:
    if method == "ddm":
        from ..model import DDM
        return DDM(config)
    return BaselineModel(config, method)


class _LossModule(nn.Module):
    """DDP hooks forward(); the models expose training_losses(), so this routes one to the other."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, source, target, middle=None, gamma=None, generator=None):
        if middle is None:
            return self.model.training_losses(source, target, generator=generator)
        return self.model.training_losses(source, target, generator=generator, middle=middle, gamma=gamma)


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
def validation_loss(model: nn.Module, pairs: torch.Tensor, seed: int, device: torch.device,
                    precision: str = "auto") -> tuple[float, float]:
    """Mean loss and NCC over the validation pairs, with a fixed t and noise per pair (comparable over time)."""
    model.eval()
    losses, nccs = [], []
    for i in range(pairs.shape[0]):
        pair = pairs[i:i + 1].to(device)
        generator = torch.Generator(device=device).manual_seed(_derived_seed(seed, _STREAM_VALIDATION, i))
        with autocast(device, precision=precision):
            out = model.training_losses(pair[:, :1], pair[:, 1:], generator=generator)
        losses.append(float(out["loss"]))
        nccs.append(float(out["ncc"]))
    return float(np.mean(losses)), float(np.mean(nccs))


class StopFlag:
    """A clean stop after the current iteration, asked for by SIGINT/SIGTERM or by a stop request in
    RUN_DIR (ddm4d.runfolder.request_stop: every platform, also behind a launcher that forwards no
    signals). A second signal aborts at once."""

    def __init__(self):
        self.signum: int | None = None
        self.by_request = False
        self._run_dir: Path | None = None
        self._since = 0.0
        self._reporter: Reporter | None = None
        self._previous: dict[int, Any] = {}

    def install(self, reporter: Reporter) -> None:
        self._reporter = reporter
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

    def watch(self, run_dir: Path) -> None:
        """Honour stop requests in RUN_DIR written from now on (an older one is left from another run)."""
        self._run_dir, self._since = run_dir, time.time()

    def requested(self) -> bool:
        if self.signum is not None or self.by_request:
            return True
        if self._run_dir is not None and rf.stop_requested(self._run_dir, self._since):
            self.by_request = True
            if self._reporter is not None:
                self._reporter.warn(f"stop requested ({self._run_dir / rf.STOP_FILE}): stopping after this "
                                    "iteration and saving a checkpoint")
        return self.by_request

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        if self.by_request and self._run_dir is not None:
            rf.clear_stop(self._run_dir)  # honoured: it must not stop the next run


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
        with autocast(run.device, precision=run.precision):
            out = self.step_module(pairs[:, :1], pairs[:, 1:], middle, gammas, generator=generator)
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
            self.state.ema_updates = self.ema.updates
        stats = torch.stack([out[k].detach().float() for k in ("loss", "diffusion", "ncc", "smooth")]
                            + [torch.tensor(float(self.stop.requested()), device=run.device)])
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

    def save_models(self, name: str = rf.MODEL_FILE) -> Path:
        run = self.run
        path = save_any_model(self.output_model(), run.run_dir / name, **self._info())
        if self.ema is not None and name == rf.MODEL_FILE:
            save_any_model(self.model, run.run_dir / rf.RAW_MODEL_FILE, **self._info())
        return path

    def checkpoint(self) -> None:
        """Training state, then the latest weights, the loss curve and the pruning of old checkpoints."""
        run = self.run
        self.last_saved = self.state.iteration
        if not run.dist.main:
            return
        path = run.checkpoints / rf.checkpoint_name(self.state.iteration)
        save_training_state(path, self.model, self.optimizer, self.ema, self.state, run.fingerprint)
        self.save_models()
        for _, old in rf.checkpoint_files(run.checkpoints)[:-run.keep_last]:
            old.unlink(missing_ok=True)
        save_loss_curve(run.run_dir / rf.LOSS_CURVE_FILE, self.history, self.validation)
        self.reporter.emit({"event": "checkpoint", "iteration": self.state.iteration, "path": str(path)})

    def validate(self) -> None:
        run = self.run
        if not run.dist.main or run.validation_pairs.shape[0] == 0:
            return
        loss, ncc = validation_loss(self.output_model(), run.validation_pairs, run.seed, run.device,
                                    run.precision)
        best = self.state.best_loss is None or loss < self.state.best_loss
        if best:
            self.state.best_loss, self.state.best_iteration = loss, self.state.iteration
            save_training_state(run.checkpoints / rf.BEST_CHECKPOINT_FILE, self.model, self.optimizer, self.ema,
                                self.state, run.fingerprint)
            self.save_models(rf.BEST_MODEL_FILE)
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
        """Run to total_iterations or a stop; True when stopped (a signal or a stop request)."""
        run = self.run
        start_iteration = self.state.iteration
        started = time.perf_counter()
        elapsed_before = self.state.elapsed_s
        stopped = not run.dist.all_ok(not self.stop.requested(), run.device)  # a stop before the first step
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
