"""`ddm4d evaluate`: the paper's Table 1 and Fig. 4 on any ACDC-layout data set.

For each subject the real sequence from end-diastole (ED) to end-systole (ES) is the ground truth.
Every method generates as many frames as that sequence has, at gamma_k = k / (n - 1) (the paper's
spread: frame k of the real sequence sits at gamma_k), from the ED frame (source) towards the ES
frame (target):

- Initial: every frame is the source (no motion at all);
- Linear blend: (1 - gamma) * source + gamma * target (not a motion model: no fields, no labels);
- DDM, VM, VM-diff: a model file each, run through :func:`ddm4d.generation.generate`, the one path
  the CLI and Slicer use (model grid, batched deformation, fields back to the source's geometry).

What is measured, and how (the choices the paper leaves open are written into report.json):

- PSNR (dB) and NMSE (plain ratio) of every generated frame k = 1 .. n-1 against the real frame k.
  ED (k = 0) is left out: it is the input, identical to the source by construction. Both images
  go through ONE affine intensity map per subject, the source's [min, max] inside the evaluation
  region -> [-1, 1] (the model's input range, as the paper computes on normalised images), and PSNR
  uses data_range = 2 (the width of [-1, 1]). One map for both, not one per image, so a frame's
  own brightest voxel cannot shift its error. The region is the model's field of view (the paper's
  centred 128 x 128 x 32 crop) or, with --region image, the whole image. A subject's PSNR is the
  PSNR of its mean MSE over the generated frames (finite even where a frame is exact, as Linear
  blend is at ES); its NMSE the mean over frames.
- Dice per structure (LV blood pool, myocardium, epicardium, RV, total foreground) of the ED labels
  carried to each frame (nearest neighbour through the method's field) against that frame's labels,
  wherever labels exist (ES in ACDC; every frame in the phantom). Table 1 shows Dice at ES.
- Folding: percentage of voxels with Jacobian determinant <= 0, inside the model's field of view
  eroded by one voxel, as :func:`ddm4d.generation.generate` reports it; mean over generated frames.
- Time per subject: wall-clock seconds of the method's generation for all of the subject's frames
  (after one untimed warm-up run per model), plus the network-only part for models.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import SimpleITK as sitk

from . import __version__, files
from .config import DDMConfig
from .errors import InputError
from .evaluation_report import (NORMALISED_RANGE, PSNR_DATA_RANGE, REPORT_FILES, _json_ready, aggregate, paired_tests,
                                plot_boxplots, plot_dice, plot_psnr_vs_frame, table_markdown, table_rows, write_report)
from .geometry import ModelMapping, make_model_grid, resample_to_reference, same_geometry
from .methods import DDM_METHOD, EVALUATION_METHODS, MODEL_METHODS
from .metrics import STRUCTURE_NAMES, dice, ejection_fraction, label_volumes_ml, mse, nmse, psnr_from_mse

__all__ = ["METHODS", "evaluate", "parse_methods", "add_arguments", "main",
           # the report (ddm4d.evaluation_report), importable from here as before
           "REPORT_FILES", "aggregate", "paired_tests", "table_rows", "table_markdown", "plot_boxplots",
           "plot_dice", "plot_psnr_vs_frame", "write_report"]

#: method key -> name shown in tables and plots, in the order of the paper's table (ddm4d.methods)
METHODS: dict[str, str] = EVALUATION_METHODS
_ALIASES = {"vm-diff": "vmdiff", "vm_diff": "vmdiff", "blend": "linear", "linear-blend": "linear"}
#: methods that need a model file, and the CLI option that gives it: --model for DDM, --vm-model, ...
MODEL_OPTIONS: dict[str, str] = {m: "--model" if m == DDM_METHOD else f"--{m}-model" for m in MODEL_METHODS}
DEFAULT_METHODS = ",".join(METHODS)
REGIONS = ("fov", "image")

PERCENT = 100.0
LV_BLOOD_POOL = "lv_blood_pool"
HASH_BLOCK_BYTES = 1 << 20  # model files are hashed in 1 MiB reads


# ------------------------------------------------------------------------------------------ methods

def parse_methods(text: str) -> list[str]:
    """Comma-separated method names -> keys in table order; unknown names are a user error."""
    names = [n.strip().lower() for n in str(text).split(",") if n.strip()]
    if not names:
        raise InputError(f"--methods is empty; choose from {','.join(METHODS)}")
    keys = [_ALIASES.get(n, n) for n in names]
    unknown = [n for n, k in zip(names, keys) if k not in METHODS]
    if unknown:
        raise InputError(f"unknown method(s) {', '.join(unknown)} in --methods; choose from {','.join(METHODS)}")
    return [k for k in METHODS if k in keys]


@dataclass
class MethodModel:
    """A loaded model of one method and where it came from."""

    path: Path
    model: Any


def _load_method_model(method: str, path: Path, device) -> Any:
    """Load by the file's own metadata and check it is the method it was given for (a VM file must
    not pose as DDM: its row of Table 1 would carry the wrong name)."""
    from .checkpoint import load_any_model

    model = load_any_model(path, device)
    kind = model.method
    if kind != method:
        raise InputError(f"{path} is a {METHODS.get(kind, kind)} model but was given as {MODEL_OPTIONS[method]}; "
                         f"pass it as {MODEL_OPTIONS.get(kind, 'the matching option')}")
    return model


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(HASH_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def load_models(methods: Sequence[str], paths: dict[str, str | os.PathLike | None], device,
                log: Callable[[str], None]) -> tuple[dict[str, MethodModel], dict[str, str]]:
    """Load the model of every requested model method; one without a file is skipped, with a reason."""
    models: dict[str, MethodModel] = {}
    skipped: dict[str, str] = {}
    for method, given in paths.items():
        if given and method not in methods:
            log(f"ignoring {MODEL_OPTIONS[method]} {given}: {method} is not in --methods")
    for method in methods:
        if method not in MODEL_OPTIONS:
            continue
        given = paths.get(method)
        if not given:
            skipped[method] = f"no model file given ({MODEL_OPTIONS[method]} FILE)"
            log(f"skipping {METHODS[method]}: {skipped[method]}")
            continue
        path = Path(given).expanduser()
        models[method] = MethodModel(path, _load_method_model(method, path, device))
    return models, skipped


# ------------------------------------------------------------------------------------------ one subject

@dataclass
class MethodOutput:
    """What a method produced for one subject: frames (and labels) on the source grid, per gamma."""

    frames: list[sitk.Image]
    labels: list[sitk.Image] | None
    folding: list[float] | None  # fraction per gamma; None: the method has no field
    time_s: float
    timings_s: dict[str, float] | None = None


def _on_grid(image: sitk.Image, reference: sitk.Image, interpolator: str) -> sitk.Image:
    """`image` on `reference`'s grid (a no-op for frames of one cine, which share a grid)."""
    if same_geometry(image, reference):
        return image
    return resample_to_reference(image, reference, interpolator, 0.0 if interpolator == "nearest" else None)


