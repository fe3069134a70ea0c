"""The result folder of `ddm4d generate` (GenerationResult.write): frames, fields and their Jacobians,
labels, 4D NIfTI and Slicer sequences, report.json, label volumes and quick-look images.
"""
from __future__ import annotations

import csv
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import SimpleITK as sitk

from . import files
from .errors import InputError
from .io import _as_3d, cine_image, write_image
from .metrics import STRUCTURE_NAMES

if TYPE_CHECKING:
    from .generation import GenerationResult

# structures whose volume over the frames a cardiologist reads (keys of metrics.ACDC_STRUCTURES)
VOLUME_STRUCTURES = ("lv_blood_pool", "lv_myocardium", "rv")


def write_sequence_nrrd(images: Sequence[sitk.Image], path: str | os.PathLike, index_values: Sequence[float],
                        index_name: str = "gamma", node_class: str = "vtkMRMLScalarVolumeNode",
                        level: int = 6) -> Path:
    """A Slicer volume sequence (.seq.nrrd): one 4D NRRD, list axis last, items on one shared grid,
    gzip `level` (0: raw).

    Slicer's volumes are 3D (it reads no 2D item): 2D images are written as single slices."""
    return _write_sequence(_as_3d(images[0]), [sitk.GetArrayViewFromImage(img) for img in images], path,
                           index_values, index_name, node_class, level)


def _write_sequence(ref: sitk.Image, arrays: Sequence[np.ndarray], path: str | os.PathLike,
                    index_values: Sequence[float], index_name: str = "gamma",
                    node_class: str = "vtkMRMLScalarVolumeNode", level: int = 6) -> Path:
    """write_sequence_nrrd from the items' voxels and a 3D image of their grid (`ref`)."""
    data = np.stack(arrays).reshape((len(arrays),) + ref.GetSize()[::-1])  # (n, k, j, i): i fastest
    nrrd_type = {np.dtype("float32"): "float", np.dtype("float64"): "double", np.dtype("uint8"): "uint8",
                 np.dtype("int16"): "int16", np.dtype("uint16"): "uint16", np.dtype("int32"): "int32"}[data.dtype]
    direction = np.asarray(ref.GetDirection()).reshape(3, 3)
    columns = [direction[:, a] * ref.GetSpacing()[a] for a in range(3)]
    vec = lambda v: "(" + ",".join(f"{x:.17g}" for x in v) + ")"  # noqa: E731
    header = [
        "NRRD0004", "# Slicer volume sequence written by ddm4d",
        f"type: {nrrd_type}", "dimension: 4", "space: left-posterior-superior",
        f"sizes: {' '.join(str(s) for s in ref.GetSize())} {len(arrays)}",
        f"space directions: {' '.join(vec(c) for c in columns)} none",
        "kinds: domain domain domain list", f'labels: "" "" "" "{index_name}"',
        "endian: little", f"encoding: {'gzip' if level > 0 else 'raw'}", f"space origin: {vec(ref.GetOrigin())}",
        "axis 3 index type:=numeric",
        "axis 3 index values:=" + " ".join(f"{v:.6g}" for v in index_values),
        f"DataNodeClassName:={node_class}",
    ]
    import gzip

    payload = np.ascontiguousarray(data).astype(data.dtype.newbyteorder("<")).tobytes()
    if level > 0:
        payload = gzip.compress(payload, level)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(("\n".join(header) + "\n\n").encode("ascii"))
            f.write(payload)

    return files.atomic_write(path, write)


# what `ddm4d generate --outputs` can choose; the frames and report.json are always written
OUTPUTS = ("fields", "jacobians", "labels", "frames_4d", "sequences", "quicklook")


def parse_outputs(outputs: str | Sequence[str] | None) -> tuple[str, ...]:
    """The chosen outputs in OUTPUTS order: None or "all" = all; "" or "none" = the frames only."""
    if outputs is None:
        return OUTPUTS
    names = [n.strip() for n in outputs.split(",")] if isinstance(outputs, str) else [str(n) for n in outputs]
    names = [n for n in names if n and n != "none"]
    if names == ["all"]:
        return OUTPUTS
    unknown = [n for n in names if n not in OUTPUTS]
    if unknown:
        raise InputError(f"unknown output(s) {', '.join(unknown)} in --outputs; choose from all, none, "
                         f"{', '.join(OUTPUTS)} (the frames and report.json are always written)")
    return tuple(n for n in OUTPUTS if n in names)


#: zlib level of the .nii.gz and NRRD files unless asked otherwise. All outputs of 11 frames at
#: 128 x 128 x 32 (benchmarks/end_to_end.py's pair), one process, two runs: level 1, 1.1-1.4 s and
#: 98 MB; 3, 1.7-1.8 s and 89 MB; 6, 3.9-4.2 s and 88 MB; 9, 16 s and 87 MB; 0, 0.4-0.5 s and 231 MB
DEFAULT_COMPRESSION = 1


