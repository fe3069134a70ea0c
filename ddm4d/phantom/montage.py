"""save_montage: a PNG of a mid-ventricular slice over the cycle, for a person to check the phantom."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .defaults import LABEL_LV
from .subject import PhantomSubject


def _load_patient(folder: Path) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(images t z y x, labels t z y x, ed, es) of an ACDC-layout patient folder with 4D labels."""
    name = folder.name
    image_file, label_file = folder / f"{name}_4d.nii.gz", folder / f"{name}_4d_gt.nii.gz"
    if not image_file.is_file() or not label_file.is_file():
        raise InputError(f"{folder} has no {image_file.name} and {label_file.name}; write it with `ddm4d phantom`")
    info = dict(
        line.split(":", 1) for line in (folder / "Info.cfg").read_text().splitlines() if ":" in line
    )
    # not io.read_cine: it returns float32, whose 99.5th percentile (the grey window) can differ from
    # the int16 file's in the last digits, and it refuses a constant label map
    images = sitk.GetArrayFromImage(sitk.ReadImage(str(image_file)))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(label_file)))
    return images, labels, int(info["ED"]) - 1, int(info["ES"]) - 1


def _patient_folder(path: Path) -> Path:
    if (path / "Info.cfg").is_file():
        return path
    patients = sorted(p for p in path.glob("patient*") if (p / "Info.cfg").is_file())
    if not patients:
        raise InputError(f"no patient folder with Info.cfg under {path}; pass a data set written by `ddm4d phantom`")
    return patients[0]


def save_montage(subject_or_dir, png_path, n_columns: int = 8) -> Path:
    """PNG of a mid-ventricular slice over the cycle (top) and the same with labels overlaid
    (bottom), so a person can check at a glance that the phantom looks and moves like cine MR.

    Accepts a PhantomSubject, a patient folder or a data-set folder (its first patient)."""
    from matplotlib.colors import ListedColormap

    from ..plotting import figure as new_figure, save_png

    if isinstance(subject_or_dir, PhantomSubject):
        s = subject_or_dir
        images, labels = s.image_array(), s.label_array()
        ed, es, title = s.ed, s.es, f"phantom (EF {s.ejection_fraction:.2f})"
    else:
        folder = _patient_folder(Path(subject_or_dir))
        images, labels, ed, es = _load_patient(folder)
        title = folder.name
    n = images.shape[0]
    frames = sorted({ed, es} | set(np.linspace(0, n - 1, min(n, n_columns)).round().astype(int).tolist()))
    frames = frames[: max(n_columns, 2)] if len(frames) <= n_columns else _thin(frames, n_columns, {ed, es})
    lv_slices = np.flatnonzero((labels[ed] == LABEL_LV).any(axis=(1, 2)))
    mid = int(np.median(lv_slices)) if lv_slices.size else images.shape[1] // 2
    crop = _zoom_on_heart(labels[ed, mid])
    images, labels = images[:, mid][(slice(None), *crop)], labels[:, mid][(slice(None), *crop)]
    high = float(np.percentile(images, 99.5)) or 1.0
    colours = ListedColormap([(0, 0, 0, 0), (0.2, 0.5, 1, 0.45), (0.1, 0.9, 0.2, 0.45), (1, 0.2, 0.2, 0.45)])

    figure = new_figure(2.0 * len(frames), 4.3, dpi=110)
    axes = figure.subplots(2, len(frames), squeeze=False)
    for column, t in enumerate(frames):
        tag = " (ED)" if t == ed else " (ES)" if t == es else ""
        for row in range(2):
            ax = axes[row, column]
            ax.imshow(images[t], cmap="gray", vmin=0, vmax=high, interpolation="nearest")
            if row == 1:
                ax.imshow(labels[t], cmap=colours, vmin=0, vmax=3, interpolation="nearest")
            ax.set_axis_off()
        axes[0, column].set_title(f"frame {t + 1}{tag}", fontsize=8)
    figure.suptitle(f"{title}: slice {mid + 1}; labels RV blue, myocardium green, LV red", fontsize=9)
    figure.tight_layout()
    png_path = _check_png_path(png_path)
    return save_png(figure, png_path)


def _check_png_path(png_path) -> Path:
    path = Path(png_path)
    if path.suffix.lower() != ".png":
        raise InputError(f"the montage must be a .png file, got {path}; try montage.png")
    if path.is_dir():
        raise InputError(f"the montage path {path} is a folder; give a file name such as {path / 'montage.png'}")
    existing = next((p for p in path.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise InputError(f"cannot write the montage {path}: {existing} is a file; choose another path")
    return path


def _zoom_on_heart(labels: np.ndarray, zoom: float = 2.2) -> tuple[slice, slice]:
    """Square (y, x) window ``zoom`` times the labelled heart, clipped to the slice: the heart
    fills the panel and the lungs either side stay in view."""
    ys, xs = np.nonzero(labels)
    if ys.size == 0:
        return slice(None), slice(None)
    half = int(np.ceil(zoom * max(np.ptp(ys), np.ptp(xs)) / 2))
    cy, cx = (ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2
    return tuple(slice(max(c - half, 0), min(c + half + 1, n)) for c, n in zip((cy, cx), labels.shape))


def _thin(frames: list[int], count: int, keep: set[int]) -> list[int]:
    """At most ``count`` frames spread over the list, always keeping ED and ES."""
    others = [f for f in frames if f not in keep]
    picks = np.linspace(0, len(others) - 1, max(count - len(keep), 0)).round().astype(int)
    return sorted(keep | {others[i] for i in picks})
