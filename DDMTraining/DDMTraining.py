"""DDMTraining: train a Diffusion Deformable Model on your own cine data, from inside Slicer.

Thin module file (module, widget, self-test). The logic is in DDMTrainingLib (no Qt), so the
Python console can do all the GUI does::

    import time, DDMTrainingLib
    logic = DDMTrainingLib.DDMTrainingLogic()
    print(logic.checkData("/data/ACDC/training").text())
    process = logic.startTraining("/data/ACDC/training", "/data/runs/run1",
                                  DDMTrainingLib.TrainingSettings(epochs=10, device="cuda"))
    curves = logic.createLossCurves("/data/runs/run1")
    while process.isRunning():
        curves.update(process.poll()); slicer.app.processEvents(); time.sleep(0.2)
"""
import logging
import os
import sys
import shutil
import tempfile
import time
import traceback

import qt

import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleTest,
                                           ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from DDMTrainingLib import BackgroundTask, DDMTrainingLogic, TrainingSettings
from DDMTrainingLib import Constants as C

SETTINGS_DATA_PATH = f"{C.SETTINGS_GROUP}/DataPath"
SETTINGS_OUTPUT_PATH = f"{C.SETTINGS_GROUP}/OutputPath"
SETTINGS_HYPERPARAMETERS = f"{C.SETTINGS_GROUP}/Settings"  # one key per TrainingSettings field below it
DEVICE_LABELS = {"auto": "Auto (GPU when available)", "cpu": "CPU", "cuda": "GPU (CUDA)", "mps": "Apple GPU (MPS)"}


