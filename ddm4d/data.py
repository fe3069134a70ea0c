"""Data sets: ACDC-layout folders and pairs CSV files, checked up front.

Why up front: a training run of hours must not die on patient 73's truncated file. `scan_dataset`
checks every subject cheaply (headers, frame numbers, label values of the small _gt files), records
each problem (subject, file, what is wrong) and skips that subject; the rest loads.

ACDC layout (frame numbers in file names and Info.cfg are 1-based; ddm4d uses 0-based indices):

    DATA_DIR/patient001/Info.cfg                       ED: 1 / ES: 12 / NbFrame: 30
    DATA_DIR/patient001/patient001_4d.nii.gz           4D cine (x, y, z, t)
    DATA_DIR/patient001/patient001_frame01.nii.gz      ED frame, and patient001_frame01_gt.nii.gz labels
    DATA_DIR/patient001/patient001_frame12.nii.gz      ES frame, and its _gt file
    DATA_DIR/patient001/patient001_4d_gt.nii.gz        optional (ddm4d phantom): labels on every frame

Labels: 0 background, 1 RV cavity, 2 myocardium, 3 LV cavity.
A pairs CSV has the header ``source,target[,source_labels,target_labels]`` (optional ``id``); paths
may be relative to the CSV's folder; a source or target may be a DICOM series folder.
"""
from __future__ import annotations

import csv
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .geometry import same_geometry
from .io import _check_label_values, check_complete, read_cine, read_image, read_info, read_labels

__all__ = ["ACDC_LABELS", "Problem", "Pair", "Sequence", "Subject", "Dataset", "scan_dataset", "frame_order"]

#: label values allowed in ACDC ground truth: background, RV cavity, myocardium, LV cavity
ACDC_LABELS = (0, 1, 2, 3)
#: progress(done, total, subject) of a data scan
Progress = Callable[[int, int, str], None]
_EXTS = (".nii.gz", ".nii")
_LAYOUT_HINT = ("expected ACDC layout (DATA_DIR/patient001/Info.cfg, patient001_4d.nii.gz, "
                "patient001_frame01.nii.gz, …) or a CSV with columns source,target")


@dataclass(frozen=True)
class Problem:
    """Why one subject was skipped: which subject, which file, what is wrong (and how to fix it)."""

    subject: str
    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.subject}: {self.file}: {self.message}"


@dataclass
class Pair:
    """Two phases as SimpleITK images (LPS mm); labels are uint8 images or None."""

    source: sitk.Image
    target: sitk.Image
    source_labels: sitk.Image | None = None
    target_labels: sitk.Image | None = None
    subject: str = ""


@dataclass
class Sequence:
    """Frames from source (ED) to target (ES) in acquisition order; labels per frame or None."""

    frames: list[sitk.Image]
    labels: list[sitk.Image | None]
    frame_indices: list[int]  # 0-based frame index in the cardiac cycle of each frame
    subject: str = ""

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def gammas(self) -> list[float]:
        """Position of each frame between source (0) and target (1), assuming uniform frame timing."""
        n = len(self.frames)
        return [k / (n - 1) for k in range(n)] if n > 1 else [0.0]


def frame_order(ed: int, es: int, n_frames: int) -> list[int]:
    """0-based frames from ED to ES inclusive, wrapping past the last frame to 0 when ES < ED."""
    if not (0 <= ed < n_frames and 0 <= es < n_frames):
        raise ValueError(f"ed={ed} and es={es} must be in 0..{n_frames - 1}")
    if es >= ed:
        return list(range(ed, es + 1))
    return list(range(ed, n_frames)) + list(range(0, es + 1))


