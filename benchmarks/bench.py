"""Speed and memory of ddm4d at the paper's size, as a fraction of this machine's matmul rate.

Each case runs in a fresh process so its peak resident memory (ru_maxrss) is its own. The 2048^2 fp32
matmul is measured right after each case: these machines drift by up to 2x within an hour, the
fraction does not. Writes benchmarks/results/<name>.json and .md.

    python benchmarks/bench.py                      # CPU, 2 threads, 128x128x32
    python benchmarks/bench.py --device cuda        # GPU (bf16 autocast), plain and compiled
    python benchmarks/bench.py --allocator default  # glibc's malloc defaults (the CLI tunes them)
    python benchmarks/bench.py --cases refine_slice,refine --name refine   # per-case refinement only
    python benchmarks/bench.py --authors ~/src/DDM --name authors_side_by_side   # against the authors' code

--authors takes a checkout of the authors' published code (github.com/torchDDM/DDM; it is not part of
ddm4d and nothing of it is copied here): their networks and training defaults, built from their
config/DDM_train.json, run in the same session as ours, case after case, for a same-run comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ddm4d import files
from ddm4d.errors import InputError

HERE = Path(__file__).resolve().parent
# multiply-accumulates per pass at 128 x 128 x 32 (anchors.md); scaled by voxel count for other sizes
GMAC_DEFORM, GMAC_DIFFUSION, GMAC_NCC = 9.6, 20.3, 1.9


def generation_gflop(frames: int, scale: float) -> float:
    """One diffusion pass and one deformation pass per frame."""
    return 2 * (GMAC_DIFFUSION + frames * GMAC_DEFORM) * scale


def training_gflop(deform_passes: int, scale: float) -> float:
    """Forward + backward ~ 3x the forward multiply-adds of both networks and the NCC."""
    return 2 * 3 * (GMAC_DIFFUSION + deform_passes * GMAC_DEFORM + GMAC_NCC) * scale
PAPER_VOXELS = 128 * 128 * 32


def matmul_gflops(device: str, n: int = 2048, repeats: int = 10) -> float:
    import torch

    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_gib(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GiB on Linux


#: the cases of one run: on a GPU the networks plain and through torch.compile (CUDA graphs there)
DEFAULT_CASES = {"cpu": "generate,train,generate_files,refine_slice,refine",
                 "cuda": "generate,generate_compiled,train,train_compiled"}
#: with --authors: the authors' generation and training step beside ours, in both precisions of ours
AUTHORS_CASES = "authors_generate,generate,authors_train,train,train_bf16,train_paper_loss_bf16"


def case(name: str, size: list[int], device: str, frames: int, repeats: int, precision: str = "auto",
         authors: str | None = None) -> dict:
    """Runs inside a child process: one measurement, printed as JSON. A case whose name ends in
    "_compiled" runs both networks through torch.compile (mode "reduce-overhead": CUDA graphs on a GPU);
    where compiling fails, the result says why instead of a time. "train_bf16": a training iteration
    in bf16 whatever --precision says. "train_paper_loss[_bf16]": with the paper's loss on phi(c), one
    deformation pass per step as in the authors' code (ours adds the zero-code pass by default).
    "authors_*": the authors' code from the --authors checkout."""
    if name.startswith("authors_"):
        return authors_case(name, size, device, frames, repeats, authors)
    if name in ("train_bf16", "train_paper_loss", "train_paper_loss_bf16"):
        result = _measure("train", size, device, frames, repeats, "bf16" if name.endswith("_bf16") else precision,
                          paper_loss="paper_loss" in name)
        return {**result, "case": name}
    if name.endswith("_compiled"):
        try:
            return compiled_case(name, size, device, frames, repeats, precision)
        except Exception as err:  # a benchmark reports what failed; it does not stop the other cases
            return {"case": name, "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
    return _measure(name, size, device, frames, repeats, precision)


def compile_mode(device: str) -> str:
    """torch.compile's mode: reduce-overhead replays CUDA graphs on a GPU; the CPU has none."""
    return "reduce-overhead" if device.startswith("cuda") else "default"


def compiled_case(name: str, size: list[int], device: str, frames: int, repeats: int, precision: str) -> dict:
    t = time.perf_counter()
    result = _measure(name[:-len("_compiled")], size, device, frames, repeats, precision, compile_networks=True)
    result["case"] = name
    result["compile_and_warm_up_s"] = time.perf_counter() - t - result["seconds_total"]
    result["compile_mode"] = compile_mode(device)
    return result


def _measure(name: str, size: list[int], device: str, frames: int, repeats: int, precision: str = "auto",
             compile_networks: bool = False, paper_loss: bool = False) -> dict:
    import numpy as np
    import torch

    from ddm4d.config import DDMConfig
    from ddm4d.device import autocast
    from ddm4d.model import DDM

    torch.manual_seed(0)
    cfg = DDMConfig(image_size=tuple(size))
    model = DDM(cfg).to(device)
    if compile_networks:
        model.diffusion = torch.compile(model.diffusion, mode=compile_mode(device), dynamic=False)
        model.deformation = torch.compile(model.deformation, mode=compile_mode(device), dynamic=False)
    shape = (1, 1) + tuple(reversed(size))
    source = torch.rand(shape, device=device) * 2 - 1
    target = torch.rand(shape, device=device) * 2 - 1
    scale = np.prod(size) / PAPER_VOXELS
    dev = torch.device(device)
    if name == "train":
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas)

        def step():
            with autocast(dev, precision=precision):  # training: bf16 on the CPU only when asked for
                loss = model.training_losses(source, target, subtract_gamma0=False if paper_loss else None)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        # the loss on the subtracted field (default) runs the deformation network on the code and on a
        # zero code (one batch of two)
        deform_passes = 2 if cfg.subtract_gamma0 and cfg.subtracted_field_loss and not paper_loss else 1
        gflop = training_gflop(deform_passes, scale)
    elif name == "generate":
        model.eval()
        gammas = torch.linspace(0, 1, frames)

        def step():
            with autocast(dev, precision=precision, cpu_auto=True):  # as ddm4d.generate
                model.generate(source, target, gammas).frames  # warped, as the authors' code does

        gflop = generation_gflop(frames, scale)
    elif name == "generate_files":
        return end_to_end(size, device, frames, repeats, precision)
    elif name in ("refine", "refine_slice"):
        return refinement(size if name == "refine" else [128, 128], device)
    else:
        raise ValueError(name)
    # warm-up: allocator, oneDNN cache; compiling and graph capture
    return timed(name, step, gflop, device, repeats, warm_ups=3 if compile_networks else 1)


