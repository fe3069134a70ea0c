"""Writing subjects and data sets in the ACDC layout, and the `ddm4d phantom` command."""
from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

from .. import files
from ..errors import InputError
from ..io import write_cine, write_image
from .defaults import LABEL_NAMES, MAX_PATIENTS, PHANTOM_FORMAT
from .montage import _check_png_path, save_montage
from .subject import PhantomSubject, _check_options, _check_seed, _is_int, make_subject, subject_seed


def _patient_name(index: int) -> str:
    return f"patient{index:03d}"


def write_subject(subject: PhantomSubject, patient_dir: str | os.PathLike) -> Path:
    """Write one subject in the ACDC layout (plus the 4D labels and a phantom.json of the truth).

    Every file is written atomically (ddm4d.files), so a reader never sees a half-written file; frame
    files of an earlier run that are no longer ED/ES go. The folder must be new, empty or written by
    ddm4d phantom (its phantom.json): a real patient's files are never overwritten."""
    folder = Path(patient_dir)
    _check_patient_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = folder.name
    files.write_text(folder / "Info.cfg", subject.info_cfg())
    write_cine(subject.images, folder / f"{name}_4d.nii.gz")  # time axis: origin 0, spacing 1
    write_cine(subject.labels, folder / f"{name}_4d_gt.nii.gz")
    keep = set()
    for index in sorted({subject.ed, subject.es}):
        stem = f"{name}_frame{index + 1:02d}"
        write_image(subject.images[index], folder / f"{stem}.nii.gz")
        write_image(subject.labels[index], folder / f"{stem}_gt.nii.gz")
        keep |= {f"{stem}.nii.gz", f"{stem}_gt.nii.gz"}
    stale = re.compile(rf"{re.escape(name)}_frame\d+(_gt)?\.nii\.gz")
    for path in folder.iterdir():
        if stale.fullmatch(path.name) and path.name not in keep:
            path.unlink()
    truth = {
        "format": PHANTOM_FORMAT,
        "seed": subject.seed,
        "n_frames": subject.n_frames,
        "ed": subject.ed + 1,
        "es": subject.es + 1,
        "ejection_fraction": subject.ejection_fraction,
        "contraction": [round(float(v), 6) for v in subject.contraction],
        "lv_cavity_ml": [round(float(v), 4) for v in subject.lv_cavity_ml],
        "myocardium_ml": [round(float(v), 4) for v in subject.myocardium_ml],
        "twist_deg_apex_base": [[round(float(v), 4) for v in row] for row in subject.twist_deg],
        "labels": {str(k): v for k, v in LABEL_NAMES.items()},
        "note": "ed/es are 1-based frame numbers, as in Info.cfg; volumes are analytic",
    }
    files.write_text(folder / "phantom.json", json.dumps(truth, indent=1) + "\n")
    return folder


def _written_by_phantom(folder: Path) -> bool:
    """phantom.json of ddm4d phantom (its format, or the keys of one written before the format was)."""
    try:
        truth = json.loads((folder / "phantom.json").read_text())
    except (OSError, ValueError):
        return False
    legacy = {"seed", "n_frames", "ed", "es", "contraction", "note"}
    return isinstance(truth, dict) and (truth.get("format") == PHANTOM_FORMAT or legacy <= truth.keys())


def _check_patient_folder(folder: Path) -> None:
    """Refuse a patient folder that holds files ddm4d phantom did not write (e.g. a real patient's)."""
    if folder.is_dir() and any(folder.iterdir()) and not _written_by_phantom(folder):
        shown = sorted(p.name for p in folder.iterdir())
        raise InputError(f"{folder} holds files that ddm4d phantom did not write ({', '.join(shown[:3])}"
                         f"{', …' if len(shown) > 3 else ''}); choose an empty or new output folder")
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} exists and is a file; choose an empty or new output folder")


def _prepare_output(out_dir) -> Path:
    """Create the output folder or say clearly why it cannot be used."""
    files.check_writable(out_dir, "output folder")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create output folder {out} ({err.strerror}); choose a writable folder") from None
    return out


def _iter_dataset(out_dir, n_subjects, seed, first_index, **subject_kwargs):
    """Yield (patient folder, subject) as each subject is generated and written."""
    if not (_is_int(n_subjects) and n_subjects >= 1):
        raise InputError(f"the number of subjects (--subjects) must be at least 1, got {n_subjects}; try 5")
    if not (_is_int(first_index) and first_index >= 1 and first_index + n_subjects - 1 <= MAX_PATIENTS):
        raise InputError(f"patient numbers must lie in 1..{MAX_PATIENTS}, got {first_index}.."
                         f"{first_index + n_subjects - 1}; write fewer subjects")
    _check_seed(seed)
    _check_options(**{k: v for k, v in subject_kwargs.items() if k != "defaults"})
    out = _prepare_output(out_dir)
    for index in range(first_index, first_index + int(n_subjects)):  # all of them before any work
        _check_patient_folder(out / _patient_name(index))
    for index in range(first_index, first_index + int(n_subjects)):
        subject = make_subject(subject_seed(seed, index), **subject_kwargs)
        yield write_subject(subject, out / _patient_name(index)), subject


def write_dataset(out_dir, n_subjects: int = 5, seed: int = 0, first_index: int = 1, **subject_kwargs) -> list[Path]:
    """Write patient001, patient002, … in the ACDC layout; returns the patient folders.

    Subject i is ``make_subject(subject_seed(seed, i), **subject_kwargs)``, so a data set is
    reproducible and extending it (a larger ``n_subjects``) keeps the earlier subjects."""
    return [folder for folder, _ in _iter_dataset(out_dir, n_subjects, seed, first_index, **subject_kwargs)]


# ----------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write patient001, patient002, … into (a "
                        "patient folder holding files that ddm4d phantom did not write is refused, never overwritten)")
    parser.add_argument("--subjects", type=int, default=5, metavar="N", help="number of subjects (default 5)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed of the data set (default 0)")
    parser.add_argument("--frames", type=int, metavar="N", help="frames per cycle (default: drawn in 12..25)")
    parser.add_argument("--size", type=int, nargs=3, metavar=("NX", "NY", "NZ"),
                        help="grid size in voxels (default: ACDC-like, drawn per subject)")
    parser.add_argument("--montage", metavar="PNG", help="also save a montage of the first subject to this PNG")


def main(args: argparse.Namespace) -> int:
    """Write the data set and print one line per subject (folder, frames, ED/ES, EF)."""
    if args.montage:
        _check_png_path(args.montage)
    kwargs = {"n_frames": args.frames, "size": tuple(args.size) if args.size else None}
    first = None
    for folder, subject in _iter_dataset(args.out_dir, args.subjects, args.seed, 1, **kwargs):
        first = first or folder
        print(f"{folder}: {subject.n_frames} frames, ED {subject.ed + 1}, ES {subject.es + 1}, "
              f"EF {subject.ejection_fraction:.2f}", flush=True)
    if args.montage:
        print(f"montage: {save_montage(first, args.montage)}")
    return 0
