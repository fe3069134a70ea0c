"""Motion on real scans and on unseen phantom subjects: every generation method against the linear
blend and classical registration, on every pair, not one favourite.

Cases
- real: the real 2D cine in ../shared/data/real-cine-2d, every pair i -> j with |j - i| in GAPS, both
  directions; each real frame in between is scored at its own time gamma = (k - i) / (j - i).
- real128: the same pairs with every frame averaged down to 128 x 128 (2 x 2 pixel bins, 2 mm): the
  size of the real short-axis slices the project is checked on (opt-in: not in the default --cases).
- real-stack: a thick-slice volume of real texture and real motion, cut from the same cine: 12 slices,
  each a 200 x 200 crop shifted by 4 rows and 2 columns from the one before, averaged down to 2 mm
  pixels, 8 mm apart (short-axis stacks are a dozen slices of 6-10 mm). Run by the 3D path (the bundled
  3D model; refinement moves in-plane only on such slices). Same pairs as real (opt-in).
- phantom2d / phantom3d: phantom subjects of a seed no bundled model was trained or checked on,
  ED -> ES; every in-between frame has its true image and labels. Also the identical pair (ED -> ED):
  how far a method moves a heart that does not change.
- phantom3d-iso: the phantom3d subjects' seed on an isotropic grid, 100 x 100 x 56 voxels of 2 mm (a
  cardiac CT or 3D cine rather than a stack of thick slices; opt-in).
- phantom2d-noisy: the phantom2d subjects with Rician noise of NOISE_FRACTION of the source's intensity
  range added to every frame independently (real-time cines have a lower SNR than the phantom; opt-in).
- real128-noisy: the real128 pairs with the same Rician noise on every frame, the truth included (a
  lower-SNR real cine, as real-time cines are; opt-in).

Methods: initial (the source), linear blend, demons (scaled by gamma), symmetric demons (both ways,
cross-faded), and ddm4d.generation in forward or symmetric mode with the bundled model, refinement on
or off, or refinement alone (model none); symmetric modes join their two moved images with the default
fade (ddm4d.fade: confidence), "linear fade" with the plain cross-fade (the default until 2026-12).
A reference, only with --methods: "smoothed blend", the blend smoothed by a Gaussian of
SMOOTHED_BLEND_SIGMA pixels (how much of a lead over the blend on noisy frames smoothing alone buys).

Metrics: PSNR (dB) / NMSE of in-between frames (ddm4d.cine's convention: the source's range -> [-1, 1],
data range 2), mean per case, then over cases; with labels, Dice of the ED labels carried to each
in-between frame (mean of LV blood pool, LV myocardium, RV), the worst frame's, the EF from the labels
carried to ES against the true EF; folding (% voxels with det J <= 0, worst frame); seconds per case.

    python benchmarks/motion.py                       # everything (tens of minutes on 2 cores)
    python benchmarks/motion.py --cases real --every 3 --methods blend,symmetric+refine
    python benchmarks/motion.py --cases real --methods "demons,forward+refine,forward best gamma,forward ceiling"
    python benchmarks/motion.py --cases real-stack,phantom2d-noisy --methods "blend,symmetric demons,symmetric+refine"
Writes benchmarks/results/motion.{json,md} (or --out).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ddm4d import files
from ddm4d.classical import demons_frames, linear_blend
from ddm4d.errors import InputError
from ddm4d.fade import smooth as fade_smooth
from ddm4d.config import DEFAULT_FADE, RefineConfig
from ddm4d.cine import inbetween
from ddm4d.generation import generate
from ddm4d.io import read_cine
from ddm4d.metrics import dice, label_volumes_ml, nmse, psnr
from ddm4d.phantom import make_subject, subject_seed

ROOT = Path(__file__).resolve().parents[1]
CINE = ROOT.parent / "shared" / "data" / "real-cine-2d" / "heart_cine_16frames.dcm"
GAPS = (4, 6, 8)
UNSEEN_SEED = 7  # the bundled models were trained on seed 0 and checked on seed 1
STACK_SLICES, STACK_CROP, STACK_SHIFT, STACK_SPACING = 12, 200, (4, 2), (2.0, 2.0, 8.0)  # real-stack
ISO_SIZE, ISO_SPACING = (100, 100, 56), (2.0, 2.0, 2.0)  # phantom3d-iso (x, y, z)
NOISE_FRACTION = 0.04  # phantom2d-noisy: sigma of each Rician channel, of the source's intensity range
DICE_STRUCTURES = ("lv_blood_pool", "lv_myocardium", "rv")
METHODS = ("initial", "blend", "demons", "symmetric demons", "forward", "symmetric", "forward+refine",
           "symmetric+refine", "symmetric+refine linear fade", "symmetric+refine model pace", "refine only forward",
           "refine only symmetric")
# bounds, not methods: they see the real in-between frames (only with --methods). "forward ceiling"
# registers the source to each in-between frame itself (refinement alone, forward): the best any warp of
# the source could do. "forward best gamma": the refined forward path S o exp(g v) sampled at 21 evenly
# spaced g, each real frame scored against the path's best one: what a perfect pace along it could do.
BOUNDS = ("forward ceiling", "forward best gamma")
# a reference, not a method (only with --methods): the blend smoothed in-plane by a Gaussian of this many
# pixels. On noisy frames PSNR rewards smoothing: the truth's own noise cannot be predicted, so a frame
# without noise scores higher, and every warp with linear interpolation smooths somewhat
SMOOTHED_BLEND_SIGMA = 0.6
REFERENCES = ("smoothed blend",)


@dataclass
class Case:
    name: str
    source: sitk.Image
    target: sitk.Image
    refs: list[tuple[float, sitk.Image, sitk.Image | None]]  # (gamma, real frame, its labels)
    source_labels: sitk.Image | None = None
    target_labels: sitk.Image | None = None
    kind: str = "real"


@dataclass
class Output:
    frames: dict[float, sitk.Image]
    fields: dict[float, sitk.Image] = field(default_factory=dict)
    labels: dict[float, sitk.Image] = field(default_factory=dict)
    folding: list[float] = field(default_factory=list)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def real_cases(gaps=GAPS, every: int = 1, shrink: int = 1) -> list[Case]:
    cine = _read_frames()
    if shrink > 1:  # mean of shrink x shrink pixel bins, SimpleITK keeps the field of view
        cine = [sitk.BinShrink(frame, [shrink, shrink] + [1] * (frame.GetDimension() - 2)) for frame in cine]
    return [Case(f"real {i}->{j}", cine[i], cine[j], [(g, cine[k], None) for k, g in inbetween(i, j)])
            for i, j in _pairs(len(cine), gaps)[::every]]


def _read_frames() -> list[sitk.Image]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the sample has no PixelSpacing: 1 mm, said once per read
        return read_cine(CINE)


def real_stack_cases(gaps=GAPS, every: int = 1) -> list[Case]:
    frames = [sitk.GetArrayFromImage(f).reshape(f.GetSize()[1], f.GetSize()[0]).astype(np.float32)
              for f in _read_frames()]
    c, (dy, dx) = STACK_CROP, STACK_SHIFT
    if (STACK_SLICES - 1) * max(dy, dx) + c > min(frames[0].shape):
        raise ValueError(f"the cine's {frames[0].shape} frames are too small for {STACK_SLICES} shifted crops")

    def stack(k: int) -> sitk.Image:
        slices = np.stack([frames[k][dy * i:dy * i + c, dx * i:dx * i + c] for i in range(STACK_SLICES)])
        volume = sitk.GetImageFromArray(slices.reshape(STACK_SLICES, c // 2, 2, c // 2, 2).mean(axis=(2, 4)))
        volume.SetSpacing(STACK_SPACING)
        return volume

    volumes = [stack(k) for k in range(len(frames))]
    return [Case(f"stack {i}->{j}", volumes[i], volumes[j], [(g, volumes[k], None) for k, g in inbetween(i, j)],
                 kind="real-stack") for i, j in _pairs(len(volumes), gaps)[::every]]


def _pairs(n: int, gaps) -> list[tuple[int, int]]:
    return [(i, j) for d in gaps for i in range(n) for j in (i - d, i + d) if 0 <= j < n]


def with_rician_noise(case: Case, fraction: float = NOISE_FRACTION, seed: int = 0) -> Case:
    """The case with |x + n1 + i n2| on every frame, n1, n2 ~ N(0, fraction x the source's range),
    independent per frame (as acquired); labels unchanged."""
    rng = np.random.default_rng(seed)
    lo, hi = _range(case.source)
    sigma = fraction * (hi - lo)

    def noisy(image: sitk.Image) -> sitk.Image:
        a = sitk.GetArrayFromImage(image).astype(np.float64)
        out = sitk.GetImageFromArray(np.hypot(a + rng.normal(0, sigma, a.shape), rng.normal(0, sigma, a.shape))
                                     .astype(np.float32))
        out.CopyInformation(image)
        return out

    return dataclasses.replace(case, source=noisy(case.source), target=noisy(case.target),
                               refs=[(g, noisy(ref), labels) for g, ref, labels in case.refs],
                               kind=case.kind + "-noisy")


def phantom_cases(dims: int, subjects: int, seed: int = UNSEEN_SEED, isotropic: bool = False) -> list[Case]:
    cases = []
    kind = f"phantom{dims}d" + ("-iso" if isotropic else "")
    for n in range(subjects):
        size = (160, 160, 1) if dims == 2 else ISO_SIZE if isotropic else None
        s = make_subject(subject_seed(seed, n + 1), size=size, spacing=ISO_SPACING if isotropic else None)
        refs = [(k / s.es, s.images[k], s.labels[k]) for k in range(1, s.es)]
        cases.append(Case(f"{kind} {n + 1}", s.images[0], s.images[s.es], refs, s.labels[0], s.labels[s.es], kind=kind))
    return cases


REFINE = RefineConfig()
MODEL = "default"
PRECISION = "fp32"  # the networks' passes; --precision


def run_method(method: str, case: Case, gammas: list[float]) -> Output:
    t0 = time.perf_counter()
    if method == "initial":
        return Output({g: case.source for g in gammas})
    if method == "blend":
        return Output(dict(zip(gammas, linear_blend(case.source, case.target, gammas))),
                      seconds=time.perf_counter() - t0)
    if method == "smoothed blend":
        frames = [smoothed(f, SMOOTHED_BLEND_SIGMA) for f in linear_blend(case.source, case.target, gammas)]
        return Output(dict(zip(gammas, frames)), seconds=time.perf_counter() - t0)
    if method in ("demons", "symmetric demons"):
        frames, fields = demons_frames(case.source, case.target, gammas, symmetric=method.startswith("symmetric"))
        labels = {}
        if case.source_labels is not None:
            from ddm4d.geometry import warp_image
            labels = {g: warp_image(case.source_labels, f, "nearest", 0) for g, f in zip(gammas, fields)}
        return Output(dict(zip(gammas, frames)), dict(zip(gammas, fields)), labels, seconds=time.perf_counter() - t0)
    if method == "forward ceiling":
        frames = {g: generate(case.source, ref, model="none", gammas=[1.0], mode="forward", refine=True,
                              device="cpu", refine_config=REFINE).frames[0] for g, ref, _ in case.refs}
        return Output({0.0: case.source, 1.0: case.target, **frames}, seconds=time.perf_counter() - t0)
    if method == "forward best gamma":
        path = [i / 20 for i in range(21)]
        result = generate(case.source, case.target, model="none", gammas=path, mode="forward", refine=True,
                          device="cpu", refine_config=REFINE)
        lo, hi = _range(case.source)
        moved = [_scaled(f, lo, hi) for f in result.frames]
        frames = {}
        for g, ref, _ in case.refs:
            truth = _scaled(ref, lo, hi)
            frames[g] = result.frames[int(np.argmax([psnr(m, truth, data_range=2.0) for m in moved]))]
        return Output({0.0: case.source, 1.0: case.target, **frames}, seconds=time.perf_counter() - t0)
    refine = "refine" in method
    mode = "symmetric" if "symmetric" in method else "forward"
    model = "none" if method.startswith("refine only") else MODEL
    result = generate(case.source, case.target, model=model, gammas=gammas, mode=mode, refine=refine,
                      seg=case.source_labels, device="cpu", refine_config=REFINE, precision=PRECISION,
                      model_timing=method.endswith("model pace"), fade="linear" if method.endswith("linear fade")
                      else DEFAULT_FADE)
    seconds = time.perf_counter() - t0
    labels = dict(zip(gammas, result.labels)) if result.labels else {}
    return Output(dict(zip(gammas, result.frames)), dict(zip(gammas, result.fields)), labels,
                  list(result.folding_fraction), seconds, {"refinement": result.refinement})


def smoothed(image: sitk.Image, sigma: float) -> sitk.Image:
    """The image smoothed by a Gaussian of `sigma` in-plane pixels (thicker axes by as many mm)."""
    spacing = image.GetSpacing()[::-1]  # (z, y, x), the array's axes
    finest = min(spacing[1:])
    a = torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.float32))[None]
    out = sitk.GetImageFromArray(fade_smooth(a, [sigma * finest / sp for sp in spacing])[0].numpy())
    out.CopyInformation(image)
    return out


def _range(image: sitk.Image) -> tuple[float, float]:
    """The source's intensity range, which every frame of a case is scored in (ddm4d.cine's convention)."""
    array = sitk.GetArrayViewFromImage(image)
    return float(array.min()), float(array.max())


def _scaled(image: sitk.Image, lo: float, hi: float) -> np.ndarray:
    return (sitk.GetArrayViewFromImage(image).astype(np.float64) - lo) / (hi - lo) * 2 - 1


def _lv_ml(labels: sitk.Image) -> float:
    return label_volumes_ml(labels)["lv_blood_pool"]


def score(case: Case, out: Output) -> dict:
    lo, hi = _range(case.source)
    row: dict = {"case": case.name, "seconds": out.seconds}
    p, e, d = [], [], []
    for g, ref, ref_labels in case.refs:
        pred, truth = _scaled(out.frames[g], lo, hi), _scaled(ref, lo, hi)
        p.append(psnr(pred, truth, data_range=2.0))
        e.append(nmse(pred, truth))
        if ref_labels is not None and g in out.labels:
            scores = dice(sitk.GetArrayViewFromImage(out.labels[g]), sitk.GetArrayViewFromImage(ref_labels))
            d.append(float(np.mean([scores[k] for k in DICE_STRUCTURES])))
    row["psnr_db"], row["nmse"] = float(np.mean(p)), float(np.mean(e))
    if d:
        row["dice_mean"], row["dice_worst_frame"] = float(np.mean(d)), float(np.min(d))
    if case.source_labels is not None and 1.0 in out.labels:
        ed = _lv_ml(case.source_labels)
        true_ef = (ed - _lv_ml(case.target_labels)) / ed
        carried_ef = (ed - _lv_ml(out.labels[1.0])) / ed
        row["ef_error_points"] = 100 * abs(carried_ef - true_ef)
    if out.folding:
        row["folding_percent"] = 100 * max(out.folding)
    if out.extra.get("refinement"):
        row["refine_start"] = out.extra["refinement"]["start"]
        row["refine_seconds"] = out.extra["refinement"]["seconds"]
        row["refine_smoothed"] = int(out.extra["refinement"].get("smoothed", False))  # mean: share of cases
    return row


def identical_motion(case: Case, method: str) -> float | None:
    """Mean displacement (mm) inside the heart when source and target are the same volume."""
    if case.source_labels is None or method in ("initial", "blend", *BOUNDS, *REFERENCES):
        return None
    same = Case(case.name, case.source, case.source, [(0.5, case.source, None)], case.source_labels,
                case.source_labels, case.kind)
    out = run_method(method, same, [0.0, 0.5, 1.0])
    u = sitk.GetArrayViewFromImage(out.fields[1.0])
    heart = sitk.GetArrayViewFromImage(case.source_labels) > 0
    return float(np.linalg.norm(u, axis=-1)[heart].mean())


def summarise(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if isinstance(rows[0][k], (int, float)) and k != "case"]
    out = {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}
    if "dice_worst_frame" in rows[0]:
        out["dice_worst_frame"] = float(np.min([r["dice_worst_frame"] for r in rows]))
        out["ef_error_worst"] = float(np.max([r["ef_error_points"] for r in rows]))
    return out


GROUPS = ("real", "real128", "real128-noisy", "real-stack", "phantom2d", "phantom2d-noisy", "phantom3d", "phantom3d-iso")


def case_group(name: str, every: int = 1, subjects2d: int = 8, subjects3d: int = 4) -> list[Case]:
    """The cases of one group of the module's docstring (the real groups need the cine sample)."""
    if name == "real-stack":
        return real_stack_cases(every=every)
    if name in ("real", "real128"):
        return real_cases(every=every, shrink=2 if name == "real128" else 1)
    if name in ("real128-noisy", "phantom2d-noisy"):
        clean = case_group(name.removesuffix("-noisy"), every, subjects2d, subjects3d)
        return [with_rician_noise(c, seed=n) for n, c in enumerate(clean)]
    if name == "phantom2d":
        return phantom_cases(2, subjects2d)
    if name == "phantom3d":
        return phantom_cases(3, subjects3d)
    if name == "phantom3d-iso":
        return phantom_cases(3, subjects3d, isotropic=True)
    raise ValueError(f"unknown case group {name}; choose from {', '.join(GROUPS)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="real,phantom2d,phantom3d")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--every", type=int, default=1, help="every n-th real pair only (quick looks)")
    parser.add_argument("--subjects2d", type=int, default=8)
    parser.add_argument("--subjects3d", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "motion"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16"),
                        help="the networks' passes (default fp32; bf16 to measure its tolerance)")
    parser.add_argument("--model", default="default", help="model of the DDM methods (default: the bundled one)")
    parser.add_argument("--refine-config", default="{}", metavar="JSON",
                        help='RefineConfig fields to change, e.g. \'{"smoothness": 5}\'')
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:  # its own results only: never a file of another program under the --out name
        files.check_results(out, lambda r: isinstance(r, dict) and {"methods", "groups"} <= r.keys())
    except InputError as err:
        parser.error(str(err))
    global REFINE, MODEL, PRECISION
    MODEL, PRECISION = args.model, args.precision
    REFINE = dataclasses.replace(RefineConfig(), **{k: tuple(v) if isinstance(v, list) else v
                                                   for k, v in json.loads(args.refine_config).items()})
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS) - set(BOUNDS) - set(REFERENCES))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS + BOUNDS + REFERENCES)}")
    groups: dict[str, list[Case]] = {}
    for name in args.cases.split(","):
        if name not in GROUPS:
            parser.error(f"unknown case group {name}")
        if name.startswith("real") and not CINE.is_file():
            print(f"skipping {name}: {CINE} is absent", file=sys.stderr)
            continue
        groups[name] = case_group(name, args.every, args.subjects2d, args.subjects3d)
    results: dict = {"methods": methods, "model": MODEL, "precision": PRECISION, "refine_config": dataclasses.asdict(REFINE), "groups": {}}
    for group, cases in groups.items():
        results["groups"][group] = {}
        for method in methods:
            rows = []
            for case in cases:
                gammas = [0.0] + [g for g, _, _ in case.refs] + [1.0]
                row = score(case, run_method(method, case, gammas))
                rows.append(row)
                print(f"{group:10s} {method:22s} {case.name:16s} " + " ".join(
                    f"{k}={v:.3f}" for k, v in row.items() if isinstance(v, float)), flush=True)
            summary = summarise(rows)
            if group.startswith("phantom"):
                motion = [identical_motion(c, method) for c in cases[:2]]
                if motion[0] is not None:
                    summary["identical_pair_motion_mm"] = float(np.mean(motion))
            results["groups"][group][method] = {"summary": summary, "cases": rows}
            print(f"== {group} {method}: " + " ".join(f"{k}={v:.3f}" for k, v in summary.items()), flush=True)
    files.write_results(out, results, markdown(results))
    print(markdown(results))
    return 0


def markdown(results: dict) -> str:
    lines = []
    columns = [("psnr_db", "PSNR (dB)", "{:.2f}"), ("nmse", "NMSE", "{:.4f}"), ("dice_mean", "Dice", "{:.3f}"),
               ("dice_worst_frame", "Dice worst frame", "{:.3f}"), ("ef_error_points", "abs EF error (points)", "{:.1f}"),
               ("identical_pair_motion_mm", "identical pair motion (mm)", "{:.2f}"),
               ("folding_percent", "folding (%)", "{:.3f}"), ("seconds", "s / case", "{:.1f}")]
    for group, methods in results["groups"].items():
        present = [c for c in columns if any(c[0] in m["summary"] for m in methods.values())]
        n = len(next(iter(methods.values()))["cases"])
        lines += [f"## {group} ({n} cases)", "", "| method | " + " | ".join(c[1] for c in present) + " |",
                  "|---|" + "---|" * len(present)]
        for name, m in methods.items():
            s = m["summary"]
            lines.append(f"| {name} | " + " | ".join(c[2].format(s[c[0]]) if c[0] in s else "–" for c in present) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