def timed(name: str, step, gflop: float, device: str, repeats: int, warm_ups: int = 1) -> dict:
    """Best and median of `repeats` timed calls of `step` after `warm_ups` untimed ones."""
    import numpy as np

    for _ in range(warm_ups):
        step()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    best = min(times)
    return {"case": name, "seconds_min": best, "seconds_median": float(np.median(times)), "gflop": gflop,
            "gflops": gflop / best, "peak_memory_gib": peak_memory_gib(device), "seconds_total": sum(times)}


def authors_case(name: str, size: list[int], device: str, frames: int, repeats: int, checkout: str) -> dict:
    """The authors' generation (their test: one diffusion pass at t = 0, then one deformation pass per
    gamma, one after another) or training iteration (their p_losses, backward, Adam), with the networks
    and defaults of their config/DDM_train.json, fp32 as they run. Random weights, as ours."""
    import contextlib

    import numpy as np
    import torch

    root = Path(checkout).resolve()
    sys.path.insert(0, str(root))
    if not device.startswith("cuda"):  # their code moves its constant tensors with .cuda(); here they stay put
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
    from model.ddpm_modules import diffusion, unet  # the checkout's modules
    from model.my_voxelmorph import registUnetBlock

    opt = json.loads((root / "config" / "DDM_train.json").read_text())
    m = opt["model"]
    torch.manual_seed(0)
    denoise = unet.UNet(in_channel=m["unet"]["in_channel"], out_channel=m["unet"]["out_channel"],
                        inner_channel=m["unet"]["inner_channel"], channel_mults=m["unet"]["channel_multiplier"],
                        attn_res=m["unet"]["attn_res"], res_blocks=m["unet"]["res_blocks"],
                        dropout=m["unet"]["dropout"], image_size=size)
    field = registUnetBlock(m["field"]["in_channel"], m["field"]["encoder_nc"], m["field"]["decoder_nc"])
    net = diffusion.GaussianDiffusion(denoise, field, channels=1, loss_type="l2", conditional=True).to(device)
    net.set_loss(device)
    net.set_new_noise_schedule(m["beta_schedule"]["train"], device)
    shape = (1, 1) + tuple(reversed(size))  # their loader's (batch, 1, depth, height, width)
    source = torch.rand(shape, device=device) * 2 - 1
    target = torch.rand(shape, device=device) * 2 - 1
    scale = np.prod(size) / PAPER_VOXELS
    if name == "authors_train":
        net.train()
        optimizer = torch.optim.Adam(net.parameters(), lr=opt["train"]["optimizer"]["lr"], betas=(0.5, 0.999))

        def step():
            loss = net.p_losses({"S": source, "T": target}, opt["train"]["loss_lambda"])[1][-1]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        gflop = training_gflop(1, scale)  # their loss: one deformation pass
    elif name == "authors_generate":
        net.eval()

        def step():
            with contextlib.redirect_stdout(sys.stderr):  # their loop prints each gamma
                net.ddm_inference(torch.cat([source, target], dim=1), frames)

        gflop = generation_gflop(frames, scale)
    else:
        raise ValueError(name)
    return timed(name, step, gflop, device, repeats)  # one warm-up, as ours


