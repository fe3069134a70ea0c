"""Training data in memory: ED -> ES pairs or whole cines on the model grid, and the frames drawn from a cine."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import atomic_write
from ..config import DDMConfig
from ..data import Dataset, Subject
from ..errors import InputError
from ..geometry import to_model_grid
from .options import RUN
from .reporting import Reporter


def _warn_problems(dataset: Dataset, reporter: Reporter) -> None:
    for problem in dataset.problems:
        reporter.warn(f"skipping {problem}")


def detect_spatial_dims(subjects: list[Subject]) -> int:
    """2 when every subject is a single slice (2D cine), else 3."""
    return 2 if subjects and all(len(s.size) >= 3 and s.size[2] == 1 for s in subjects) else 3


def _cache_key(subject: Subject, config: DDMConfig) -> str:
    """Changes when a file or the model grid changes, so a stale cached array is never used."""
    files = {k: [str(p), p.stat().st_size, p.stat().st_mtime_ns] for k, p in sorted(subject.paths.items())
             if p.is_file()}
    text = json.dumps([files, list(config.image_size), list(config.spacing)], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _load_cached(path: Path | None) -> np.ndarray | None:
    if path is None or not path.is_file():
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None


def _save_cached(path: Path, array: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
    atomic_write(path, write)


def preprocess_subject(subject: Subject, config: DDMConfig) -> np.ndarray:
    """ED -> ES pair on the model grid, normalised to [-1, 1]: float32 (2, *spatial) = [source, target]."""
    pair = subject.load_pair()
    source, target, _ = to_model_grid(pair.source, pair.target, config.image_size, config.spacing,
                                      source_name=f"{subject.id} ED", target_name=f"{subject.id} ES")
    return np.stack([source, target]).astype(np.float32)


def preprocess_cycle(subject: Subject, config: DDMConfig) -> np.ndarray:
    """Every frame of the subject's cine on the model grid around its ED frame, each normalised to
    [-1, 1]: float16 (n_frames, *spatial) (half the memory; the networks see float32). A subject
    without a cine (a CSV pair, an ACDC folder without its 4D file) gives [ED, ES]."""
    if subject.kind == "pairs" or not subject.has_cine:
        return preprocess_subject(subject, config).astype(np.float16)
    cycle = subject.load_cycle()
    ed = cycle[subject.ed]
    _, _, mapping = to_model_grid(ed, ed, config.image_size, config.spacing,
                                  source_name=f"{subject.id} ED", target_name=f"{subject.id} ED")
    return np.stack([mapping.image_to_model(frame) for frame in cycle]).astype(np.float16)


def prepare_pairs(subjects: list[Subject], config: DDMConfig, cache_dir: Path | None, write_cache: bool,
                  reporter: Reporter, whole_cine: bool = False) -> tuple[list[str], Any]:
    """All data in memory once (an epoch never re-reads NIfTI); a subject that fails is skipped, warned.

    ED -> ES pairs: one (n, 2, *spatial) tensor. `whole_cine`: one (n_frames, *spatial) tensor per
    subject, every frame of its cine."""
    ids, arrays = [], []
    for subject in subjects:
        kind = "cycle" if whole_cine else "pair"
        path = cache_dir / f"{subject.id}-{kind}-{_cache_key(subject, config)}.npy" if cache_dir else None
        array = _load_cached(path)
        if array is None:
            try:
                array = preprocess_cycle(subject, config) if whole_cine else preprocess_subject(subject, config)
            except (InputError, RuntimeError, ValueError) as err:
                reporter.warn(f"skipping {subject.id}: {err}")
                continue
            if path is not None and write_cache:
                _save_cached(path, array)
        ids.append(subject.id)
        arrays.append(array)
    if whole_cine:
        return ids, [torch.from_numpy(a) for a in arrays]
    stack = torch.from_numpy(np.stack(arrays)) if arrays else torch.empty(0)
    return ids, stack


def draw_frames(n_frames: int, rng: np.random.Generator, identity_fraction: float = RUN.identity_fraction
                ) -> tuple[int, int, int | None, float]:
    """(source, target, in-between frame or None, its gamma) drawn from a cine of n_frames frames.

    Both directions are drawn (j < i is the cine played backwards) and, with `identity_fraction`,
    source = target. The in-between frame is one of those strictly between, at gamma = |k - i| / |j - i|:
    frames are taken as evenly timed, so gamma is normalised time."""
    if n_frames < 2 or rng.random() < identity_fraction:
        i = int(rng.integers(n_frames))
        return i, i, None, 0.0
    i, j = (int(v) for v in rng.choice(n_frames, size=2, replace=False))
    if abs(j - i) < 2:
        return i, j, None, 0.0
    step = 1 if j > i else -1
    k = int(rng.choice(np.arange(i + step, j, step)))
    return i, j, k, abs(k - i) / abs(j - i)
