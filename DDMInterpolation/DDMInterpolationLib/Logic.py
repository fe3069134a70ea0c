"""DDMInterpolationLogic: MRML nodes in, ddm4d in the middle, sequences and plots out.

Everything the module's GUI does is a call here, so it is scriptable from the Python console and
testable headless under ``slicer-core``. It imports only slicer/vtk MRML API, numpy, SimpleITK and
ddm4d (ddm4d.generation, and with it torch, only when generation runs). It never opens a dialog.
"""
import contextlib
import dataclasses
import json
import logging
import os
import sys

import numpy as np
import SimpleITK as sitk
import vtk

import slicer
from ddm4d.geometry import resample_to_reference, same_geometry
from ddm4d.metrics import psnr

from . import Constants as C
from .BackgroundProcess import processEnvironment

from .Conversion import (addVolumeNodeFromImage, as3D, gridTransformNodeFromField, imageFromVolumeNode,
                         isSingleSlice, LPS_TO_RAS, volumeNodeFromImage)
from .Plots import addChart, addTable, labelVolumesMl
from .Sequences import (addBrowser, addSequence, indexValueStrings, setFixedWindowLevel, setTransformVisualization,
                        showInSliceViews)


@dataclasses.dataclass
class GenerationInputs:
    """Validated inputs of one generation, as SimpleITK images (LPS); no scene node is made for them."""
    source: sitk.Image
    target: sitk.Image
    baseName: str
    gammas: list  # the gammas asked for (linspace(0, 1, frames) unless explicit)
    model: object = C.DEFAULT_MODEL  # "default", a .safetensors path, or None (refinement only)
    device: str = "auto"
    fitSteps: int = 0
    mode: str = C.DEFAULT_MODE
    refine: bool = C.DEFAULT_REFINE
    fade: str = C.DEFAULT_FADE
    center: tuple = None  # LPS mm
    labels: sitk.Image = None
    labelNames: dict = dataclasses.field(default_factory=dict)  # label value -> name
    labelColors: dict = dataclasses.field(default_factory=dict)  # label value -> (r, g, b)
    labelColorNodeID: str = None  # colour table of an input labelmap, reused for the output
    # a segmentation node as input: the output is a sequence of segmentation nodes too (same segment IDs,
    # names and colours), and this node is hidden while the cine plays
    sourceSegmentationNodeID: str = None
    segmentIDs: dict = dataclasses.field(default_factory=dict)  # label value -> segment ID of the input
    indexName: str = C.GAMMA_INDEX_NAME
    indexUnit: str = ""
    cineSequenceNode: object = None
    sourceItem: int = None
    targetItem: int = None
    cineIndexValues: list = None  # numeric index values of the cine items, when they are numbers


@dataclasses.dataclass
class GenerateCommand:
    """A ``ddm4d generate`` command line for a background process, and what is needed to load its output."""
    args: list
    env: dict
    workDirectory: str  # holds inputs/ and output/; the caller removes it when done
    outputDirectory: str  # the command's --out
    inputs: GenerationInputs


@contextlib.contextmanager
def removeNodesAddedOnError(scene):
    """Remove every node added to ``scene`` inside the block if the block raises (no half-built outputs)."""
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        yield
    except BaseException:
        removeNodesAddedSince(scene, before)
        raise


@contextlib.contextmanager
def temporaryNodes(scene):
    """Remove every node added to ``scene`` inside the block when it ends, whatever happens."""
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        yield
    finally:
        removeNodesAddedSince(scene, before)


def removeNodesAddedSince(scene, nodeIDsBefore):
    added = [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]
    for nodeID in reversed([nodeID for nodeID in added if nodeID not in nodeIDsBefore]):
        node = scene.GetNodeByID(nodeID)
        if node is not None:  # removing a node may have removed its display/storage nodes already
            scene.RemoveNode(node)


def _findSequencesLogic(scene):
    """The application's sequences logic when it watches ``scene``, else a new one set on ``scene``."""
    modules = getattr(slicer, "modules", None)
    sequences = getattr(modules, "sequences", None) if modules is not None else None
    if sequences is not None and sequences.logic().GetMRMLScene() is scene:
        return sequences.logic()
    sequencesLogic = slicer.vtkSlicerSequencesLogic()
    sequencesLogic.SetMRMLScene(scene)
    return sequencesLogic


