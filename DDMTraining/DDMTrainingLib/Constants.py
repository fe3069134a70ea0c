"""Named values of the DDMTraining module, in one place.

Hyper-parameter defaults are not here: they come from ``ddm4d.config.DDMConfig`` and the
``ddm4d train`` command (see ``Settings.py``), so the GUI always starts from the paper's numbers.
"""
from ddm4d import config as _config
from ddm4d import runfolder as _runfolder

# The list of model files DDMInterpolation offers (Qt setting, a list of paths). DDMInterpolation
# defines the same key in its module file (DDMInterpolation.py: SETTINGS_MODEL_PATHS) and
# SETTINGS_MODEL for the selected one; mirrored here because that file imports Qt and the logic may not.
MODEL_LIST_SETTINGS_KEY = "DDMInterpolation/ModelPaths"
SELECTED_MODEL_SETTINGS_KEY = "DDMInterpolation/Model"

# The module's own remembered settings (the widget stores them with qt.QSettings)
SETTINGS_GROUP = "DDMTraining"

DEVICES = _config.DEVICES  # auto, cpu, cuda, mps: ddm4d's list

# What `ddm4d train` writes into RUN_DIR and the events it prints: one owner, ddm4d.runfolder (torch-free),
# which the trainer imports too, so the two sides cannot drift apart
MODEL_FILE = _runfolder.MODEL_FILE
BEST_MODEL_FILE = _runfolder.BEST_MODEL_FILE
CONFIG_FILE = _runfolder.CONFIG_FILE
CHECKPOINTS_DIRECTORY = _runfolder.CHECKPOINTS_DIRECTORY
CHECKPOINT_PATTERN = _runfolder.CHECKPOINT_PATTERN
LOG_FILE = _runfolder.LOG_FILE
LOSS_CURVE_FILE = _runfolder.LOSS_CURVE_FILE
LOCK_FILE = _runfolder.LOCK_FILE
MODEL_FORMAT = _runfolder.MODEL_FORMAT
STATE_FORMAT = _runfolder.STATE_FORMAT
EXPORTED_MODELS_DIRECTORY = "models"  # models this module exports from checkpoints ("Use this model")

# Background process
POLL_INTERVAL_MS = 200  # the widget drains the event queue this often
STOP_GRACE_S = 60.0  # after SIGINT, time the trainer gets to save a checkpoint before it is terminated
KILL_GRACE_S = 5.0  # after terminate, time before kill
LOG_LINES = 2000  # non-JSON output lines kept in memory
ERROR_LINES = 20  # last stderr lines kept for lastError()

# Loss curves: table columns and the series drawn from them
COLUMN_ITERATION = "iteration"
TRAINING_LOSS_COLUMNS = ("loss", "diffusion", "ncc", "smooth")  # fields of the "iteration" event
VALIDATION_LOSS_COLUMNS = ("loss", "ncc")  # fields of the "validation" event
VALIDATION_SERIES_PREFIX = "validation "
MAX_PLOT_POINTS = 4000  # longer runs keep every 2nd, 4th, ... iteration in the table
SERIES_COLORS = {  # matplotlib's tab10
    "loss": (0.12, 0.47, 0.71),
    "diffusion": (1.0, 0.5, 0.05),
    "ncc": (0.17, 0.63, 0.17),
    "smooth": (0.84, 0.15, 0.16),
    "validation loss": (0.58, 0.4, 0.74),
    "validation ncc": (0.55, 0.34, 0.29),
}

# Node references from the loss chart to its tables (so a chart found later leads to its data)
REFERENCE_TRAINING_TABLE = "DDMTrainingTable"
REFERENCE_VALIDATION_TABLE = "DDMValidationTable"
ATTRIBUTE_RUN_DIRECTORY = "DDMTraining.RunDirectory"
