"""The methods ddm4d knows, with the names tables, plots and messages show: one table for all modules.

Plain Python, no torch: the CLI's argument parsing and the Slicer modules read it without loading a
network library.
"""
from __future__ import annotations

#: model method -> display name, in the order of the paper's Table 1: DDM and the VoxelMorph baselines
MODEL_METHODS: dict[str, str] = {"ddm": "DDM", "vm": "VM", "vmdiff": "VM-diff"}
#: the model methods' keys, the values of `ddm4d train --method` and of every model's `method`
METHODS: tuple[str, ...] = tuple(MODEL_METHODS)
DDM_METHOD = "ddm"
#: the methods ddm4d.baselines implements (VoxelMorph networks)
BASELINE_METHODS: tuple[str, ...] = tuple(m for m in METHODS if m != DDM_METHOD)

#: what `ddm4d evaluate` compares: two methods without a model (every frame the source; the linear
#: intensity blend), then the model methods
EVALUATION_METHODS: dict[str, str] = {"initial": "Initial", "linear": "Linear blend", **MODEL_METHODS}