def write_outputs(result: GenerationResult, out_dir: Path, outputs: Sequence[str] = OUTPUTS,
                  compression: int | None = DEFAULT_COMPRESSION) -> dict[str, Any]:
    """The result folder, replaced as a whole under the rule of ddm4d.files (checked before writing).

    `compression`: 0, none (.nii, raw NRRD: written several times faster, 2-3x the size); 1-9, .nii.gz
    and NRRD files at that zlib level (default DEFAULT_COMPRESSION); None, ITK's defaults."""
    if compression is not None and not 0 <= compression <= 9:
        raise InputError(f"--compress must be 0 (none) to 9, got {compression}")
    t0 = time.perf_counter()

    def fill(tmp: Path, final: Path) -> dict[str, Any]:
        report = _write_into(result, tmp, final, set(outputs), compression)
        report["timings_s"]["write"] = time.perf_counter() - t0
        report.update(files.manifest(tmp))  # every file it wrote: a later run may replace them, nothing else
        files.write_text(tmp / files.MANIFEST, json.dumps(report, indent=2))  # last: it lists the others
        return report

    return files.replace_folder(out_dir, fill, "--out", "ddm4d generate")


def _write_into(result: GenerationResult, tmp: Path, final: Path, outputs: set[str],
                compression: int | None) -> dict[str, Any]:
    """Image files are written by a few threads: SimpleITK's writers and zlib release the GIL, and
    compressing some 30 volumes was most of the end-to-end time (benchmarks/bench.py). The plots are
    drawn meanwhile: matplotlib's import and drawing are Python, which the writers leave free."""
    n = len(result.gammas)
    nifti = ".nii" if compression == 0 else ".nii.gz"
    frame_paths = [f"frames/frame_{i:03d}{nifti}" for i in range(n)]
    field_paths = [f"fields/field_{i:03d}.nrrd" for i in range(n)] if "fields" in outputs else []
    jac_paths = [f"fields/jacobian_{i:03d}{nifti}" for i in range(n)] if "jacobians" in outputs else []
    labels = result.labels if result.labels and "labels" in outputs else []
    label_paths = [f"labels/labels_{i:03d}{nifti}" for i in range(len(labels))]
    sequences = "sequences" in outputs
    level = 6 if compression is None else compression  # of the .seq.nrrd files, written by hand
    # Every read of the images' voxels and every copy of them happens here, before the writer threads
    # start: SimpleITK makes an image's buffer its own (MakeUnique) to give a numpy view or to change a
    # copy's geometry, which can swap the buffer under a thread that is writing that image (a segfault
    # in CI once the plots were drawn during the writing). The threads then only read.
    frame_arrays = [sitk.GetArrayViewFromImage(f) for f in result.frames]
    label_arrays = [sitk.GetArrayViewFromImage(img) for img in labels]
    grid = _as_3d(result.frames[0])
    cine = cine_image(result.frames, 1.0) if "frames_4d" in outputs else None
    volumes = result.label_volumes_ml() if labels else None
    slices = _middle_slices(frame_arrays, grid.GetSize()) if "quicklook" in outputs else None
    jobs = []
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        # the longest jobs (a file of all the frames) first, so none of them is left running alone at the end
        if cine is not None:
            jobs.append(pool.submit(write_image, cine, tmp / f"frames_4d{nifti}", compression))
        if sequences:
            jobs.append(pool.submit(_write_sequence, grid, frame_arrays, tmp / "frames.seq.nrrd", result.gammas,
                                    level=level))
        for frame, path in zip(result.frames, frame_paths):
            jobs.append(pool.submit(write_image, frame, tmp / path, compression))
        for fld, path in zip(result.fields, field_paths):
            jobs.append(pool.submit(write_image, fld, tmp / path, compression))
        for jac, path in zip(result.jacobians, jac_paths):
            jobs.append(pool.submit(write_image, jac, tmp / path, compression))
        for img, path in zip(labels, label_paths):
            jobs.append(pool.submit(write_image, img, tmp / path, compression))
        if labels and sequences:
            jobs.append(pool.submit(_write_sequence, grid, label_arrays, tmp / "labels.seq.nrrd", result.gammas,
                                    node_class="vtkMRMLLabelMapVolumeNode", level=level))
        report = _report(result, tmp, final, outputs, compression, frame_paths, field_paths, jac_paths, label_paths,
                         volumes, slices)
        for job in jobs:
            job.result()  # the first failure, in order
    return report


