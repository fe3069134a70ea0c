"""DDMInterpolation: generate intermediate cardiac phases with the Diffusion Deformable Model.

Thin module file (module, widget, self-test). The logic is in DDMInterpolationLib (no Qt), so the
Python console and headless scripts can do all the GUI does::

    import DDMInterpolationLib
    logic = DDMInterpolationLib.DDMInterpolationLogic()
    browser = logic.generate(getNode("ED"), getNode("ES"), numberOfFrames=10)
"""
import logging
import os
import sys
import tempfile
import traceback
from typing import Annotated, Union

import qt
import vtk

import slicer
from slicer import (vtkMRMLLabelMapVolumeNode, vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode,
                    vtkMRMLSegmentationNode, vtkMRMLSequenceNode)
from slicer.parameterNodeWrapper import Minimum, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from DDMInterpolationLib import (DDMInterpolationLogic, GenerationRun, InstallError, ensureRequirements,
                                 requirementsMet)
from DDMInterpolationLib import Constants

SETTINGS_MODEL_PATHS = "DDMInterpolation/ModelPaths"  # DDMTraining appends the models it trains here
SETTINGS_MODEL = "DDMInterpolation/Model"
SETTINGS_DEVICE = "DDMInterpolation/Device"
UNTRAINED_MODEL = "untrained"  # combo box data of "no network: per-case refinement (or fitting) only"
POLL_INTERVAL_MS = 200


class DDMInterpolation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "DDM Interpolation"
        self.parent.categories = ["Cardiac"]
        self.parent.dependencies = ["Sequences"]
        self.parent.contributors = ["DDMExtension contributors"]
        self.parent.helpText = """
Generate intermediate phases between two cardiac volumes (for example end-diastole and end-systole)
with the Diffusion Deformable Model (Kim and Ye, MICCAI 2022): a smooth, topology-preserving cine
sequence of frames, the displacement field of each frame as a grid transform, and, when a source
segmentation is given, the propagated labels with a volume-over-time plot.
<ol>
<li>Choose a source and a target volume, or a cine sequence and two of its items
(then each generated frame that falls on a real item gets a PSNR in a table and plot).</li>
<li>Set the number of frames, the model (the bundled ones are trained on synthetic data; or your own
.safetensors file), the device, and optionally an ROI to centre the field of view and a source
segmentation. <b>Refine on this pair</b> (on by default) optimises the motion path on your scans,
started from the model; <b>Symmetric</b> (on by default) joins the source and the target
warped along that path, voxel by voxel towards the plain blend where the motion does not explain
the change (through-plane motion, inflow).</li>
<li>Press <b>Generate intermediate phases</b>. It runs in the background; Cancel stops it.
Play the result with the sequence browser toolbar.</li>
</ol>
Python console: <code>DDMInterpolationLib.DDMInterpolationLogic().generate(sourceNode, targetNode,
numberOfFrames=10)</code> returns the sequence browser node; see the README for every option.
"""
        self.parent.acknowledgementText = """
Method: B. Kim and J. C. Ye, "Diffusion Deformable Model for 4D Temporal Medical Image Generation",
MICCAI 2022. Built on 3D Slicer, SimpleITK and PyTorch.
"""


#
# Parameter node (widget state, saved with the scene)
#

@parameterNodeWrapper
class DDMInterpolationParameterNode:
    useCineSequence: bool = False
    sourceVolume: vtkMRMLScalarVolumeNode
    targetVolume: vtkMRMLScalarVolumeNode
    cineSequence: vtkMRMLSequenceNode
    sourceItem: Annotated[int, Minimum(0)] = 0
    targetItem: Annotated[int, Minimum(0)] = 1
    numberOfFrames: Annotated[int, WithinRange(2, 500)] = Constants.DEFAULT_NUMBER_OF_FRAMES
    fitSteps: Annotated[int, WithinRange(0, 100000)] = 0
    refine: bool = Constants.DEFAULT_REFINE
    symmetric: bool = Constants.DEFAULT_MODE == "symmetric"
    roi: vtkMRMLMarkupsROINode
    sourceSegmentation: Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode]


