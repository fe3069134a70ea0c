"""Figures for the PNGs ddm4d writes, on matplotlib's Agg canvas.

No pyplot and no `matplotlib.use`: writing a result from a notebook or the Slicer console must not
switch the user's plotting backend or keep figures alive in pyplot's registry.
"""
from __future__ import annotations

from pathlib import Path

from .files import atomic_write


def figure(width: float, height: float, dpi: float | None = None):
    """A matplotlib Figure (inches) attached to its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: Path | str, dpi: float | None = None) -> Path:
    """Write `fig` as a PNG, atomically (a reader never sees half a file)."""
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=dpi if dpi is not None else "figure"))
    return Path(path)
