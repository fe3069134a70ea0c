"""Logic of the DDMTraining module: data checks, the ``ddm4d train`` process, loss curves (no Qt)."""
from .Events import TrainingStatus, formatDuration, parseEventLine
from .Logic import BackgroundTask, DataCheck, DDMTrainingLogic, RunState, processEnvironment, pythonExecutable
from .LossCurves import LossCurves
from .Settings import TrainingSettings
from .TrainingProcess import TrainingProcess

__all__ = [
    "BackgroundTask",
    "DataCheck",
    "DDMTrainingLogic",
    "LossCurves",
    "RunState",
    "TrainingProcess",
    "TrainingSettings",
    "TrainingStatus",
    "formatDuration",
    "parseEventLine",
    "processEnvironment",
    "pythonExecutable",
]
