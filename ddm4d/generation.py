"""`ddm4d generate`: intermediate frames between two volumes, in the source's exact geometry.

Pipeline: read -> model grid (geometry.to_model_grid) -> optional per-case fit -> latent code ->
batched deformation over gamma -> fields back to physical space -> warp the ORIGINAL source.
The same path serves the CLI, the Python API, the Slicer logic and `ddm4d evaluate`.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from . import files, resample
from .checkpoint import load_any_model
from .config import (DDMConfig, DEFAULT_FADE, DEFAULT_MODE, DEFAULT_MODEL_TIMING, DEFAULT_REFINE, FADES, MODE_ALIASES,
                     MODES, RefineConfig)
from .device import PRECISIONS, autocast, check_precision, resolve_device, uses_bf16
from .errors import Cancelled, InputError
from .fade import join
from .geometry import ModelMapping, folding_of, to_model_grid
from .inputs import as_labels, in_input_dims, read_pair
from .interface import Generation, Model
from .io import read_cine
from .metrics import ACDC_STRUCTURES, label_volumes_ml
from .model import DDM
from .outputs import DEFAULT_COMPRESSION, OUTPUTS, VOLUME_STRUCTURES, parse_outputs, write_outputs, write_sequence_nrrd
from .refine import Refinement, _axis_spacing, path_fields, refine_velocity, refinement_grid
from .svf import compose, invert, logarithm

__all__ = ["generate", "GenerationResult", "fit_pair", "Cancelled", "MODES", "DEFAULT_MODE", "DEFAULT_REFINE",
           "write_sequence_nrrd"]

BUNDLED_MODELS = {3: "ddm_phantom_3d.safetensors", 2: "ddm_phantom_2d.safetensors"}
#: where refinement started (ddm4d.refine.Refinement.start), in the user's words; otherwise no motion
STARTS = {"model": "the model's motion", "reversed model": "the model's motion from the target to the source, inverted"}


def bundled_model_path(spatial_dims: int) -> Path | None:
    """The default model shipped in Resources/models (source tree) or ddm4d/models (installed)."""
    name = BUNDLED_MODELS[spatial_dims]
    here = Path(__file__).resolve().parent
    for folder in (here / "models", here.parent / "Resources" / "models"):
        if (folder / name).is_file():
            return folder / name
    return None


@dataclass
class GenerationResult:
    """Frames, fields and labels on the source's grid (SimpleITK images, LPS mm) plus bookkeeping."""

    gammas: list[float]
    frames: list[sitk.Image]
    fields: list[sitk.Image]
    labels: list[sitk.Image] | None
    folding_fraction: list[float]
    timings_s: dict[str, float]
    device: str
    model: str
    mode: str
    mapping: ModelMapping
    precision: str = "fp32"  # of the networks' passes (bf16 or fp32)
    fit_losses: list[float] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    refinement: dict[str, Any] | None = None  # where refinement started, its time and objective
    score: dict[str, Any] | None = None  # against a cine's real in-between frames (ddm4d.cine.score_frames)
    jacobians: list[sitk.Image] = field(default_factory=list)  # det(I + grad u) of each field, float32
    fade: str | None = None  # how symmetric mode joined its moved images (ddm4d.fade); None in forward mode
    motion_source: str = ""  # one sentence: the model (synthetic-trained or not) and whether it was refined

    def label_volumes_ml(self) -> list[dict[str, float]]:
        """Volume (mL) of the LV blood pool, LV myocardium and RV in every propagated label frame."""
        structures = {k: ACDC_STRUCTURES[k] for k in VOLUME_STRUCTURES}
        return [label_volumes_ml(img, labels=structures) for img in self.labels or []]

    def write(self, out_dir: str | os.PathLike, quicklook: bool = True, outputs: str | Sequence[str] | None = None,
              compression: int | None = DEFAULT_COMPRESSION) -> dict[str, Any]:
        """Write the frames, report.json and the chosen `outputs` (default all of ddm4d.outputs.OUTPUTS)
        into a temporary folder beside `out_dir`, then move it into place. `compression`: 0, none (.nii,
        raw NRRD: fastest); 1-9, .nii.gz, and NRRD at that zlib level (default
        ddm4d.outputs.DEFAULT_COMPRESSION); None, ITK's.

        `out_dir` must be new, empty or hold only an earlier result (ddm4d.files: nothing ddm4d did
        not write is ever deleted); otherwise InputError, before anything is written."""
        chosen = tuple(o for o in parse_outputs(outputs) if quicklook or o != "quicklook")
        return write_outputs(self, Path(out_dir), chosen, compression)


