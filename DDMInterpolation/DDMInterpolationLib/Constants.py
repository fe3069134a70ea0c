"""Named values of the DDMInterpolation module, in one place."""

# generation modes and defaults are ddm4d's (its config module never imports torch)
from ddm4d.config import DEFAULT_FADE, DEFAULT_MODE, DEFAULT_REFINE, DEVICES, FADES, MODE_ALIASES, MODES  # noqa: F401

# Generation defaults (the numbers themselves belong to ddm4d; these are the GUI's starting values)
DEFAULT_NUMBER_OF_FRAMES = 10
DEFAULT_MODEL = "default"  # ddm4d's bundled model

# Cine playback: one pass from source to target lasts about this long, within these rates
PLAYBACK_PASS_DURATION_S = 1.0
PLAYBACK_MIN_FPS = 2.0
PLAYBACK_MAX_FPS = 30.0

# Transform display in slice views (vtkMRMLTransformDisplayNode visualization modes)
TRANSFORM_VISUALIZATIONS = ("glyph", "grid", "contour")
DEFAULT_TRANSFORM_VISUALIZATION = "glyph"

# What the background `ddm4d generate` writes beside the frames: only what loadGenerateOutputs reads
GENERATE_OUTPUTS = ("fields", "labels")

# Index of the generated sequences when nothing better is known (two-volume input)
GAMMA_INDEX_NAME = "gamma"

# Node references from the browser node to everything one generation made
REFERENCE_FRAMES = "DDMFrames"
REFERENCE_FIELDS = "DDMFields"
REFERENCE_LABELS = "DDMLabels"
REFERENCE_VOLUME_TABLE = "DDMVolumeTable"
REFERENCE_VOLUME_CHART = "DDMVolumeChart"
REFERENCE_PSNR_TABLE = "DDMPsnrTable"
REFERENCE_PSNR_CHART = "DDMPsnrChart"
REFERENCE_LABEL_COLORS = "DDMLabelColors"
ATTRIBUTE_REPORT = "DDMInterpolation.Report"  # JSON: gammas, timings, folding fraction, model, device

# Two phases of a cine sequence coincide when their fractional item positions differ by less than this
PHASE_TOLERANCE = 1e-6

# Table columns
COLUMN_FRAME = "Frame"
COLUMN_GAMMA = "Gamma"
COLUMN_CINE_ITEM = "Cine item"
COLUMN_PSNR_DDM = "PSNR DDM (dB)"
COLUMN_PSNR_BLEND = "PSNR linear blend (dB)"

# Background generation: folders inside the work folder, and ddm4d generate's report in its output
INPUTS_SUBDIRECTORY = "inputs"
OUTPUT_SUBDIRECTORY = "output"
REPORT_FILE = "report.json"

# Python packages ddm4d needs at run time: import name -> pip requirement
# (SimpleITK and numpy ship with Slicer; torch comes through the PyTorch extension)
TORCH_REQUIREMENT = ">=2.2"
PIP_REQUIREMENTS = {
    "safetensors": "safetensors>=0.4",
    "tqdm": "tqdm>=4.60",
    "scipy": "scipy>=1.10",
    "psutil": "psutil>=5.9",
}