@dataclass
class Subject:
    """One training/evaluation unit: an ACDC patient or one row of a pairs CSV.

    `ed`/`es` are 0-based frame indices, `n_frames` the cycle length (2 for a CSV pair). `paths` keys:
    ACDC: "info", "ed", "es", optional "ed_gt", "es_gt", "cine", "gt4d"; CSV: "source", "target",
    optional "source_labels", "target_labels". `size`/`spacing` are the source's (x, y, z; mm).
    """

    id: str
    folder: Path
    ed: int
    es: int
    n_frames: int
    paths: dict[str, Path]
    kind: str = "acdc"
    size: tuple[int, ...] = ()
    spacing: tuple[float, ...] = ()

    @property
    def has_labels(self) -> bool:
        return ("ed_gt" in self.paths and "es_gt" in self.paths) or \
            ("source_labels" in self.paths and "target_labels" in self.paths)

    @property
    def has_cine(self) -> bool:
        return "cine" in self.paths

    @property
    def frame_indices(self) -> list[int]:
        return frame_order(self.ed, self.es, self.n_frames)

    def load_pair(self) -> Pair:
        """Source (ED) and target (ES) as float32 images; their labels as uint8 images when present."""
        if self.kind == "pairs":
            keys = ("source", "target", "source_labels", "target_labels")
        else:
            keys = ("ed", "es", "ed_gt", "es_gt")
        p = self.paths
        return Pair(read_image(p[keys[0]]), read_image(p[keys[1]]),
                    read_labels(p[keys[2]]) if keys[2] in p else None,
                    read_labels(p[keys[3]]) if keys[3] in p else None, self.id)

    def load_cycle(self) -> list[sitk.Image]:
        """Every frame of the 4D cine (the whole cycle, 0-based), checked against Info.cfg's NbFrame."""
        if not self.has_cine:
            raise InputError(f"{self.id}: has no 4D cine ({self.id}_4d.nii.gz); only its ED and ES frames exist")
        cine = read_cine(self.paths["cine"])
        if len(cine) != self.n_frames:
            raise InputError(f"{self.paths['cine']}: has {len(cine)} frames but Info.cfg says NbFrame: "
                             f"{self.n_frames}; fix Info.cfg or the 4D file")
        return cine

    def load_sequence(self) -> Sequence:
        """All frames ED..ES (inclusive, wrapping around the cycle when ES < ED), from the 4D cine.

        Labels: every frame from the 4D ground truth when present, else only at both ends (None in
        between). A CSV pair, or an ACDC patient without a 4D cine, gives just [source, target].
        """
        if self.kind == "pairs" or not self.has_cine:
            pair = self.load_pair()
            return Sequence([pair.source, pair.target], [pair.source_labels, pair.target_labels],
                            [self.ed, self.es], self.id)
        order = self.frame_indices
        cine = read_cine(self.paths["cine"])
        if len(cine) != self.n_frames:
            raise InputError(f"{self.paths['cine']}: has {len(cine)} frames but Info.cfg says NbFrame: "
                             f"{self.n_frames}; fix Info.cfg or the 4D file")
        frames = [cine[t] for t in order]
        labels: list[sitk.Image | None] = [None] * len(order)
        if "gt4d" in self.paths:
            all_labels = _read_label_cine(self.paths["gt4d"])
            labels = [all_labels[t] for t in order]
        else:
            if "ed_gt" in self.paths:
                labels[0] = read_labels(self.paths["ed_gt"])
            if "es_gt" in self.paths:
                labels[-1] = read_labels(self.paths["es_gt"])
        for lab, frame in zip(labels, frames):
            if lab is not None and same_geometry(lab, frame, tol=1e-3):
                lab.CopyInformation(frame)  # same grid; drop float noise between the two files
        return Sequence(frames, labels, order, self.id)


def _read_label_cine(path: Path) -> list[sitk.Image]:
    check_complete(path)
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    _check_label_values(path, array, 255, ACDC_LABELS)
    dim = image.GetDimension()
    direction = np.asarray(image.GetDirection()).reshape(dim, dim)[:3, :3].ravel()
    out = []
    for t in range(array.shape[0] if dim == 4 else 1):
        frame = sitk.GetImageFromArray(array[t].astype(np.uint8) if dim == 4 else array.astype(np.uint8))
        frame.SetOrigin(image.GetOrigin()[:3])
        frame.SetSpacing(image.GetSpacing()[:3])
        frame.SetDirection(tuple(direction))
        out.append(frame)
    return out