# ------------------------------------------------------------------------------------------ the API

def generate(source, target=None, model: Any = "default", frames: int = 10, gammas: Sequence[float] | None = None,
             fit_steps: int = 0, seg=None, device: str = "auto", mode: str = DEFAULT_MODE,
             refine: bool = DEFAULT_REFINE, refine_config: RefineConfig | None = None,
             center: Sequence[float] | None = None, progress: Callable[[float, str], None] | None = None,
             cancel: Callable[[], bool] | None = None, seed: int = 0, chunk_size: int | None = None,
             subtract_gamma0: bool | None = None, source_frame: int | None = None,
             target_frame: int | None = None, model_timing: bool = DEFAULT_MODEL_TIMING,
             precision: str = "auto", fade: str = DEFAULT_FADE) -> GenerationResult:
    """Generate frames from `source` towards `target`.

    :param source, target: SimpleITK images or paths (NIfTI, NRRD, MHA, DICOM series folder); with
        `source_frame` / `target_frame`, cines (4D NIfTI, multi-frame DICOM, DICOM cine series or a
        list of images) and the frame to take (from 0). Without `target`, both frames come from `source`.
    :param model: a model file path, a DDM/baseline object, "default" (bundled) or None/"none"
        (no network: refinement alone, or an untrained model fitted with fit_steps).
    :param frames: number of frames, gammas = linspace(0, 1, frames) including both ends.
    :param gammas: explicit gammas in [0, 1] instead of `frames`.
    :param mode: "symmetric" (the source warped forward and the target backward along one path,
        cross-faded with weights 1 - gamma and gamma) or "forward" (the paper: the source warped).
    :param refine: per-case refinement of the path (ddm4d.refine), started from the model's field (the
        model run from the source to the target and back, whichever fits the pair better).
    :param precision: the networks' passes: "auto" (bf16 on CUDA and on CPUs with AMX, where it is
        faster and was measured within 0.05 dB of fp32; benchmarks/motion.py --precision), "fp32" or "bf16".
    :param fade: how symmetric mode joins its two moved images: "confidence" (voxel by voxel, towards
        the plain blend where the motion does not explain the pair; ddm4d.fade) or "linear".
    :param model_timing: with refinement and a model, frames sit where the model's own path is at
        each gamma (its pace), not evenly along the refined path.
    :param fit_steps: per-case optimisation of the whole network on this pair (slow; the paper's loss).
    :param seg: labels on the source (image or path), propagated to every frame (nearest neighbour).
    :param center: LPS point (mm) on which to centre the model's field of view (e.g. an ROI centre).
    :param progress: callback(fraction, message); cancel: callback returning True to stop.
    """
    timings: dict[str, float] = {}
    report = progress or (lambda f, m: None)
    t0 = time.perf_counter()
    mode = MODE_ALIASES.get(mode, mode)
    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}; use {' or '.join(MODES)}")
    gamma_list = _gammas(frames, gammas)
    if fade not in FADES:
        raise InputError(f"unknown fade {fade!r}; use {' or '.join(FADES)}")
    if int(fit_steps) < 0:
        raise InputError(f"fit steps must be >= 0, got {fit_steps}")
    source_img, target_img = read_pair(source, target, source_frame, target_frame)
    labels_img = as_labels(seg, source_img) if seg is not None else None
    spatial_dims = 2 if source_img.GetSize()[2] == 1 else 3
    if (target_img.GetSize()[2] == 1) != (spatial_dims == 2):
        raise InputError(f"the source is {'a single slice' if spatial_dims == 2 else '3D'} but the target is not; "
                         "give two volumes of the same kind")
    torch_device = resolve_device(device)
    check_precision(precision)
    net, model_name = _resolve_model(model, spatial_dims, fit_steps, refine)
    timings["load"] = time.perf_counter() - t0
    _check_cancel(cancel)

    messages: list[str] = []
    fit_losses: list[float] = []
    paths: _Paths | None = None
    need_end = refine or mode == "symmetric"
    model_gammas = sorted(set(gamma_list) | ({1.0} if need_end else set()))
    if net is not None:
        t = time.perf_counter()
        cfg = net.config
        size, spacing = cfg.image_size, cfg.spacing
        if model_name == "none":
            spacing = _covering_spacing(source_img, size, spacing)
        src_arr, tgt_arr, mapping = to_model_grid(source_img, target_img, size, spacing, center)
        timings["preprocess"] = time.perf_counter() - t
        report(0.05, "preprocessed")
        if fit_steps:
            t = time.perf_counter()
            net, fit_losses = fit_pair(net, src_arr, tgt_arr, fit_steps, torch_device, seed=seed,
                                       bidirectional=(mode == "symmetric"), progress=report, cancel=cancel)
            timings["fit"] = time.perf_counter() - t
        run = _run_model(net, src_arr, tgt_arr, model_gammas, torch_device, chunk_size, subtract_gamma0, messages,
                         precision)
        timings["code"], timings["deform"] = run.code_s, run.deform_s
        torch_device, precision = run.device, run.precision
        fields = run.generation.fields
        paths = _Paths(mapping, {g: fields[i:i + 1].float().cpu() for i, g in enumerate(model_gammas)})
        if refine:
            # the model asked the other way round too; refinement starts from the direction that fits
            # better (real cine pairs: which one does differs from pair to pair, benchmarks/motion.py)
            back = _run_model(net, tgt_arr, src_arr, [1.0], torch_device, chunk_size, subtract_gamma0, messages,
                              precision)
            timings["code"] += back.code_s
            timings["deform"] += back.deform_s
            precision = back.precision
            paths.reverse_end = back.generation.fields[:1].float().cpu()
    _check_cancel(cancel)

    refinement, timing = None, None
    if refine:
        t = time.perf_counter()
        timing = _model_timing(paths.forward, gamma_list) if (paths is not None and model_timing) else None
        paths, refinement = _refine_paths(source_img, target_img, paths, gamma_list, mode, refine_config,
                                          torch_device, report, cancel, timing)
        timings["refine"] = time.perf_counter() - t
        messages.append(f"refinement started from {STARTS.get(refinement.start, 'no motion')}"
                        f" ({refinement.seconds:.1f} s)")
    elif mode == "symmetric":
        paths.backward = _backward_from_forward(paths.forward, gamma_list)
    report(0.85, "mapping frames back to the source geometry")
    _check_cancel(cancel)

    t = time.perf_counter()
    mapping = paths.mapping
    frames_out, fields_out, jacobians, folding, labels_out = _on_source(paths, gamma_list, mode, fade, labels_img)
    frames_out, fields_out, labels_out, jacobians = in_input_dims(source_img, frames_out, fields_out, labels_out,
                                                                  jacobians)
    timings["postprocess"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    report(1.0, "done")
    return GenerationResult(gammas=gamma_list, frames=frames_out, fields=fields_out,
                            labels=labels_out if labels_img is not None else None, folding_fraction=folding,
                            jacobians=jacobians,
                            timings_s=timings, device=str(torch_device), model=model_name, mode=mode,
                            fade=fade if mode == "symmetric" else None,
                            precision="bf16" if net is not None and uses_bf16(torch_device, precision, cpu_auto=True)
                            else "fp32",
                            mapping=mapping, fit_losses=fit_losses, messages=messages,
                            refinement=_refinement_info(refinement, timing),
                            motion_source=motion_source(model_name, refinement, fit_steps))


def _on_source(paths: _Paths, gammas: list[float], mode: str, fade: str, labels_img: sitk.Image | None):
    """Frames, fields, Jacobians, folding and labels of every gamma on the source grid: all gammas at
    once, in torch (ddm4d.resample: SimpleITK's conventions, several times faster). A gamma that does
    not move (the source frame: a zero field forward, and gamma 0 in symmetric mode, where the fade
    keeps the source exactly) is the source itself, with no resampling."""
    mapping = paths.mapping
    fov = mapping.fov_mask(erode=1)
    still = {g for g in gammas if (mode == "forward" or g == 0) and not bool(paths.forward[g].any())}
    out: dict[float, tuple] = {}
    if still:
        zero = sitk.Image(mapping.source.GetSize(), sitk.sitkVectorFloat64, 3)
        zero.CopyInformation(mapping.source)
        one = sitk.Image(mapping.source.GetSize(), sitk.sitkFloat32) + 1.0
        one.CopyInformation(mapping.source)
        for g in still:  # copies (SimpleITK's are copy-on-write): no frame is the caller's image itself
            out[g] = (sitk.Image(mapping.source), sitk.Image(zero), sitk.Image(one), 0.0,
                      sitk.Image(labels_img) if labels_img is not None else None)
    moving = [g for g in gammas if g not in still]
    ends = [torch.from_numpy(sitk.GetArrayFromImage(im)).float() for im in (mapping.source, mapping.target)] \
        if mode == "symmetric" else []  # what the fade blends towards; forward mode never reads them
    for batch in resample.gamma_batches(moving, mapping.source):
        fld = resample.fields_on_source(mapping, torch.cat([paths.forward[g] for g in batch]))
        warp = resample.Warp(fld, mapping.source)  # also carries the labels
        frames = warp.linear(mapping.source)  # (N, z, y, x) float32
        if mode == "symmetric":  # the source moved forward joined with the target moved back (ddm4d.fade)
            back = resample.fields_on_source(mapping, torch.cat([paths.backward[g] for g in batch]))
            moved_target = resample.Warp(back, mapping.target).linear(mapping.target)
            frames = join(*ends, frames, moved_target, batch, spacing=mapping.source.GetSpacing()[::-1], fade=fade)
        jacobian = warp.jacobians()
        labels = resample.to_images(warp.nearest(labels_img, default_value=0), labels_img) \
            if labels_img is not None else [None] * len(batch)
        for g, *items in zip(batch, resample.to_images(frames, mapping.source),
                             resample.to_images(fld, mapping.source, vector=True),
                             resample.to_images(jacobian, mapping.source),
                             [folding_of(j.numpy(), mask=fov) for j in jacobian], labels):
            out[g] = tuple(items)
    frames, fields, jacobians, folding, labels = ([out[g][k] for g in gammas] for k in range(5))
    return frames, fields, jacobians, folding, labels if labels_img is not None else []


@dataclass
class _Paths:
    """Fields of every gamma on one grid (the model's or the refinement's), (1, ndim, *spatial) each:
    `forward` pulls the source to the frame, `backward` the target (symmetric mode)."""

    mapping: ModelMapping
    forward: dict[float, torch.Tensor]
    backward: dict[float, torch.Tensor] = field(default_factory=dict)
    reverse_end: torch.Tensor | None = None  # the model's target -> source field at gamma 1


def _backward_from_forward(forward: dict[float, torch.Tensor], gammas: Sequence[float]) -> dict[float, torch.Tensor]:
    """The target's fields along the model's own path: a frame point p sits at phi_gamma(p) in the
    source, which the end field phi_1 maps from the target: T o phi_1^-1 o phi_gamma."""
    inverse_end = invert(forward[1.0])
    return {g: compose(inverse_end, forward[g]) for g in gammas}


def _model_timing(forward: dict[float, torch.Tensor], gammas: Sequence[float]) -> list[float] | None:
    """How far along its own path the model is at each gamma: the projection of phi_gamma on phi_1.

    A model trained on real in-between frames knows that a heart does not move evenly in time (slow,
    fast, slow in ejection); refinement then follows its refined path at the model's pace. None when
    the model does not move (nothing to read a pace from)."""
    end = forward[1.0]
    norm = float((end * end).sum())
    if norm < 1e-6 * end[0, 0].numel():
        return None
    taus = [min(1.0, max(0.0, float((forward[g] * end).sum()) / norm)) for g in gammas]
    order = sorted(range(len(gammas)), key=lambda i: gammas[i])
    running = 0.0
    for i in order:  # a pace never goes backwards
        running = max(running, taus[i])
        taus[i] = running
    return [0.0 if g == 0 else 1.0 if g == 1 else tau for g, tau in zip(gammas, taus)]


def _refine_paths(source_img, target_img, paths: _Paths | None, gammas, mode, config, device, report, cancel,
                  timing: list[float] | None = None):
    config = config or RefineConfig()
    dims = 2 if source_img.GetSize()[2] == 1 else 3
    src, tgt, mapping = refinement_grid(source_img, target_img, config, dims)
    s = torch.from_numpy(src)[None, None].to(device)
    t = torch.from_numpy(tgt)[None, None].to(device)

    squarings = config.squarings(dims)

    def velocity(model_field: torch.Tensor) -> torch.Tensor:
        end = paths.mapping.field_to_physical(model_field[0].numpy())
        return logarithm(torch.from_numpy(mapping.field_to_model(end))[None].to(device), steps=squarings)

    starts = {}
    if paths is not None:
        starts["model"] = velocity(paths.forward[1.0])
        if paths.reverse_end is not None:  # exp(-v) is the inverse of exp(v)
            starts["reversed model"] = -velocity(paths.reverse_end)
    refinement = refine_velocity(s, t, _axis_spacing(mapping), starts, config, symmetric=(mode == "symmetric"),
                                 progress=lambda f, m: report(0.1 + 0.7 * f, m), cancel=cancel)
    taus = timing or gammas
    with torch.no_grad():
        forward = path_fields(refinement.velocity, taus, squarings).cpu()
        backward = path_fields(refinement.velocity, taus, squarings, backward=True).cpu() \
            if mode == "symmetric" else None
    out = _Paths(mapping, {g: forward[i:i + 1] for i, g in enumerate(gammas)})
    if backward is not None:
        out.backward = {g: backward[i:i + 1] for i, g in enumerate(gammas)}
    return out, refinement


def motion_source(model_name: str, refinement: Refinement | None, fit_steps: int = 0) -> str:
    """One sentence for the user: where the motion came from, and whether the model was trained on
    synthetic data (the bundled ones are: phantom cines, not real scans)."""
    if model_name == "none":
        model = "no network"
    elif Path(model_name).name in BUNDLED_MODELS.values():
        model = "the bundled model, trained on synthetic phantom cines (not on real scans)"
    else:
        model = f"the model {Path(model_name).name}"
    if fit_steps:
        model += f", fitted to this pair for {fit_steps} steps"
    if refinement is None:
        return f"Motion from {model}, not refined on this pair."
    start = STARTS.get(refinement.start, "no motion (it fitted this pair better)")
    return f"Motion from {model}, refined on this pair starting from {start}."


def _refinement_info(refinement: Refinement | None, timing: list[float] | None) -> dict[str, Any] | None:
    if refinement is None:
        return None
    return {"start": refinement.start, "seconds": refinement.seconds, "objective": refinement.objective,
            "steps": refinement.steps, "smoothed": refinement.smoothed, "path_position": timing}


def fit_pair(net, source: np.ndarray, target: np.ndarray, steps: int, device: torch.device, seed: int = 0,
             bidirectional: bool = False, progress=None, cancel=None, checks: int = 10):
    """Per-case optimisation of a copy of the model: `steps` Adam steps of its own loss on this pair.

    t is drawn from [0, fit_max_timestep), near the t = 0 at which generation computes the code (drawn
    over all steps, as in training, a few hundred steps learn no motion); the loss should see the
    subtracted field (config.subtracted_field_loss, the default), else one pair's field is learned from
    the source alone and subtracted away. Bidirectional fitting alternates source -> target with
    target -> source.
    Noisy steps do not improve monotonically, so `checks` times along the way the generated target
    frame is scored (local NCC with the target, the inference condition) and the best weights are
    kept; if nothing beats the starting model, it stays.
    """
    from .losses import local_ncc

    torch.manual_seed(seed)
    net = copy.deepcopy(net).to(device).train()
    cfg = net.config
    opt = torch.optim.Adam(net.parameters(), lr=cfg.fit_lr, betas=cfg.adam_betas)
    s = torch.from_numpy(source)[None, None].to(device)
    t = torch.from_numpy(target)[None, None].to(device)
    pairs = [(s, t)] + ([(t, s)] if bidirectional else [])
    max_t = max(1, min(cfg.fit_max_timestep, cfg.timesteps))

    def score() -> float:
        net.eval()
        with torch.no_grad(), autocast(device):
            value = local_ncc(net.generate(s, t, [1.0]).frames, t, cfg.ncc_window).item()
        net.train()
        return value

    best_score, best_state = score(), copy.deepcopy(net.state_dict())
    losses = []
    every = max(1, steps // 20)
    check_every = max(1, steps // max(1, checks))
    for step in range(steps):
        a, b = pairs[step % len(pairs)]
        step_t = torch.randint(0, max_t, (1,), device=device)
        with autocast(device):
            loss = net.training_losses(a, b, t=step_t)["loss"]
        if not torch.isfinite(loss):  # diverged (too large a fit_lr): keep the best weights so far
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % check_every == 0 or step == steps - 1:
            current = score()
            if current > best_score:
                best_score, best_state = current, copy.deepcopy(net.state_dict())
        if progress and (step % every == 0 or step == steps - 1):
            progress(0.05 + 0.6 * (step + 1) / steps,
                     f"fitting {step + 1}/{steps}: loss {losses[-1]:.4f}, best NCC(frame 1, target) {best_score:.4f}")
        _check_cancel(cancel)
    net.load_state_dict(best_state)
    return net.eval(), losses


# ------------------------------------------------------------------------------------------ helpers

#: the most frames one run makes: every frame keeps its volume (float32) and displacement field
#: (3 x float64) in memory until written, FRAME_BYTES_PER_VOXEL bytes per source voxel
MAX_FRAMES = 1000
FRAME_BYTES_PER_VOXEL = 4 + 3 * 8


def frames_memory_text(frames: int = MAX_FRAMES) -> str:
    """What `frames` frames hold in memory, for a source of the paper's grid (help text, README)."""
    voxels = int(np.prod(DDMConfig().image_size))
    size = "x".join(map(str, DDMConfig().image_size))
    return f"about {frames * voxels * FRAME_BYTES_PER_VOXEL / 1e9:.0f} GB for a {size} source"


def _gammas(frames: int | None, gammas: Sequence[float] | None) -> list[float]:
    if gammas is not None:
        values = [float(g) for g in gammas]
        if not values:
            raise InputError("no gammas given; give values in [0, 1], e.g. --gammas 0,0.5,1")
        if len(values) > MAX_FRAMES:
            raise InputError(f"{len(values)} gammas are more than {MAX_FRAMES}, the most frames one run makes "
                             f"({frames_memory_text()}); give fewer, or split them over several runs")
        bad = [g for g in values if not (0.0 <= g <= 1.0) or np.isnan(g)]
        if bad:
            raise InputError(f"gammas must lie in [0, 1]; got {bad}")
        return values
    if frames is None or int(frames) < 2:
        raise InputError(f"--frames must be at least 2 (source and target), got {frames}")
    if int(frames) > MAX_FRAMES:
        raise InputError(f"--frames {frames} is more than {MAX_FRAMES}, the most one run makes "
                         f"({frames_memory_text()}); ask for fewer frames, or split the range with --gammas over "
                         "several runs")
    return [float(g) for g in np.linspace(0.0, 1.0, int(frames))]


def _resolve_model(model, spatial_dims: int, fit_steps: int, refine: bool):
    """(network or None, description). Models are checked against the input's dimensionality."""
    if model is None or (isinstance(model, str) and model.lower() == "none"):
        if fit_steps:
            return DDM(DDMConfig.for_dims(spatial_dims)), "none"
        if not refine:
            raise InputError("--model none uses no network; keep refinement on (drop --no-refine), or give "
                             "--fit-steps K to fit an untrained model to this pair")
        return None, "none"
    if isinstance(model, str) and model == "default":
        path = bundled_model_path(spatial_dims)
        if path is None:
            raise InputError(f"no bundled {spatial_dims}D model is installed; pass --model FILE.safetensors, "
                             "or --model none")
        model = path
    if isinstance(model, (str, os.PathLike)):
        net = load_any_model(Path(model), "cpu")
        name = str(model)
    else:
        net, name = model, getattr(model, "name", type(model).__name__)
    if net.config.spatial_dims != spatial_dims:
        kind = "single-slice (2D)" if net.config.spatial_dims == 2 else "3D"
        have = "a single slice" if spatial_dims == 2 else "a 3D volume"
        raise InputError(f"model {name} was trained for {kind} images but the source is {have}; "
                         f"use a {spatial_dims}D model or --model none")
    return net, name


def _covering_spacing(source: sitk.Image, size, spacing) -> tuple[float, ...]:
    """For an untrained model: a grid spacing that covers the whole in-plane field of view."""
    extent = [n * s for n, s in zip(source.GetSize(), source.GetSpacing())]
    return tuple(max(sp, extent[i] / n) if i < 2 else sp for i, (n, sp) in enumerate(zip(size, spacing)))


@dataclass
class _ModelRun:
    """A model's generation on the model grid, the device it ran on and the seconds of its two passes."""

    generation: Generation
    device: torch.device
    code_s: float
    deform_s: float
    precision: str = "auto"  # what later passes should ask for: "fp32" once a bf16 pass was redone in fp32


def _run_model(net: Model, src_arr, tgt_arr, gammas, device, chunk_size, subtract_gamma0, messages,
               precision="auto") -> _ModelRun:
    """Latent code + batched deformation; on CUDA out-of-memory retry with smaller chunks, then CPU.

    A bf16 pass whose displacements are not finite or reach beyond the grid is done again in fp32.
    Why: a bf16 kernel of oneDNN (torch 2.13) read memory it never wrote for one shape of layer
    (networks.blocks.Conv3d) and the fields came out NaN or 1e36 voxels; a kernel defect of another
    shape, or of another library version, must not reach the frames either."""
    while True:
        try:
            run = _run_on(net, src_arr, tgt_arr, gammas, device, chunk_size, subtract_gamma0, precision)
            if uses_bf16(run.device, precision, cpu_auto=True) and not _plausible(run.generation.fields):
                messages.append("the networks' bf16 pass gave displacements that are not finite or reach beyond the "
                                "grid: done again in fp32 (--precision fp32 skips bf16)")
                print(f"ddm4d generate: {messages[-1]}", file=sys.stderr)
                precision = "fp32"
                run = _run_on(net, src_arr, tgt_arr, gammas, run.device, chunk_size, subtract_gamma0, precision)
            run.precision = precision
            return run
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            current = chunk_size or net.auto_chunk_size(torch.zeros((1, 1) + src_arr.shape))
            if current > 1:
                chunk_size = max(1, current // 2)
                messages.append(f"GPU out of memory: retrying with {chunk_size} gammas per pass")
            else:
                device = torch.device("cpu")
                messages.append("GPU out of memory even one gamma at a time: continuing on the CPU")
            print(f"ddm4d generate: {messages[-1]}", file=sys.stderr)


def _run_on(net: Model, src_arr, tgt_arr, gammas, device, chunk_size, subtract_gamma0,
            precision="auto") -> _ModelRun:
    net = net.to(device).eval()
    s = torch.from_numpy(src_arr)[None, None].to(device)
    t = torch.from_numpy(tgt_arr)[None, None].to(device)
    _sync(device)
    t0 = time.perf_counter()
    with autocast(device, precision=precision, cpu_auto=True):
        code = net.latent_code(s, t)
        _sync(device)
        t1 = time.perf_counter()
        gen = net.generate(s, t, gammas, subtract_gamma0=subtract_gamma0, chunk_size=chunk_size, code=code)
    _sync(device)
    return _ModelRun(gen, device, t1 - t0, time.perf_counter() - t1)


def _plausible(fields: torch.Tensor) -> bool:
    """Displacements (N, ndim, *spatial, in voxels) that are finite and shorter than the grid's extent."""
    return bool(torch.isfinite(fields).all()) and float(fields.abs().max()) < max(fields.shape[2:])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_cancel(cancel) -> None:
    if cancel is not None and cancel():
        raise Cancelled("generation cancelled")


# ------------------------------------------------------------------------------------------ the CLI

def add_arguments(parser) -> None:
    parser.add_argument("--source", required=True,
                        help="source volume (e.g. end-diastole): NIfTI, NRRD, MHA or DICOM folder; or a cine "
                        "(4D NIfTI, multi-frame DICOM, DICOM cine series) with --source-frame")
    parser.add_argument("--target", help="target volume (e.g. end-systole); default with --target-frame: the "
                        "source's cine")
    parser.add_argument("--source-frame", type=int, metavar="I", help="frame of the source cine (from 0)")
    parser.add_argument("--target-frame", type=int, metavar="J", help="frame of the target cine (from 0)")
    parser.add_argument("--out", required=True,
                        help="output folder, written atomically; it must be new, empty or hold only an earlier result "
                        "of ddm4d generate (which is replaced): generate never deletes or overwrites a file it did "
                        "not write")
    parser.add_argument("--model", default="default",
                        help="model .safetensors file, 'default' (bundled) or 'none' (no network: refinement only)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--frames", type=int, help="number of frames including source and target (default 10, at "
                       f"most {MAX_FRAMES}: frames and fields stay in memory until written, {frames_memory_text()})")
    group.add_argument("--gammas", help="explicit comma-separated gammas in [0, 1], e.g. 0,0.25,0.5,1")
    parser.add_argument("--mode", default=DEFAULT_MODE, choices=list(MODES) + list(MODE_ALIASES),
                        help=f"symmetric: source and target warped along one path and cross-faded; forward: the "
                        f"source warped (the paper) (default {DEFAULT_MODE}; bidirectional is the old name of "
                        "symmetric)")
    parser.add_argument("--fade", default=DEFAULT_FADE, choices=FADES,
                        help="symmetric mode: confidence joins the two moved images voxel by voxel, towards the plain "
                        "blend where the motion does not explain the pair; linear cross-fades them with (1 - gamma, "
                        f"gamma) (default {DEFAULT_FADE})")
    parser.add_argument("--refine", action=argparse.BooleanOptionalAction, default=DEFAULT_REFINE,
                        help="per-case refinement of the path on this pair, started from the model's field (run "
                        "both ways, the better one) "
                        f"(default {'on' if DEFAULT_REFINE else 'off'}; --no-refine: the model alone)")
    parser.add_argument("--fit-steps", type=int, default=0,
                        help="per-case optimisation of the whole network on this pair before generating (slow)")
    parser.add_argument("--seg", help="labels on the source to propagate to every frame (nearest neighbour)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else the CPU), cpu, cuda, or mps (Apple's GPU) (default auto)")
    parser.add_argument("--center", help="LPS point x,y,z in mm on which to centre the model's field of view")
    parser.add_argument("--no-subtract-gamma0", action="store_true",
                        help="the paper's plain behaviour: do not subtract the field at gamma = 0")
    parser.add_argument("--chunk-size", type=int, help="gammas per deformation pass (default: as many as fit)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="the networks' passes: auto = bf16 on a GPU and on CPUs with AMX (1.6x faster generation "
                             "measured, within 0.05 dB of fp32), else fp32 (default auto)")
    parser.add_argument("--seed", type=int, default=0, help="seed for --fit-steps")
    parser.add_argument("--outputs", default="all", metavar="LIST",
                        help=f"what to write beside the frames and report.json: all (default), none, or a comma-"
                        f"separated choice of {', '.join(OUTPUTS)} (the Slicer module asks for fields,labels)")
    parser.add_argument("--compress", type=int, metavar="LEVEL", choices=range(10), default=DEFAULT_COMPRESSION,
                        help="0: uncompressed .nii and NRRD (fastest to write and to load); 1-9: .nii.gz and NRRD "
                        f"files at that zlib level (default {DEFAULT_COMPRESSION}: all outputs in about a third of the "
                        "time of 6, about 11%% larger)")
    parser.add_argument("--no-quicklook", action="store_true", help="skip the montage PNG and GIF")
    parser.add_argument("--score", action="store_true",
                        help="with a cine and --source-frame/--target-frame: generate at the times of the real frames "
                        "in between and score against them (PSNR, NMSE, beside the linear blend): score.json, score.md")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def _parse_floats(text: str, what: str, count: int | None = None) -> list[float]:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise InputError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if count is not None and len(values) != count:
        raise InputError(f"{what} needs {count} comma-separated numbers, got {text!r}")
    return values


def main(args) -> int:
    gammas = _parse_floats(args.gammas, "--gammas") if args.gammas is not None else None
    frames = 10 if args.frames is None else args.frames
    if args.score:
        if args.source_frame is None or args.target_frame is None:
            raise InputError("--score needs a cine as --source with --source-frame and --target-frame: the real frames "
                             "in between are what it scores against")
        if args.target is not None and Path(args.target) != Path(args.source):
            raise InputError("--score scores against the source cine's own frames; drop --target (both frames come "
                             "from --source)")
        if args.frames is not None or args.gammas is not None:
            raise InputError("--score generates at the cine's own frame times; drop --frames / --gammas")
        from .cine import frame_gammas, scorable_inbetween
        scorable_inbetween(args.source_frame, args.target_frame)  # neighbours: refused before any work
        gammas = frame_gammas(args.source_frame, args.target_frame)
    center = _parse_floats(args.center, "--center", 3) if args.center else None
    if args.chunk_size is not None and args.chunk_size < 1:
        raise InputError(f"--chunk-size must be at least 1, got {args.chunk_size}")
    outputs = parse_outputs(args.outputs)  # a misspelt name: refused before any work
    out = Path(args.out)
    files.check_replaceable(out, "--out", "ddm4d generate")  # before any work; again when writing
    _gammas(frames if gammas is None else None, gammas)  # e.g. --frames 100000: refused before anything loads

    def progress(fraction: float, message: str) -> None:
        if not args.quiet:
            print(f"[{100 * fraction:5.1f}%] {message}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        cine = read_cine(args.source) if args.score else None  # read once: generated from and scored against
        source, target = (args.source, args.target) if cine is None else (cine, None)
        result = generate(source, target, model=args.model, frames=frames, gammas=gammas,
                          fit_steps=args.fit_steps, seg=args.seg, device=args.device, mode=args.mode,
                          refine=args.refine, center=center, progress=progress, seed=args.seed,
                          chunk_size=args.chunk_size, subtract_gamma0=False if args.no_subtract_gamma0 else None,
                          source_frame=args.source_frame, target_frame=args.target_frame, precision=args.precision,
                          fade=args.fade)
    if cine is not None:
        from .cine import score_frames
        result.score = score_frames(result.frames, result.gammas, cine, args.source_frame, args.target_frame)
    report = result.write(out, quicklook=not args.no_quicklook, outputs=outputs, compression=args.compress)
    t = report["timings_s"]
    print(f"wrote {len(result.frames)} frames to {out} on {result.device} in {t['total'] + t['write']:.2f} s "
          f"(model {t.get('code', 0) + t.get('deform', 0):.2f} s); max folding {100 * max(result.folding_fraction):.3f}%")
    print(result.motion_source)
    if report.get("ejection_fraction") is not None:
        print(f"LV ejection fraction from propagated labels: {100 * report['ejection_fraction']:.1f}%")
    if result.score is not None:
        m = result.score["mean"]
        print(f"against the real frames in between: PSNR {m['generated_psnr_db']:.2f} dB (linear blend "
              f"{m['blend_psnr_db']:.2f}, source {m['initial_psnr_db']:.2f}); NMSE {m['generated_nmse']:.4f} "
              f"(blend {m['blend_nmse']:.4f}); per frame in {out / 'score.md'}")
    return 0
