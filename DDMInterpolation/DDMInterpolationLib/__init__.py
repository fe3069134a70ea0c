"""Logic of the DDMInterpolation module: MRML nodes <-> ddm4d, no Qt (runs headless under slicer-core)."""
from .BackgroundProcess import BackgroundProcess, parseProgressLine, processEnvironment
from .GenerationRun import GenerationRun
from .Logic import DDMInterpolationLogic, GenerateCommand, GenerationInputs
from .Requirements import InstallError, ensureRequirements, requirementsMet

__all__ = [
    "BackgroundProcess",
    "DDMInterpolationLogic",
    "GenerateCommand",
    "GenerationRun",
    "GenerationInputs",
    "InstallError",
    "ensureRequirements",
    "parseProgressLine",
    "processEnvironment",
    "requirementsMet",
]