def getParameterNode():
    """The module's singleton vtkMRMLScriptedModuleNode (the computing logic lives in DDMInterpolationLib)."""
    finder = ScriptedLoadableModuleLogic()
    finder.moduleName = "DDMInterpolation"
    return finder.getParameterNode()


#
# Widget
#

class DDMInterpolationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None  # the GenerationRun in progress
        self._timer = None
        self._lastBrowserNode = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DDMInterpolation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DDMInterpolationLogic()

        self.ui.deviceComboBox.addItem("Auto (GPU when available)", "auto")
        self.ui.deviceComboBox.addItem("CPU", "cpu")
        self.ui.deviceComboBox.addItem("GPU (CUDA)", "cuda")
        if sys.platform == "darwin":  # PyTorch's Apple GPU backend exists only there
            self.ui.deviceComboBox.addItem("Apple GPU (MPS)", "mps")
        for mode in Constants.TRANSFORM_VISUALIZATIONS:
            self.ui.transformVisualizationComboBox.addItem(mode.capitalize(), mode)
        self._loadSettings()

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollProcess)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.inputTabWidget.connect("currentChanged(int)", self.onInputTabChanged)
        self.ui.cineSequenceSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onCineSequenceChanged)
        self.ui.sourceItemSpinBox.connect("valueChanged(int)", self.onCineItemsChanged)
        self.ui.targetItemSpinBox.connect("valueChanged(int)", self.onCineItemsChanged)
        self.ui.modelBrowseButton.connect("clicked(bool)", self.onBrowseModel)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onSettingsChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onSettingsChanged)
        self.ui.transformVisualizationComboBox.connect("currentIndexChanged(int)", self.onTransformVisualizationChanged)
        self.ui.generateButton.connect("clicked(bool)", self.onGenerate)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)

        self.initializeParameterNode()

    def cleanup(self):
        self._endRun("the module was unloaded")
        self.removeObservers()
        self._disconnectParameterNode()

    def enter(self):
        self.initializeParameterNode()
        self._loadSettings()  # a model trained meanwhile (DDMTraining) shows up

    def exit(self):
        self._disconnectParameterNode()

    def onSceneStartClose(self, caller, event):
        if self._run is not None:  # its results belong to this scene's nodes: never load them elsewhere
            self._endRun("the scene was closed")
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ---------------------------------------------------------------------------------------------- state

    def initializeParameterNode(self):
        parameterNode = DDMInterpolationParameterNode(getParameterNode())
        if not parameterNode.sourceVolume:
            parameterNode.sourceVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        self.setParameterNode(parameterNode)

    def setParameterNode(self, parameterNode):
        self._disconnectParameterNode()
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIState)
            self.ui.inputTabWidget.currentIndex = 1 if self._parameterNode.useCineSequence else 0
        self.updateGUIState()

    def _disconnectParameterNode(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIState)

    def updateGUIState(self, caller=None, event=None):
        running = self._run is not None
        ready = False
        if self._parameterNode:
            p = self._parameterNode
            ready = (p.cineSequence is not None and p.sourceItem != p.targetItem) if p.useCineSequence \
                else (p.sourceVolume is not None and p.targetVolume is not None)
        self.ui.generateButton.enabled = ready and not running
        self.ui.generateButton.toolTip = ("Run ddm4d in the background and load the frames as a cine sequence"
                                          if ready else "Choose a source and a target (or a cine sequence and two items)")
        self.ui.cancelButton.enabled = running
        self.ui.inputsCollapsibleButton.enabled = not running
        self.ui.modelCollapsibleButton.enabled = not running

    def onInputTabChanged(self, index):
        if self._parameterNode:
            self._parameterNode.useCineSequence = index == 1
            self.onCineItemsChanged()

    def onCineSequenceChanged(self, sequenceNode):
        count = sequenceNode.GetNumberOfDataNodes() if sequenceNode else 0
        for spinBox in (self.ui.sourceItemSpinBox, self.ui.targetItemSpinBox):
            spinBox.maximum = max(count - 1, 0)

    def onCineItemsChanged(self, value=None):
        # one generated frame per real item between the two, so that every frame gets a PSNR
        if self._parameterNode and self._parameterNode.useCineSequence:
            self._parameterNode.numberOfFrames = max(
                2, abs(self.ui.targetItemSpinBox.value - self.ui.sourceItemSpinBox.value) + 1)

    # ------------------------------------------------------------------------------------------- settings

    def _loadSettings(self):
        settings = qt.QSettings()
        paths = settings.value(SETTINGS_MODEL_PATHS) or []
        if isinstance(paths, str):
            paths = [paths]
        current = settings.value(SETTINGS_MODEL) or Constants.DEFAULT_MODEL
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        combo.addItem("Bundled default model (trained on synthetic data)", Constants.DEFAULT_MODEL)
        for path in paths:
            if os.path.isfile(path):
                combo.addItem(os.path.basename(path), path)
                combo.setItemData(combo.count - 1, path, qt.Qt.ToolTipRole)
        combo.addItem("No model (refinement on this pair only)", UNTRAINED_MODEL)
        index = combo.findData(current)
        combo.currentIndex = index if index >= 0 else 0
        combo.blockSignals(wasBlocked)
        deviceIndex = self.ui.deviceComboBox.findData(settings.value(SETTINGS_DEVICE) or "auto")
        self.ui.deviceComboBox.currentIndex = max(deviceIndex, 0)

    def onSettingsChanged(self, index=None):
        settings = qt.QSettings()
        settings.setValue(SETTINGS_MODEL, self.ui.modelComboBox.currentData)
        settings.setValue(SETTINGS_DEVICE, self.ui.deviceComboBox.currentData)

    def onBrowseModel(self):
        settings = qt.QSettings()
        path = qt.QFileDialog.getOpenFileName(self.parent, "Choose a DDM model", "",
                                              "DDM models (*.safetensors);;All files (*)")
        if not path:
            return
        paths = settings.value(SETTINGS_MODEL_PATHS) or []
        paths = [paths] if isinstance(paths, str) else list(paths)
        if path not in paths:
            paths.append(path)
        settings.setValue(SETTINGS_MODEL_PATHS, paths)
        settings.setValue(SETTINGS_MODEL, path)
        self._loadSettings()

    def _selectedModel(self):
        model = self.ui.modelComboBox.currentData
        return None if model == UNTRAINED_MODEL else model

    # ---------------------------------------------------------------------------------------- generation

    def _generationArguments(self):
        p = self._parameterNode
        kwargs = dict(numberOfFrames=p.numberOfFrames, model=self._selectedModel(),
                      device=self.ui.deviceComboBox.currentData, fitSteps=p.fitSteps, refine=p.refine,
                      mode="symmetric" if p.symmetric else "forward", roiNode=p.roi,
                      segmentationNode=p.sourceSegmentation)
        if p.useCineSequence:
            kwargs.update(sequenceNode=p.cineSequence, sourceItem=p.sourceItem, targetItem=p.targetItem)
        else:
            kwargs.update(sourceNode=p.sourceVolume, targetNode=p.targetVolume)
        return kwargs

    def onGenerate(self):
        if self._run is not None:
            return
        try:
            ensureRequirements(confirm=lambda message: slicer.util.confirmOkCancelDisplay(message, "DDMInterpolation"))
        except InstallError as error:
            message = str(error) + ("\n\nRestart Slicer, then try again." if error.restartRequired else "")
            slicer.util.errorDisplay(message, windowTitle="DDMInterpolation: missing packages")
            return
        workDirectory = tempfile.mkdtemp(prefix="DDMInterpolation-", dir=slicer.app.temporaryPath)
        try:
            self._run = GenerationRun(self.logic, workDirectory, **self._generationArguments())
        except Exception as error:
            self._showError("Cannot start the generation", error)
            return
        logging.info("DDMInterpolation: " + " ".join(self._run.command.args))
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = "Starting ddm4d (loading PyTorch)..."
        self._timer.start()
        self.updateGUIState()

    def onPollProcess(self):
        run = self._run
        if run is None or run.abandoned is not None:
            self._endRun(run.abandoned if run is not None else None)
            return
        progress, lines = run.poll()
        if progress is not None:
            fraction, message = progress
            self.ui.progressBar.value = int(round(100 * fraction))
            if message:
                self.ui.statusLabel.text = message
        for line in lines:
            logging.info(f"ddm4d: {line}")
        if not run.finished:
            return
        self._timer.stop()
        self._run = None
        try:
            if run.process.cancelled:
                self.ui.statusLabel.text = "Cancelled."
            elif run.process.returncode != 0:
                self.ui.statusLabel.text = "Failed."
                slicer.util.errorDisplay(f"Generation failed: {run.process.errorMessage()}",
                                         windowTitle="DDMInterpolation")
            else:
                self.ui.statusLabel.text = "Loading the results..."
                slicer.app.processEvents()
                qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)
                try:
                    browserNode = run.load(transformVisualization=self.ui.transformVisualizationComboBox.currentData)
                finally:
                    qt.QApplication.restoreOverrideCursor()
                self._showResult(browserNode)
        except Exception as error:
            self._showError("Cannot load the generated frames", error)
        finally:
            run.abandon("done")  # the work folder goes, whatever happened
            self.updateGUIState()

    def onCancel(self):
        if self._run is not None:
            self.ui.statusLabel.text = "Cancelling..."
            self._run.process.cancel()

    def _endRun(self, reason):
        """Give the run up (scene closed, module unloaded): process tree ended, work folder removed."""
        self._timer.stop()
        run, self._run = self._run, None
        if run is not None:
            run.abandon(reason)
            self.ui.statusLabel.text = f"Cancelled: {reason}."
        self.updateGUIState()

    def _showResult(self, browserNode):
        self._lastBrowserNode = browserNode
        nodes = self.logic.outputNodes(browserNode)
        slicer.modules.sequences.setToolBarActiveBrowserNode(browserNode)
        slicer.modules.sequences.showSequenceBrowser(browserNode)
        slicer.util.resetSliceViews()
        chart = nodes["psnrChart"] or nodes["volumeChart"]
        if chart is not None:
            slicer.modules.plots.logic().ShowChartInLayout(chart)
        self.ui.progressBar.value = 100
        report = self.logic.report(browserNode) or {}
        folding = max(report.get("folding_fraction") or [0.0])
        total = (report.get("timings_s") or {}).get("total")
        self.ui.statusLabel.text = (f"{nodes['frames'].GetNumberOfDataNodes()} frames in '{browserNode.GetName()}'"
                                    + (f", {total:.1f} s" if isinstance(total, (int, float)) else "")
                                    + f"; folded voxels: {100 * folding:.2f}% at most. "
                                    + report.get("motion_source", ""))

    def onTransformVisualizationChanged(self, index=None):
        browserNode = self._lastBrowserNode
        if browserNode is not None and slicer.mrmlScene.IsNodePresent(browserNode) \
                and self.logic.outputNodes(browserNode)["fields"] is not None:
            self.logic.setTransformVisualization(browserNode, self.ui.transformVisualizationComboBox.currentData)

    @staticmethod
    def _showError(message, error):
        if isinstance(error, ValueError):  # a user mistake: the message says what to change
            slicer.util.errorDisplay(f"{message}: {error}", windowTitle="DDMInterpolation")
        else:
            slicer.util.errorDisplay(f"{message}: {error}", windowTitle="DDMInterpolation",
                                     detailedText=traceback.format_exc())