def refinement(size: list[int], device: str) -> dict:
    """Per-case refinement (ddm4d.refine, the default of generate) of a pair that differs by a smooth
    deformation of a few voxels: a 128 x 128 slice or the --size volume (budgets: ~10 s and ~60 s)."""
    import torch
    import torch.nn.functional as F

    from ddm4d.refine import refine_velocity
    from ddm4d.svf import integrate
    from ddm4d.warp import warp

    torch.manual_seed(0)
    shape = tuple(reversed(size))
    pool = F.avg_pool2d if len(shape) == 2 else F.avg_pool3d
    source = (pool(torch.rand(1, 1, *shape), 5, 1, 2) * 4 - 2).clamp(-1, 1).to(device)
    coarse = torch.randn(1, len(shape), *[max(2, n // 16) for n in shape]) * 2.0
    v = F.interpolate(coarse, size=shape, mode="bilinear" if len(shape) == 2 else "trilinear", align_corners=True)
    target = warp(source, integrate(v.to(device)))
    spacing = [1.5, 1.5] if len(shape) == 2 else [3.15, 1.5, 1.5]
    t = time.perf_counter()
    result = refine_velocity(source, target, spacing)
    seconds = time.perf_counter() - t
    return {"case": f"refine {' x '.join(map(str, size))}", "seconds_min": seconds,
            "objective_per_level": result.objective, "steps_per_level": result.steps,
            "peak_memory_gib": peak_memory_gib(device)}


def end_to_end(size: list[int], device: str, frames: int, repeats: int, precision: str = "auto") -> dict:
    """`ddm4d generate` from NIfTI files to written outputs, with a (random-weight) model file."""
    with tempfile.TemporaryDirectory(prefix="ddm4d-bench-") as folder:  # its own files, removed after
        return _generate_files(Path(folder), size, device, frames, repeats, precision)


def _generate_files(tmp: Path, size, device: str, frames: int, repeats: int, precision: str = "auto") -> dict:
    import numpy as np
    import SimpleITK as sitk
    import torch

    from ddm4d.checkpoint import save_model
    from ddm4d.config import DDMConfig
    from ddm4d.generation import generate
    from ddm4d.model import DDM

    torch.manual_seed(0)
    save_model(DDM(DDMConfig(image_size=tuple(size))), tmp / "m.safetensors")
    rng = np.random.default_rng(0)
    for name in ("s", "t"):
        img = sitk.GetImageFromArray(rng.random(tuple(reversed(size))).astype(np.float32))
        img.SetSpacing((1.5, 1.5, 3.15))
        sitk.WriteImage(img, str(tmp / f"{name}.nii.gz"))
    times, parts = [], []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        # the model path (the paper's forward mode); refinement, on by default, is timed by the refine cases
        r = generate(tmp / "s.nii.gz", tmp / "t.nii.gz", model=tmp / "m.safetensors", frames=frames, device=device,
                     mode="forward", refine=False, precision=precision)
        rep = r.write(tmp / "out", quicklook=False)
        times.append(time.perf_counter() - t)
        parts.append(rep["timings_s"])
    best = int(np.argmin(times[1:])) + 1
    return {"case": "generate_files", "seconds_min": times[best], "timings_s": parts[best],
            "peak_memory_gib": peak_memory_gib(device)}


def run_child(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--device", args.device, "--threads", str(args.threads),
           "--allocator", args.allocator, "--precision", args.precision, "--frames", str(args.frames), "--repeats", str(args.repeats), "--size", *map(str, args.size)]
    if args.authors:
        cmd += ["--authors", args.authors]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if out.returncode:
        raise SystemExit(f"benchmark case {name} failed:\n{out.stderr}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["matmul_gflops_after"] = matmul_gflops_child(args)
    if "gflops" in result:
        result["fraction_of_matmul"] = result["gflops"] / result["matmul_gflops_after"]
    return result


def matmul_gflops_child(args) -> float:
    code = f"import torch; torch.set_num_threads({args.threads}); import sys; sys.path.insert(0, {str(HERE)!r}); " \
           f"import bench; print(bench.matmul_gflops({args.device!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def _number(value, digits: int) -> str:
    """A table cell: blank where a case has no such figure (file writing has no GFLOP count)."""
    return "" if value is None or value != value else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    lines = [f"# ddm4d benchmark: {report['machine']}", "",
             f"size {' x '.join(map(str, report['size']))}, device {report['device']}, threads {report['threads']}, "
             f"torch {report['torch']}, {report['frames']} frames, allocator {report.get('allocator', 'default')}, "
             f"precision {report.get('precision', 'fp32')}", "",
             "| case | time (s) | GFLOP/s | matmul GFLOP/s after | fraction of matmul | peak memory (GiB) |",
             "|---|---|---|---|---|---|"]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['case']} | failed: {r['error']} | | | | |")
            continue
        lines.append(f"| {r['case']} | {r['seconds_min']:.3f} | {_number(r.get('gflops'), 1)} | "
                     f"{r['matmul_gflops_after']:.1f} | {_number(r.get('fraction_of_matmul'), 2)} | "
                     f"{r['peak_memory_gib']:.2f} |")
    for r in report["results"]:
        if "compile_and_warm_up_s" in r:
            lines += ["", f"{r['case']}: torch.compile mode {r['compile_mode']}, compiling and warming up took "
                      f"{r['compile_and_warm_up_s']:.1f} s before the timed runs"]
        if "timings_s" in r:
            parts = ", ".join(f"{k} {v:.3f}" for k, v in r["timings_s"].items())
            lines += ["", f"end to end from files ({r['case']}): {parts}"]
    lines += side_by_side(report["results"])
    return "\n".join(lines) + "\n"


# our case, the authors' case it is compared with, and what the row says
SIDE_BY_SIDE = (
    ("generate", "authors_generate", "10 frames (ours: `--precision auto`, bf16 on CPUs with AMX)"),
    ("train", "authors_train", "training iteration, fp32, our loss (the default)"),
    ("train_bf16", "authors_train", "training iteration, bf16 (`--precision bf16`), our loss"),
    ("train_paper_loss", "authors_train", "training iteration, fp32, their loss (`--paper-loss`)"),
    ("train_paper_loss_bf16", "authors_train", "training iteration, bf16, their loss (`--precision bf16 --paper-loss`)"),
)


def side_by_side(results: list[dict]) -> list[str]:
    """How many times faster than the authors' code each of our cases ran, and the peak memory of both."""
    by_case = {r["case"]: r for r in results if "error" not in r}
    lines = []
    for ours, theirs, label in SIDE_BY_SIDE:
        if ours in by_case and theirs in by_case:
            a, b = by_case[ours], by_case[theirs]
            lines.append(f"| {label} | {a['seconds_min']:.3f} | {b['seconds_min']:.3f} | "
                         f"{b['seconds_min'] / a['seconds_min']:.2f}x | {a['peak_memory_gib']:.2f} / "
                         f"{b['peak_memory_gib']:.2f} |")
    header = ["| case | ours (s) | theirs (s) | faster | peak memory, ours / theirs (GiB) |", "|---|---|---|---|---|"]
    return ["", "Against the authors' code in the same run:", "", *header, *lines] if lines else []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", type=int, nargs=3, default=[128, 128, 32], metavar=("X", "Y", "Z"))
    p.add_argument("--frames", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cases", help="comma-separated; default: " + "; ".join(f"{k}: {v}" for k, v in DEFAULT_CASES.items()))
    p.add_argument("--allocator", choices=("tuned", "default"), default="tuned",
                   help="tuned: as the ddm4d CLI runs (ddm4d.allocator); default: glibc's malloc settings")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: as ddm4d runs (generation in bf16 on GPUs and CPUs with AMX; training in "
                        "bf16 on GPUs); fp32 or bf16 for every case")
    p.add_argument("--name", default=None, help="results file name (default: device and size)")
    p.add_argument("--authors", metavar="CHECKOUT",
                   help="a checkout of the authors' code (github.com/torchDDM/DDM): time it beside ours "
                        f"(default cases then: {AUTHORS_CASES})")
    p.add_argument("--render", action="store_true",
                   help="measure nothing: write results/NAME.md again from results/NAME.json (after a change of format)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    name = args.name or f"{args.device.split(':')[0]}_{'x'.join(map(str, args.size))}"
    if args.render:
        return render(name)
    if args.child and args.allocator == "tuned":
        from ddm4d.allocator import tune_cpu_allocator

        tune_cpu_allocator()  # before torch is imported, as the ddm4d CLI does
    import torch

    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"bench.py: no CUDA GPU here (torch {torch.__version__}): nothing measured; run it where PyTorch "
              "sees a GPU")
        return  # exit 0: a machine without a GPU is not a failure of the benchmark
    if args.authors and not (Path(args.authors) / "model" / "ddpm_modules" / "diffusion.py").is_file():
        p.error(f"--authors {args.authors}: not a checkout of the authors' code (no model/ddpm_modules/diffusion.py "
                "in it); clone github.com/torchDDM/DDM and give its folder")
    if args.child:
        print(json.dumps(case(args.child, args.size, args.device, args.frames, args.repeats, args.precision,
                              args.authors)))
        return
    out = HERE / "results"
    try:  # results of this script only: never another benchmark's files of the same --name
        files.check_results(out / name, _ours, option="--name")
    except InputError as err:
        raise SystemExit(f"bench.py: error: {err}") from None
    cases = args.cases or (AUTHORS_CASES if args.authors else DEFAULT_CASES["cuda" if args.device.startswith("cuda") else "cpu"])
    results = [run_child(case_name, args) for case_name in cases.split(",")]
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    report = {"machine": machine, "device": args.device, "threads": args.threads, "size": args.size,
              "frames": args.frames, "allocator": args.allocator, "precision": args.precision, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
              "results": results}
    files.write_results(out / name, report, markdown(report))
    print(markdown(report))


def _ours(record) -> bool:
    """A results record this script wrote (never replace another program's file of the same name)."""
    return isinstance(record, dict) and {"machine", "results"} <= record.keys()


def render(name: str) -> None:
    record = HERE / "results" / f"{name}.json"
    try:
        files.check_results(record, _ours, option="--name")
        report = json.loads(record.read_text())
    except (InputError, OSError, ValueError) as err:
        raise SystemExit(f"bench.py: error: --render {name}: {err}") from None
    files.write_text(record.with_suffix(".md"), markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
