"""Forward vs bidirectional generation vs linear blend on the real 2D cine (frames 0 -> 6).

Each generated frame k (gamma = k/6) is compared with the real frame k, for k = 1..5, after scaling
both with the source's intensity range to [-1, 1] (PSNR with data range 2, NMSE = |e|^2 / |ref|^2).
Both modes fit an untrained model to the pair (`--fit-steps`), the bidirectional one on both
directions. Writes benchmarks/results/real_cine_modes.{json,md}.

    python benchmarks/real_cine_modes.py [fit_steps] [seed]
"""
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ddm4d import files
from ddm4d.generation import generate
from ddm4d.io import read_cine
from ddm4d.metrics import nmse, psnr

CINE = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-cine-2d" / "heart_cine_16frames.dcm"


def main(steps: int = 100, seed: int = 0) -> None:
    cine = read_cine(CINE)
    real = [sitk.GetArrayFromImage(f).astype(np.float64) for f in cine[:7]]
    lo, hi = real[0].min(), real[0].max()
    scale = lambda a: (a - lo) / (hi - lo) * 2 - 1  # noqa: E731
    gammas = [k / 6 for k in range(7)]
    methods = {"initial": [real[0]] * 7, "linear blend": [(1 - g) * real[0] + g * real[6] for g in gammas]}
    for mode in ("forward", "bidirectional"):
        result = generate(cine[0], cine[6], model="none", gammas=gammas, fit_steps=steps, mode=mode,
                          device="cpu", seed=seed)
        methods[f"DDM {mode}"] = [sitk.GetArrayFromImage(f).astype(np.float64) for f in result.frames]
    rows = {}
    for name, frames in methods.items():
        p = [psnr(scale(frames[k]), scale(real[k]), data_range=2.0) for k in range(1, 6)]
        n = [nmse(scale(frames[k]), scale(real[k])) for k in range(1, 6)]
        rows[name] = {"psnr_db": p, "nmse": n, "psnr_mean": float(np.mean(p)), "nmse_mean": float(np.mean(n))}
    out = Path(__file__).resolve().parent / "results"
    files.write_text(out / "real_cine_modes.json",
                     json.dumps({"fit_steps": steps, "seed": seed, "methods": rows}, indent=2))
    lines = [f"# Real 2D cine, frames 0 -> 6, in-between frames 1..5 ({steps} fit steps, seed {seed})", "",
             "| method | PSNR (dB), mean over frames 1..5 | NMSE, mean |", "|---|---|---|"]
    lines += [f"| {k} | {v['psnr_mean']:.2f} | {v['nmse_mean']:.4f} |" for k, v in rows.items()]
    files.write_text(out / "real_cine_modes.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
