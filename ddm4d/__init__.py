"""ddm4d: the Diffusion Deformable Model (Kim & Ye, MICCAI 2022) for 4D cardiac frame generation.

The public API (imported lazily, so `import ddm4d` stays cheap)::

    import ddm4d
    result = ddm4d.generate("ed.nii.gz", "es.nii.gz", model="default", frames=10)
    result.write("out/")                      # frames, .seq.nrrd, fields, report.json
    model = ddm4d.load_model("model.safetensors")
    ddm4d.train("ACDC/training", "runs/r1", iterations=1000)
    ddm4d.evaluate("ACDC/testing", "report/", model="runs/r1/model.safetensors")
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "DDMConfig": "ddm4d.config",
    "DDM": "ddm4d.model",
    "load_model": "ddm4d.checkpoint",
    "save_model": "ddm4d.checkpoint",
    "generate": "ddm4d.generation",
    "GenerationResult": "ddm4d.generation",
    "fit_pair": "ddm4d.generation",
    "train": "ddm4d.training",
    "evaluate": "ddm4d.evaluation",
    "scan_dataset": "ddm4d.data",
    "read_image": "ddm4d.io",
    "read_cine": "ddm4d.io",
    "InputError": "ddm4d.errors",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    # the functions live in modules of other names (generation, training, evaluation), so importing a
    # module never replaces a function on the package: ddm4d.generate(...) works every time
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ddm4d' has no attribute {name!r}")