def _report(result: GenerationResult, tmp: Path, final: Path, outputs: set[str], compression: int | None,
            frame_paths: list[str], field_paths: list[str], jac_paths: list[str], label_paths: list[str],
            volumes: list[dict[str, float]] | None, slices: list[np.ndarray] | None) -> dict[str, Any]:
    """report.json's content, and the files it points to that are not images (score, volumes, plots),
    from what was read of the images before the writer threads started (no image is read here)."""
    nifti = ".nii" if compression == 0 else ".nii.gz"
    labels, sequences = bool(label_paths), "sequences" in outputs
    report: dict[str, Any] = {
        "gammas": result.gammas, "frames": [str(final / p) for p in frame_paths],
        "fields": [str(final / p) for p in field_paths], "jacobians": [str(final / p) for p in jac_paths],
        "outputs": sorted(outputs, key=OUTPUTS.index), "compression": compression, "device": result.device,
        "model": result.model, "motion_source": result.motion_source, "mode": result.mode,
        "fade": result.fade, "precision": result.precision,
        "timings_s": dict(result.timings_s), "folding_fraction": result.folding_fraction,
        "field_convention": "LPS millimetres, pull: frame(x) = source(x + u(x)); SimpleITK DisplacementFieldTransform",
        "model_grid": {"size": list(result.mapping.grid.GetSize()), "spacing": list(result.mapping.grid.GetSpacing()),
                       "origin": list(result.mapping.grid.GetOrigin())},
        "messages": result.messages,
    }
    if result.refinement:
        report["refinement"] = result.refinement
    if result.score is not None:
        from .cine import score_markdown
        files.write_text(tmp / "score.json", json.dumps(result.score, indent=2))
        files.write_text(tmp / "score.md", score_markdown(result.score))
        report["score"] = {"json": str(final / "score.json"), "markdown": str(final / "score.md"),
                           "mean": result.score["mean"]}
    if result.fit_losses:
        report["fit"] = {"steps": len(result.fit_losses), "first_loss": result.fit_losses[0],
                         "last_loss": result.fit_losses[-1]}
    if "frames_4d" in outputs:
        report["frames_4d"] = str(final / f"frames_4d{nifti}")
    if sequences:
        report["sequence"] = str(final / "frames.seq.nrrd")
    if labels:
        report["labels"] = [str(final / p) for p in label_paths]
        if sequences:
            report["labels_sequence"] = str(final / "labels.seq.nrrd")
        report.update(_write_volumes(result.gammas, volumes, tmp, final, plot="quicklook" in outputs))
    if slices is not None:
        report.update(_write_quicklook(slices, tmp, final))
    return report


def _write_volumes(gammas: list[float], volumes: list[dict[str, float]], tmp: Path, final: Path,
                   plot: bool) -> dict[str, Any]:
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["frame", "gamma"] + [f"{STRUCTURE_NAMES[k]} (mL)" for k in VOLUME_STRUCTURES])
    for i, (g, v) in enumerate(zip(gammas, volumes)):
        writer.writerow([i, f"{g:.4f}"] + [f"{v[k]:.3f}" for k in VOLUME_STRUCTURES])
    files.write_text(tmp / "volumes.csv", table.getvalue())
    first, last = volumes[0]["lv_blood_pool"], volumes[-1]["lv_blood_pool"]
    ef = (first - last) / first if first > 0 else None
    found = {"volumes_ml": volumes, "ejection_fraction": ef, "volumes_csv": str(final / "volumes.csv")}
    if not plot:
        return found
    from .plotting import figure, save_png  # matplotlib: imported only when a plot is written

    fig = figure(6, 3.5)
    ax = fig.subplots()
    for key in VOLUME_STRUCTURES:
        ax.plot(gammas, [v[key] for v in volumes], marker="o", label=STRUCTURE_NAMES[key])
    ax.set_xlabel("gamma (source to target)")
    ax.set_ylabel("volume (mL)")
    title = "Propagated label volumes"
    if ef is not None:
        title += f"; LV ejection fraction {100 * ef:.1f}% (first vs last frame)"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, tmp / "volumes.png", dpi=100)
    return {**found, "volumes_png": str(final / "volumes.png")}


def _middle_slices(frames: Sequence[np.ndarray], size: Sequence[int]) -> list[np.ndarray]:
    """The middle slice of each frame's voxels (`size`: their grid, x, y, z), scaled to [0, 1]."""
    arrays = [f.reshape(tuple(size)[::-1]) for f in frames]  # 2D: one slice
    k = arrays[0].shape[0] // 2
    lo, hi = np.percentile(np.stack([a[k] for a in arrays]), [1, 99])
    return [np.clip((a[k] - lo) / max(hi - lo, 1e-6), 0, 1) for a in arrays]


def _write_quicklook(middle_slices: list[np.ndarray], tmp: Path, final: Path) -> dict[str, Any]:
    """Montage PNG and animated GIF of the middle slice over the frames."""
    from PIL import Image

    slices = [(255 * s).astype(np.uint8) for s in middle_slices]
    frames = [Image.fromarray(s) for s in slices]
    h, w = slices[0].shape
    cols = min(len(frames), 5)
    rows = (len(frames) + cols - 1) // cols
    montage = Image.new("L", (cols * w, rows * h))
    for i, im in enumerate(frames):
        montage.paste(im, ((i % cols) * w, (i // cols) * h))
    files.atomic_write(tmp / "montage.png", lambda path: montage.save(path, format="PNG"))
    loop = frames + frames[-2:0:-1]  # forth and back, like a beating heart
    files.atomic_write(tmp / "frames.gif", lambda path: loop[0].save(path, format="GIF", save_all=True,
                                                                   append_images=loop[1:], duration=120, loop=0))
    return {"montage": str(final / "montage.png"), "gif": str(final / "frames.gif")}