class DDMInterpolationLogic:
    """Generate intermediate phases between two volumes with the Diffusion Deformable Model.

    Console example (inside Slicer)::

        import DDMInterpolationLib
        logic = DDMInterpolationLib.DDMInterpolationLogic()
        browser = logic.generate(getNode("ED"), getNode("ES"), numberOfFrames=10)
        frames = logic.outputNodes(browser)["frames"]   # vtkMRMLSequenceNode

    :param scene: the MRML scene (default ``slicer.mrmlScene``).
    :param sequencesLogic: a sequences logic watching ``scene`` (default: the application's, or a new one).
    """

    def __init__(self, scene=None, sequencesLogic=None):
        self.scene = scene if scene is not None else slicer.mrmlScene
        if self.scene is None:
            raise ValueError("no MRML scene: pass scene=... or set slicer.mrmlScene")
        self.sequencesLogic = sequencesLogic if sequencesLogic is not None else _findSequencesLogic(self.scene)
        self.lastReport = None

    # ------------------------------------------------------------------------------------------------
    # Public API
    # ------------------------------------------------------------------------------------------------

    def generate(self, sourceNode=None, targetNode=None, numberOfFrames=None, *, sequenceNode=None,
                 sourceItem=None, targetItem=None, gammas=None, model=C.DEFAULT_MODEL, device="auto", fitSteps=0,
                 roiNode=None, segmentationNode=None, mode=C.DEFAULT_MODE, refine=C.DEFAULT_REFINE,
                 fade=C.DEFAULT_FADE, transformVisualization=C.DEFAULT_TRANSFORM_VISUALIZATION, showResult=True,
                 progressCallback=None, cancelCallback=None):
        """Generate intermediate phases in this process and return the sequence browser node.

        Inputs are either ``sourceNode`` and ``targetNode`` (scalar volume nodes) or ``sequenceNode``
        (a cine vtkMRMLSequenceNode of volumes) with ``sourceItem`` and ``targetItem`` (item numbers).

        :param numberOfFrames: frames from source (gamma 0) to target (gamma 1), both included; default 10,
          or for a cine sequence one per real item between the two (so each generated frame has a real
          counterpart for the PSNR table).
        :param gammas: explicit gammas in [0, 1] instead of ``numberOfFrames``.
        :param model: ``"default"`` (bundled), a ``.safetensors`` path, a ``ddm4d.model.DDM``, or None / ``"none"``
          (no network: per-case refinement alone).
        :param device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        :param fitSteps: optimisation steps of the whole network on this pair before generating (0: none; slow).
        :param roiNode: optional vtkMRMLMarkupsROINode whose centre centres the model's field of view.
        :param segmentationNode: optional labelmap volume or segmentation node of the source, propagated
          to every frame (with a volume-over-time table and chart).
        :param mode: ``"symmetric"`` (source and target warped along one path and cross-faded; the default) or
          ``"forward"`` (the source warped, as in the paper); see ddm4d.generation.
        :param refine: per-case refinement of the path on this pair, started from the model (the default).
        :param fade: how symmetric mode joins the two moved images: ``"confidence"`` (the default: voxel by
          voxel towards the plain blend where the motion does not explain the pair) or ``"linear"``.
        :param transformVisualization: ``"glyph"``, ``"grid"`` or ``"contour"`` in slice views.
        :param showResult: show the frames (and labels) in the slice views.
        :param progressCallback: ``progressCallback(fraction, message)``.
        :param cancelCallback: ``cancelCallback() -> bool``; True stops generation (ddm4d.generation.Cancelled).
        :return: the vtkMRMLSequenceBrowserNode; :meth:`outputNodes` lists what else was made.
        :raises ValueError: bad inputs, with a message that says what to change; the scene is left as it was.
        :raises ddm4d.generation.Cancelled: ``cancelCallback`` returned True; no node was made.
        """
        inputs = self.prepareInputs(
            sourceNode, targetNode, numberOfFrames, sequenceNode=sequenceNode, sourceItem=sourceItem,
            targetItem=targetItem, gammas=gammas, model=model, device=device, fitSteps=fitSteps, roiNode=roiNode,
            segmentationNode=segmentationNode, mode=mode, refine=refine, fade=fade)
        from ddm4d.generation import generate as ddmGenerate  # imports torch: only now, never at module import

        def generationProgress(fraction, message):
            if progressCallback is not None:
                progressCallback(0.95 * fraction, message)

        result = ddmGenerate(
            inputs.source, inputs.target, model=inputs.model, gammas=inputs.gammas, fit_steps=inputs.fitSteps,
            seg=inputs.labels, device=inputs.device, mode=inputs.mode, refine=inputs.refine, center=inputs.center,
            fade=inputs.fade, progress=generationProgress, cancel=cancelCallback)
        report = {
            "gammas": [float(g) for g in result.gammas],
            "folding_fraction": [float(f) for f in result.folding_fraction],
            "timings_s": dict(result.timings_s), "model": result.model, "device": result.device,
            "mode": result.mode, "fade": result.fade, "fit_steps": inputs.fitSteps, "messages": list(result.messages),
            "refinement": result.refinement, "motion_source": result.motion_source,
        }
        if progressCallback is not None:
            progressCallback(0.95, "creating sequences")
        browserNode = self.createOutputNodes(inputs, result.gammas, result.frames, result.fields, result.labels,
                                             report=report, transformVisualization=transformVisualization,
                                             showResult=showResult)
        if progressCallback is not None:
            progressCallback(1.0, "done")
        return browserNode

    def buildGenerateCommand(self, workDirectory, sourceNode=None, targetNode=None, numberOfFrames=None, *,
                             pythonExecutable=None, **kwargs):
        """Write the inputs to ``workDirectory/inputs`` and return the ``ddm4d generate`` command for them.

        Takes the same inputs as :meth:`generate` (except the callbacks and display options). The
        command writes into ``workDirectory/output`` (``ddm4d generate`` replaces its ``--out`` folder
        as a whole, so the inputs live beside it, not in it). Run ``command.args`` with ``command.env``
        in the background (the widget uses :class:`BackgroundProcess`), then call
        ``loadGenerateOutputs(command.outputDirectory, command.inputs)``.

        :param pythonExecutable: default ``sys.executable`` (PythonSlicer inside Slicer).
        :raises ValueError: bad inputs; nothing is written and the scene is unchanged.
        """
        inputs = self.prepareInputs(sourceNode, targetNode, numberOfFrames, **kwargs)
        inputsDirectory = os.path.join(workDirectory, C.INPUTS_SUBDIRECTORY)
        outputDirectory = os.path.join(workDirectory, C.OUTPUT_SUBDIRECTORY)
        os.makedirs(inputsDirectory, exist_ok=True)
        sourcePath = os.path.join(inputsDirectory, "source.nrrd")  # NRRD keeps the geometry exactly
        targetPath = os.path.join(inputsDirectory, "target.nrrd")
        sitk.WriteImage(inputs.source, sourcePath)
        sitk.WriteImage(inputs.target, targetPath)
        args = [pythonExecutable or sys.executable, "-m", "ddm4d", "generate",
                "--source", sourcePath, "--target", targetPath, "--out", outputDirectory,
                "--gammas", ",".join(f"{g:.9g}" for g in inputs.gammas),
                "--fit-steps", str(inputs.fitSteps), "--device", inputs.device, "--mode", inputs.mode,
                "--refine" if inputs.refine else "--no-refine", "--fade", inputs.fade]
        args += ["--model", "none" if inputs.model is None else str(inputs.model)]
        # only what loadGenerateOutputs reads, uncompressed: the work folder is temporary
        args += ["--outputs", ",".join(C.GENERATE_OUTPUTS), "--compress", "0"]
        if inputs.labels is not None:
            labelsPath = os.path.join(inputsDirectory, "labels.nrrd")
            sitk.WriteImage(inputs.labels, labelsPath, True)
            args += ["--seg", labelsPath]
        if inputs.center is not None:
            args += ["--center", ",".join(f"{c:.9g}" for c in inputs.center)]
        return GenerateCommand(args=args, env=processEnvironment(), workDirectory=workDirectory,
                               outputDirectory=outputDirectory, inputs=inputs)

    def loadGenerateOutputs(self, outputDirectory, inputs, transformVisualization=C.DEFAULT_TRANSFORM_VISUALIZATION,
                            showResult=True):
        """Load what ``ddm4d generate`` wrote into ``outputDirectory`` (its ``--out``) and build the output nodes.

        :param inputs: ``command.inputs`` from :meth:`buildGenerateCommand` (or :meth:`prepareInputs`).
        :return: the vtkMRMLSequenceBrowserNode, as :meth:`generate`.
        :raises ValueError: the folder has no readable report.json or misses listed files.
        """
        reportPath = os.path.join(outputDirectory, C.REPORT_FILE)
        try:
            with open(reportPath, encoding="utf-8") as file:
                report = json.load(file)
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read the generation report {reportPath}: {error}") from None

        def resolve(path):
            return path if os.path.isabs(path) else os.path.join(outputDirectory, path)

        def readAll(key, required=True):
            paths = report.get(key)
            if not paths:
                if required:
                    raise ValueError(f"{reportPath} lists no {key}")
                return None
            missing = [p for p in paths if not os.path.exists(resolve(p))]
            if missing:
                raise ValueError(f"{reportPath} lists {key} that do not exist: {missing[:3]}")
            return _ImagesOnDisk([resolve(p) for p in paths])

        frames = readAll("frames")
        fields = readAll("fields")
        labels = readAll("labels", required=False)
        gammas = report.get("gammas") or inputs.gammas
        if not (len(gammas) == len(frames) == len(fields)):
            raise ValueError(f"{reportPath}: {len(gammas)} gammas, {len(frames)} frames and {len(fields)} fields "
                             "should be as many")
        return self.createOutputNodes(inputs, gammas, frames, fields, labels, report=report,
                                      transformVisualization=transformVisualization, showResult=showResult)

    def prepareInputs(self, sourceNode=None, targetNode=None, numberOfFrames=None, *, sequenceNode=None,
                      sourceItem=None, targetItem=None, gammas=None, model=C.DEFAULT_MODEL, device="auto",
                      fitSteps=0, roiNode=None, segmentationNode=None, mode=C.DEFAULT_MODE, refine=C.DEFAULT_REFINE,
                      fade=C.DEFAULT_FADE):
        """Validate the inputs of :meth:`generate` and convert them to SimpleITK images.

        :raises ValueError: with a message that says what to change. Leaves the scene unchanged.
        """
        if sequenceNode is not None:
            if sourceNode is not None or targetNode is not None:
                raise ValueError("give either a cine sequence or source and target volumes, not both")
            inputs = self._cineInputs(sequenceNode, sourceItem, targetItem, numberOfFrames)
            numberOfFrames = inputs["numberOfFrames"]
        else:
            inputs = self._volumeInputs(sourceNode, targetNode)
            numberOfFrames = C.DEFAULT_NUMBER_OF_FRAMES if numberOfFrames is None else numberOfFrames

        source, target = inputs["source"], inputs["target"]
        if isSingleSlice(source) != isSingleSlice(target):
            kinds = {True: "a single slice (2D)", False: "a 3D volume"}
            raise ValueError(f"the source is {kinds[isSingleSlice(source)]} of size {source.GetSize()} but the "
                             f"target is {kinds[isSingleSlice(target)]} of size {target.GetSize()}; "
                             "choose two phases of the same acquisition")

        fields = dict(
            source=source, target=target, baseName=inputs["baseName"],
            gammas=self._gammas(numberOfFrames, gammas), model=self._checkModel(model, fitSteps, refine),
            device=self._checkDevice(device), fitSteps=int(fitSteps), mode=self._checkMode(mode), refine=bool(refine),
            fade=self._checkFade(fade), center=self._roiCenter(roiNode),
            indexName=inputs.get("indexName", C.GAMMA_INDEX_NAME), indexUnit=inputs.get("indexUnit", ""),
            cineSequenceNode=sequenceNode, sourceItem=inputs.get("sourceItem"), targetItem=inputs.get("targetItem"),
            cineIndexValues=inputs.get("cineIndexValues"))
        if segmentationNode is not None:
            fields.update(self._labelInputs(segmentationNode, source))
        return GenerationInputs(**fields)

    def createOutputNodes(self, inputs, gammas, frames, fields, labels=None, report=None,
                          transformVisualization=C.DEFAULT_TRANSFORM_VISUALIZATION, showResult=True):
        """Sequences (frames, fields, labels), their browser, tables and charts from generated images.

        All or nothing: if anything fails, every node made here is removed again.

        :param gammas: one per frame; :param frames: SimpleITK images on the source grid;
        :param fields: SimpleITK displacement fields (LPS mm, pull); :param labels: label images or None.
        :return: the vtkMRMLSequenceBrowserNode, with node references to the rest (see :meth:`outputNodes`).
        """
        if not (len(gammas) == len(frames) == len(fields)) or (labels is not None and len(labels) != len(frames)):
            raise ValueError("gammas, frames, fields (and labels) must be lists of the same length")
        scene = self.scene
        base = inputs.baseName
        indexValues = indexValueStrings(self._indexValues(inputs, gammas))
        with removeNodesAddedOnError(scene):
            framesSequence = addSequence(
                scene, f"{base} frames", (volumeNodeFromImage(f, f"{base} frame") for f in frames),
                indexValues, inputs.indexName, inputs.indexUnit)
            fieldsSequence = addSequence(
                scene, f"{base} displacement", (gridTransformNodeFromField(f, f"{base} displacement") for f in fields),
                indexValues, inputs.indexName, inputs.indexUnit)
            synchronized = [fieldsSequence]
            labelsSequence = None
            asSegmentation = labels is not None and inputs.sourceSegmentationNodeID is not None
            if asSegmentation:  # segmentation in, segmentation out
                labelsSequence = addSequence(
                    scene, f"{base} segmentation",
                    (self._segmentationFromLabels(_asLabelImage(l), inputs, f"{base} segmentation") for l in labels),
                    indexValues, inputs.indexName, inputs.indexUnit)
                synchronized.append(labelsSequence)
            elif labels is not None:
                labelsSequence = addSequence(
                    scene, f"{base} labels",
                    (volumeNodeFromImage(_asLabelImage(l), f"{base} labels", "vtkMRMLLabelMapVolumeNode") for l in labels),
                    indexValues, inputs.indexName, inputs.indexUnit)
                synchronized.append(labelsSequence)
            browserNode = addBrowser(scene, f"{base} browser", framesSequence, synchronized)
            browserNode.SetNodeReferenceID(C.REFERENCE_FRAMES, framesSequence.GetID())
            browserNode.SetNodeReferenceID(C.REFERENCE_FIELDS, fieldsSequence.GetID())

            framesProxy = browserNode.GetProxyNode(framesSequence)
            setFixedWindowLevel(framesProxy, inputs.source)
            transformProxy = browserNode.GetProxyNode(fieldsSequence)
            setTransformVisualization(transformProxy, transformVisualization, regionNode=framesProxy)
            if not showResult:
                transformProxy.GetDisplayNode().SetVisibility(False)

            labelsProxy = None
            if labelsSequence is not None:
                browserNode.SetNodeReferenceID(C.REFERENCE_LABELS, labelsSequence.GetID())
                labelsProxy = browserNode.GetProxyNode(labelsSequence)
                if asSegmentation:
                    labelsProxy.CreateDefaultDisplayNodes()
                else:
                    self._colorLabels(browserNode, labelsProxy, inputs)
                self._addVolumeOverTime(browserNode, inputs, gammas, labels)
            if inputs.cineSequenceNode is not None:
                self._addPsnrAgainstCine(browserNode, inputs, gammas, frames)

            self.lastReport = dict(report or {}, gammas=[float(g) for g in gammas])
            browserNode.SetAttribute(C.ATTRIBUTE_REPORT, json.dumps(self.lastReport))
            if showResult:
                showInSliceViews(scene, framesProxy, None if asSegmentation else labelsProxy)
                sourceSegmentation = scene.GetNodeByID(inputs.sourceSegmentationNodeID) if asSegmentation else None
                if sourceSegmentation is not None and sourceSegmentation.GetDisplayNode() is not None:
                    sourceSegmentation.GetDisplayNode().SetVisibility(False)  # the moving one shows instead
        return browserNode

    def outputNodes(self, browserNode):
        """What one generation made, by role: browser, frames, fields, labels, (proxies), tables, charts."""
        nodes = {"browser": browserNode}
        for role, reference in (("frames", C.REFERENCE_FRAMES), ("fields", C.REFERENCE_FIELDS),
                                ("labels", C.REFERENCE_LABELS), ("volumeTable", C.REFERENCE_VOLUME_TABLE),
                                ("volumeChart", C.REFERENCE_VOLUME_CHART), ("psnrTable", C.REFERENCE_PSNR_TABLE),
                                ("psnrChart", C.REFERENCE_PSNR_CHART), ("labelColors", C.REFERENCE_LABEL_COLORS)):
            nodes[role] = browserNode.GetNodeReference(reference)
        for role in ("frames", "fields", "labels"):
            nodes[role + "Proxy"] = browserNode.GetProxyNode(nodes[role]) if nodes[role] is not None else None
        return nodes

    def setTransformVisualization(self, browserNode, mode):
        """Switch the displacement display of a generation to 'glyph', 'grid' or 'contour'."""
        nodes = self.outputNodes(browserNode)
        if nodes["fieldsProxy"] is None:
            raise ValueError(f"'{browserNode.GetName()}' is not a DDMInterpolation result")
        setTransformVisualization(nodes["fieldsProxy"], mode, regionNode=nodes["framesProxy"])

    @staticmethod
    def report(browserNode):
        """The generation report stored on a browser node (gammas, timings, folding fraction, ...)."""
        text = browserNode.GetAttribute(C.ATTRIBUTE_REPORT) if browserNode is not None else None
        return json.loads(text) if text else None

    # ------------------------------------------------------------------------------------------------
    # Input validation
    # ------------------------------------------------------------------------------------------------

    @staticmethod
    def _volumeInputs(sourceNode, targetNode):
        if sourceNode is None:
            raise ValueError("no source volume: select the source phase (for example end-diastole), "
                             "or a cine sequence")
        if targetNode is None:
            raise ValueError("no target volume: select the target phase (for example end-systole)")
        if sourceNode is targetNode or sourceNode.GetID() == targetNode.GetID():
            raise ValueError(f"source and target are the same volume '{sourceNode.GetName()}': "
                             "choose two different phases")
        for role, node in (("source", sourceNode), ("target", targetNode)):
            if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
                raise ValueError(f"the {role} '{node.GetName()}' is a {node.GetClassName()}; "
                                 "choose a scalar (grayscale) volume")
        return dict(source=imageFromVolumeNode(sourceNode, np.float32),
                    target=imageFromVolumeNode(targetNode, np.float32),
                    baseName=f"{sourceNode.GetName()} DDM")

    @staticmethod
    def _cineInputs(sequenceNode, sourceItem, targetItem, numberOfFrames):
        if not sequenceNode.IsA("vtkMRMLSequenceNode"):
            raise ValueError(f"'{sequenceNode.GetName()}' is a {sequenceNode.GetClassName()}, not a sequence")
        count = sequenceNode.GetNumberOfDataNodes()
        if count < 2:
            raise ValueError(f"the cine sequence '{sequenceNode.GetName()}' has {count} item(s); it needs two or more")
        if sourceItem is None or targetItem is None:
            raise ValueError("choose the source and target item numbers of the cine sequence")
        sourceItem, targetItem = int(sourceItem), int(targetItem)
        for role, item in (("source", sourceItem), ("target", targetItem)):
            if not 0 <= item < count:
                raise ValueError(f"{role} item {item} is outside the cine sequence '{sequenceNode.GetName()}' "
                                 f"(items 0 to {count - 1})")
        if sourceItem == targetItem:
            raise ValueError(f"source and target are the same cine item ({sourceItem}): choose two different phases")
        images = []
        for role, item in (("source", sourceItem), ("target", targetItem)):
            dataNode = sequenceNode.GetNthDataNode(item)
            if dataNode is None or not dataNode.IsA("vtkMRMLScalarVolumeNode") or dataNode.IsA(
                    "vtkMRMLLabelMapVolumeNode"):
                kind = dataNode.GetClassName() if dataNode is not None else "nothing"
                raise ValueError(f"the cine sequence '{sequenceNode.GetName()}' holds {kind} at item {item}; "
                                 "it must be a sequence of scalar volumes")
            images.append(imageFromVolumeNode(dataNode, np.float32))
        cineIndexValues = None
        try:
            cineIndexValues = [float(sequenceNode.GetNthIndexValue(i)) for i in range(count)]
        except ValueError:
            pass  # text index values: fall back to item numbers
        if numberOfFrames is None:
            numberOfFrames = abs(targetItem - sourceItem) + 1
        return dict(
            source=images[0], target=images[1], numberOfFrames=numberOfFrames,
            baseName=f"{sequenceNode.GetName()} {sourceItem}-{targetItem} DDM",
            indexName=sequenceNode.GetIndexName() if cineIndexValues else "item",
            indexUnit=sequenceNode.GetIndexUnit() if cineIndexValues else "",
            sourceItem=sourceItem, targetItem=targetItem, cineIndexValues=cineIndexValues)

    @staticmethod
    def _gammas(numberOfFrames, gammas):
        if gammas is not None:
            gammas = [float(g) for g in gammas]
            if len(gammas) < 1 or any(not 0.0 <= g <= 1.0 for g in gammas):
                raise ValueError(f"gammas must be numbers in [0, 1], got {gammas}")
            return gammas
        if int(numberOfFrames) != numberOfFrames or numberOfFrames < 2:
            raise ValueError(f"the number of frames must be a whole number of at least 2 (source and target), "
                             f"got {numberOfFrames}")
        return [float(g) for g in np.linspace(0.0, 1.0, int(numberOfFrames))]

    @staticmethod
    def _checkModel(model, fitSteps, refine=C.DEFAULT_REFINE):
        if int(fitSteps) != fitSteps or fitSteps < 0:
            raise ValueError(f"fitting steps must be a whole number >= 0, got {fitSteps}")
        if model is None or (isinstance(model, str) and model.lower() == "none"):
            if fitSteps <= 0 and not refine:
                raise ValueError("without a model, turn per-case refinement on (or set fitting steps above 0)")
            return None
        if isinstance(model, str) and model == C.DEFAULT_MODEL:
            return model
        if not isinstance(model, (str, os.PathLike)):
            return model  # a ddm4d.model.DDM instance, for console use
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise ValueError(f"model file not found: {path}; choose a .safetensors file, or the bundled default model")
        return path

    @staticmethod
    def _checkDevice(device):
        device = (device or "auto").lower()
        if device not in C.DEVICES:
            raise ValueError(f"device must be one of {', '.join(C.DEVICES)}, got {device!r}")
        return device

    @staticmethod
    def _checkMode(mode):
        mode = C.MODE_ALIASES.get(mode, mode)
        if mode not in C.MODES:
            raise ValueError(f"mode must be one of {', '.join(repr(m) for m in C.MODES)}, got {mode!r}")
        return mode

    @staticmethod
    def _checkFade(fade):
        if fade not in C.FADES:
            raise ValueError(f"fade must be one of {', '.join(repr(f) for f in C.FADES)}, got {fade!r}")
        return fade

    @staticmethod
    def _roiCenter(roiNode):
        if roiNode is None:
            return None
        if not roiNode.IsA("vtkMRMLMarkupsROINode"):
            raise ValueError(f"'{roiNode.GetName()}' is a {roiNode.GetClassName()}; choose a markups ROI")
        center = [0.0, 0.0, 0.0]
        roiNode.GetCenterWorld(center)
        return tuple(float(c) for c in LPS_TO_RAS @ np.array(center))

    def _labelInputs(self, node, sourceImage):
        """Labels of the source as a SimpleITK image on the source grid, with names and colours."""
        names, colors, colorNodeID = {}, {}, None
        if node.IsA("vtkMRMLLabelMapVolumeNode"):
            labels = imageFromVolumeNode(node, np.int16)
            displayNode = node.GetDisplayNode()
            colorNode = displayNode.GetColorNode() if displayNode is not None else None
            values = [int(v) for v in np.unique(sitk.GetArrayViewFromImage(labels)) if v != 0]
            if colorNode is not None:
                colorNodeID = colorNode.GetID()
                for value in values:
                    rgba = [0.0, 0.0, 0.0, 0.0]
                    if colorNode.GetColor(value, rgba):
                        colors[value] = tuple(rgba[:3])
                    name = colorNode.GetColorName(value)
                    if name and name != "(none)":
                        names[value] = name
        elif node.IsA("vtkMRMLSegmentationNode"):
            segmentation = node.GetSegmentation()
            if segmentation.GetNumberOfSegments() == 0:
                raise ValueError(f"the segmentation '{node.GetName()}' has no segments")
            labels = self._exportSegmentation(node, sourceImage)
            segmentIDs = {}
            for number in range(segmentation.GetNumberOfSegments()):
                segment = segmentation.GetNthSegment(number)
                names[number + 1] = segment.GetName()
                colors[number + 1] = tuple(segment.GetColor())
                segmentIDs[number + 1] = segmentation.GetNthSegmentID(number)
        else:
            raise ValueError(f"'{node.GetName()}' is a {node.GetClassName()}; the source segmentation must be a "
                             "labelmap volume or a segmentation")
        labels, reference = as3D(labels), as3D(sourceImage)
        if not same_geometry(labels, reference, tol=1e-4):
            labels = resample_to_reference(labels, reference, "nearest", 0)
        if not np.any(sitk.GetArrayViewFromImage(labels)):
            raise ValueError(f"the segmentation '{node.GetName()}' is empty on the source volume's grid")
        found = dict(labels=sitk.Cast(labels, sitk.sitkInt16), labelNames=names, labelColors=colors,
                     labelColorNodeID=colorNodeID)
        if node.IsA("vtkMRMLSegmentationNode"):
            found.update(sourceSegmentationNodeID=node.GetID(), segmentIDs=segmentIDs)
        return found

    def _segmentationFromLabels(self, labels, inputs, name):
        """A segmentation node (outside the scene, for a sequence) with one segment per label of the input
        segmentation: its segment ID, name and colour, empty where the label is absent in this frame."""
        out = slicer.vtkMRMLSegmentationNode()
        out.SetName(name)
        with temporaryNodes(self.scene):  # the import needs nodes in the scene; none of them stays
            labelNode = addVolumeNodeFromImage(self.scene, labels, "DDM labels", "vtkMRMLLabelMapVolumeNode")
            imported = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "DDM imported")
            if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelNode, imported):
                raise ValueError("could not turn the propagated labels into a segmentation")
            found = {}
            source = imported.GetSegmentation()
            for number in range(source.GetNumberOfSegments()):
                found[int(source.GetNthSegment(number).GetLabelValue())] = source.GetNthSegment(number)
            segmentation = out.GetSegmentation()
            for value in sorted(inputs.segmentIDs):
                segmentID, segmentName = inputs.segmentIDs[value], inputs.labelNames.get(value, f"Label {value}")
                color = inputs.labelColors.get(value, (0.5, 0.5, 0.5))
                if value in found:
                    segment = found[value]
                    segment.SetName(segmentName)
                    segment.SetColor(*color)
                    segmentation.AddSegment(segment, segmentID)
                else:
                    segmentation.AddEmptySegment(segmentID, segmentName, color)
        return out

    def _exportSegmentation(self, segmentationNode, sourceImage):
        """All segments as one label image on the source grid (segment n -> label n + 1)."""
        with temporaryNodes(self.scene):  # the export needs nodes in the scene; none of them stays
            grid = sitk.Image(as3D(sourceImage).GetSize(), sitk.sitkUInt8)  # only the geometry matters
            grid.CopyInformation(as3D(sourceImage))
            reference = addVolumeNodeFromImage(self.scene, grid, "DDM reference")
            labelNode = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "DDM labels")
            segmentIDs = vtk.vtkStringArray()
            segmentationNode.GetSegmentation().GetSegmentIDs(segmentIDs)
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                    segmentationNode, segmentIDs, labelNode, reference):
                raise ValueError(f"could not export the segmentation '{segmentationNode.GetName()}' to labels")
            return imageFromVolumeNode(labelNode, np.int16)

    # ------------------------------------------------------------------------------------------------
    # Outputs
    # ------------------------------------------------------------------------------------------------

    @staticmethod
    def _phases(inputs, gammas):
        """Fractional cine item position of each gamma."""
        return [inputs.sourceItem + g * (inputs.targetItem - inputs.sourceItem) for g in gammas]

    def _indexValues(self, inputs, gammas):
        if inputs.cineSequenceNode is None:
            return list(gammas)
        phases = self._phases(inputs, gammas)
        if inputs.cineIndexValues is None:
            return phases
        items = np.arange(len(inputs.cineIndexValues))
        return list(np.interp(phases, items, inputs.cineIndexValues))

    def _colorLabels(self, browserNode, labelsProxy, inputs):
        displayNode = labelsProxy.GetDisplayNode()
        if displayNode is None:
            labelsProxy.CreateDefaultDisplayNodes()
            displayNode = labelsProxy.GetDisplayNode()
        colorNodeID = inputs.labelColorNodeID
        if colorNodeID is None and inputs.labelColors:
            colorNode = self.scene.AddNewNodeByClass("vtkMRMLColorTableNode",
                                                     self.scene.GenerateUniqueName(f"{inputs.baseName} label colors"))
            colorNode.SetTypeToUser()
            colorNode.SetNumberOfColors(max(inputs.labelColors) + 1)
            colorNode.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
            for value, rgb in inputs.labelColors.items():
                colorNode.SetColor(value, inputs.labelNames.get(value, f"Label {value}"), *rgb, 1.0)
            colorNodeID = colorNode.GetID()
            browserNode.SetNodeReferenceID(C.REFERENCE_LABEL_COLORS, colorNodeID)
        if displayNode is not None and colorNodeID is not None:
            displayNode.SetAndObserveColorNodeID(colorNodeID)

    def _addVolumeOverTime(self, browserNode, inputs, gammas, labels):
        values = [int(v) for v in np.unique(sitk.GetArrayViewFromImage(inputs.labels)) if v != 0]
        volumes = labelVolumesMl(labels, values)
        columns = {C.COLUMN_FRAME: np.arange(len(gammas)), C.COLUMN_GAMMA: gammas}
        names = []
        for number, value in enumerate(values):
            name = f"{inputs.labelNames.get(value, f'Label {value}')} (mL)"
            names.append(name)
            columns[name] = volumes[:, number]
        title = f"{inputs.baseName} volume over time"
        tableNode = addTable(self.scene, title, columns)
        chartNode = addChart(self.scene, title, tableNode, C.COLUMN_GAMMA, names, "gamma (source to target)",
                             "volume (mL)", colors=[inputs.labelColors.get(v) for v in values]
                             if all(v in inputs.labelColors for v in values) else None)
        browserNode.SetNodeReferenceID(C.REFERENCE_VOLUME_TABLE, tableNode.GetID())
        browserNode.SetNodeReferenceID(C.REFERENCE_VOLUME_CHART, chartNode.GetID())

    def _addPsnrAgainstCine(self, browserNode, inputs, gammas, frames):
        """PSNR of each generated frame strictly between source and target that falls on a real cine item,
        against that item; the linear blend of source and target beside it as the simple baseline."""
        rows = {C.COLUMN_FRAME: [], C.COLUMN_GAMMA: [], C.COLUMN_CINE_ITEM: [], C.COLUMN_PSNR_DDM: [],
                C.COLUMN_PSNR_BLEND: []}
        source = sitk.GetArrayViewFromImage(inputs.source).astype(np.float64)
        target = sitk.GetArrayViewFromImage(inputs.target).astype(np.float64)
        for number, (gamma, phase) in enumerate(zip(gammas, self._phases(inputs, gammas))):
            item = int(round(phase))
            if not 0.0 < gamma < 1.0 or abs(phase - item) > C.PHASE_TOLERANCE:
                continue
            real = sitk.GetArrayFromImage(imageFromVolumeNode(inputs.cineSequenceNode.GetNthDataNode(item),
                                                              np.float32))
            generated = sitk.GetArrayViewFromImage(frames[number])
            if real.shape != generated.shape:
                logging.warning(f"cine item {item} has another grid than the source; no PSNR for it")
                continue
            rows[C.COLUMN_FRAME].append(number)
            rows[C.COLUMN_GAMMA].append(gamma)
            rows[C.COLUMN_CINE_ITEM].append(item)
            rows[C.COLUMN_PSNR_DDM].append(psnr(generated, real))
            rows[C.COLUMN_PSNR_BLEND].append(psnr((1.0 - gamma) * source + gamma * target, real))
        if not rows[C.COLUMN_FRAME]:
            logging.info("no generated frame falls on a real cine item between source and target: no PSNR table")
            return
        title = f"{inputs.baseName} PSNR against cine"
        tableNode = addTable(self.scene, title, rows)
        chartNode = addChart(self.scene, title, tableNode, C.COLUMN_CINE_ITEM,
                             [C.COLUMN_PSNR_DDM, C.COLUMN_PSNR_BLEND], "cine item", "PSNR (dB)")
        browserNode.SetNodeReferenceID(C.REFERENCE_PSNR_TABLE, tableNode.GetID())
        browserNode.SetNodeReferenceID(C.REFERENCE_PSNR_CHART, chartNode.GetID())


def _asLabelImage(image):
    return sitk.Cast(as3D(image), sitk.sitkInt16)


class _ImagesOnDisk:
    """A list of images read from their files when asked for: the sequences copy them one at a time, so
    the whole result is never in memory twice (20 frames of 256 x 256 x 100 with fields: GBs)."""

    def __init__(self, paths):
        self.paths = list(paths)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return _readImageOrField(self.paths[index])

    def __iter__(self):
        return (_readImageOrField(path) for path in self.paths)


def _readImageOrField(path):
    """A SimpleITK image; ITK transform files (.h5, .tfm) holding a displacement field give the field."""
    if path.lower().endswith((".h5", ".hdf5", ".tfm", ".txt")):
        transform = sitk.ReadTransform(path)
        if transform.GetName() == "CompositeTransform":
            transform = sitk.CompositeTransform(transform).GetNthTransform(0)
        return sitk.DisplacementFieldTransform(transform).GetDisplacementField()
    return sitk.ReadImage(path)
