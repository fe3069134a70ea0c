#!/usr/bin/env python3
"""Write the model card (Markdown) of a bundled default model from its training run and evaluation.

Called by scripts/train_default_models.sh; reads only files:
  RUN_DIR/config.json, RUN_DIR/log.jsonl (ddm4d train), REPORT_DIR/table1.md and report.json
  (ddm4d evaluate) and the model file itself (its sha256 and metadata).

Usage: python scripts/model_card.py --run RUN_DIR --evaluation REPORT_DIR --model FILE --out CARD.md
           --train-data-command "..." --eval-data-command "..." --reproduce "..." [--device auto]
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import sys
from pathlib import Path


def read_log(run_dir: Path) -> list[dict]:
    events = []
    path = run_dir / "log.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return events


def hardware(device_text: str) -> str:
    """A human description of the device the run used, named on this machine."""
    cpu = "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "CPU"
    cores = os.cpu_count() or 0
    try:
        import torch
        torch_text = f"PyTorch {torch.__version__}"
        if device_text.startswith("cuda") and torch.cuda.is_available():
            index = int(device_text.split(":")[1]) if ":" in device_text else 0
            props = torch.cuda.get_device_properties(index)
            return (f"1 x {torch.cuda.get_device_name(index)} ({props.total_memory / 2**30:.0f} GiB), "
                    f"{torch_text}, CUDA {torch.version.cuda}; host {cpu}, {cores} cores")
    except Exception:  # the card still gets written without torch details
        torch_text = "PyTorch (version unknown)"
    return f"CPU only: {cpu}, {cores} cores, {torch_text}"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    hours, rest = divmod(seconds, 3600)
    return f"{int(hours)} h {rest / 60:.0f} min" if hours else f"{seconds / 60:.1f} min"


def evaluation_table(report_dir: Path) -> tuple[list[str], str]:
    """The Markdown table rows and the heading line of ddm4d evaluate's table1.md."""
    text = (report_dir / "table1.md").read_text()
    lines = text.splitlines()
    heading = next((ln.lstrip("# ").strip() for ln in lines if ln.startswith("# ")), "")
    rows = []
    for ln in lines:  # the first table only (the paired tests follow under their own heading)
        if ln.startswith("|"):
            rows.append(ln)
        elif rows:
            break
    return rows, heading


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--evaluation", required=True, type=Path)
    p.add_argument("--model", required=True, type=Path, help="the bundled model file the card describes")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--train-data-command", required=True)
    p.add_argument("--eval-data-command", required=True)
    p.add_argument("--train-command", required=True)
    p.add_argument("--eval-command", required=True)
    p.add_argument("--reproduce", required=True)
    args = p.parse_args(argv)

    run_config = json.loads((args.run / "config.json").read_text())
    events = read_log(args.run)
    starts = [e for e in events if e.get("event") == "start"]
    dones = [e for e in events if e.get("event") == "done"]
    iterations = [e for e in events if e.get("event") == "iteration"]
    validations = [e for e in events if e.get("event") == "validation"]
    done = dones[-1] if dones else {}
    device_text = str(starts[-1].get("device", "unknown")) if starts else "unknown"
    cfg = run_config["config"]
    run = run_config.get("run", {})
    subjects = run_config.get("subjects", {})
    dims = cfg["spatial_dims"]
    eval_report = json.loads((args.evaluation / "report.json").read_text())
    rows, heading = evaluation_table(args.evaluation)

    from ddm4d.checkpoint import read_model_metadata

    info = read_model_metadata(args.model).get("info", {})
    size_mb = args.model.stat().st_size / 2**20
    grid = " x ".join(str(v) for v in cfg["image_size"])
    spacing = " x ".join(f"{v:g}" for v in cfg["spacing"])
    fov = " x ".join(f"{n * s:g}" for n, s in zip(cfg["image_size"], cfg["spacing"]))
    best_val = min((v["loss"] for v in validations), default=None)
    last_loss = iterations[-1]["loss"] if iterations else None
    kind = "single-slice (2D)" if dims == 2 else "3D"
    n_train, n_val = len(subjects.get("train", [])), len(subjects.get("validation", []))
    pairs = run.get("pairs", "ed-es")
    pairs_text = ("pairs i -> j drawn from every frame of each cine (both directions, 10% identical pairs), "
                  f"a real in-between frame as supervision at its time (weight {cfg.get('inbetween_weight', 1.0):g})"
                  if pairs == "cine" else "pairs ED -> ES (the paper's)")

    lines = [
        f"# Model card: `{args.model.name}`",
        "",
        f"The default {kind} model of ddm4d / DDMExtension: the Diffusion Deformable Model of Kim & Ye "
        "(MICCAI 2022), trained by `scripts/train_default_models.sh` on **synthetic** cardiac cine data "
        "(`ddm4d phantom`). `ddm4d generate --model default`, `make demo` and the Slicer module "
        f"DDMInterpolation use it for {'single-slice' if dims == 2 else '3D'} inputs.",
        "",
        "## File",
        "",
        f"- `{args.model.name}`: {size_mb:.1f} MiB, sha256 `{sha256(args.model)}`",
        "- Format: safetensors (no pickle); the model configuration is inside the file's metadata.",
        f"- Model grid: {grid} voxels at {spacing} mm (field of view {fov} mm, centred on the image "
        "unless `--center` is given); intensities mapped to [-1, 1].",
        f"- Networks: diffusion UNet channels {cfg['diffusion_channels']} x {list(cfg['channel_mults'])}, "
        f"deformation UNet (VoxelMorph-1) encoder {list(cfg['encoder_channels'])}, decoder "
        f"{list(cfg['decoder_channels'])}; schedule {cfg['timesteps']} steps, beta {cfg['beta_start']:g} .. {cfg['beta_end']:g}.",
        "",
        "## Training",
        "",
        f"- Data: `{args.train_data_command}`: synthetic 4D cardiac cine MR with labels on every frame; "
        f"{pairs_text}; {n_train} training and {n_val} validation subjects (split by the run, seed {run.get('seed')}).",
        f"- Command: `{args.train_command}`",
        f"- Iterations: {done.get('iteration', info.get('iteration', 'unknown'))} of {run.get('total_iterations')} "
        f"({run.get('epochs')} epochs of {run.get('iterations_per_epoch')} iterations), batch size {cfg['batch_size']}, "
        f"Adam lr {cfg['lr']:g}, betas {tuple(cfg['adam_betas'])}, lambda {cfg['loss_lambda']:g}, "
        f"lambda_R {cfg['lambda_r']:g}, NCC window {cfg['ncc_window']}, EMA {run.get('ema')}, augmentation {run.get('augment')}.",
        f"- Loss at the last logged iteration: {last_loss if last_loss is None else f'{last_loss:.4f}'}; "
        f"best validation loss: {best_val if best_val is None else f'{best_val:.4f}'}.",
        f"- Hardware: {hardware(device_text)}.",
        f"- Training wall time: {duration(done.get('elapsed_s'))} (the run's own clock, summed over resumes).",
        f"- Written: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, "
        f"ddm4d {run_config.get('ddm4d_version', '?')}, Python {platform.python_version()}.",
        "",
        "## Evaluation on held-out phantom subjects",
        "",
        f"- Data: `{args.eval_data_command}` (a different seed: none of these subjects was seen in training).",
        f"- Command: `{args.eval_command}`",
        f"- {eval_report.get('n_subjects')} subjects; every real frame from ED to ES is the ground truth "
        "(see `ddm4d evaluate --help` and its report's notes for the exact definitions).",
        "",
    ]
    lines += rows
    lines += [
        "",
        "PSNR/NMSE: generated frames 2..n against the true frames inside the model's field of view, "
        "intensities mapped with the ED frame's range to [-1, 1]; NMSE is the plain ratio (not the paper's "
        "unexplained x1e-8 scale). Dice: the ED labels carried to ES. Mean ± standard deviation over subjects. "
        "The model alone, forward (the paper's protocol, `ddm4d generate --mode forward --no-refine`); the "
        "default path of `ddm4d generate` is measured in the README.",
        "",
        "## Limitations",
        "",
        "- Trained on synthetic phantom data only. It has never seen a real scan. That is why `ddm4d "
        "generate` refines the path on every pair by default (started from this model's field, or from no "
        "motion where that fits the pair better; `--no-refine` uses the model alone): see the README, "
        "\"Motion on real scans\". For your own data, train your own model (`ddm4d train YOUR_DATA --out RUN`; "
        "`--init` this file to start from it).",
        "- The phantom is a short-axis bSSFP-like cine: other contrasts, orientations or anatomies are out of "
        "its range.",
        f"- Only the {fov} mm field of view (centred on the image, or on `--center`) moves: the "
        "displacement is zero outside it.",
        "- Not a medical device; research use only.",
        "",
        "## Reproduce",
        "",
        f"    {args.reproduce}",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, args.out)
    print(f"model card: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
