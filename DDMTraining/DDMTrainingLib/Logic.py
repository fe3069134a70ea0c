"""DDMTrainingLogic: check a data folder, start and follow ``ddm4d train``, hand its model on.

Everything the module's GUI does is a call here, so it is scriptable from the Python console and
testable headless under ``slicer-core``. No Qt, no dialogs: bad input raises ``ValueError`` with a
message that says what to change, before any process starts.
"""
import concurrent.futures
import dataclasses
import json
import os
import sys
import tempfile
import threading

from DDMInterpolationLib import processEnvironment  # one child-process environment for both modules
from ddm4d import runfolder  # torch-free: the run folder as ddm4d train writes it

from . import Constants as C
from .LossCurves import LossCurves
from .Settings import TrainingSettings
from .TrainingProcess import TrainingProcess


@dataclasses.dataclass
class DataCheck:
    """What "Check data" found in a data folder (or pairs CSV)."""

    path: str
    kind: str  # "acdc" or "pairs"
    subjects: list  # ids of the usable subjects
    problems: list  # (subject, file, message) of each skipped subject
    summary: dict  # ddm4d.data.Dataset.summary(): counts, sizes, spacings, problems

    @property
    def numberOfSubjects(self):
        return len(self.subjects)

    @property
    def numberOfPairs(self):
        """Training pairs: one source/target (ED/ES) pair per usable subject or CSV row."""
        return len(self.subjects)

    @property
    def numberOfSkipped(self):
        return self.summary.get("n_skipped", len({subject for subject, _, _ in self.problems}))

    def text(self):
        """A short report for the GUI: counts, sizes and spacings, then each skipped subject and why."""
        s = self.summary
        what = "pairs CSV" if self.kind == "pairs" else "ACDC-layout folder"
        lines = [f"{what}: {self.path}",
                 f"{self.numberOfSubjects} usable subject(s), {self.numberOfPairs} training pair(s); "
                 f"{self.numberOfSkipped} skipped."]
        if self.kind != "pairs":
            lines.append(f"with labels: {s.get('n_with_labels', 0)}, with 4D cine: {s.get('n_with_cine', 0)}")
            frames = s.get("frames_per_cycle")
            if frames:
                lines.append(f"frames per cycle: {frames['min']} to {frames['max']}")
        if s.get("sizes"):
            lines.append("image sizes (voxels): " + ", ".join(f"{size} ({n})" for size, n in s["sizes"].items()))
        if s.get("spacings_mm"):
            lines.append("spacings (mm): " + ", ".join(f"{spacing} ({n})" for spacing, n in s["spacings_mm"].items()))
        if self.problems:
            lines.append("Skipped:")
            lines += [f"  {subject}: {os.path.basename(str(file)) or file}: {message}"
                      for subject, file, message in self.problems]
        return "\n".join(lines)


@dataclasses.dataclass
class RunState:
    """What an output (run) folder holds: earlier weights and checkpoints, and a lock of a live run."""

    runDirectory: str
    modelPath: str = None  # RUN_DIR/model.safetensors: the latest weights
    bestModelPath: str = None  # RUN_DIR/model_best.safetensors: the best validation loss
    checkpoints: list = dataclasses.field(default_factory=list)  # (iteration, path) of each ckpt_*, oldest first
    lockPid: int = None  # pid in RUN_DIR/.lock
    lockHost: str = None  # host in RUN_DIR/.lock
    lockAlive: bool = False  # that process runs (or runs on another host, where it cannot be checked)

    @property
    def lastCheckpoint(self):
        return self.checkpoints[-1][1] if self.checkpoints else None

    @property
    def lastIteration(self):
        return self.checkpoints[-1][0] if self.checkpoints else None

    @property
    def canResume(self):
        return bool(self.checkpoints)

    @property
    def hasPreviousRun(self):
        return bool(self.checkpoints)

    def modelChoices(self):
        """(label, path) of every model this run can give, the latest first: its model files, then each
        checkpoint (exported to a model file when used)."""
        choices = []
        if self.modelPath:
            choices.append((f"Latest model ({C.MODEL_FILE})", self.modelPath))
        if self.bestModelPath:
            choices.append((f"Best validation model ({C.BEST_MODEL_FILE})", self.bestModelPath))
        for iteration, path in reversed(self.checkpoints):
            choices.append((f"Checkpoint at iteration {iteration}", path))
        return choices