def run_initial(source: sitk.Image, gammas: Sequence[float], seg: sitk.Image | None) -> MethodOutput:
    """Every frame is the source; labels stay the ED labels; the identity field never folds."""
    t0 = time.perf_counter()
    frames = [source] * len(gammas)
    labels = [seg] * len(gammas) if seg is not None else None
    return MethodOutput(frames, labels, [0.0] * len(gammas), time.perf_counter() - t0)


def run_linear(source: sitk.Image, target: sitk.Image, gammas: Sequence[float]) -> MethodOutput:
    """(1 - gamma) * source + gamma * target, voxel by voxel on the source grid; no field, no labels."""
    t0 = time.perf_counter()
    s = sitk.GetArrayFromImage(source).astype(np.float32)
    t = sitk.GetArrayFromImage(_on_grid(target, source, "linear")).astype(np.float32)
    frames = []
    for g in gammas:
        frame = sitk.GetImageFromArray((1.0 - g) * s + g * t)
        frame.CopyInformation(source)
        frames.append(frame)
    return MethodOutput(frames, None, None, time.perf_counter() - t0)


def run_model(model: Any, source: sitk.Image, target: sitk.Image, gammas: Sequence[float],
              seg: sitk.Image | None, device) -> MethodOutput:
    """The one generation path of ddm4d (ddm4d.generation.generate), timed by the wall clock: the model
    alone, forward (the paper's Table 1 protocol), without per-case refinement."""
    from .generation import generate

    t0 = time.perf_counter()
    result = generate(source, target, model=model, gammas=list(gammas), seg=seg, device=device, mode="forward",
                      refine=False)
    elapsed = time.perf_counter() - t0
    return MethodOutput(list(result.frames), result.labels, list(result.folding_fraction), elapsed,
                        dict(result.timings_s))


