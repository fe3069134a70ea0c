"""Synthetic 4D cardiac cine MR, written in the ACDC layout with labels on every frame.

Why: DDM generates the frames *between* end-diastole (ED) and end-systole (ES). Real data label
only ED and ES, so nothing measures the in-between frames; this phantom has ground truth for every
frame (labels, LV cavity and myocardial volumes) and needs no download.

How: the heart is analytic, defined in a continuous heart frame in mm: the LV cavity and the LV
epicardium are half prolate ellipsoids cut by an oblique base plane through their common centre
(such a plane halves an ellipsoid whatever its tilt, so volumes stay closed-form); the RV is an
ellipsoid wrapped around the septum. A contraction curve s(t) (0 at ED, 1 at ES) drives the radii,
the long-axis length (the apex stays put, the base descends) and the twist; the cavity volume
follows the requested ejection fraction exactly and the wall thickness is solved per frame so the
myocardial volume is conserved. Each frame is evaluated on the voxel grid with numpy; intensities
use a box-filter partial volume across each surface (labels take the voxel centre, i.e. the
majority), then coil shading and Rician noise, so it looks like bSSFP cine MR at a glance.

Layout (this package imports no torch, so `ddm4d phantom` starts fast): defaults.py (labels, limits,
PhantomDefaults), grid.py (voxel grid, partial-volume shapes), heart.py (contraction curve, heart at
any contraction), anatomy.py (chest, coil shading, heart placement), render.py (one frame),
subject.py (make_subject), dataset.py (ACDC folders, the CLI), montage.py (PNG check). The names
below are the public API; names with a leading underscore are internal to the package.
"""
from __future__ import annotations

from .dataset import add_arguments, main, write_dataset, write_subject
from .defaults import (DEFAULTS, EJECTION_FRACTION_LIMITS, FRAME_LIMITS, IN_PLANE_LIMITS, LABEL_BACKGROUND,
                       LABEL_LV, LABEL_MYOCARDIUM, LABEL_NAMES, LABEL_RV, MAX_PATIENTS, PHANTOM_FORMAT,
                       SLICE_LIMITS, TISSUES, Intensities, PhantomDefaults)
from .heart import contraction_curve
from .montage import save_montage
from .subject import PhantomSubject, make_subject, subject_seed

__all__ = [
    "DEFAULTS", "EJECTION_FRACTION_LIMITS", "FRAME_LIMITS", "IN_PLANE_LIMITS", "LABEL_BACKGROUND", "LABEL_LV",
    "LABEL_MYOCARDIUM", "LABEL_NAMES", "LABEL_RV", "MAX_PATIENTS", "PHANTOM_FORMAT", "SLICE_LIMITS", "TISSUES",
    "Intensities", "PhantomDefaults", "PhantomSubject", "add_arguments", "contraction_curve", "main",
    "make_subject", "save_montage", "subject_seed", "write_dataset", "write_subject",
]