@dataclass
class Dataset:
    """Subjects that passed the checks, and the problems of those that did not."""

    root: Path
    subjects: list[Subject] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    kind: str = "acdc"

    def __len__(self) -> int:
        return len(self.subjects)

    def __iter__(self) -> Iterator[Subject]:
        return iter(self.subjects)

    def __getitem__(self, key: int | str) -> Subject:
        if isinstance(key, str):
            for s in self.subjects:
                if s.id == key:
                    return s
            raise KeyError(key)
        return self.subjects[key]

    def summary(self) -> dict:
        """Counts, image sizes and spacings seen (JSON-ready; shown before training starts)."""
        def fmt(values, f):
            return "x".join(f(v) for v in values)
        sizes = Counter(fmt(s.size, str) for s in self.subjects if s.size)
        spacings = Counter(fmt(s.spacing, lambda v: f"{v:.3g}") for s in self.subjects if s.spacing)
        frames = [s.n_frames for s in self.subjects]
        return {
            "root": str(self.root),
            "kind": self.kind,
            "n_subjects": len(self.subjects),
            "n_skipped": len({p.subject for p in self.problems}),
            "n_problems": len(self.problems),
            "n_with_labels": sum(s.has_labels for s in self.subjects),
            "n_with_cine": sum(s.has_cine for s in self.subjects),
            "n_with_labels_every_frame": sum("gt4d" in s.paths for s in self.subjects),
            "frames_per_cycle": {"min": min(frames), "max": max(frames)} if frames else None,
            "sizes": dict(sizes.most_common()),
            "spacings_mm": dict(spacings.most_common()),
            "problems": [str(p) for p in self.problems],
        }

    def split(self, validation_fraction: float = 0.1, seed: int = 0) -> tuple["Dataset", "Dataset"]:
        """Deterministic (train, validation) split by subject: same ids and seed give the same split.

        At least one subject goes to validation when the fraction is > 0 and there are 2+ subjects.
        """
        if not 0.0 <= validation_fraction < 1.0:
            raise InputError(f"validation fraction must be in [0, 1), got {validation_fraction}")
        ids = sorted(s.id for s in self.subjects)
        random.Random(seed).shuffle(ids)
        n = len(ids)
        n_val = int(round(validation_fraction * n))
        if validation_fraction > 0 and n >= 2:
            n_val = min(max(n_val, 1), n - 1)
        val_ids = set(ids[:n_val])
        train = [s for s in self.subjects if s.id not in val_ids]
        val = [s for s in self.subjects if s.id in val_ids]
        return (Dataset(self.root, train, list(self.problems), self.kind),
                Dataset(self.root, val, [], self.kind))

    def require_subjects(self, minimum: int = 1) -> "Dataset":
        """Raise InputError listing the problems when fewer than `minimum` subjects are usable."""
        if len(self.subjects) < minimum:
            listed = "; ".join(str(p) for p in self.problems[:5])
            more = f" (and {len(self.problems) - 5} more)" if len(self.problems) > 5 else ""
            raise InputError(f"{self.root}: {len(self.subjects)} usable subject(s), {minimum} needed; "
                             f"problems: {listed or 'none'}{more}")
        return self


# ----------------------------------------------------------------------------------------------- checks

class _Skip(Exception):
    def __init__(self, file, message):
        super().__init__(message)
        self.file = str(file)
        self.message = message


def _find(folder: Path, stem: str) -> Path | None:
    for ext in _EXTS:
        p = folder / (stem + ext)
        if p.is_file():
            return p
    return None


def _parse_info(path: Path) -> dict[str, str]:
    values = {}
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise _Skip(path, f"cannot be read ({exc.strerror}); check its permissions") from None
    for line in text.splitlines():
        if ":" in line:
            key, _, value = line.partition(":")
            values[key.strip()] = value.strip()
    return values


def _info_int(info: dict[str, str], key: str, path: Path) -> int:
    if key not in info:
        raise _Skip(path, f"has no '{key}:' line; Info.cfg needs ED, ES and NbFrame, e.g. 'ED: 1', "
                          "'ES: 12', 'NbFrame: 30'")
    try:
        value = float(info[key])
        if value != int(value):
            raise ValueError
        return int(value)
    except ValueError:
        raise _Skip(path, f"'{key}: {info[key]}' is not a whole number; write e.g. '{key}: 1'") from None


def _header(path: Path, dims: tuple[int, ...], what: str):
    """Header of `path`, refusing unreadable/truncated files and the wrong dimension."""
    try:
        check_complete(path)
        info = read_info(path)
    except InputError as exc:
        raise _Skip(path, _strip_path(str(exc), path)) from None
    if info.components != 1:
        raise _Skip(path, f"has {info.components} components per voxel; {what} must be a scalar image")
    if info.dimension not in dims:
        shape = " x ".join(str(s) for s in info.size)
        raise _Skip(path, f"is {info.dimension}D ({shape}); {what} must be "
                          f"{' or '.join(f'{d}D' for d in dims)}")
    if info.n_frames > 1 and 4 not in dims:
        raise _Skip(path, f"is a multi-frame cine ({info.n_frames} frames); {what} must be one volume")
    return info