def model_grid_config(models: dict[str, MethodModel], source: sitk.Image):
    """The grid that defines the evaluation region: DDM's, else the first model's, else the paper's."""
    for method in MODEL_OPTIONS:  # DDM first
        if method in models:
            return models[method].model.config
    return DDMConfig.for_dims(2 if source.GetSize()[2] == 1 else 3)


def evaluation_region(source: sitk.Image, config, region: str) -> np.ndarray:
    """Boolean (z, y, x) mask on the source grid where intensities are compared."""
    shape = tuple(reversed(source.GetSize()))
    if region == "image":
        return np.ones(shape, dtype=bool)
    grid = make_model_grid(source, config.image_size, config.spacing)
    mapping = ModelMapping(source=source, grid=grid, spatial_dims=config.spatial_dims)
    mask = sitk.GetArrayFromImage(mapping.fov_mask()) != 0
    return mask if mask.any() else np.ones(shape, dtype=bool)


def intensity_map(source: np.ndarray, region: np.ndarray) -> tuple[float, float]:
    """(lo, hi): the source's intensity range in the region, mapped to [-1, 1] for every image."""
    values = source[region]
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        raise ValueError("the source is constant inside the evaluation region")
    return lo, hi


def _normalise(array: np.ndarray, lo: float, hi: float) -> np.ndarray:
    low, high = NORMALISED_RANGE
    return (np.asarray(array, dtype=np.float64) - lo) / (hi - lo) * (high - low) + low


def _lv_volumes(labels: Sequence[sitk.Image | None]) -> list[float | None]:
    return [label_volumes_ml(lab)[LV_BLOOD_POOL] if lab is not None else None for lab in labels]


def _ef_or_nan(volumes: Sequence[float | None]) -> float:
    values = [v for v in volumes if v is not None]
    try:
        return ejection_fraction(values)
    except ValueError:
        return math.nan


def score_method(output: MethodOutput, real: list[np.ndarray], real_labels: list[sitk.Image | None],
                 region: np.ndarray, lo: float, hi: float) -> dict[str, Any]:
    """Per-frame and per-subject metrics of one method against the real sequence of one subject.

    The subject's PSNR is that of its mean MSE over the generated frames: finite even when a frame is
    reproduced exactly (Linear blend at ES), where a mean of per-frame PSNRs would be infinite.
    """
    n = len(real)
    pred = [_normalise(sitk.GetArrayViewFromImage(output.frames[k])[region], lo, hi) for k in range(n)]
    ref = [_normalise(r[region], lo, hi) for r in real]
    mses = [mse(pred[k], ref[k]) for k in range(1, n)]
    psnrs = [psnr_from_mse(m, PSNR_DATA_RANGE) for m in mses]
    nmses = [nmse(pred[k], ref[k]) for k in range(1, n)]
    scores: dict[str, Any] = {
        "mse": mses, "psnr_db": psnrs, "nmse": nmses,
        "psnr_identical_frames": sum(1 for v in psnrs if math.isinf(v)),
        "ed_equals_source": bool(np.array_equal(sitk.GetArrayViewFromImage(output.frames[0]), real[0])),
        "time_s": output.time_s, "timings_s": output.timings_s,
        "folding_fraction": output.folding,
    }
    scores.update(_label_scores(output, real_labels))
    summary = {"psnr_db": psnr_from_mse(float(np.mean(mses)), PSNR_DATA_RANGE), "nmse": float(np.mean(nmses)),
               "time_s": output.time_s, "network_time_s": _network_time(output.timings_s),
               "folding_percent": PERCENT * float(np.mean(output.folding[1:])) if output.folding else math.nan,
               "folding_percent_max": PERCENT * max(output.folding) if output.folding else math.nan}
    es_dice = scores["dice_es"] or {}
    summary.update({f"dice_{name}": es_dice.get(name, math.nan) for name in STRUCTURE_NAMES})
    summary["ef_abs_error"] = abs(scores["ef"] - scores["ef_true"])
    scores["summary"] = summary
    return scores


def _network_time(timings: dict[str, float] | None) -> float:
    if not timings:
        return math.nan
    return float(timings.get("code", 0.0) + timings.get("deform", 0.0))