class DDMTraining(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "DDM Training"
        self.parent.categories = ["Cardiac"]
        self.parent.dependencies = ["DDMInterpolation"]  # ships the ddm4d package and shows the trained models
        self.parent.contributors = ["DDMExtension contributors"]
        self.parent.helpText = """
Train a Diffusion Deformable Model (Kim and Ye, MICCAI 2022) on a folder of cine data, then use it in
DDM Interpolation.
<ol>
<li>Choose the <b>data folder</b> (ACDC layout: patient001/Info.cfg, patient001_frame01.nii.gz, ...; or a folder
with a pairs.csv) and press <b>Check data</b>: it lists the usable subjects and pairs, the skipped ones and
why, and the image sizes and spacings.</li>
<li>Choose an <b>output folder</b> and the hyper-parameters (the paper's defaults are preset; more under
Advanced).</li>
<li><b>Start training</b>: it runs in a background process; the progress bar, the current losses and live loss
curves (plot view) follow it. <b>Stop</b> saves a checkpoint; <b>Resume</b> continues from the last one.</li>
<li><b>Use this model</b> makes the trained model (or any checkpoint) selectable in DDM Interpolation.</li>
</ol>
"""
        self.parent.acknowledgementText = """
Method: B. Kim and J. C. Ye, "Diffusion Deformable Model for 4D Temporal Medical Image Generation",
MICCAI 2022. Built on 3D Slicer, SimpleITK and PyTorch.
"""


class _CloseGuard(qt.QObject):
    """Asks before the main window closes while training runs (and can keep Slicer open)."""

    def __init__(self, widget):
        qt.QObject.__init__(self)
        self.widget = widget

    def eventFilter(self, watched, event):
        if event.type() == qt.QEvent.Close and not self.widget.confirmStopBeforeClosing(
                "Slicer is closing while a training run is in progress.\n\n"
                "OK: save a checkpoint, stop training and close (Resume continues it later).\n"
                "Cancel: keep Slicer open and training running."):
            event.ignore()
            return True
        return False


#
# Widget
#

class DDMTrainingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.process = None  # the running TrainingProcess
        self.lastProcess = None
        self.curves = None  # LossCurves of the current run
        self._timer = None
        self._task = None  # a BackgroundTask (data check, or the start of a run) and what to do when it ends
        self._taskDone = None
        self._taskTimer = None
        self._closeGuard = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DDMTraining.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DDMTrainingLogic()

        for device in C.DEVICES:
            if device != "mps" or sys.platform == "darwin":  # PyTorch's Apple GPU backend exists only there
                self.ui.deviceComboBox.addItem(DEVICE_LABELS.get(device, device), device)
        self._loadSettings()

        self._timer = qt.QTimer()
        self._timer.setInterval(C.POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPoll)
        self._taskTimer = qt.QTimer()
        self._taskTimer.setInterval(C.POLL_INTERVAL_MS)
        self._taskTimer.connect("timeout()", self.onPollTask)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        slicer.app.connect("aboutToQuit()", self.onAboutToQuit)
        mainWindow = slicer.util.mainWindow()
        if mainWindow is not None:
            self._closeGuard = _CloseGuard(self)
            mainWindow.installEventFilter(self._closeGuard)

        self.ui.checkDataButton.connect("clicked(bool)", self.onCheckData)
        self.ui.outputPathLineEdit.connect("currentPathChanged(QString)", self.onOutputPathChanged)
        self.ui.useIterationsCheckBox.connect("toggled(bool)", self.updateGUIState)
        self.ui.emaCheckBox.connect("toggled(bool)", self.updateGUIState)
        self.ui.useValidationFractionCheckBox.connect("toggled(bool)", self.updateGUIState)
        self.ui.customSizeCheckBox.connect("toggled(bool)", self.updateGUIState)
        self.ui.restoreDefaultsButton.connect("clicked(bool)", self.onRestoreDefaults)
        self.ui.startButton.connect("clicked(bool)", self.onStart)
        self.ui.resumeButton.connect("clicked(bool)", self.onResume)
        self.ui.stopButton.connect("clicked(bool)", self.onStop)
        self.ui.showPlotButton.connect("clicked(bool)", self.onShowPlot)
        self.ui.openOutputFolderButton.connect("clicked(bool)", self.onOpenOutputFolder)
        self.ui.useModelButton.connect("clicked(bool)", self.onUseModel)
        self.refreshRunState()

    def cleanup(self):
        self._timer.stop()
        self._taskTimer.stop()
        if self.isTraining():
            logging.info("DDMTraining: the module is being unloaded; stopping the training run (a checkpoint is saved)")
            self.process.stop(wait=True)
        self.removeObservers()
        slicer.app.disconnect("aboutToQuit()", self.onAboutToQuit)
        mainWindow = slicer.util.mainWindow()
        if mainWindow is not None and self._closeGuard is not None:
            mainWindow.removeEventFilter(self._closeGuard)

    def enter(self):
        self.refreshRunState()

    # ---------------------------------------------------------------------------------------------- state

    def isTraining(self):
        return self.process is not None and self.process.isRunning()

    def updateGUIState(self, *args):
        running = self.isTraining() or self._task is not None
        state = self._runState()
        self.ui.dataCollapsibleButton.enabled = not running
        self.ui.parametersCollapsibleButton.enabled = not running
        self.ui.iterationsSpinBox.enabled = self.ui.useIterationsCheckBox.checked
        self.ui.epochsSpinBox.enabled = not self.ui.useIterationsCheckBox.checked
        self.ui.emaSpinBox.enabled = self.ui.emaCheckBox.checked
        self.ui.validationFractionSpinBox.enabled = self.ui.useValidationFractionCheckBox.checked
        for spinBox in (self.ui.sizeXSpinBox, self.ui.sizeYSpinBox, self.ui.sizeZSpinBox):
            spinBox.enabled = self.ui.customSizeCheckBox.checked
        self.ui.startButton.enabled = not running
        self.ui.resumeButton.enabled = not running and state is not None and state.canResume
        self.ui.checkDataButton.enabled = self._task is None
        self.ui.stopButton.enabled = self.isTraining() and not self.process.stopRequested
        self.ui.useModelButton.enabled = self.ui.modelSourceComboBox.count > 0
        self.ui.showPlotButton.enabled = self.curves is not None
        self.ui.openOutputFolderButton.enabled = state is not None and os.path.isdir(state.runDirectory)

    def _runState(self):
        path = self.ui.outputPathLineEdit.currentPath
        return self.logic.runState(path) if path else None

    def refreshRunState(self):
        """List the run's model and checkpoints (for "Use this model") and enable the buttons."""
        state = self._runState()
        combo = self.ui.modelSourceComboBox
        previous = combo.currentData
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        if state is not None:
            for label, path in state.modelChoices():
                combo.addItem(label, path)
        index = combo.findData(previous) if previous else -1
        combo.currentIndex = index if index >= 0 else 0
        combo.blockSignals(wasBlocked)
        self.updateGUIState()

    def onOutputPathChanged(self, path):
        """A folder with an earlier run: show the settings it was trained with (Resume keeps them)."""
        state = self._runState()
        if state is not None and state.canResume and not self.isTraining():
            stored = self.logic.runSettings(state.runDirectory)
            if stored is not None:
                stored.device = self.ui.deviceComboBox.currentData
                self._showSettings(stored)
            self.ui.statusLabel.text = (f"This folder holds a run at iteration {state.lastIteration}: Resume continues "
                                        "it with its own settings (length, device and checkpoint interval may change).")
        self.refreshRunState()

    # ---------------------------------------------------------------------------------------------- settings

    def _settingsFromGUI(self):
        ui = self.ui
        return TrainingSettings(
            epochs=ui.epochsSpinBox.value,
            iterations=ui.iterationsSpinBox.value if ui.useIterationsCheckBox.checked else None,
            lossLambda=ui.lambdaSpinBox.value,
            learningRate=ui.learningRateSpinBox.value,
            batchSize=ui.batchSizeSpinBox.value,
            checkpointEvery=ui.checkpointEverySpinBox.value or None,
            device=ui.deviceComboBox.currentData,
            seed=ui.seedSpinBox.value if ui.seedSpinBox.value >= 0 else None,
            ema=ui.emaSpinBox.value if ui.emaCheckBox.checked else None,
            augment=ui.augmentCheckBox.checked,
            validationFraction=ui.validationFractionSpinBox.value if ui.useValidationFractionCheckBox.checked else None,
            size=(ui.sizeXSpinBox.value, ui.sizeYSpinBox.value, ui.sizeZSpinBox.value)
            if ui.customSizeCheckBox.checked else None)

    def _showSettings(self, settings):
        ui = self.ui
        ui.epochsSpinBox.value = settings.epochs
        ui.useIterationsCheckBox.checked = settings.iterations is not None
        if settings.iterations is not None:
            ui.iterationsSpinBox.value = settings.iterations
        ui.lambdaSpinBox.value = settings.lossLambda
        ui.learningRateSpinBox.value = settings.learningRate
        ui.batchSizeSpinBox.value = settings.batchSize
        ui.checkpointEverySpinBox.value = settings.checkpointEvery or 0
        ui.deviceComboBox.currentIndex = max(ui.deviceComboBox.findData(settings.device), 0)
        ui.seedSpinBox.value = -1 if settings.seed is None else settings.seed
        ui.emaCheckBox.checked = settings.ema is not None
        if settings.ema is not None:
            ui.emaSpinBox.value = settings.ema
        ui.augmentCheckBox.checked = settings.augment
        ui.useValidationFractionCheckBox.checked = settings.validationFraction is not None
        if settings.validationFraction is not None:
            ui.validationFractionSpinBox.value = settings.validationFraction
        size = settings.size if settings.size is not None else TrainingSettings.paperImageSize()
        size = tuple(size) + (1,) * (3 - len(size))
        ui.customSizeCheckBox.checked = settings.size is not None
        ui.sizeXSpinBox.value, ui.sizeYSpinBox.value, ui.sizeZSpinBox.value = size
        self.updateGUIState()

    def _loadSettings(self):
        settings = qt.QSettings()
        values = {name: settings.value(f"{SETTINGS_HYPERPARAMETERS}/{name}")
                  for name in TrainingSettings().toDict() if settings.contains(f"{SETTINGS_HYPERPARAMETERS}/{name}")}
        self._showSettings(TrainingSettings.fromDict(values))
        self.ui.dataPathLineEdit.currentPath = settings.value(SETTINGS_DATA_PATH) or ""
        self.ui.outputPathLineEdit.currentPath = settings.value(SETTINGS_OUTPUT_PATH) or ""

    def _saveSettings(self, trainingSettings):
        settings = qt.QSettings()
        for name, value in trainingSettings.toDict().items():
            if isinstance(value, list):
                value = " ".join(str(v) for v in value)
            settings.setValue(f"{SETTINGS_HYPERPARAMETERS}/{name}", "" if value is None else value)
        settings.setValue(SETTINGS_DATA_PATH, self.ui.dataPathLineEdit.currentPath)
        settings.setValue(SETTINGS_OUTPUT_PATH, self.ui.outputPathLineEdit.currentPath)

    def onRestoreDefaults(self):
        self._showSettings(TrainingSettings())

    # ---------------------------------------------------------------------------------------------- buttons

    def _runTask(self, description, whenDone, function, *args, **kwargs):
        """Run a file-reading logic call in the background; ``whenDone(task)`` on the GUI thread after."""
        if self._task is not None:
            return
        self._task, self._taskDone = BackgroundTask(function, *args, **kwargs), whenDone
        self.ui.statusLabel.text = description
        self.ui.progressBar.value = 0
        self._taskTimer.start()
        self.updateGUIState()

    def onPollTask(self):
        task = self._task
        if task is None:
            self._taskTimer.stop()
            return
        self.ui.progressBar.value = int(round(1000 * task.fraction))
        if task.message:
            self.ui.statusLabel.text = task.message
        if not task.done:
            return
        self._taskTimer.stop()
        whenDone, self._task, self._taskDone = self._taskDone, None, None
        try:
            whenDone(task)
        finally:
            self.updateGUIState()

    def onCheckData(self):
        self._runTask("Checking the data...", self._dataChecked, self.logic.checkData,
                      self.ui.dataPathLineEdit.currentPath)

    def _dataChecked(self, task):
        try:
            check = task.result()
        except ValueError as error:
            self.ui.statusLabel.text = ""
            self.ui.dataReportTextEdit.setPlainText(f"Not usable: {error}")
            slicer.util.errorDisplay(f"The data folder cannot be used: {error}", windowTitle="DDM Training")
            return
        self.ui.statusLabel.text = f"{len(check.subjects)} subjects usable."
        self.ui.dataReportTextEdit.setPlainText(check.text())

    def onStart(self):
        self._start(resume=False)

    def onResume(self):
        self._start(resume=True)

    def _start(self, resume):
        if self.isTraining():
            return
        try:
            settings = self._settingsFromGUI().validate()
        except ValueError as error:
            slicer.util.errorDisplay(f"Check the training settings: {error}", windowTitle="DDM Training")
            return
        self._saveSettings(settings)
        if not self._ensureRequirements():
            return
        dataPath = self.ui.dataPathLineEdit.currentPath
        runDirectory = self.ui.outputPathLineEdit.currentPath
        # the data check reads every subject: in the background, then the run starts from _started
        self._runTask("Checking the data...", lambda task: self._started(task, runDirectory, resume),
                      self.logic.startTraining, dataPath, runDirectory, settings, resume=resume)

    def _started(self, task, runDirectory, resume):
        try:
            process = task.result()
        except ValueError as error:
            self.ui.statusLabel.text = ""
            slicer.util.errorDisplay(f"Cannot start training: {error}", windowTitle="DDM Training")
            return
        except Exception as error:
            self.ui.statusLabel.text = ""
            slicer.util.errorDisplay(f"Cannot start training: {error}", windowTitle="DDM Training",
                                     detailedText="".join(traceback.format_exception(error)))
            return
        logging.info("DDMTraining: " + " ".join(process.args))
        self.process = process
        self.ui.logTextEdit.setPlainText("")
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = "Starting ddm4d train (loading PyTorch, reading the data)..."
        self.ui.lossLabel.text = ""
        self._prepareCurves(runDirectory, resume)
        self._timer.start()
        self.updateGUIState()

    def _ensureRequirements(self):
        from DDMInterpolationLib import InstallError, ensureRequirements  # torch through the PyTorch extension
        try:
            ensureRequirements(confirm=lambda message: slicer.util.confirmOkCancelDisplay(message, "DDM Training"))
        except InstallError as error:
            message = str(error) + ("\n\nRestart Slicer, then try again." if error.restartRequired else "")
            slicer.util.errorDisplay(message, windowTitle="DDM Training: missing packages")
            return False
        return True

    def _curvesAlive(self):
        return self.curves is not None and slicer.mrmlScene.IsNodePresent(self.curves.chartNode)

    def _prepareCurves(self, runDirectory, resume):
        """Reuse the curves of the same run (a resume), else make new ones (with the run's history)."""
        sameRun = self._curvesAlive() and os.path.normpath(
            self.curves.chartNode.GetAttribute(C.ATTRIBUTE_RUN_DIRECTORY) or "") == os.path.normpath(runDirectory)
        if not (resume and sameRun):
            self.curves = self.logic.createLossCurves(runDirectory, loadHistory=resume)
        self.onShowPlot()

    def onShowPlot(self):
        if self._curvesAlive():
            slicer.modules.plots.logic().ShowChartInLayout(self.curves.chartNode)

    def onPoll(self):
        process = self.process
        if process is None:
            self._timer.stop()
            return
        events = process.poll()
        if self._curvesAlive():
            self.curves.update(events)
        for line in process.newLogLines:
            self.ui.logTextEdit.appendPlainText(line)
        status = process.status
        if status.fraction is not None:
            self.ui.progressBar.value = int(round(1000 * status.fraction))
        self.ui.statusLabel.text = ("Stopping: the trainer saves a checkpoint... " if process.stopRequested
                                    and process.isRunning() else "") + status.progressText()
        self.ui.lossLabel.text = status.lossText()
        if any(event["event"] in ("checkpoint", "done") for event in events):
            self.refreshRunState()
        if not process.isRunning():
            self._timer.stop()
            self.process, self.lastProcess = None, process
            self._finished(process)

    def _finished(self, process):
        status = process.status
        runDirectory = process.runDirectory
        if process.crashed():
            self.ui.statusLabel.text = f"Failed at iteration {status.iteration}."
            slicer.util.errorDisplay(
                f"Training stopped with an error:\n\n{process.lastError()}\n\n"
                f"Checkpoints saved so far are kept in {runDirectory}; fix the cause and press Resume "
                "to continue from the last one.", windowTitle="DDM Training", detailedText=process.logText())
        elif status.stopped or process.stopRequested:
            self.ui.statusLabel.text = process.stopOutcome()
        else:
            self.ui.statusLabel.text = f"Done: {status.progressText()}. Model: {status.model}"
            self.ui.progressBar.value = 1000
        self.refreshRunState()

    def onStop(self):
        if self.isTraining():
            self.process.stop(grace_s=C.STOP_GRACE_S, wait=False)
            self.ui.statusLabel.text = "Stopping: the trainer saves a checkpoint..."
            self.updateGUIState()

    def onOpenOutputFolder(self):
        state = self._runState()
        if state is not None and os.path.isdir(state.runDirectory):
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(state.runDirectory))

    def onUseModel(self):
        if not self._ensureRequirements():  # a checkpoint's model is exported with torch
            return
        try:
            modelPath = self.logic.trainedModel(self.ui.modelSourceComboBox.currentData
                                                or self.ui.outputPathLineEdit.currentPath)
        except ValueError as error:
            slicer.util.errorDisplay(f"Cannot use this model: {error}", windowTitle="DDM Training")
            return
        settings = qt.QSettings()
        settings.setValue(C.MODEL_LIST_SETTINGS_KEY,
                          self.logic.modelListWithModel(settings.value(C.MODEL_LIST_SETTINGS_KEY), modelPath))
        settings.setValue(C.SELECTED_MODEL_SETTINGS_KEY, modelPath)
        self.ui.statusLabel.text = f"{os.path.basename(modelPath)} is selected in DDM Interpolation."
        slicer.util.infoDisplay(f"{modelPath}\n\nis now in DDM Interpolation's model list, and selected.",
                                windowTitle="DDM Training")

    # ---------------------------------------------------------------------------------------------- closing

    def confirmStopBeforeClosing(self, question):
        """Ask whether to stop a running training; True: stopped (or nothing ran), False: keep it."""
        if not self.isTraining():
            return True
        if not slicer.util.confirmOkCancelDisplay(question, windowTitle="DDM Training"):
            return False
        self.ui.statusLabel.text = "Stopping: the trainer saves a checkpoint..."
        slicer.app.processEvents()
        with slicer.util.tryWithErrorDisplay("Stopping the training failed", waitCursor=True):
            self.process.stop(grace_s=C.STOP_GRACE_S, wait=True)
        self.onPoll()
        return True

    def onSceneStartClose(self, caller, event):
        if self.isTraining() and not self.process.stopRequested:
            question = ("A training run is in progress. Closing the scene removes its loss curves (they come back "
                        "from the run's log).\n\nOK: save a checkpoint and stop training.\nCancel: keep training.")
            if slicer.util.confirmOkCancelDisplay(question, windowTitle="DDM Training"):
                self.process.stop(grace_s=C.STOP_GRACE_S, wait=False)

    def onSceneEndClose(self, caller, event):
        self.curves = None
        if self.isTraining():
            self._prepareCurves(self.process.runDirectory, resume=True)
        self.updateGUIState()

    def onAboutToQuit(self):
        # the main window's close was confirmed already; this catches quits that bypass it (e.g. slicer.util.quit())
        if self.isTraining():
            logging.info("DDMTraining: Slicer quits; stopping the training run (a checkpoint is saved)")
            self.process.stop(grace_s=C.STOP_GRACE_S, wait=True)


