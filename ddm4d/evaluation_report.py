"""The report of `ddm4d evaluate` (ddm4d.evaluation): statistics over subjects, Table 1 in Markdown,
the plots, report.json.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import files
from .methods import DDM_METHOD, EVALUATION_METHODS
from .metrics import STRUCTURE_NAMES, psnr_from_mse
from .plotting import figure, save_png

REPORT_FILES = ("report.json", "table1.md", "fig4_boxplots.png", "dice_boxplots.png", "psnr_vs_frame.png")
NORMALISED_RANGE = (-1.0, 1.0)  # the model's input range; PSNR's data_range is its width
PSNR_DATA_RANGE = NORMALISED_RANGE[1] - NORMALISED_RANGE[0]
REFERENCE_METHOD = DDM_METHOD  # the paired tests compare every other method with this one
TESTED_METRICS = ("psnr_db", "nmse", "dice_total")
MIN_PAIRED_SUBJECTS = 2
PLOT_DPI = 110


# ------------------------------------------------------------------------------------------ aggregate

def _mean_std(values: Sequence[float]) -> dict[str, Any]:
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = int(finite.size)
    return {"mean": float(finite.mean()) if n else math.nan,
            "std": float(finite.std(ddof=1)) if n > 1 else math.nan,
            "median": float(np.median(finite)) if n else math.nan, "n": n}


def aggregate(subjects: list[dict[str, Any]], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Mean, sample std (ddof 1), median and count over subjects of each per-subject summary value."""
    out: dict[str, dict[str, Any]] = {}
    for method in methods:
        rows = [s["methods"][method]["summary"] for s in subjects]
        out[method] = {metric: _mean_std([r[metric] for r in rows]) for metric in rows[0]}
    return out


def _paired_p_values(x: np.ndarray, y: np.ndarray) -> tuple[float, float, str]:
    """(t-test p, Wilcoxon p, note) of paired samples; NaN with a reason where a test is undefined."""
    from scipy import stats

    diff = x - y
    if x.size < MIN_PAIRED_SUBJECTS:
        return math.nan, math.nan, f"{x.size} paired subject(s); the tests need at least {MIN_PAIRED_SUBJECTS}"
    if not np.any(diff):
        return math.nan, math.nan, "all differences are zero; the methods agree on every subject"
    notes = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if np.all(diff == diff[0]):  # zero variance: t is infinite and its p meaningless
            t_p = math.nan
            notes.append("t-test undefined: every difference is the same (zero variance)")
        else:
            t_p = float(stats.ttest_rel(x, y).pvalue)
        try:
            w_p = float(stats.wilcoxon(x, y).pvalue)
        except ValueError as err:
            w_p = math.nan
            notes.append(f"Wilcoxon undefined: {err}")
    return t_p, w_p, "; ".join(notes)