def _label_scores(output: MethodOutput, real_labels: list[sitk.Image | None]) -> dict[str, Any]:
    """Dice of the carried ED labels at every labelled frame, ES Dice, and LV ejection fractions."""
    n = len(real_labels)
    per_frame: list[dict[str, float] | None] = [None] * n
    if output.labels is not None:
        for k in range(1, n):
            if real_labels[k] is not None:
                per_frame[k] = dice(sitk.GetArrayViewFromImage(output.labels[k]),
                                    sitk.GetArrayViewFromImage(real_labels[k]))
    labelled = [k for k in range(n) if real_labels[k] is not None]
    ef_true = _ef_or_nan(_lv_volumes([real_labels[k] for k in labelled]))
    ef = _ef_or_nan(_lv_volumes([output.labels[k] for k in labelled])) if output.labels is not None else math.nan
    return {"dice_frames": per_frame, "dice_es": per_frame[-1] if n > 1 else None, "ef": ef, "ef_true": ef_true}


@dataclass
class SubjectData:
    """The real sequence of one subject on the source grid, ready to score."""

    id: str
    frame_indices: list[int]
    gammas: list[float]
    source: sitk.Image
    target: sitk.Image
    real: list[np.ndarray]
    labels: list[sitk.Image | None]


def load_subject(subject) -> SubjectData:
    """Frames ED..ES of a data-set subject; every frame and label map put on the ED frame's grid."""
    seq = subject.load_sequence()
    if len(seq) < 2:
        raise ValueError("ED and ES are the same frame, so there is nothing to generate")
    source = seq.frames[0]
    frames = [_on_grid(f, source, "linear") for f in seq.frames]
    labels = [_on_grid(lab, source, "nearest") if lab is not None else None for lab in seq.labels]
    return SubjectData(subject.id, list(seq.frame_indices), seq.gammas, source, seq.frames[-1],
                       [sitk.GetArrayFromImage(f) for f in frames], labels)


def run_method(method: str, data: SubjectData, models: dict[str, MethodModel], device) -> MethodOutput:
    if method == "initial":
        return run_initial(data.source, data.gammas, data.labels[0])
    if method == "linear":
        return run_linear(data.source, data.target, data.gammas)
    return run_model(models[method].model, data.source, data.target, data.gammas, data.labels[0], device)


def evaluate_subject(data: SubjectData, methods: Sequence[str], models: dict[str, MethodModel], device,
                     region_name: str) -> dict[str, Any]:
    region = evaluation_region(data.source, model_grid_config(models, data.source), region_name)
    lo, hi = intensity_map(data.real[0], region)
    grid = model_grid_config(models, data.source)
    record: dict[str, Any] = {
        "id": data.id, "n_frames": len(data.real), "frame_indices": data.frame_indices, "gammas": data.gammas,
        "labelled_frames": [k for k, lab in enumerate(data.labels) if lab is not None],
        "region": {"kind": region_name, "voxels": int(region.sum()), "model_grid_size": list(grid.image_size),
                   "model_grid_spacing_mm": list(grid.spacing)},
        "intensity_map": {"source_min": lo, "source_max": hi},
        "methods": {},
    }
    for method in methods:
        output = run_method(method, data, models, device)
        record["methods"][method] = score_method(output, data.real, data.labels, region, lo, hi)
    return record


# ------------------------------------------------------------------------------------------ output

def _prepare_output(out: Path) -> Path:
    """Check REPORT_DIR before hours of work, and make a staging folder beside it (the files move
    into REPORT_DIR one by one at the end: its other files stay)."""
    out = files.check_writable(out, "--out")
    files.check_writable(out.parent, "--out")
    try:
        files.remove_leftovers(out)
        return files.temporary_folder(out)
    except OSError as err:
        raise InputError(f"cannot write the report next to {out} ({err.strerror}); choose a writable --out") from None


# ------------------------------------------------------------------------------------------ the API