def pythonExecutable():
    """The Python to run ``ddm4d`` with: ``sys.executable`` (PythonSlicer inside Slicer).

    Should sys.executable be the Slicer application itself (older builds), PythonSlicer next to it.
    """
    executable = sys.executable
    name = os.path.basename(executable).lower()
    if name.startswith("slicer") and not name.startswith("slicerpython"):
        for candidate in ("PythonSlicer.exe", "PythonSlicer"):
            for folder in (os.path.dirname(executable), os.path.join(os.path.dirname(executable), "bin")):
                path = os.path.join(folder, candidate)
                if os.path.isfile(path):
                    return path
    return executable


# the JSON metadata of a .safetensors file, read with plain Python (no torch, nothing unpickled);
# ValueError when it is not one
readSafetensorsMetadata = runfolder.read_safetensors_metadata


class BackgroundTask:
    """A logic call that reads files (no MRML) in a worker thread, so the GUI stays responsive on a large
    data folder; the widget polls :attr:`done`, :attr:`fraction` and :attr:`message` from its timer.

    The call gets ``progress=task.report``. :meth:`result` returns its value or raises its exception.
    """

    def __init__(self, function, *args, **kwargs):
        self.fraction, self.message = 0.0, ""
        self._future = concurrent.futures.Future()
        thread = threading.Thread(target=self._run, args=(function, args, kwargs), daemon=True,
                                  name="DDMTraining-task")
        thread.start()

    def _run(self, function, args, kwargs):
        try:
            self._future.set_result(function(*args, progress=self.report, **kwargs))
        except BaseException as error:  # handed to the GUI thread by result()
            self._future.set_exception(error)

    def report(self, fraction, message):
        self.fraction, self.message = float(fraction), str(message)

    @property
    def done(self):
        return self._future.done()

    def result(self, timeout=None):
        return self._future.result(timeout)