def paired_tests(subjects: list[dict[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    """Paired t-test and Wilcoxon signed-rank of each method against DDM, per tested metric."""
    if REFERENCE_METHOD not in methods:
        return {"note": "DDM was not evaluated, so there is nothing to compare the other methods with"}
    out: dict[str, Any] = {}
    for method in methods:
        if method == REFERENCE_METHOD:
            continue
        out[method] = {}
        for metric in TESTED_METRICS:
            pairs = [(s["methods"][method]["summary"][metric], s["methods"][REFERENCE_METHOD]["summary"][metric])
                     for s in subjects]
            pairs = [(a, b) for a, b in pairs if math.isfinite(a) and math.isfinite(b)]
            x = np.asarray([a for a, _ in pairs], dtype=np.float64)
            y = np.asarray([b for _, b in pairs], dtype=np.float64)
            t_p, w_p, note = _paired_p_values(x, y)
            out[method][metric] = {"n": int(x.size), "mean_difference": float(np.mean(x - y)) if x.size else math.nan,
                                   "ttest_p": t_p, "wilcoxon_p": w_p, "note": note}
    return out


# ------------------------------------------------------------------------------------------ table

_TABLE_COLUMNS = [  # (summary key, header, format)
    ("psnr_db", "PSNR (dB)", "{:.2f}"),
    ("nmse", "NMSE (ratio)", "{:.3e}"),
    ("dice_lv_blood_pool", "Dice LV blood pool", "{:.3f}"),
    ("dice_lv_myocardium", "Dice LV myocardium", "{:.3f}"),
    ("dice_lv_epicardium", "Dice LV epicardium", "{:.3f}"),
    ("dice_rv", "Dice RV", "{:.3f}"),
    ("dice_total", "Dice total", "{:.3f}"),
    ("folding_percent", "Folding (%)", "{:.3f}"),
    ("time_s", "Time / subject (s)", "{:.3f}"),
    ("network_time_s", "Network time (s)", "{:.3f}"),
]


def _missing(value) -> bool:
    """NaN in memory, null once through JSON: both mean 'no value'."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _cell(stat: dict[str, Any], fmt: str) -> str:
    if not stat["n"] or _missing(stat["mean"]):
        return "–"
    text = fmt.format(stat["mean"])
    return text if _missing(stat["std"]) else f"{text} ± {fmt.format(stat['std'])}"


def _p(value) -> str:
    return "–" if _missing(value) else f"{value:.3g}"


def table_rows(report: dict[str, Any]) -> list[str]:
    """The Markdown table itself: a header and one row per method, in the paper's order."""
    agg = report["aggregate"]
    lines = ["| Method | " + " | ".join(h for _, h, _ in _TABLE_COLUMNS) + " |",
             "|---" * (len(_TABLE_COLUMNS) + 1) + "|"]
    for method in report["settings"]["methods"]:
        cells = [_cell(agg[method][key], fmt) for key, _, fmt in _TABLE_COLUMNS]
        lines.append(f"| {EVALUATION_METHODS[method]} | " + " | ".join(cells) + " |")
    return lines


def table_markdown(report: dict[str, Any]) -> str:
    """Table 1 of the paper (rows: methods) with our columns, the paired tests and what each means."""
    settings = report["settings"]
    lines = [f"# Table 1 — {settings['data_dir']} ({report['n_subjects']} subjects)", ""]
    lines += table_rows(report)
    lines += ["", "Mean ± sample standard deviation over subjects; – where a method has no such value.", ""]
    lines += [f"- {note}" for note in report["notes"]]
    lines += _tests_markdown(report["statistics"])
    return "\n".join(lines) + "\n"


def _tests_markdown(statistics: dict[str, Any]) -> list[str]:
    lines = ["", "## Paired tests against DDM (per subject)", ""]
    if "note" in statistics:
        return lines + [statistics["note"]]
    lines += ["| Method | Metric | n | mean difference (method − DDM) | t-test p | Wilcoxon p | note |",
              "|---|---|---|---|---|---|---|"]
    for method, metrics in statistics.items():
        for metric, r in metrics.items():
            diff = "–" if _missing(r["mean_difference"]) else f"{r['mean_difference']:.4g}"
            lines.append(f"| {EVALUATION_METHODS[method]} | {metric} | {r['n']} | {diff} | {_p(r['ttest_p'])} | "
                         f"{_p(r['wilcoxon_p'])} | {r['note']} |")
    return lines


# ------------------------------------------------------------------------------------------ plots

def _boxplot(ax, subjects, methods, metric: str, title: str) -> None:
    data, names = [], []
    for method in methods:
        values = [s["methods"][method]["summary"][metric] for s in subjects]
        values = [v for v in values if math.isfinite(v)]
        if values:
            data.append(values)
            names.append(EVALUATION_METHODS[method])
    if data:
        ax.boxplot(data, tick_labels=names) if _has_tick_labels() else ax.boxplot(data, labels=names)
    else:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)


def _has_tick_labels() -> bool:
    """Matplotlib 3.9 renamed boxplot's `labels` to `tick_labels`."""
    import matplotlib

    major, minor = (int(p) for p in matplotlib.__version__.split(".")[:2])
    return (major, minor) >= (3, 9)


def plot_boxplots(path: Path, subjects, methods) -> None:
    """Fig. 4 of the paper: PSNR, NMSE and (total) Dice per method over subjects."""
    fig = figure(12, 4)
    panels = (("psnr_db", "PSNR (dB)"), ("nmse", "NMSE (ratio)"), ("dice_total", "Dice total (ES)"))
    for i, (metric, title) in enumerate(panels, start=1):
        _boxplot(fig.add_subplot(1, len(panels), i), subjects, methods, metric, title)
    fig.tight_layout()
    save_png(fig, path, dpi=PLOT_DPI)


def plot_dice(path: Path, subjects, methods) -> None:
    """Dice at ES per structure and method."""
    fig = figure(4 * len(STRUCTURE_NAMES), 4)
    for i, (key, name) in enumerate(STRUCTURE_NAMES.items(), start=1):
        _boxplot(fig.add_subplot(1, len(STRUCTURE_NAMES), i), subjects, methods, f"dice_{key}", f"Dice {name} (ES)")
    fig.tight_layout()
    save_png(fig, path, dpi=PLOT_DPI)


def _psnr_curve(subjects, method: str, grid: np.ndarray) -> np.ndarray:
    """PSNR of the mean MSE over subjects against gamma; each subject's MSE interpolated onto `grid`
    (sequences differ in length). Frames reproduced exactly everywhere come out as +inf (not drawn)."""
    curves = [np.interp(grid, np.asarray(s["gammas"][1:], dtype=np.float64),
                        np.asarray(s["methods"][method]["mse"], dtype=np.float64)) for s in subjects]
    mean_mse = np.mean(curves, axis=0)
    return np.asarray([psnr_from_mse(float(m), PSNR_DATA_RANGE) for m in mean_mse])


def plot_psnr_vs_frame(path: Path, subjects, methods) -> None:
    """PSNR of each generated frame against its phase between ED and ES, mean over subjects."""
    n_max = max(s["n_frames"] for s in subjects)
    grid = np.linspace(0.0, 1.0, n_max)[1:]
    fig = figure(6.5, 4)
    ax = fig.add_subplot(1, 1, 1)
    for method in methods:
        curve = _psnr_curve(subjects, method, grid)
        ax.plot(grid, np.where(np.isfinite(curve), curve, np.nan), marker="o", label=EVALUATION_METHODS[method])
    ax.set_xlabel("phase between ED (0) and ES (1) = frame k / (n - 1)")
    ax.set_ylabel("PSNR (dB) of the mean MSE over subjects")
    ax.set_title("PSNR of generated frames against the real frames", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path, dpi=PLOT_DPI)


# ------------------------------------------------------------------------------------------ output

def _json_ready(value):
    """NaN and inf become null (strict JSON); numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def write_report(report: dict[str, Any], subjects: list[dict[str, Any]], folder: Path) -> None:
    """report.json, table1.md and the plots (REPORT_FILES) into `folder`."""
    methods = report["settings"]["methods"]
    files.write_text(folder / "report.json", json.dumps(_json_ready(report), indent=1, allow_nan=False) + "\n")
    files.write_text(folder / "table1.md", table_markdown(report))
    plot_boxplots(folder / "fig4_boxplots.png", subjects, methods)
    plot_dice(folder / "dice_boxplots.png", subjects, methods)
    plot_psnr_vs_frame(folder / "psnr_vs_frame.png", subjects, methods)