def _notes(settings: dict[str, Any], records: list[dict[str, Any]]) -> list[str]:
    notes = [
        "PSNR and NMSE: every generated frame k = 1..n-1 against the real frame k (ED, the input, left out), "
        f"gamma_k = k/(n-1); {settings['intensity_normalisation']}; PSNR with data_range = {PSNR_DATA_RANGE:g}. "
        "Per subject: PSNR of the mean MSE over its generated frames (finite even where a frame is reproduced "
        "exactly, as Linear blend does at ES) and the mean NMSE; then mean ± std over subjects.",
        f"Region compared: {settings['region_description']}.",
        "NMSE is the plain ratio ||pred − ref||² / ||ref||² on those normalised intensities. The paper's "
        "column is labelled ×1e-8 without a definition of that scale (the authors' code computes no NMSE), "
        "so ours is not rescaled: do not compare the two numbers directly.",
        "Dice: ED labels carried to ES by each method's field (nearest neighbour) against the ES labels; "
        "epicardium = myocardium ∪ LV blood pool; total = all foreground as one mask. Linear blend has no "
        "field, hence no Dice and no folding.",
        "Folding: % of voxels with Jacobian determinant ≤ 0 inside the model's field of view eroded by one "
        "voxel, mean over generated frames.",
        "Time / subject: wall-clock of the method's generation of all frames of a subject on "
        f"{settings['device']} (model grid, network, fields back to the image, warps, labels); network time: "
        "latent code + deformation passes only (the paper's 0.456 s is of this kind, on a Quadro RTX 6000).",
    ]
    for method in settings["methods"]:
        exact = sum(1 for r in records if math.isinf(r["methods"][method]["summary"]["psnr_db"]))
        if exact:
            notes.append(f"{METHODS[method]} reproduced every generated frame exactly on {exact} subject(s) "
                         "(PSNR +inf, e.g. a pair whose only generated frame is the target); those are left "
                         "out of its PSNR mean.")
    for method, reason in settings["skipped_methods"].items():
        notes.append(f"{METHODS[method]} was skipped: {reason}.")
    for subject, reason in settings["skipped_subjects"].items():
        notes.append(f"Subject {subject} was skipped: {reason}.")
    return notes