def _strip_path(message: str, path: Path) -> str:
    prefix = f"{path}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def _check_labels(path: Path, frame_info, what: str) -> None:
    info = _header(path, (3,) if what != "4D labels" else (4,), what)
    if frame_info is not None and tuple(info.size) != tuple(frame_info.size):
        raise _Skip(path, f"has size {'x'.join(map(str, info.size))} but its image has "
                          f"{'x'.join(map(str, frame_info.size))}; labels must be on the image's grid")
    try:
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        _check_label_values(path, array, 255, ACDC_LABELS)
    except InputError as exc:
        raise _Skip(path, _strip_path(str(exc), path)) from None
    except RuntimeError as exc:
        raise _Skip(path, f"cannot be read ({str(exc).strip().splitlines()[-1]})") from None


def _scan_patient(folder: Path) -> Subject:
    name = folder.name
    info_path = folder / "Info.cfg"
    if not info_path.is_file():
        raise _Skip(info_path, "is missing; each patient folder needs an Info.cfg with lines "
                               "'ED: <frame>', 'ES: <frame>', 'NbFrame: <count>' (1-based frames)")
    info = _parse_info(info_path)
    ed1, es1, nb = (_info_int(info, k, info_path) for k in ("ED", "ES", "NbFrame"))
    if nb < 1:
        raise _Skip(info_path, f"NbFrame: {nb} must be at least 1")
    for key, value in (("ED", ed1), ("ES", es1)):
        if not 1 <= value <= nb:
            raise _Skip(info_path, f"{key}: {value} is outside 1..NbFrame ({nb}); frame numbers are 1-based "
                                   "and must not exceed NbFrame")
    paths: dict[str, Path] = {"info": info_path}
    frame_infos = {}
    for key, number in (("ed", ed1), ("es", es1)):
        stem = f"{name}_frame{number:02d}"
        p = _find(folder, stem)
        if p is None:
            raise _Skip(folder / (stem + ".nii.gz"), f"is missing: Info.cfg says {key.upper()}: {number}, so this "
                                                   "frame file must exist (1-based, two digits)")
        frame_infos[key] = _header(p, (3,), f"the {key.upper()} frame")
        paths[key] = p
        gt = _find(folder, stem + "_gt")
        if gt is not None:
            _check_labels(gt, frame_infos[key], "a label map")
            paths[key + "_gt"] = gt
    cine = _find(folder, f"{name}_4d")
    if cine is not None:
        cinfo = _header(cine, (4,), "the 4D cine")
        if cinfo.size[3] != nb:
            raise _Skip(cine, f"has {cinfo.size[3]} frames but Info.cfg says NbFrame: {nb}; fix one of them")
        if tuple(cinfo.size[:3]) != tuple(frame_infos["ed"].size):
            raise _Skip(cine, f"has frames of {'x'.join(map(str, cinfo.size[:3]))} voxels but the ED frame "
                              f"has {'x'.join(map(str, frame_infos['ed'].size))}; they must match")
        paths["cine"] = cine
        gt4d = _find(folder, f"{name}_4d_gt")
        if gt4d is not None:
            _check_labels(gt4d, cinfo, "4D labels")
            paths["gt4d"] = gt4d
    ed_info = frame_infos["ed"]
    return Subject(name, folder, ed1 - 1, es1 - 1, nb, paths, "acdc", tuple(ed_info.size),
                   tuple(float(v) for v in ed_info.spacing))


def _scan_acdc(root: Path, folders: list[Path], progress: Progress | None = None) -> Dataset:
    dataset = Dataset(root.resolve(), kind="acdc")
    for number, folder in enumerate(folders):
        if progress is not None:
            progress(number, len(folders), folder.name)
        try:
            dataset.subjects.append(_scan_patient(folder))
        except _Skip as skip:
            dataset.problems.append(Problem(folder.name, skip.file, skip.message))
    return dataset


_CSV_COLUMNS = ("source", "target", "source_labels", "target_labels")