class DDMTrainingLogic:
    """Train a DDM on a local data folder in a background ``ddm4d train`` process.

    Console example (inside Slicer, or any Python with ddm4d)::

        import time, DDMTrainingLib
        logic = DDMTrainingLib.DDMTrainingLogic()
        print(logic.checkData("/data/ACDC/training").text())
        settings = DDMTrainingLib.TrainingSettings(epochs=10, device="cuda")
        process = logic.startTraining("/data/ACDC/training", "/data/runs/run1", settings)
        curves = logic.createLossCurves("/data/runs/run1")    # table + chart nodes in the scene
        while process.isRunning():
            curves.update(process.poll()); time.sleep(0.2)
        print(process.status.progressText(), logic.trainedModel("/data/runs/run1"))

    :param scene: the MRML scene for the loss curves (default ``slicer.mrmlScene``, looked up on use).
    """

    def __init__(self, scene=None):
        self._scene = scene

    @property
    def scene(self):
        if self._scene is not None:
            return self._scene
        import slicer
        if getattr(slicer, "mrmlScene", None) is None:
            raise ValueError("no MRML scene: pass scene=... or set slicer.mrmlScene")
        return slicer.mrmlScene

    # ---------------------------------------------------------------------------------------------- data

    def checkData(self, dataPath, progress=None):
        """Check a data folder (ACDC layout, or with a pairs.csv) or a pairs CSV file.

        :param progress: ``progress(fraction, message)`` before each subject is read.
        :return: :class:`DataCheck` (subjects, skipped ones and why, sizes and spacings seen).
        :raises ValueError: no path, nothing readable there, or no valid pair at all.
        """
        if not dataPath or not str(dataPath).strip():
            raise ValueError("no data folder: choose a folder in the ACDC layout (patient001/, patient002/, ...) "
                             "or a pairs CSV file")
        path = os.path.abspath(os.path.expanduser(os.fspath(dataPath)))
        if not os.path.exists(path):
            raise ValueError(f"data folder {path} does not exist; choose an existing folder")
        if not os.access(path, os.R_OK) or (os.path.isdir(path) and not os.access(path, os.X_OK)):
            raise ValueError(f"data folder {path} cannot be read (permission denied); check its permissions")
        from ddm4d.data import scan_dataset  # numpy and SimpleITK only, no torch
        scanned = None if progress is None else (
            lambda done, total, subject: progress(done / max(total, 1), f"reading {subject} ({done + 1} of {total})"))
        try:
            dataset = scan_dataset(path, scanned)
        except ValueError as error:  # ddm4d.errors.InputError: what is wrong and how to fix it
            raise ValueError(str(error)) from None
        except OSError as error:
            raise ValueError(f"data folder {path} cannot be read ({error.strerror or error}); "
                             "check its permissions") from None
        check = DataCheck(path=path, kind=dataset.kind, subjects=[s.id for s in dataset.subjects],
                          problems=[(p.subject, str(p.file), p.message) for p in dataset.problems],
                          summary=dataset.summary())
        if not check.subjects:
            listed = "; ".join(f"{subject}: {message}" for subject, _, message in check.problems[:3])
            more = f" (and {len(check.problems) - 3} more)" if len(check.problems) > 3 else ""
            raise ValueError(f"no valid training pairs in {path}: every subject was skipped. {listed}{more}")
        return check

    # ---------------------------------------------------------------------------------------------- runs

    def runState(self, runDirectory):
        """What ``runDirectory`` holds already (it need not exist)."""
        runDirectory = os.path.abspath(os.path.expanduser(os.fspath(runDirectory)))
        state = RunState(runDirectory)
        for attribute, name in (("modelPath", C.MODEL_FILE), ("bestModelPath", C.BEST_MODEL_FILE)):
            path = os.path.join(runDirectory, name)
            setattr(state, attribute, path if os.path.isfile(path) else None)
        state.checkpoints = checkpointFiles(os.path.join(runDirectory, C.CHECKPOINTS_DIRECTORY))
        state.lockPid, state.lockHost = runfolder.read_lock(os.path.join(runDirectory, C.LOCK_FILE))
        state.lockAlive = runfolder.lock_alive(state.lockPid, state.lockHost)
        return state

    def runSettings(self, runDirectory):
        """The settings a run was started with (its config.json), to show them before a resume.

        :return: :class:`TrainingSettings`, or None when the folder has no readable config.json.
        """
        path = os.path.join(os.fspath(runDirectory), C.CONFIG_FILE)
        try:
            with open(path, encoding="utf-8") as file:
                stored = json.load(file)
            config, run = stored["config"], stored.get("run", {})
        except (OSError, ValueError, KeyError, TypeError):
            return None
        values = dict(lossLambda=config.get("loss_lambda"), learningRate=config.get("lr"),
                      batchSize=config.get("batch_size"), size=config.get("image_size"),
                      seed=run.get("seed"), ema=run.get("ema"), augment=run.get("augment", False),
                      validationFraction=run.get("validation_fraction"),
                      checkpointEvery=run.get("checkpoint_every"))
        total, perEpoch, epochs = run.get("total_iterations"), run.get("iterations_per_epoch"), run.get("epochs")
        if isinstance(epochs, int) and isinstance(perEpoch, int) and total == epochs * perEpoch:
            values["epochs"] = epochs
        elif isinstance(total, int):
            values["iterations"] = total
        if values["size"] is not None and tuple(values["size"]) == TrainingSettings.paperImageSize():
            values["size"] = None
        return TrainingSettings.fromDict({key: value for key, value in values.items() if value is not None})

    def checkOutputDirectory(self, runDirectory, resume=False):
        """Make sure a run can write to ``runDirectory`` (created when missing).

        :return: :class:`RunState` of the folder.
        :raises ValueError: no folder, not writable, a live run on it, a previous run when not
          resuming (nothing saved is ever overwritten), or nothing to resume.
        """
        if not runDirectory or not str(runDirectory).strip():
            raise ValueError("no output folder: choose a folder for the trained model and its checkpoints")
        runDirectory = os.path.abspath(os.path.expanduser(os.fspath(runDirectory)))
        running = TrainingProcess.runningFor(runDirectory)
        if running is not None:
            raise ValueError(f"a training run is already writing to {runDirectory} (process {running.pid}); "
                             "stop it first, or choose another output folder")
        if os.path.exists(runDirectory) and not os.path.isdir(runDirectory):
            raise ValueError(f"output folder {runDirectory} is a file; choose a folder")
        state = self.runState(runDirectory)
        if state.lockAlive:
            raise ValueError(f"another training run (process {state.lockPid}) is writing to {runDirectory} "
                             f"({C.LOCK_FILE}); wait for it or stop it, or choose another output folder")
        if resume and not state.canResume:
            raise ValueError(f"nothing to resume in {runDirectory}: it has no checkpoint "
                             f"({C.CHECKPOINTS_DIRECTORY}/ckpt_*.safetensors); start a new training instead")
        if not resume and state.hasPreviousRun:
            raise ValueError(f"output folder {runDirectory} holds a previous run (checkpoint at iteration "
                             f"{state.lastIteration}); press Resume to continue it, or choose an empty output "
                             "folder (nothing is overwritten)")
        try:
            os.makedirs(runDirectory, exist_ok=True)
            with tempfile.TemporaryFile(dir=runDirectory):
                pass
        except OSError as error:
            raise ValueError(f"output folder {runDirectory} is not writable ({error.strerror or error}); "
                             "choose a folder you can write to") from None
        return state

    def buildTrainCommand(self, dataPath, runDirectory, settings=None, resume=False, python=None):
        """The ``ddm4d train`` command line (a list) for these settings; checks nothing on disk.

        A resume passes only what may change between a run and its continuation (its length, the
        device, the checkpoint interval): everything else the trainer takes from the run's config.json,
        so that it continues the same training (see :meth:`runSettings`).
        """
        settings = settings if settings is not None else TrainingSettings()
        options = settings.trainOptions()
        if resume:
            options = settings.resumeOptions() + ["--resume"]
        return [python or pythonExecutable(), "-m", "ddm4d", "train", os.fspath(dataPath),
                "--out", os.fspath(runDirectory), "--progress", "json"] + options

    def startTraining(self, dataPath, runDirectory, settings=None, resume=False, python=None, progress=None):
        """Check everything, then start ``ddm4d train`` in the background.

        :param dataPath: ACDC-layout folder or pairs CSV (checked with :meth:`checkData`).
        :param runDirectory: output folder (checked with :meth:`checkOutputDirectory`).
        :param settings: :class:`TrainingSettings` (default: the paper's).
        :param resume: continue from the last checkpoint of ``runDirectory`` (``--resume``).
        :param python: the Python executable (default :func:`pythonExecutable`).
        :param progress: ``progress(fraction, message)`` while the data are checked.
        :return: the started :class:`TrainingProcess`; call its ``poll()`` regularly.
        :raises ValueError: bad data, output folder or settings; no process is started then.
        """
        settings = settings if settings is not None else TrainingSettings()
        settings.validate()
        check = self.checkData(dataPath, progress)
        self.checkOutputDirectory(runDirectory, resume=resume)
        runDirectory = os.path.abspath(os.path.expanduser(os.fspath(runDirectory)))
        args = self.buildTrainCommand(check.path, runDirectory, settings, resume=resume, python=python)
        return TrainingProcess(args, runDirectory=runDirectory, env=processEnvironment()).start()

    def createLossCurves(self, runDirectory=None, name=None, loadHistory=True):
        """Table and chart nodes for the loss curves of a run (see :class:`LossCurves`).

        :param loadHistory: fill them with what the run's log.jsonl holds already (a resumed run).
        """
        if name is None:
            name = f"DDM training {os.path.basename(os.path.normpath(runDirectory))}" if runDirectory else "DDM training"
        curves = LossCurves(self.scene, name, runDirectory=runDirectory)
        if loadHistory and runDirectory:
            curves.loadLog(os.path.join(runDirectory, C.LOG_FILE))
        return curves

    # ---------------------------------------------------------------------------------------------- models

    def trainedModel(self, runDirectoryOrFile):
        """The model file a run (or one of its files) gives, checked to be a ddm4d model.

        :param runDirectoryOrFile: a run folder (its model.safetensors, else its last checkpoint), a model
          file, or a checkpoint (a training state: its model is exported to RUN_DIR/models/ once, which
          imports torch).
        :return: the absolute path of a file ``ddm4d.checkpoint.load_model`` accepts.
        :raises ValueError: nothing usable there (yet).
        """
        path = os.path.abspath(os.path.expanduser(os.fspath(runDirectoryOrFile)))
        if os.path.isdir(path):
            state = self.runState(path)
            candidates = [p for p in [state.modelPath, state.lastCheckpoint] if p]
            if not candidates:
                raise ValueError(f"{path} holds no model yet ({C.MODEL_FILE} or {C.CHECKPOINTS_DIRECTORY}/); "
                                 "wait for the first checkpoint")
            path = candidates[0]
        elif not os.path.isfile(path):
            raise ValueError(f"model file {path} does not exist")
        metadata = readSafetensorsMetadata(path)
        kind = metadata.get("format")
        if kind == C.MODEL_FORMAT and "config" in metadata:
            return path
        if kind == C.STATE_FORMAT:
            return self.exportCheckpointModel(path)
        raise ValueError(f"{path} is not a ddm4d model or training checkpoint (format {kind!r})")

    def exportCheckpointModel(self, checkpointPath, outputPath=None):
        """Write the model of a training checkpoint as a model file (once; later calls reuse it).

        The weights are those the trainer hands out: the EMA ones when the run keeps an EMA.
        :param outputPath: default RUN_DIR/models/model_<iteration>.safetensors.
        :return: the model file's path.
        :raises ValueError: not a readable DDM training checkpoint.
        """
        checkpointPath = os.path.abspath(os.fspath(checkpointPath))
        metadata = readSafetensorsMetadata(checkpointPath)
        fingerprint = metadata.get("fingerprint") or {}
        if metadata.get("format") != C.STATE_FORMAT or "config" not in fingerprint:
            raise ValueError(f"{checkpointPath} is not a ddm4d training checkpoint")
        if fingerprint.get("method", "ddm") != "ddm":
            raise ValueError(f"{checkpointPath} is a {fingerprint.get('method')} baseline, not a DDM")
        iteration = int((metadata.get("state") or {}).get("iteration", 0))
        if outputPath is None:
            runDirectory = os.path.dirname(os.path.dirname(checkpointPath))
            outputPath = os.path.join(runDirectory, C.EXPORTED_MODELS_DIRECTORY, f"model_{iteration:08d}.safetensors")
        if os.path.isfile(outputPath) and os.path.getmtime(outputPath) >= os.path.getmtime(checkpointPath):
            return outputPath
        from ddm4d.checkpoint import load_tensors, save_model  # torch: only now
        from ddm4d.config import DDMConfig
        from ddm4d.model import DDM
        try:
            tensors, _ = load_tensors(checkpointPath)
            weights = {key[len("model."):]: value for key, value in tensors.items() if key.startswith("model.")}
            weights.update({key[len("ema."):]: value.to(weights[key[len("ema."):]].dtype)
                            for key, value in tensors.items() if key.startswith("ema.")})
            model = DDM(DDMConfig.from_dict(fingerprint["config"]))
            model.load_state_dict(weights, strict=True)
        except (ValueError, RuntimeError, KeyError) as error:
            raise ValueError(f"{checkpointPath}: its model cannot be read ({str(error).splitlines()[0]})") from None
        save_model(model, outputPath, iteration=iteration, checkpoint=checkpointPath, method="ddm")
        return outputPath

    @staticmethod
    def modelListWithModel(currentList, modelPath):
        """The shared model list (setting ``MODEL_LIST_SETTINGS_KEY``) with ``modelPath`` added once.

        :param currentList: what the setting holds (None, one path as a string, or a list of paths).
        :return: a new list of paths, ``modelPath`` last, without duplicates or missing files.
        """
        if currentList is None or currentList == "":
            paths = []
        elif isinstance(currentList, str):
            paths = [currentList]
        else:
            paths = [str(p) for p in currentList]
        modelPath = os.path.abspath(os.fspath(modelPath))
        kept = []
        for path in paths:
            if path and os.path.isfile(path) and os.path.normcase(os.path.abspath(path)) != os.path.normcase(modelPath) \
                    and path not in kept:
                kept.append(path)
        return kept + [modelPath]


def checkpointFiles(folder):
    """(iteration, path) of each checkpoints/ckpt_<iteration>.safetensors, oldest first."""
    return [(iteration, str(path)) for iteration, path in runfolder.checkpoint_files(folder)]