def _settings(data_dir, methods, skipped, models, device, region, warmup, dataset) -> dict[str, Any]:
    region_text = ("the model's field of view on the source grid (its grid centred on the image, like the "
                   "paper's centred 128×128×32 crop)" if region == "fov" else "the whole image")
    return {
        "data_dir": str(data_dir), "methods": list(methods), "skipped_methods": skipped,
        "skipped_subjects": {}, "device": str(device), "region": region, "region_description": region_text,
        "warmup": warmup,
        "intensity_normalisation": ("prediction and real frame mapped with one affine map per subject, the "
                                    "source (ED) [min, max] inside the region -> [-1, 1]"),
        "psnr_data_range": PSNR_DATA_RANGE, "frames": "gamma_k = k/(n-1) for the n real frames ED..ES",
        "dice_structures": {k: v for k, v in STRUCTURE_NAMES.items()},
        "dataset_problems": [str(p) for p in dataset.problems],
        "models": {m: {"path": str(mm.path), "sha256": _sha256(mm.path),
                       "config": mm.model.config.to_dict(),
                       "class": type(mm.model).__name__}
                   for m, mm in models.items()},
        "ddm4d_version": __version__, "python": platform.python_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _warm_up(data: SubjectData, methods, models, device) -> None:
    """One untimed run per model, so first-call costs (kernel selection, allocation) stay out of timings."""
    for method in methods:
        if method in models:
            run_method(method, data, models, device)


def _load_subjects(dataset, limit: int | None, log) -> tuple[list[SubjectData], dict[str, str]]:
    chosen = list(dataset)[:limit] if limit else list(dataset)
    loaded, skipped = [], {}
    for subject in chosen:
        try:
            loaded.append(load_subject(subject))
        except (InputError, ValueError) as err:
            skipped[subject.id] = str(err)
            log(f"skipping {subject.id}: {err}")
    return loaded, skipped


def evaluate(data_dir, out_dir, methods: Sequence[str] | str = DEFAULT_METHODS, model=None, vm_model=None,
             vmdiff_model=None, subjects: int | None = None, device: str = "auto", region: str = "fov",
             warmup: bool = True, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Evaluate the methods on an ACDC-layout folder (or pairs CSV) and write the report to `out_dir`.

    Returns the report (as written to report.json). Raises InputError for user mistakes: no data,
    no usable subject, a missing or foreign model file, unknown methods.
    """
    from .data import scan_dataset
    from .device import resolve_device

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    methods = parse_methods(methods) if isinstance(methods, str) else parse_methods(",".join(methods))
    if region not in REGIONS:
        raise InputError(f"unknown region {region!r}; use one of {', '.join(REGIONS)}")
    if subjects is not None and subjects < 1:
        raise InputError(f"--subjects must be at least 1, got {subjects}")
    dataset = scan_dataset(data_dir).require_subjects(1)
    torch_device = resolve_device(device)
    models, skipped = load_models(methods, {"ddm": model, "vm": vm_model, "vmdiff": vmdiff_model}, torch_device, log)
    methods = [m for m in methods if m not in skipped]
    if not methods:
        raise InputError("no method left to evaluate: every requested method needs a model file that was not given")
    staging = _prepare_output(Path(out_dir).expanduser())
    try:
        report = _evaluate_into(staging, dataset, data_dir, methods, skipped, models, torch_device, subjects,
                                region, warmup, log)
        files.publish_into(staging, Path(out_dir).expanduser())
    finally:
        files.discard_temporary_folder(staging)
    return report


def _evaluate_into(staging, dataset, data_dir, methods, skipped, models, device, limit, region, warmup, log):
    data, skipped_subjects = _load_subjects(dataset, limit, log)
    if not data:
        raise InputError(f"{data_dir}: no subject with a usable ED..ES sequence ({len(skipped_subjects)} skipped: "
                         f"{'; '.join(f'{k}: {v}' for k, v in skipped_subjects.items())})")
    settings = _settings(data_dir, methods, skipped, models, device, region, warmup, dataset)
    settings["skipped_subjects"] = skipped_subjects
    if warmup:
        _warm_up(data[0], methods, models, device)
    records = []
    for item in data:
        records.append(evaluate_subject(item, methods, models, device, region))
        log(_progress_line(records[-1], methods))
    report = {"settings": settings, "n_subjects": len(records), "subjects": records,
              "aggregate": aggregate(records, methods), "statistics": paired_tests(records, methods)}
    report["notes"] = _notes(settings, records)
    write_report(report, records, staging)
    return json.loads(json.dumps(_json_ready(report)))


def _progress_line(record: dict[str, Any], methods) -> str:
    parts = []
    for method in methods:
        s = record["methods"][method]["summary"]
        dice_text = "" if math.isnan(s["dice_total"]) else f", Dice {s['dice_total']:.3f}"
        parts.append(f"{METHODS[method]} {s['psnr_db']:.2f} dB{dice_text}, {s['time_s']:.2f} s")
    return f"{record['id']} ({record['n_frames']} frames): " + "; ".join(parts)


# ------------------------------------------------------------------------------------------ the CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_dir", metavar="DATA_DIR",
                        help="ACDC-layout folder (patient*/ with Info.cfg and a 4D cine) or a pairs CSV")
    parser.add_argument("--out", required=True, metavar="REPORT_DIR",
                        help="report folder: report.json, table1.md and PNG plots (written atomically)")
    parser.add_argument("--model", metavar="M", help="DDM model file (.safetensors); without it DDM is skipped")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"comma-separated methods (default {DEFAULT_METHODS}); a model method whose "
                             "file is not given is skipped")
    parser.add_argument("--vm-model", metavar="P", help="VM baseline model file")
    parser.add_argument("--vmdiff-model", metavar="P", help="VM-diff baseline model file")
    parser.add_argument("--subjects", type=int, metavar="N", help="evaluate only the first N subjects")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else the CPU), cpu, cuda, or mps (Apple's GPU) (default auto)")
    parser.add_argument("--region", default="fov", choices=REGIONS,
                        help="where PSNR/NMSE are computed: the model's field of view (default, like the "
                             "paper's crop) or the whole image")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="time the first subject cold (default: one untimed warm-up run per model)")


def main(args: argparse.Namespace) -> int:
    report = evaluate(args.data_dir, args.out, methods=args.methods, model=args.model, vm_model=args.vm_model,
                      vmdiff_model=args.vmdiff_model, subjects=args.subjects, device=args.device,
                      region=args.region, warmup=args.warmup)
    out = Path(args.out)
    print("\n".join(table_rows(report)))
    print(f"report: {out / 'report.json'}; table: {out / 'table1.md'}; plots: "
          f"{', '.join(str(out / f) for f in REPORT_FILES[2:])}")
    return 0
