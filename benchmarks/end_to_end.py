#!/usr/bin/env python3
"""End to end as a user feels it: the wall clock of `ddm4d generate` from files, against its model time.

The command runs as a user runs it (a fresh interpreter: start-up, imports, reading, the networks,
mapping back to the source geometry, writing) on a phantom pair of the default 3D model grid
(128 x 128 x 32), 11 frames, with the bundled 3D model; the model time is report.json's code + deform.
Each variant runs `--repeats` times, the fastest counts (file caches warm).

    python benchmarks/end_to_end.py --out benchmarks/results/end_to_end
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # the ddm4d beside this script

from ddm4d import files  # noqa: E402
from ddm4d.errors import InputError  # noqa: E402

# (name, model, extra options of ddm4d generate). "grid": a DDM on the 128 x 128 x 32 model grid (random
# weights: the time does not depend on them), the size the speed targets are set for; "bundled": the
# bundled 3D model (a 64 x 64 x 16 grid). The paper's path (forward, no refinement) is the model path.
PAPER = ["--mode", "forward", "--no-refine"]
VARIANTS = (
    ("all outputs, .nii.gz (the CLI's default)", "grid", PAPER),
    ("what Slicer loads, uncompressed", "grid", PAPER + ["--outputs", "fields,labels", "--compress", "0"]),
    ("frames only, uncompressed", "grid", PAPER + ["--outputs", "none", "--compress", "0"]),
    ("bundled 3D model, all outputs", "bundled", PAPER),
    ("bundled 3D model, default path (symmetric + refinement), all outputs", "bundled", []),
)


def make_pair(folder: Path, size=(128, 128, 32)) -> tuple[Path, Path, Path]:
    """ED and ES of one phantom subject (a seed no bundled model saw) and the ED labels, as NIfTI."""
    from ddm4d.io import write_image
    from ddm4d.phantom import make_subject

    subject = make_subject(seed=7, size=size)
    paths = folder / "ed.nii.gz", folder / "es.nii.gz", folder / "ed_labels.nii.gz"
    write_image(subject.images[subject.ed], paths[0])
    write_image(subject.images[subject.es], paths[1])
    write_image(subject.labels[subject.ed], paths[2])
    return paths


def grid_model(folder: Path) -> Path:
    import torch

    from ddm4d.checkpoint import save_model
    from ddm4d.config import DDMConfig
    from ddm4d.model import DDM

    torch.manual_seed(0)
    return save_model(DDM(DDMConfig(image_size=(128, 128, 32))), folder / "grid128.safetensors")


def run(pair, model: str, extra, out: Path, threads: int) -> dict:
    source, target, labels = pair
    cmd = [sys.executable, "-m", "ddm4d", "generate", "--source", str(source), "--target", str(target),
           "--seg", str(labels), "--frames", "11", "--device", "cpu", "--out", str(out), "--quiet",
           "--model", model, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"ddm4d generate failed:\n{done.stderr}")
    report = json.loads((out / "report.json").read_text())
    t = report["timings_s"]
    model = t.get("code", 0.0) + t.get("deform", 0.0)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"wall_s": wall, "model_s": model, "ratio": wall / model, "timings_s": t, "megabytes": size / 2 ** 20,
            "precision": report.get("precision")}


def slicer_path(pair, model: str) -> dict:
    """The Slicer module's path, headless (slicer-core): "Generate" (inputs written, ddm4d generate in the
    background with the module's outputs) to the sequence in the scene, as the widget runs it."""
    import SimpleITK as sitk
    import slicer

    sys.path.insert(0, str(ROOT / "DDMInterpolation"))
    from DDMInterpolationLib import DDMInterpolationLogic, GenerationRun
    from DDMInterpolationLib.Conversion import addVolumeNodeFromImage

    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    sequences = slicer.vtkSlicerSequencesLogic()
    sequences.SetMRMLScene(scene)
    logic = DDMInterpolationLogic(scene, sequences)
    source = addVolumeNodeFromImage(scene, sitk.ReadImage(str(pair[0])), "ED")
    target = addVolumeNodeFromImage(scene, sitk.ReadImage(str(pair[1])), "ES")
    labels = addVolumeNodeFromImage(scene, sitk.ReadImage(str(pair[2])), "ED labels", "vtkMRMLLabelMapVolumeNode")
    with tempfile.TemporaryDirectory(prefix="ddm4d-slicer-") as work:
        started = time.perf_counter()
        run = GenerationRun(logic, work, sourceNode=source, targetNode=target, numberOfFrames=11, model=model,
                            device="cpu", mode="forward", refine=False, segmentationNode=labels)
        while not run.finished:
            run.poll()
            time.sleep(0.05)
        run.poll()
        if not run.succeeded:
            raise SystemExit(f"the Slicer path failed: {run.process.errorMessage()}")
        report = json.loads((Path(run.command.outputDirectory) / "report.json").read_text())
        browser = run.load()
        wall = time.perf_counter() - started
    t = report["timings_s"]
    model_s = t.get("code", 0.0) + t.get("deform", 0.0)
    frames = logic.outputNodes(browser)["frames"].GetNumberOfDataNodes()
    return {"wall_s": wall, "model_s": model_s, "ratio": wall / model_s, "timings_s": t, "frames": frames,
            "generate_s": run.seconds["generate"], "load_s": run.seconds["load"]}