#
# Self-test (runs inside Slicer; makes its own tiny phantom data set, downloads nothing)
#

class DDMTrainingTest(ScriptedLoadableModuleTest):
    # a tiny model grid and run so the test takes well under a minute on a CPU
    SETTINGS = dict(iterations=6, checkpointEvery=3, size=(16, 16, 16), device="cpu", seed=0)

    def setUp(self):
        slicer.mrmlScene.Clear()
        self.folder = tempfile.mkdtemp(prefix="DDMTrainingTest-", dir=slicer.app.temporaryPath)

    def tearDown(self):
        shutil.rmtree(self.folder, ignore_errors=True)

    def runTest(self):
        from DDMInterpolationLib import requirementsMet
        tests = [self.test_DataChecksWithoutTorch]
        if requirementsMet():
            tests += [self.test_BadInputsStartNothing, self.test_TrainStopResumeAndUse, self.test_WidgetTraining]
        else:  # e.g. the extension catalog's build machines: no PyTorch there
            self.delayDisplay("PyTorch or ddm4d's Python packages are not installed: the training tests are "
                              "skipped. Press Start once to install them, then run this self-test again.")
        for test in tests:
            self.setUp()
            try:
                test()
            finally:
                self.tearDown()

    def _phantom(self):
        from ddm4d.phantom import write_dataset
        data = os.path.join(self.folder, "data")
        write_dataset(data, n_subjects=2, seed=0, size=(32, 32, 8))
        return data

    @staticmethod
    def _pollUntil(process, curves=None, condition=lambda events: False, timeout=600):
        events = []
        deadline = time.time() + timeout
        while process.isRunning() and time.time() < deadline:
            new = process.poll()
            if curves is not None:
                curves.update(new)
            events += new
            if condition(events):
                break
            slicer.app.processEvents()
            time.sleep(0.05)
        return events

    def test_DataChecksWithoutTorch(self):
        """What runs without PyTorch: the data check, the run folder, the ddm4d train command."""
        self.delayDisplay("Data check and the ddm4d command (no PyTorch needed)")
        data = self._phantom()
        logic = DDMTrainingLogic()
        self.assertEqual(logic.checkData(data).numberOfPairs, 2)
        run = os.path.join(self.folder, "run")
        self.assertFalse(logic.runState(run).canResume)
        args = logic.buildTrainCommand(data, run, TrainingSettings(**self.SETTINGS))
        self.assertEqual(args[2:4], ["ddm4d", "train"])
        self.assertIn("--progress", args)

    def test_BadInputsStartNothing(self):
        self.delayDisplay("Bad inputs are refused before any process starts")
        logic = DDMTrainingLogic()
        data = self._phantom()
        empty = os.path.join(self.folder, "empty")
        os.makedirs(empty)
        notAFolder = os.path.join(self.folder, "file.txt")
        with open(notAFolder, "w") as file:
            file.write("x")
        for dataPath, runDirectory, resume in ((empty, os.path.join(self.folder, "run"), False),
                                               (data, os.path.join(notAFolder, "run"), False),
                                               (data, os.path.join(self.folder, "run"), True)):
            with self.assertRaises(ValueError):
                logic.startTraining(dataPath, runDirectory, TrainingSettings(**self.SETTINGS), resume=resume)
        self.assertFalse(os.path.exists(os.path.join(self.folder, "run", C.CHECKPOINTS_DIRECTORY)))

    def test_TrainStopResumeAndUse(self):
        self.delayDisplay("Train, stop, resume, use (logic)")
        logic = DDMTrainingLogic()
        data = self._phantom()
        run = os.path.join(self.folder, "run")
        self.assertEqual(logic.checkData(data).numberOfPairs, 2)
        process = logic.startTraining(data, run, TrainingSettings(**self.SETTINGS))
        curves = logic.createLossCurves(run)
        slicer.modules.plots.logic().ShowChartInLayout(curves.chartNode)
        self._pollUntil(process, curves, lambda events: any(e["event"] == "iteration" for e in events))
        self.assertTrue(process.isRunning(), process.lastError())
        process.stop(grace_s=120)  # the trainer finishes its iteration, saves a checkpoint and exits
        curves.update(process.poll())
        self.assertFalse(process.crashed(), process.lastError())
        self.assertTrue(process.status.stopped)
        self.assertTrue(logic.runState(run).canResume)
        self.delayDisplay("Resume")
        process = logic.startTraining(data, run, TrainingSettings(**self.SETTINGS), resume=True)
        self._pollUntil(process, curves)
        self.assertFalse(process.crashed(), process.lastError())
        self.assertTrue(process.status.done and not process.status.stopped)
        self.assertEqual(process.status.iteration, self.SETTINGS["iterations"])
        self.assertGreater(curves.numberOfRows, 0)
        model = logic.trainedModel(run)
        from ddm4d.checkpoint import load_model
        self.assertIsNotNone(load_model(model))

    def test_WidgetTraining(self):
        self.delayDisplay("Train from the module's GUI")
        settings = qt.QSettings()  # the widget remembers what it ran with: put the user's settings back after
        saved = {key: settings.value(key) for key in settings.allKeys() if key.startswith(C.SETTINGS_GROUP + "/")}
        try:
            self._widgetTraining()
        finally:
            settings.remove(C.SETTINGS_GROUP)
            for key, value in saved.items():
                settings.setValue(key, value)

    @staticmethod
    def _waitForTask(widget, timeout=120):
        deadline = time.time() + timeout
        while widget._task is not None and time.time() < deadline:
            slicer.app.processEvents()
            time.sleep(0.05)

    def _widgetTraining(self):
        data = self._phantom()
        run = os.path.join(self.folder, "run")
        slicer.util.selectModule("DDMTraining")
        widget = slicer.util.getModuleWidget("DDMTraining")
        widget.ui.dataPathLineEdit.currentPath = data
        widget.onCheckData()  # in the background: the GUI keeps running while the folder is read
        self._waitForTask(widget)
        self.assertIn("2 usable subject(s)", widget.ui.dataReportTextEdit.plainText)
        widget.ui.outputPathLineEdit.currentPath = run
        widget._showSettings(TrainingSettings(**self.SETTINGS))
        widget.onStart()
        self._waitForTask(widget)
        self.assertIsNotNone(widget.process, "the training process did not start")
        deadline = time.time() + 600
        while widget.process is not None and time.time() < deadline:
            slicer.app.processEvents()  # the GUI keeps running while ddm4d trains
            time.sleep(0.05)
        self.assertIsNone(widget.process, "training did not finish in 10 minutes")
        self.assertFalse(widget.lastProcess.crashed(), widget.lastProcess.lastError())
        self.assertGreater(widget.curves.numberOfRows, 0)
        self.assertGreater(widget.ui.modelSourceComboBox.count, 0)
        self.delayDisplay("Test passed")