def _scan_pairs(csv_path: Path, progress: Progress | None = None) -> Dataset:
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [(h or "").strip() for h in (reader.fieldnames or [])]
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{csv_path}: cannot be read as a CSV file ({exc}); expected a header "
                         "source,target[,source_labels,target_labels]") from None
    if "source" not in header or "target" not in header:
        raise InputError(f"{csv_path}: has columns {header or '(none)'}; expected a header line "
                         "source,target[,source_labels,target_labels] (paths relative to the CSV's folder)")
    if not rows:
        raise InputError(f"no patient folders or pairs found in {csv_path}; the CSV has a header but no rows")
    base = csv_path.parent
    dataset = Dataset(csv_path.resolve(), kind="pairs")
    seen: Counter = Counter()
    for n, raw in enumerate(rows, start=1):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
        sid = row.get("id") or f"pair{n:03d}"
        if progress is not None:
            progress(n - 1, len(rows), sid)
        seen[sid] += 1
        if seen[sid] > 1:
            sid = f"{sid}_{seen[sid]}"
        try:
            dataset.subjects.append(_scan_pair_row(sid, row, base, csv_path, n + 1))
        except _Skip as skip:
            dataset.problems.append(Problem(sid, skip.file, skip.message))
    return dataset


def _scan_pair_row(sid: str, row: dict[str, str], base: Path, csv_path: Path, line: int) -> Subject:
    paths: dict[str, Path] = {}
    for key in _CSV_COLUMNS:
        value = row.get(key, "")
        if not value:
            if key in ("source", "target"):
                raise _Skip(csv_path, f"line {line}: the {key} column is empty; every row needs a source and "
                                      "a target path")
            continue
        p = Path(value).expanduser()
        p = p if p.is_absolute() else base / p
        if not p.exists():
            raise _Skip(p, f"is missing (line {line} of {csv_path.name}, column {key}); relative paths are "
                           f"relative to {base}")
        paths[key] = p
    infos = {}
    for key in ("source", "target"):
        infos[key] = _header(paths[key], (2, 3), f"the {key}")
    for key, img in (("source_labels", "source"), ("target_labels", "target")):
        if key in paths:
            info = _header(paths[key], (2, 3), "a label map")
            if tuple(info.size) != tuple(infos[img].size):
                raise _Skip(paths[key], f"has size {'x'.join(map(str, info.size))} but the {img} has "
                                        f"{'x'.join(map(str, infos[img].size))}; labels must be on its grid")
            try:
                array = sitk.GetArrayFromImage(sitk.ReadImage(str(paths[key])))
                _check_label_values(paths[key], array, 255)
            except InputError as exc:
                raise _Skip(paths[key], _strip_path(str(exc), paths[key])) from None
    src = infos["source"]
    size = tuple(src.size) + ((1,) if src.dimension == 2 else ())
    spacing = tuple(float(v) for v in src.spacing) + ((1.0,) if src.dimension == 2 else ())
    return Subject(sid, base, 0, 1, 2, paths, "pairs", size, spacing)


def scan_dataset(path, progress: Progress | None = None) -> Dataset:
    """Check an ACDC-layout folder (patient* subfolders) or a pairs CSV; never stops at a bad subject.

    A folder without patient* subfolders but with a pairs.csv is read as that CSV. Raises InputError
    only when nothing usable is there at all (no folder, no patients, no pairs). `progress(done, total,
    subject)` is called before each subject is read (a large folder takes a while).
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise InputError(f"{root}: not found; pass a data folder in the ACDC layout or a pairs CSV")
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise InputError(f"{root}: is a file but not a .csv; pass a data folder ({_LAYOUT_HINT})")
        return _scan_pairs(root, progress)
    if (root / "Info.cfg").is_file():  # one patient folder given directly
        return _scan_acdc(root.parent, [root], progress)
    folders = sorted((p for p in root.iterdir() if p.is_dir() and re.match(r"(?i)patient", p.name)),
                     key=lambda p: p.name)
    if folders:
        return _scan_acdc(root, folders, progress)
    if (root / "pairs.csv").is_file():
        return _scan_pairs(root / "pairs.csv", progress)
    nested = sorted(p.name for p in root.iterdir() if p.is_dir() and any(
        q.is_dir() and q.name.lower().startswith("patient") for q in p.iterdir()))
    hint = f" (the subfolder(s) {', '.join(nested)} hold patient folders: pass one of them)" if nested else ""
    raise InputError(f"no patient folders or pairs found in {root}{hint}; {_LAYOUT_HINT}")