#
# Self-test (runs inside Slicer; makes its own small phantom data, downloads nothing)
#

class DDMInterpolationTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_InputsAndCommandWithoutTorch()
        if not requirementsMet():  # e.g. the extension catalog's build machines: no PyTorch there
            self.delayDisplay("PyTorch or ddm4d's Python packages are not installed: the generation tests are "
                              "skipped. Press Generate once to install them, then run this self-test again.")
            return
        self.setUp()
        self.test_BadInputsLeaveSceneClean()
        self.setUp()
        self.test_GenerateFromVolumesAndSegmentation()
        self.setUp()
        self.test_GenerateFromCineSequence()
        self.setUp()
        self.test_WidgetBackgroundGeneration()

    def _phantom(self, frames=6):
        from ddm4d.phantom import make_subject
        from DDMInterpolationLib.Conversion import addVolumeNodeFromImage
        subject = make_subject(0, n_frames=frames, size=(48, 48, 6))
        scene = slicer.mrmlScene
        ed = addVolumeNodeFromImage(scene, subject.images[subject.ed], "phantom ED")
        es = addVolumeNodeFromImage(scene, subject.images[subject.es], "phantom ES")
        labels = addVolumeNodeFromImage(scene, subject.labels[subject.ed], "phantom ED labels",
                                        "vtkMRMLLabelMapVolumeNode")
        return subject, ed, es, labels

    def _model(self):
        """The bundled 3D model when ddm4d ships one, else a small untrained network saved to a file and
        fitted for a few steps (seconds on a CPU): the test checks the flow, not the model's quality."""
        from ddm4d.generation import bundled_model_path
        if bundled_model_path(3) is not None:
            return dict(model=Constants.DEFAULT_MODEL, fitSteps=0)
        from ddm4d.checkpoint import save_model
        from ddm4d.config import DDMConfig
        from ddm4d.model import DDM
        path = os.path.join(slicer.app.temporaryPath, "DDMInterpolationTest-small.safetensors")
        save_model(DDM(DDMConfig.for_dims(3, image_size=(32, 32, 8), spacing=(6.0, 6.0, 8.0))), path)
        return dict(model=path, fitSteps=2)

    def test_InputsAndCommandWithoutTorch(self):
        """What runs without PyTorch: the inputs on the source grid, the labels, the ddm4d generate command."""
        self.delayDisplay("Inputs and the ddm4d command (no PyTorch needed)")
        import SimpleITK as sitk
        from DDMInterpolationLib.Conversion import imageFromVolumeNode
        _, ed, es, labels = self._phantom()
        folder = tempfile.mkdtemp(prefix="DDMInterpolationTest-", dir=slicer.app.temporaryPath)
        try:
            command = DDMInterpolationLogic().buildGenerateCommand(folder, ed, es, numberOfFrames=4,
                                                                  segmentationNode=labels, device="cpu")
            option = lambda name: command.args[command.args.index(name) + 1]  # noqa: E731
            self.assertEqual(command.args[2:4], ["ddm4d", "generate"])
            self.assertEqual(len(option("--gammas").split(",")), 4)
            written, source = sitk.ReadImage(option("--source")), imageFromVolumeNode(ed)
            self.assertEqual(written.GetSize(), source.GetSize())
            for a, b in zip(written.GetOrigin() + written.GetSpacing() + written.GetDirection(),
                            source.GetOrigin() + source.GetSpacing() + source.GetDirection()):
                self.assertAlmostEqual(a, b, places=4)
            self.assertTrue(os.path.isfile(option("--seg")))
        finally:
            import shutil
            shutil.rmtree(folder, ignore_errors=True)

    def test_BadInputsLeaveSceneClean(self):
        self.delayDisplay("Bad inputs")
        ensureRequirements(confirm=None)  # the self-test installs nothing: it needs torch and ddm4d's packages
        _, ed, es, _ = self._phantom()
        logic = DDMInterpolationLogic()
        before = slicer.mrmlScene.GetNumberOfNodes()
        for kwargs in (dict(sourceNode=None, targetNode=es), dict(sourceNode=ed, targetNode=ed),
                       dict(sourceNode=ed, targetNode=es, model=os.path.join(slicer.app.temporaryPath, "nope.safetensors"))):
            with self.assertRaises(ValueError):
                logic.generate(**kwargs)
            self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)

    def test_GenerateFromVolumesAndSegmentation(self):
        self.delayDisplay("Generate from two volumes with a segmentation")
        from DDMInterpolationLib.Conversion import imageFromVolumeNode
        _, ed, es, labels = self._phantom()
        logic = DDMInterpolationLogic()
        browser = logic.generate(ed, es, numberOfFrames=4, segmentationNode=labels, device="cpu", **self._model())
        nodes = logic.outputNodes(browser)
        self.assertEqual(nodes["frames"].GetNumberOfDataNodes(), 4)
        self.assertEqual(nodes["fields"].GetNumberOfDataNodes(), 4)
        self.assertEqual(nodes["labels"].GetNumberOfDataNodes(), 4)
        self.assertIsNotNone(nodes["volumeChart"])
        source = imageFromVolumeNode(ed)
        for item in range(4):
            browser.SetSelectedItemNumber(item)
            frame = imageFromVolumeNode(nodes["framesProxy"])
            self.assertEqual(frame.GetSize(), source.GetSize())
            for a, b in zip(frame.GetOrigin() + frame.GetSpacing() + frame.GetDirection(),
                            source.GetOrigin() + source.GetSpacing() + source.GetDirection()):
                self.assertAlmostEqual(a, b, places=4)
        self.delayDisplay("Playing the cine")
        browser.SetPlaybackActive(True)
        self.delayDisplay("Done", 1000)
        browser.SetPlaybackActive(False)

    def test_GenerateFromCineSequence(self):
        self.delayDisplay("Generate from a cine sequence")
        from DDMInterpolationLib.Conversion import volumeNodeFromImage
        subject = self._phantom(frames=6)[0]
        cine = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSequenceNode", "phantom cine")
        for number, image in enumerate(subject.images):
            cine.SetDataNodeAtValue(volumeNodeFromImage(image, "frame"), str(number))
        logic = DDMInterpolationLogic()
        browser = logic.generate(sequenceNode=cine, sourceItem=0, targetItem=3, device="cpu", **self._model())
        nodes = logic.outputNodes(browser)
        self.assertEqual(nodes["frames"].GetNumberOfDataNodes(), 4)
        self.assertEqual(nodes["psnrTable"].GetNumberOfRows(), 2)  # items 1 and 2

    def test_WidgetBackgroundGeneration(self):
        self.delayDisplay("Generate from the module's GUI (background process)")
        import time
        _, ed, es, _ = self._phantom()
        slicer.util.selectModule("DDMInterpolation")
        widget = slicer.util.getModuleWidget("DDMInterpolation")
        parameters = widget._parameterNode
        parameters.useCineSequence = False
        parameters.sourceVolume = ed
        parameters.targetVolume = es
        parameters.numberOfFrames = 3
        model = self._model()
        parameters.fitSteps = model["fitSteps"]
        # select the model and device without writing them to the user's settings
        for combo, data in ((widget.ui.modelComboBox, model["model"]), (widget.ui.deviceComboBox, "cpu")):
            wasBlocked = combo.blockSignals(True)
            if combo.findData(data) < 0:
                combo.addItem(os.path.basename(data), data)
            combo.currentIndex = combo.findData(data)
            combo.blockSignals(wasBlocked)
        widget.onGenerate()
        self.assertIsNotNone(widget._run, "the background process did not start")
        workDirectory = widget._run.workDirectory
        deadline = time.time() + 600
        while widget._run is not None and time.time() < deadline:
            slicer.app.processEvents()  # the GUI keeps running while ddm4d works
            time.sleep(0.05)
        self.assertIsNone(widget._run, "generation did not finish in 10 minutes")
        self.assertFalse(os.path.exists(workDirectory), "the work folder is removed once the results are loaded")
        browsers = slicer.util.getNodesByClass("vtkMRMLSequenceBrowserNode")
        self.assertEqual(len(browsers), 1)
        self.assertEqual(widget.logic.outputNodes(browsers[0])["frames"].GetNumberOfDataNodes(), 3)
        self.delayDisplay("Test passed")
