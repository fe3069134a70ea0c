#!/usr/bin/env python3
"""bf16 training on the CPU: as fast as it looks, and does the model learn as well?

Trains the same run twice (`ddm4d train --precision fp32`, then `bf16`; same data, seed and length) on
phantom subjects, then scores both models on phantom subjects neither saw (benchmarks/motion.py:
forward generation, the model alone, in fp32, so only the training differs): PSNR of the in-between
frames, |EF error| and Dice of the carried labels, and the motion of an identical pair.

    python benchmarks/train_bf16.py --iterations 300 --out benchmarks/results/train_bf16
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]  # the ddm4d beside this script, and motion.py

import numpy as np  # noqa: E402

import motion  # noqa: E402
from ddm4d import files  # noqa: E402
from ddm4d.errors import InputError  # noqa: E402
from ddm4d.phantom import write_dataset  # noqa: E402


def train(data: Path, out: Path, precision: str, args) -> dict:
    cmd = [sys.executable, "-m", "ddm4d", "train", str(data), "--out", str(out), "--iterations", str(args.iterations),
           "--size", *map(str, args.size), "--device", "cpu", "--seed", "0", "--precision", precision,
           "--checkpoint-every", str(args.iterations), "--progress", "json"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"ddm4d train --precision {precision} failed:\n{done.stderr[-3000:]}")
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    steps = [e for e in events if e["event"] == "iteration"]
    validation = [e for e in events if e["event"] == "validation"]
    # seconds per iteration over the second half (the first iterations warm the allocator and oneDNN)
    half = steps[len(steps) // 2]
    per_iteration = (steps[-1]["elapsed_s"] - half["elapsed_s"]) / max(steps[-1]["iteration"] - half["iteration"], 1)
    return {"precision": precision, "seconds_per_iteration": per_iteration, "final_loss": steps[-1]["loss"],
            "validation_loss": validation[-1]["loss"] if validation else None,
            "validation_ncc": validation[-1]["ncc"] if validation else None, "model": str(out / "model.safetensors")}


def evaluate(model: str, subjects: int) -> dict:
    motion.MODEL, motion.PRECISION = model, "fp32"
    rows, identical = [], []
    for case in motion.phantom_cases(3, subjects):
        gammas = [g for g, _, _ in case.refs] + [1.0]
        rows.append(motion.score(case, motion.run_method("forward", case, gammas)))
        identical.append(motion.identical_motion(case, "forward"))
    return {"psnr_db": float(np.mean([r["psnr_db"] for r in rows])),
            "ef_error_points": float(np.mean([r["ef_error_points"] for r in rows])),
            "dice_mean": float(np.mean([r["dice_mean"] for r in rows])),
            "identical_mm": float(np.mean(identical))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--subjects", type=int, default=8, help="training subjects (seed 0)")
    parser.add_argument("--eval-subjects", type=int, default=4, help="unseen subjects (benchmarks/motion.py's seed)")
    parser.add_argument("--size", type=int, nargs=3, default=(64, 64, 16), help="model grid (the bundled 3D model's)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", help="write OUT.json and OUT.md")
    args = parser.parse_args()
    try:  # its own results only: never a file of another program under the --out name
        if args.out:
            files.check_results(args.out, lambda r: isinstance(r, list) and all("precision" in row for row in r))
    except InputError as err:
        parser.error(str(err))
    import torch
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ddm4d-bf16-") as scratch:
        data = Path(scratch) / "data"
        write_dataset(data, n_subjects=args.subjects, seed=0)
        for precision in ("fp32", "bf16"):
            row = train(data, Path(scratch) / precision, precision, args)
            row.update(evaluate(row.pop("model"), args.eval_subjects))
            rows.append(row)
            print(json.dumps(row), flush=True)
    fp32, bf16 = rows
    lines = [f"# bf16 training on the CPU: {args.iterations} iterations at {' x '.join(map(str, args.size))}, "
             f"{args.subjects} phantom subjects, {args.threads} threads, torch {torch.__version__}", "",
             "| precision | s / iteration | final loss | validation loss | unseen PSNR (dB) | \\|EF error\\| | Dice | "
             "identical (mm) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        val = "–" if r["validation_loss"] is None else f"{r['validation_loss']:.4f}"
        lines.append(f"| {r['precision']} | {r['seconds_per_iteration']:.3f} | {r['final_loss']:.4f} | {val} | "
                     f"{r['psnr_db']:.2f} | {r['ef_error_points']:.1f} | {r['dice_mean']:.3f} | {r['identical_mm']:.2f} |")
    lines += ["", f"bf16 is {fp32['seconds_per_iteration'] / bf16['seconds_per_iteration']:.2f}x the speed of fp32; "
              f"unseen PSNR {bf16['psnr_db'] - fp32['psnr_db']:+.2f} dB, |EF error| "
              f"{bf16['ef_error_points'] - fp32['ef_error_points']:+.1f} points, Dice {bf16['dice_mean'] - fp32['dice_mean']:+.3f}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        files.write_results(Path(args.out), rows, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