SLICER_ROW = ("Slicer module, headless (slicer-core): \"Generate\" to the sequence in the scene, forward, no "
              "refinement, what it loads")


def markdown(rows: list[dict]) -> str:
    """The results table; the Slicer path's row counts its whole wall clock (the background ddm4d generate
    and loading the frames, fields and labels into MRML nodes, its "write" column)."""
    first = rows[0]
    lines = [f"# ddm4d generate end to end: 128 x 128 x 32, 11 frames, {first['threads']} CPU threads, torch "
             f"{first['torch']}", "",
             "| variant | wall clock (s) | model (s) | wall / model | load | preprocess | refine | postprocess | "
             "write (Slicer: load into the scene) | output (MB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["timings_s"]
        slicer = r["variant"] == "Slicer path"
        lines.append(f"| {SLICER_ROW if slicer else r['variant']} | {r['wall_s']:.2f} | {r['model_s']:.2f} | "
                     f"{r['ratio']:.2f} | {t.get('load', 0):.2f} | {t.get('preprocess', 0):.2f} | "
                     f"{t.get('refine', 0):.2f} | {t.get('postprocess', 0):.2f} | "
                     f"{r['load_s'] if slicer else t.get('write', 0):.2f} | "
                     f"{'–' if slicer else format(r['megabytes'], '.1f')} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", help="write OUT.json and OUT.md (a folder's files are never replaced otherwise)")
    parser.add_argument("--render", action="store_true", help="measure nothing: write OUT.md again from OUT.json")
    args = parser.parse_args()
    if args.render and not args.out:
        parser.error("--render needs --out")
    try:  # its own results only: never a file of another program under the --out name
        if args.out:
            files.check_results(args.out, lambda r: isinstance(r, list) and all("variant" in row for row in r))
        if args.render:
            record, table = files.results_paths(args.out)
            files.write_text(table, markdown(json.loads(record.read_text())))
            return 0
    except (InputError, OSError, ValueError, KeyError) as err:
        parser.error(str(err))
    rows = []
    with tempfile.TemporaryDirectory(prefix="ddm4d-e2e-") as scratch:
        folder = Path(scratch)
        pair = make_pair(folder)
        models = {"grid": str(grid_model(folder)), "bundled": "default"}
        for name, model, extra in VARIANTS:
            runs = [run(pair, models[model], extra, folder / f"out{i}", args.threads) for i in range(args.repeats)]
            best = min(runs, key=lambda r: r["wall_s"])
            best["wall_s_median"] = statistics.median(r["wall_s"] for r in runs)
            rows.append({"variant": name, "model": model, "options": extra, **best})
            print(f"{name}: {best['wall_s']:.2f} s wall, model {best['model_s']:.2f} s, "
                  f"{best['ratio']:.2f}x, {best['megabytes']:.1f} MB", flush=True)
        slicer_runs = [slicer_path(pair, models["grid"]) for _ in range(args.repeats)]
        slicer_best = min(slicer_runs, key=lambda r: r["wall_s"])
        print(f"Slicer path: {slicer_best['wall_s']:.2f} s (generate {slicer_best['generate_s']:.2f} s, load "
              f"{slicer_best['load_s']:.2f} s), model {slicer_best['model_s']:.2f} s", flush=True)
    import torch
    rows.append({"variant": "Slicer path", **slicer_best})
    for row in rows:
        row.update(threads=args.threads, torch=torch.__version__)
    text = markdown(rows)
    print(text)
    if args.out:
        files.write_results(Path(args.out), rows, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
