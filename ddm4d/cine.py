"""Scoring generated frames against a real cine's own in-between frames.

A pair of cine frames i -> j has real frames strictly between them; frame k sits at
gamma_k = (k - i) / (j - i) (normalised time; frames are taken as evenly timed, as a cine's
FrameTime or ACDC's frame numbers give them). i > j is the cine played backwards.

Every image of a pair is mapped with ONE affine intensity map, the source's [min, max] -> [-1, 1],
and PSNR uses data range 2 (as `ddm4d evaluate` does), so the numbers of different methods and
of the blend are directly comparable.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .classical import linear_blend
from .errors import InputError
from .geometry import resample_to_reference, same_geometry
from .metrics import nmse, psnr

__all__ = ["inbetween", "scorable_inbetween", "frame_gammas", "score_frames"]


def inbetween(source_frame: int, target_frame: int) -> list[tuple[int, float]]:
    """(frame index, gamma) of the real frames strictly between the two, in playing order."""
    i, j = int(source_frame), int(target_frame)
    if i == j:
        return []
    step = 1 if j > i else -1
    return [(k, abs(k - i) / abs(j - i)) for k in range(i + step, j, step)]


def scorable_inbetween(source_frame: int, target_frame: int) -> list[tuple[int, float]]:
    """inbetween(), refused (InputError) when there is no real frame between the two to score against."""
    pairs = inbetween(source_frame, target_frame)
    if not pairs:
        raise InputError("the source and target frames are neighbours or the same frame: there is no "
                         "real in-between frame to score against; choose frames further apart")
    return pairs


def frame_gammas(source_frame: int, target_frame: int) -> list[float]:
    """0, the in-between frames' gammas, 1: what to generate to score a pair of cine frames."""
    return [0.0] + [g for _, g in inbetween(source_frame, target_frame)] + [1.0]


def _array(image: sitk.Image, reference: sitk.Image) -> np.ndarray:
    if not same_geometry(image, reference):
        image = resample_to_reference(image, reference, "linear")
    return sitk.GetArrayViewFromImage(image).astype(np.float64)


def score_frames(frames: Sequence[sitk.Image], gammas: Sequence[float], cine: Sequence[sitk.Image],
                 source_frame: int, target_frame: int) -> dict:
    """PSNR (dB) and NMSE of the generated frames at the in-between gammas against the real frames,
    beside the unmoved source ("initial") and the linear blend of the two ends."""
    n = len(cine)
    for name, index in (("source", source_frame), ("target", target_frame)):
        if not 0 <= index < n:
            raise InputError(f"{name} frame {index} is out of range: the cine has {n} frames (0..{n - 1})")
    pairs = scorable_inbetween(source_frame, target_frame)
    source, target = cine[source_frame], cine[target_frame]
    src = _array(source, source)
    lo, hi = float(src.min()), float(src.max())
    if hi <= lo:
        raise InputError("the source frame is constant; nothing to score")
    scale = lambda a: (a - lo) / (hi - lo) * 2.0 - 1.0  # noqa: E731
    by_gamma = {round(float(g), 6): f for g, f in zip(gammas, frames)}
    blend = linear_blend(source, target, [g for _, g in pairs])
    rows = []
    for (k, g), blended in zip(pairs, blend):
        key = round(g, 6)
        if key not in by_gamma:
            raise InputError(f"no generated frame at gamma {g:.4f} (real frame {k}); generate at the cine's own "
                             "frame times (ddm4d.cine.frame_gammas)")
        ref = scale(_array(cine[k], source))
        row = {"frame": k, "gamma": g}
        for name, image in (("generated", by_gamma[key]), ("blend", blended), ("initial", source)):
            pred = scale(_array(image, source))
            row[f"{name}_psnr_db"] = psnr(pred, ref, data_range=2.0)
            row[f"{name}_nmse"] = nmse(pred, ref)
        rows.append(row)
    summary = {f"{name}_{metric}": float(np.mean([r[f"{name}_{metric}"] for r in rows]))
               for name in ("generated", "blend", "initial") for metric in ("psnr_db", "nmse")}
    return {"source_frame": int(source_frame), "target_frame": int(target_frame), "frames": rows, "mean": summary,
            "intensity_map": {"lo": lo, "hi": hi, "to": [-1.0, 1.0], "psnr_data_range": 2.0}}


def score_markdown(score: dict) -> str:
    """The score as a Markdown table (one row per real in-between frame, then the means)."""
    lines = [f"# Generated frames against the real cine, frames {score['source_frame']} -> {score['target_frame']}", "",
             "| frame | gamma | generated PSNR (dB) | blend PSNR (dB) | source PSNR (dB) | generated NMSE | blend NMSE |",
             "|---|---|---|---|---|---|---|"]
    for r in score["frames"]:
        lines.append(f"| {r['frame']} | {r['gamma']:.3f} | {r['generated_psnr_db']:.2f} | {r['blend_psnr_db']:.2f} | "
                     f"{r['initial_psnr_db']:.2f} | {r['generated_nmse']:.4f} | {r['blend_nmse']:.4f} |")
    m = score["mean"]
    lines.append(f"| mean | | {m['generated_psnr_db']:.2f} | {m['blend_psnr_db']:.2f} | {m['initial_psnr_db']:.2f} | "
                 f"{m['generated_nmse']:.4f} | {m['blend_nmse']:.4f} |")
    return "\n".join(lines) + "\n"
