#!/usr/bin/env python3
"""ddm4d demo: intermediate cardiac frames from two phases with the bundled default model.

No download and no GPU needed. What it does:

1. writes one synthetic cardiac cine subject (`ddm4d phantom`, a held-out seed that the bundled
   model never saw in training) into OUT/data, in the ACDC layout, with labels on every frame;
2. generates the frames from end-diastole (ED) to end-systole (ES) with the bundled DDM model,
   as many as the phantom has real frames between them, carrying the ED labels along
   (`ddm4d.generation.generate`, the same call as `ddm4d generate`), and writes them to OUT/generated;
3. compares the generated frames with the phantom's TRUE frames at the same phases, for three
   methods: Initial (the ED frame repeated), Linear blend (cross-fade ED -> ES) and DDM, using
   the functions and normalisation of `ddm4d evaluate`;
4. prints where everything is.

Usage: python scripts/demo.py [--out demo-output] [--model default|FILE.safetensors] [--seed 2026]
Exit codes: 0 done, 2 no bundled model (run scripts/train_default_models.sh) or another input error.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

# before torch loads: waiting OpenMP threads sleep instead of spinning (on a small, busy machine
# spinning threads were measured to slow PyTorch's CPU kernels down many times over)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# the ddm4d beside this script (in a checkout: one folder up), never another one that is installed
_HERE = Path(__file__).resolve().parent
for _root in (_HERE, _HERE.parent):
    if (_root / "ddm4d" / "__init__.py").is_file():
        sys.path.insert(0, str(_root))
        break
try:
    import ddm4d  # noqa: F401
except ImportError as err:
    sys.exit(f"demo: cannot import ddm4d ({err}); run `make demo` (it sets up .venv) or `pip install -e .`")

DEFAULT_SEED = 2026  # scripts/train_default_models.sh trains on seed 0 and evaluates on seed 1
DEFAULT_2D_SIZE = (160, 160, 1)  # single-slice phantom for a 2D model (as in the training script)
TRAIN_SCRIPT = "scripts/train_default_models.sh"

# (key in the scores, column header, format); Dice "mean" is over the generated frames 2..n
COLUMNS = [
    ("psnr_db", "PSNR (dB)", "{:.2f}"),
    ("nmse", "NMSE", "{:.3e}"),
    ("dice_total_mean", "Dice total, mean", "{:.3f}"),
    ("dice_total_es", "Dice total, ES", "{:.3f}"),
    ("dice_lv_mean", "Dice LV cavity, mean", "{:.3f}"),
    ("dice_lv_es", "Dice LV cavity, ES", "{:.3f}"),
    ("folding_percent", "Folding (%)", "{:.3f}"),
    ("time_s", "Time (s)", "{:.2f}"),
]


class DemoError(Exception):
    """A user-facing problem: printed as one line, exit code 2."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="demo.py", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo-output", help="output folder (default demo-output)")
    parser.add_argument("--model", default="default",
                        help="'default' (the bundled model) or a model file .safetensors (default: default)")
    parser.add_argument("--dims", type=int, choices=(2, 3),
                        help="2: single-slice demo with the bundled 2D model; 3 (default): 3D. "
                             "A model file or --size decides it when given")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"phantom seed (default {DEFAULT_SEED}, not used to train the bundled model)")
    parser.add_argument("--size", type=int, nargs=3, metavar=("NX", "NY", "NZ"),
                        help="phantom grid in voxels (default: ACDC-like, drawn; NZ 1 gives a single slice)")
    parser.add_argument("--frames", type=int, metavar="N", help="phantom frames per cardiac cycle (default: drawn, 12..25)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------ model

def missing_model_message(dims: int) -> str:
    from ddm4d.generation import BUNDLED_MODELS

    name = BUNDLED_MODELS[dims]
    here = Path(ddm4d.__file__).resolve().parent
    places = [here / "models", here.parent / "Resources" / "models"]
    return (f"no bundled {dims}D model is installed (looked for {name} in {places[0]} and {places[1]}). "
            f"Create it with `bash {TRAIN_SCRIPT}` (a GPU helps), or run the demo with --model FILE.safetensors")


def resolve_model(model: str, dims: int) -> Path:
    """The model file the demo uses: the bundled one for 'default', else the given file."""
    from ddm4d.generation import bundled_model_path

    if model == "default":
        path = bundled_model_path(dims)
        if path is None:
            raise DemoError(missing_model_message(dims))
        return path
    path = Path(model).expanduser()
    if not path.is_file():
        raise DemoError(f"model file {path} does not exist; give a .safetensors model or --model default")
    return path


def model_config(path: Path):
    """The model's configuration, read from the file's metadata (weights are not loaded)."""
    from ddm4d.checkpoint import read_model_metadata
    from ddm4d.config import DDMConfig

    meta = read_model_metadata(path)
    if "config" not in meta:
        raise DemoError(f"{path} is a safetensors file but not a ddm4d model; give a model written by `ddm4d train`")
    return DDMConfig.from_dict(meta["config"])


def choose_dims(args) -> int:
    """Spatial dimensions of the demo: --dims, --size (NZ 1: 2D) and a model file must agree; default 3."""
    said = {}
    if args.dims:
        said[f"--dims {args.dims}"] = args.dims
    if args.size:
        said[f"--size {' '.join(map(str, args.size))}"] = 2 if args.size[2] == 1 else 3
    if args.model != "default":
        path = Path(args.model).expanduser()
        if path.is_file():
            said[f"the model {path.name}"] = model_config(path).spatial_dims
    if len(set(said.values())) > 1:
        raise DemoError("these disagree on 2D (single slice) or 3D: " + ", ".join(f"{k} is {v}D" for k, v in said.items())
                        + "; a 2D model needs a single-slice phantom (--size NX NY 1), a 3D one NZ > 1")
    return next(iter(said.values()), 3)


# ------------------------------------------------------------------------------------------ metrics

def _mean(values) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def summarise(scores: dict) -> dict:
    """The demo's columns from `ddm4d.evaluation.score_method`'s scores of one method."""
    s = scores["summary"]
    frames = [d for d in scores["dice_frames"][1:] if d is not None]  # generated frames 2..n
    return {
        "psnr_db": s["psnr_db"], "nmse": s["nmse"],
        "dice_total_mean": _mean([d["total"] for d in frames]) if frames else math.nan,
        "dice_total_es": s["dice_total"],
        "dice_lv_mean": _mean([d["lv_blood_pool"] for d in frames]) if frames else math.nan,
        "dice_lv_es": s["dice_lv_blood_pool"],
        "folding_percent": s["folding_percent"], "time_s": s["time_s"],
        "ejection_fraction": scores["ef"], "ejection_fraction_true": scores["ef_true"],
        "psnr_db_per_frame": scores["psnr_db"], "nmse_per_frame": scores["nmse"],
        "dice_per_frame": scores["dice_frames"],
    }


def _cell(value, fmt: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def table_lines(rows: dict[str, dict]) -> list[str]:
    header = ["Method"] + [h for _, h, _ in COLUMNS]
    body = [[name] + [_cell(values[k], f) for k, _, f in COLUMNS] for name, values in rows.items()]
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return [line(header), rule] + [line(r) for r in body]


def _json_ready(value):
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):  # numpy scalars
        return _json_ready(value.item())
    return value


# ------------------------------------------------------------------------------------------ the demo

def run(args) -> int:
    from ddm4d import evaluation as ev
    from ddm4d.data import scan_dataset
    from ddm4d.generation import generate
    from ddm4d.phantom import write_dataset

    t_start = time.perf_counter()
    out = Path(args.out).expanduser()
    dims = choose_dims(args)
    model_path = resolve_model(args.model, dims)
    config = model_config(model_path)
    size = tuple(args.size) if args.size else (DEFAULT_2D_SIZE if dims == 2 else None)

    print(f"ddm4d demo: DDM (Kim & Ye, MICCAI 2022) on a synthetic {dims}D cardiac cine; no download, no GPU needed")
    print(f"model: {model_path} ({config.spatial_dims}D, grid {'x'.join(map(str, config.image_size))} voxels at "
          f"{' x '.join(f'{v:g}' for v in config.spacing)} mm)")

    # 1. the phantom subject (held-out seed)
    t = time.perf_counter()
    data_dir = out / "data"
    folder = write_dataset(data_dir, n_subjects=1, seed=args.seed, size=size, n_frames=args.frames)[0]
    subject = scan_dataset(data_dir)[folder.name]
    data = ev.load_subject(subject)
    n = len(data.real)
    print(f"[1/4] phantom subject (seed {args.seed}) -> {folder}: {subject.n_frames} frames per cycle, "
          f"ED frame {subject.ed + 1}, ES frame {subject.es + 1}, so {n} real frames from ED to ES "
          f"({time.perf_counter() - t:.1f} s)")

    # 2. DDM: the same call as `ddm4d generate`
    ed, es, ed_gt = subject.paths["ed"], subject.paths["es"], subject.paths["ed_gt"]
    generated = out / "generated"
    cli = ["ddm4d", "generate", "--source", str(ed), "--target", str(es), "--seg", str(ed_gt),
           "--frames", str(n), "--model", args.model if args.model == "default" else str(model_path),
           "--device", args.device, "--out", str(generated)]
    from ddm4d.config import DEFAULT_MODE, DEFAULT_REFINE
    print(f"[2/4] generating {n} frames ED -> ES with DDM ({DEFAULT_MODE}, per-case refinement "
          f"{'on' if DEFAULT_REFINE else 'off'}: the defaults); the same from the command line:\n      {shlex.join(cli)}")
    t = time.perf_counter()
    result = generate(data.source, data.target, model=str(model_path), frames=n, seg=data.labels[0],
                      device=args.device)
    ddm_time = time.perf_counter() - t
    for message in result.messages:
        print(f"      note: {message}")
    report = result.write(generated)
    network = result.timings_s.get("code", 0.0) + result.timings_s.get("deform", 0.0)
    print(f"      {ddm_time:.2f} s on {result.device} (network {network:.2f} s), written in "
          f"{report['timings_s']['write']:.1f} s")

    # 3. compare with the phantom's true frames, as `ddm4d evaluate` does
    t = time.perf_counter()
    region = ev.evaluation_region(data.source, config, "fov")
    lo, hi = ev.intensity_map(data.real[0], region)
    outputs = {
        "Initial": ev.run_initial(data.source, data.gammas, data.labels[0]),
        "Linear blend": ev.run_linear(data.source, data.target, data.gammas),
        "DDM": ev.MethodOutput(list(result.frames), result.labels, list(result.folding_fraction), ddm_time,
                               dict(result.timings_s)),
    }
    rows = {name: summarise(ev.score_method(o, data.real, data.labels, region, lo, hi)) for name, o in outputs.items()}
    print(f"[3/4] generated vs true frames ({n - 1} generated frames, ED left out; {time.perf_counter() - t:.1f} s)")
    print()
    for line in table_lines(rows):
        print(line)
    print()
    print("PSNR/NMSE: frames 2..n against the true frames inside the model's field of view, intensities mapped "
          "with the ED frame's range to [-1, 1] (as `ddm4d evaluate`). Dice: the ED labels carried to each frame "
          "vs the true labels (mean over frames 2..n, and at ES); LV cavity = label 3. Folding: % voxels with "
          "Jacobian determinant <= 0. Linear blend moves nothing, so it has no labels or folding.")
    ef_true = rows["DDM"]["ejection_fraction_true"]
    if math.isfinite(ef_true):
        carried = ", ".join(f"{name} {100 * rows[name]['ejection_fraction']:.1f}%" for name in ("DDM", "Initial")
                            if math.isfinite(rows[name]["ejection_fraction"]))
        print(f"LV ejection fraction (ED to ES) from the labels: true {100 * ef_true:.1f}%; from the carried "
              f"labels: {carried}")

    results = {"seed": args.seed, "subject": str(folder), "n_frames": n, "gammas": data.gammas,
               "ed_frame": subject.ed + 1, "es_frame": subject.es + 1, "model": str(model_path),
               "device": result.device, "cli": shlex.join(cli), "methods": rows,
               "ddm_timings_s": result.timings_s}
    results_path = out / "demo_results.json"
    results_path.write_text(json.dumps(_json_ready(results), indent=1) + "\n")

    # 4. where things are
    print()
    print(f"[4/4] outputs (in {time.perf_counter() - t_start:.1f} s in all):")
    places = [
        (generated / "frames", "the generated frames, one NIfTI per phase (frame_000 = ED ... last = ES)"),
        (generated / "frames.seq.nrrd", "the same as one Slicer sequence (drag it into 3D Slicer)"),
        (generated / "frames_4d.nii.gz", "the same as one 4D NIfTI"),
        (generated / "fields", "displacement fields (SimpleITK DisplacementFieldTransform, mm, LPS) and Jacobians"),
        (generated / "labels.seq.nrrd", "the ED labels carried to every frame"),
        (generated / "montage.png", "middle slice of every frame"),
        (generated / "frames.gif", "the same as an animation"),
        (generated / "volumes.csv", "LV cavity, myocardium and RV volume per frame (mL); plot: volumes.png"),
        (generated / "report.json", "what was generated, with timings and folding"),
        (folder, "the phantom subject (ACDC layout; true labels for every frame in *_4d_gt.nii.gz)"),
        (results_path, "the table above with per-frame values"),
    ]
    width = max(len(str(p)) for p, _ in places)
    for path, what in places:
        print(f"  {str(path).ljust(width)}  {what}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ddm4d.errors import InputError

    try:
        return run(args)
    except (DemoError, InputError) as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
