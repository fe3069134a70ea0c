"""DDMInterpolation's logic with a real MRML scene (PyPI `slicer-core`: real nodes, no Qt, no app).

Volumes are oblique (rotated direction), anisotropic and off origin, because that is where LPS/RAS,
axis-order and direction mix-ups show. Generated frames and fields are synthetic here (frame =
source pulled through a known smooth field, exactly ddm4d's contract), so these tests check the MRML
side exactly; the end-to-end tests at the bottom run the real ``ddm4d.generation``.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="the Slicer logic tests need the PyPI package slicer-core")
import vtk  # noqa: E402  (slicer-core brings the matching vtk)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "DDMInterpolation"))  # the module's Lib is not a pip package

from DDMInterpolationLib import Constants as C  # noqa: E402
from DDMInterpolationLib import Requirements  # noqa: E402
from DDMInterpolationLib.BackgroundProcess import BackgroundProcess, parseProgressLine  # noqa: E402
from DDMInterpolationLib.Conversion import (  # noqa: E402
    LPS_TO_RAS, addVolumeNodeFromImage, displacementFieldFromGridTransformNode, gridTransformNodeFromField,
    imageFromVolumeNode, updateVolumeNodeFromImage)
from DDMInterpolationLib.Logic import DDMInterpolationLogic, temporaryNodes  # noqa: E402

# What the Slicer application's Segmentations module does at start-up: without its conversion rules a
# segmentation cannot be copied (into a sequence, for one), as the application always can
for _rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule, slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
    slicer.vtkSegmentationConverterFactory.GetInstance().RegisterConverterRule(_rule())
from ddm4d.metrics import psnr  # noqa: E402

SIZE = (22, 18, 7)  # x, y, z
SPACING = (1.3, 0.9, 3.1)
ORIGIN = (12.0, -40.0, 7.5)


def rotation(axis, degrees):
    k = np.asarray(axis, dtype=float)
    k /= np.linalg.norm(k)
    t = np.deg2rad(degrees)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(t) * kx + (1 - np.cos(t)) * kx @ kx


DIRECTION = rotation((0.3, -0.5, 0.8), 35.0)


def oblique(array, spacing=SPACING, origin=ORIGIN, direction=DIRECTION, isVector=False):
    image = sitk.GetImageFromArray(array, isVector=isVector)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(tuple(np.asarray(direction).ravel()))
    return image


def smoothImage(size=SIZE, phase=0.0):
    z, y, x = np.mgrid[:size[2], :size[1], :size[0]].astype(float)
    return (100 + 40 * np.sin(x / 3.5 + phase) + 30 * np.cos(y / 4.0) + 5 * z).astype(np.float32)


def smoothField(gamma, size=SIZE):
    """A smooth LPS displacement (mm) scaled by gamma; zero at gamma 0."""
    z, y, x = np.mgrid[:size[2], :size[1], :size[0]].astype(float)
    u = np.zeros(x.shape + (3,))
    u[..., 0] = 2.0 * np.sin(y / 5.0)
    u[..., 1] = -1.5 * np.cos(x / 6.0)
    u[..., 2] = 0.8 * np.sin(x / 7.0)
    return gamma * u


def pull(source, field):
    """frame = source pulled through the field (ITK convention; ddm4d's contract: outside -> source minimum)."""
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    outside = float(sitk.GetArrayViewFromImage(source).min())
    return sitk.Resample(source, source, transform, sitk.sitkLinear, outside, sitk.sitkFloat32)


def fakeResult(source, gammas, labels=None):
    """What ddm4d.generation returns, built from a known field."""
    fields = [oblique(smoothField(g, source.GetSize()), source.GetSpacing(), source.GetOrigin(),
                      np.reshape(source.GetDirection(), (3, 3)), isVector=True) for g in gammas]
    frames = [pull(source, f) for f in fields]
    warpedLabels = None
    if labels is not None:
        warpedLabels = [sitk.Resample(labels, labels, sitk.DisplacementFieldTransform(sitk.Cast(f, sitk.sitkVectorFloat64)),
                                      sitk.sitkNearestNeighbor, 0, labels.GetPixelID()) for f in fields]
    return frames, fields, warpedLabels


def addCine(scene, frames, indexValues, name="cine", indexName="time", indexUnit="ms"):
    """A cine vtkMRMLSequenceNode holding the images (a text index when the values are not numbers)."""
    cine = scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
    cine.SetIndexName(indexName)
    cine.SetIndexUnit(indexUnit)
    try:
        [float(value) for value in indexValues]
    except ValueError:
        cine.SetIndexType(slicer.vtkMRMLSequenceNode.TextIndex)
    for frame, value in zip(frames, indexValues):
        node = slicer.vtkMRMLScalarVolumeNode()
        updateVolumeNodeFromImage(node, frame)
        cine.SetDataNodeAtValue(node, value)
    return cine


def nodeIDs(scene):
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


@pytest.fixture
def scene():
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene  # slicer.util helpers use it
    sequencesLogic = slicer.vtkSlicerSequencesLogic()
    sequencesLogic.SetMRMLScene(scene)  # before any browser node, or proxies are not updated
    scene.sequencesLogic = sequencesLogic  # keep it alive as long as the scene
    yield scene
    scene.Clear(1)


@pytest.fixture
def logic(scene):
    return DDMInterpolationLogic(scene, scene.sequencesLogic)


@pytest.fixture
def pair(scene):
    source = oblique(smoothImage())
    target = pull(source, oblique(smoothField(1.0), isVector=True))
    sourceNode = addVolumeNodeFromImage(scene, source, "ED")
    targetNode = addVolumeNodeFromImage(scene, target, "ES")
    return source, target, sourceNode, targetNode


def assertSameGeometry(a, b, tol=1e-6):
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=tol)


# ------------------------------------------------------------------------------------------ conversion

def test_volume_node_round_trip_keeps_voxels_and_geometry(scene):
    source = oblique(smoothImage())
    node = addVolumeNodeFromImage(scene, source, "src")
    back = imageFromVolumeNode(node)
    assertSameGeometry(back, source)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(source))
    # the same voxel is at the same physical place: IJK -> RAS of the node vs ITK's index -> LPS
    ijkToRas = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijkToRas)
    for index in [(0, 0, 0), (5, 11, 3), (21, 17, 6)]:
        ras = ijkToRas.MultiplyPoint(list(index) + [1.0])[:3]
        lps = source.TransformIndexToPhysicalPoint(index)
        np.testing.assert_allclose(LPS_TO_RAS @ np.array(ras), lps, atol=1e-9)


def test_linear_parent_transform_is_part_of_the_geometry(scene):
    source = oblique(smoothImage())
    node = addVolumeNodeFromImage(scene, source, "src")
    transformNode = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 10.0)  # 10 mm towards R
    transformNode.SetMatrixTransformToParent(matrix)
    node.SetAndObserveTransformNodeID(transformNode.GetID())
    moved = imageFromVolumeNode(node)
    np.testing.assert_allclose(np.array(moved.GetOrigin()) - source.GetOrigin(), [-10.0, 0, 0], atol=1e-9)  # R = -L

    gridNode = scene.AddNode(gridTransformNodeFromField(oblique(smoothField(1.0), isVector=True)))
    node.SetAndObserveTransformNodeID(gridNode.GetID())
    with pytest.raises(ValueError, match="harden"):
        imageFromVolumeNode(node)


def test_grid_transform_is_the_pull_field_in_ras(scene):
    field = oblique(smoothField(1.0), isVector=True)
    transformNode = scene.AddNode(gridTransformNodeFromField(field, "u"))
    fromParent = transformNode.GetTransformFromParent()
    itk = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    for index in [(3, 4, 2), (10, 9, 3), (15, 2, 5), (21, 17, 6)]:
        lps = field.TransformIndexToPhysicalPoint(index)
        expected = np.array(itk.TransformPoint(lps))  # lps + u(lps)
        ras = fromParent.TransformPoint(*(LPS_TO_RAS @ np.array(lps)))
        np.testing.assert_allclose(LPS_TO_RAS @ np.array(ras), expected, atol=1e-9)
    back = displacementFieldFromGridTransformNode(transformNode)
    assertSameGeometry(back, field)
    np.testing.assert_allclose(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(field), atol=1e-12)


def test_hardening_the_grid_transform_reproduces_the_frame(scene):
    """Slicer's own resampling (harden) of the source through the grid transform gives ddm4d's frame."""
    source = oblique(smoothImage())
    field = oblique(smoothField(1.0), isVector=True)
    frame = pull(source, field)
    node = addVolumeNodeFromImage(scene, source, "src")
    transformNode = scene.AddNode(gridTransformNodeFromField(field, "u"))
    node.SetAndObserveTransformNodeID(transformNode.GetID())
    assert slicer.vtkSlicerTransformLogic().hardenTransform(node)
    hardened = sitk.Resample(imageFromVolumeNode(node, np.float32), source, sitk.Transform(), sitk.sitkLinear, np.nan)
    hardened = sitk.GetArrayFromImage(hardened)
    inside = np.isfinite(hardened) & (sitk.GetArrayFromImage(frame) != 0)
    inside[:, :2] = inside[:, -2:] = inside[:, :, :2] = inside[:, :, -2:] = False  # away from the borders
    opposite = pull(source, oblique(-smoothField(1.0), isVector=True))
    errors = {name: float(np.mean(np.abs(hardened - sitk.GetArrayFromImage(image))[inside]))
              for name, image in (("frame", frame), ("source", source), ("opposite", opposite))}
    # hardening resamples onto its own grid, so a second interpolation remains; the convention is
    # right when the hardened volume is far closer to the frame than to the unmoved or oppositely moved source
    assert errors["frame"] < 0.4 * errors["source"] and errors["frame"] < 0.25 * errors["opposite"], errors


# ------------------------------------------------------------------------------------------ outputs

def test_outputs_sequences_browser_and_transforms(scene, logic, pair):
    source, target, sourceNode, targetNode = pair
    inputs = logic.prepareInputs(sourceNode, targetNode, numberOfFrames=5)
    assert inputs.gammas == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    frames, fields, _ = fakeResult(source, inputs.gammas)
    browser = logic.createOutputNodes(inputs, inputs.gammas, frames, fields, report={"device": "cpu"},
                                      transformVisualization="grid")
    nodes = logic.outputNodes(browser)
    framesSequence, fieldsSequence = nodes["frames"], nodes["fields"]
    assert framesSequence.GetNumberOfDataNodes() == fieldsSequence.GetNumberOfDataNodes() == 5
    assert framesSequence.GetIndexName() == "gamma" and framesSequence.GetNthIndexValue(1) == "0.25"
    assert browser.GetMasterSequenceNode() is framesSequence
    assert browser.IsSynchronizedSequenceNode(fieldsSequence.GetID())
    assert browser.GetPlaybackLooped() and not browser.GetPlaybackItemSkippingEnabled()
    assert C.PLAYBACK_MIN_FPS <= browser.GetPlaybackRateFps() <= C.PLAYBACK_MAX_FPS
    assert nodes["framesProxy"].IsA("vtkMRMLScalarVolumeNode") and nodes["fieldsProxy"].IsA("vtkMRMLGridTransformNode")
    assert nodes["labels"] is None and nodes["psnrTable"] is None
    assert DDMInterpolationLogic.report(browser)["gammas"] == pytest.approx(inputs.gammas)

    for item in range(5):
        browser.SetSelectedItemNumber(item)
        proxyImage = imageFromVolumeNode(nodes["framesProxy"])
        assertSameGeometry(proxyImage, source)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(proxyImage), sitk.GetArrayFromImage(frames[item]))
        # the transform proxy, read back as an ITK field and applied to the source, gives the frame
        field = displacementFieldFromGridTransformNode(nodes["fieldsProxy"])
        np.testing.assert_allclose(sitk.GetArrayFromImage(pull(source, field)),
                                   sitk.GetArrayFromImage(frames[item]), atol=1e-4)

    volumeDisplay = nodes["framesProxy"].GetDisplayNode()  # one window/level for the whole cine
    assert not volumeDisplay.GetAutoWindowLevel()
    low, high = np.percentile(sitk.GetArrayViewFromImage(source), (0.5, 99.5))
    assert volumeDisplay.GetWindowLevelMin() == pytest.approx(low) and volumeDisplay.GetWindowLevelMax() == pytest.approx(high)

    display = nodes["fieldsProxy"].GetDisplayNode()
    assert display.GetVisualizationMode() == display.VIS_MODE_GRID and display.GetVisibility2D()
    assert display.GetRegionNode() is nodes["framesProxy"]
    logic.setTransformVisualization(browser, "contour")
    assert display.GetVisualizationMode() == display.VIS_MODE_CONTOUR
    with pytest.raises(ValueError, match="glyph"):
        logic.setTransformVisualization(browser, "arrows")


def test_outputs_are_shown_in_slice_views(scene, logic, pair):
    source, _, sourceNode, targetNode = pair
    compositeNode = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    compositeNode.SetLayoutName("Red")
    inputs = logic.prepareInputs(sourceNode, targetNode, numberOfFrames=3)
    browser = logic.createOutputNodes(inputs, inputs.gammas, *fakeResult(source, inputs.gammas)[:2])
    assert compositeNode.GetBackgroundVolumeID() == logic.outputNodes(browser)["framesProxy"].GetID()


def test_a_failure_while_building_outputs_leaves_no_nodes(scene, logic, pair):
    source, _, sourceNode, targetNode = pair
    inputs = logic.prepareInputs(sourceNode, targetNode, numberOfFrames=3)
    frames, fields, _ = fakeResult(source, inputs.gammas)
    fields[-1] = sitk.Image(SIZE, sitk.sitkVectorFloat32, 4)  # not a displacement field: fails mid-way
    before = nodeIDs(scene)
    with pytest.raises(ValueError, match="components"):
        logic.createOutputNodes(inputs, inputs.gammas, frames, fields)
    assert nodeIDs(scene) == before


def test_cine_sequence_input_and_psnr_table(scene, logic):
    count = 8
    source = oblique(smoothImage())
    cineFrames = [pull(source, oblique(smoothField(t / (count - 1)), isVector=True)) for t in range(count)]
    cine = addCine(scene, cineFrames, [str(40.0 * t) for t in range(count)])

    inputs = logic.prepareInputs(sequenceNode=cine, sourceItem=1, targetItem=5)
    assert len(inputs.gammas) == 5  # one generated frame per real item from 1 to 5
    np.testing.assert_array_equal(sitk.GetArrayFromImage(inputs.source), sitk.GetArrayFromImage(cineFrames[1]))
    assertSameGeometry(inputs.target, cineFrames[5])
    # "generated" frames: the real ones plus a known error, so the PSNR is known
    rng = np.random.default_rng(0)
    generated = []
    for item in range(1, 6):
        array = sitk.GetArrayFromImage(cineFrames[item]) + rng.normal(0, 2.0, cineFrames[item].GetSize()[::-1])
        image = sitk.GetImageFromArray(array.astype(np.float32))
        image.CopyInformation(source)
        generated.append(image)
    fields = [oblique(smoothField(g), isVector=True) for g in inputs.gammas]
    browser = logic.createOutputNodes(inputs, inputs.gammas, generated, fields)
    nodes = logic.outputNodes(browser)
    assert nodes["frames"].GetIndexName() == "time" and nodes["frames"].GetIndexUnit() == "ms"
    assert [float(nodes["frames"].GetNthIndexValue(i)) for i in range(5)] == pytest.approx([40, 80, 120, 160, 200])

    table = nodes["psnrTable"]
    assert table is not None and table.GetNumberOfRows() == 3  # items 2, 3, 4: strictly between source and target
    items = slicer.util.arrayFromTableColumn(table, C.COLUMN_CINE_ITEM)
    np.testing.assert_array_equal(items, [2, 3, 4])
    for row, item in enumerate(items.astype(int)):
        real = sitk.GetArrayFromImage(cineFrames[item]).astype(float)
        expected = psnr(sitk.GetArrayFromImage(generated[item - 1]), real)
        assert slicer.util.arrayFromTableColumn(table, C.COLUMN_PSNR_DDM)[row] == pytest.approx(expected)
        gamma = (item - 1) / 4
        blend = (1 - gamma) * sitk.GetArrayFromImage(cineFrames[1]) + gamma * sitk.GetArrayFromImage(cineFrames[5])
        assert slicer.util.arrayFromTableColumn(table, C.COLUMN_PSNR_BLEND)[row] == pytest.approx(psnr(blend, real))
    mse = np.mean((real - sitk.GetArrayFromImage(generated[item - 1])) ** 2)
    assert 10 * np.log10(np.ptp(real) ** 2 / mse) == pytest.approx(expected)  # the definition, spelled out
    assert nodes["psnrChart"].GetNumberOfPlotSeriesNodes() == 2


def test_cine_numeric_index_reversed_and_text_index(scene, logic):
    source = oblique(smoothImage())
    cine = addCine(scene, [pull(source, oblique(smoothField(t / 3), isVector=True)) for t in range(4)],
                   [f"phase{t}" for t in range(4)])
    inputs = logic.prepareInputs(sequenceNode=cine, sourceItem=3, targetItem=0, numberOfFrames=7)
    assert len(inputs.gammas) == 7 and inputs.indexName == "item"
    assert logic._indexValues(inputs, inputs.gammas) == pytest.approx([3, 2.5, 2, 1.5, 1, 0.5, 0])


def test_segmentation_path_labelmap_and_segmentation_node(scene, logic, pair):
    source, _, sourceNode, targetNode = pair
    labelArray = np.zeros(SIZE[::-1], np.int16)
    labelArray[2:5, 4:10, 5:12] = 3
    labelArray[2:5, 10:14, 5:12] = 2
    labels = oblique(labelArray)
    labelNode = addVolumeNodeFromImage(scene, labels, "ED labels", "vtkMRMLLabelMapVolumeNode")

    inputs = logic.prepareInputs(sourceNode, targetNode, numberOfFrames=4, segmentationNode=labelNode)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(inputs.labels), labelArray)
    frames, fields, warped = fakeResult(source, inputs.gammas, inputs.labels)
    browser = logic.createOutputNodes(inputs, inputs.gammas, frames, fields, warped)
    nodes = logic.outputNodes(browser)
    assert nodes["labels"].GetNumberOfDataNodes() == 4 and browser.IsSynchronizedSequenceNode(nodes["labels"].GetID())
    browser.SetSelectedItemNumber(2)
    assert nodes["labelsProxy"].IsA("vtkMRMLLabelMapVolumeNode")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(imageFromVolumeNode(nodes["labelsProxy"])),
                                  sitk.GetArrayFromImage(warped[2]))
    table = nodes["volumeTable"]
    voxelMl = np.prod(SPACING) / 1000
    columns = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    assert columns[:2] == [C.COLUMN_FRAME, C.COLUMN_GAMMA] and len(columns) == 4
    for frameNumber, image in enumerate(warped):
        array = sitk.GetArrayFromImage(image)
        for column, value in zip(columns[2:], (2, 3)):
            assert slicer.util.arrayFromTableColumn(table, column)[frameNumber] == pytest.approx(
                np.count_nonzero(array == value) * voxelMl)
    assert nodes["volumeChart"].GetNumberOfPlotSeriesNodes() == 2

    # a segmentation node: segments become labels 1..n with their names and colours; no helper node stays
    segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "ED segmentation")
    segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(sourceNode)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelNode, segmentationNode)
    segmentation = segmentationNode.GetSegmentation()
    segmentation.GetNthSegment(0).SetName("myocardium")
    segmentation.GetNthSegment(1).SetName("LV cavity")
    before = nodeIDs(scene)
    inputs = logic.prepareInputs(sourceNode, targetNode, numberOfFrames=3, segmentationNode=segmentationNode)
    assert nodeIDs(scene) == before
    expected = np.select([labelArray == 2, labelArray == 3], [1, 2], 0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(inputs.labels), expected)
    assert inputs.labelNames == {1: "myocardium", 2: "LV cavity"}
    frames, fields, warped = fakeResult(source, inputs.gammas, inputs.labels)
    segmentation.GetNthSegment(1).SetColor(0.9, 0.1, 0.2)
    inputs.labelColors[2] = (0.9, 0.1, 0.2)
    segmentationNode.CreateDefaultDisplayNodes()
    browser = logic.createOutputNodes(inputs, inputs.gammas, frames, fields, warped)
    nodes = logic.outputNodes(browser)
    # segmentation in, segmentation out: one segmentation per frame, the input's segment IDs, names, colours
    assert nodes["labels"].GetNumberOfDataNodes() == 3 and browser.IsSynchronizedSequenceNode(nodes["labels"].GetID())
    ids = [segmentation.GetNthSegmentID(i) for i in range(2)]
    for item in range(3):
        browser.SetSelectedItemNumber(item)
        proxy = nodes["labelsProxy"]
        assert proxy.IsA("vtkMRMLSegmentationNode")
        out = proxy.GetSegmentation()
        assert [out.GetNthSegmentID(i) for i in range(out.GetNumberOfSegments())] == ids
        assert [out.GetSegment(i).GetName() for i in ids] == ["myocardium", "LV cavity"]
        assert out.GetSegment(ids[1]).GetColor() == pytest.approx((0.9, 0.1, 0.2))
        with temporaryNodes(scene):  # what it holds: the propagated labels of that frame, voxel for voxel
            labelOut = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "check")
            segmentIDs = vtk.vtkStringArray()
            for i in ids:
                segmentIDs.InsertNextValue(i)
            assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                proxy, segmentIDs, labelOut, sourceNode)
            np.testing.assert_array_equal(sitk.GetArrayFromImage(imageFromVolumeNode(labelOut, np.int16)),
                                          sitk.GetArrayFromImage(warped[item]))
    assert not segmentationNode.GetDisplayNode().GetVisibility()  # the static source segmentation is hidden
    table = nodes["volumeTable"]
    assert table.GetColumnName(3) == "LV cavity (mL)"


def test_labels_on_another_grid_are_resampled_to_the_source(scene, logic, pair):
    source, _, sourceNode, targetNode = pair
    labelArray = np.zeros(SIZE[::-1], np.int16)
    labelArray[2:5, 4:10, 5:12] = 1
    fine = sitk.Expand(oblique(labelArray), [2, 2, 1], sitk.sitkNearestNeighbor)
    labelNode = addVolumeNodeFromImage(scene, fine, "fine labels", "vtkMRMLLabelMapVolumeNode")
    inputs = logic.prepareInputs(sourceNode, targetNode, numberOfFrames=2, segmentationNode=labelNode)
    assertSameGeometry(inputs.labels, source)
    agreement = np.mean(sitk.GetArrayFromImage(inputs.labels) == labelArray)
    assert agreement > 0.97


# ------------------------------------------------------------------------------------------ bad inputs

def bad_cases(scene, pair):
    source, target, sourceNode, targetNode = pair
    single = addVolumeNodeFromImage(scene, oblique(smoothImage((22, 18, 1))), "one slice")
    cine = addCine(scene, [source] * 3, ["0", "1", "2"])
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "not a roi")
    return {
        "no source": (dict(sourceNode=None, targetNode=targetNode), "no source"),
        "no target": (dict(sourceNode=sourceNode, targetNode=None), "no target"),
        "source is target": (dict(sourceNode=sourceNode, targetNode=sourceNode), "same volume"),
        "2D vs 3D": (dict(sourceNode=single, targetNode=targetNode), "single slice"),
        "missing model": (dict(sourceNode=sourceNode, targetNode=targetNode, model="/nowhere/model.safetensors"),
                          "model file not found"),
        "no model, no refinement": (dict(sourceNode=sourceNode, targetNode=targetNode, model=None, refine=False),
                                    "refinement on"),
        "unknown mode": (dict(sourceNode=sourceNode, targetNode=targetNode, mode="sideways"), "mode must be one of"),
        "one frame": (dict(sourceNode=sourceNode, targetNode=targetNode, numberOfFrames=1), "at least 2"),
        "gamma outside": (dict(sourceNode=sourceNode, targetNode=targetNode, gammas=[0, 1.5]), r"\[0, 1\]"),
        "bad device": (dict(sourceNode=sourceNode, targetNode=targetNode, device="tpu"), "device"),
        "labelmap as source": (dict(sourceNode=addVolumeNodeFromImage(
            scene, oblique(np.ones(SIZE[::-1], np.int16)), "labels", "vtkMRMLLabelMapVolumeNode"),
            targetNode=targetNode), "scalar"),
        "not a roi": (dict(sourceNode=sourceNode, targetNode=targetNode, roiNode=roi), "markups ROI"),
        "cine same items": (dict(sequenceNode=cine, sourceItem=1, targetItem=1), "same cine item"),
        "cine item outside": (dict(sequenceNode=cine, sourceItem=0, targetItem=3), "outside"),
        "cine and volumes": (dict(sequenceNode=cine, sourceItem=0, targetItem=2, sourceNode=sourceNode),
                             "either"),
        "empty segmentation": (dict(sourceNode=sourceNode, targetNode=targetNode,
                                    segmentationNode=scene.AddNewNodeByClass("vtkMRMLSegmentationNode")),
                               "no segments"),
    }


BAD_CASE_NAMES = ["no source", "no target", "source is target", "2D vs 3D", "missing model",
                  "no model, no refinement", "unknown mode", "one frame", "gamma outside", "bad device", "labelmap as source",
                  "not a roi", "cine same items", "cine item outside", "cine and volumes", "empty segmentation"]


@pytest.mark.parametrize("case", BAD_CASE_NAMES)
def test_bad_inputs_raise_clear_errors_and_leave_the_scene_as_it_was(scene, logic, pair, case, tmp_path):
    kwargs, message = bad_cases(scene, pair)[case]
    before = nodeIDs(scene)
    with pytest.raises(ValueError, match=message):
        logic.generate(**kwargs)  # fails in validation, before ddm4d (and torch) is touched
    assert nodeIDs(scene) == before
    with pytest.raises(ValueError, match=message):
        logic.buildGenerateCommand(str(tmp_path / "out"), **kwargs)
    assert nodeIDs(scene) == before
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ background path

def test_build_command_writes_exact_inputs(scene, logic, pair, tmp_path):
    source, target, sourceNode, targetNode = pair
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "roi")
    roi.SetCenter(5.0, -6.0, 7.0)
    model = tmp_path / "mine.safetensors"
    model.write_bytes(b"")
    command = logic.buildGenerateCommand(str(tmp_path / "out"), sourceNode, targetNode, numberOfFrames=4,
                                         model=str(model), device="cpu", fitSteps=20, roiNode=roi,
                                         pythonExecutable="PythonSlicer")
    args = command.args
    assert args[:4] == ["PythonSlicer", "-m", "ddm4d", "generate"]
    option = lambda name: args[args.index(name) + 1]  # noqa: E731
    written = sitk.ReadImage(option("--source"))
    assertSameGeometry(written, source)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(source))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(option("--target"))),
                                  sitk.GetArrayFromImage(target))
    assert option("--model") == str(model) and option("--fit-steps") == "20" and option("--device") == "cpu"
    assert option("--mode") == "symmetric" and "--refine" in args  # ddm4d's defaults
    assert option("--fade") == "confidence"
    assert option("--outputs") == "fields,labels" and option("--compress") == "0"  # what it loads, uncompressed
    forward = logic.buildGenerateCommand(str(tmp_path / "out3"), sourceNode, targetNode, mode="forward", refine=False)
    assert forward.args[forward.args.index("--mode") + 1] == "forward" and "--no-refine" in forward.args
    linear = logic.buildGenerateCommand(str(tmp_path / "out5"), sourceNode, targetNode, fade="linear")
    assert linear.args[linear.args.index("--fade") + 1] == "linear"
    with pytest.raises(ValueError, match="fade must be one of"):
        logic.buildGenerateCommand(str(tmp_path / "out6"), sourceNode, targetNode, fade="cubic")
    assert not (tmp_path / "out6").exists()  # refused before anything is written
    old_name = logic.buildGenerateCommand(str(tmp_path / "out4"), sourceNode, targetNode, mode="bidirectional")
    assert old_name.args[old_name.args.index("--mode") + 1] == "symmetric"
    assert [float(g) for g in option("--gammas").split(",")] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert [float(c) for c in option("--center").split(",")] == pytest.approx([-5.0, 6.0, 7.0])  # RAS -> LPS
    untrained = logic.buildGenerateCommand(str(tmp_path / "out2"), sourceNode, targetNode, model=None)
    assert untrained.args[untrained.args.index("--model") + 1] == "none"  # refinement alone
    import ddm4d
    assert command.env["PYTHONUNBUFFERED"] == "1"
    assert command.env["PYTHONPATH"].split(os.pathsep)[0] == str(Path(ddm4d.__file__).resolve().parents[1])


@pytest.mark.parametrize("fieldFormat", [".nii.gz", ".h5"])
def test_load_generate_outputs(scene, logic, pair, tmp_path, fieldFormat):
    source, _, sourceNode, targetNode = pair
    command = logic.buildGenerateCommand(str(tmp_path / "work"), sourceNode, targetNode, numberOfFrames=3)
    out = Path(command.outputDirectory)  # what `ddm4d generate --out` would have written
    out.mkdir()
    frames, fields, _ = fakeResult(source, command.inputs.gammas)
    (out / "frames").mkdir()
    (out / "fields").mkdir()
    report = {"gammas": command.inputs.gammas, "frames": [], "fields": [], "device": "cpu", "model": "default",
              "timings_s": {"total": 1.0}, "folding_fraction": [0.0] * 3}
    for number, (frame, field) in enumerate(zip(frames, fields)):
        report["frames"].append(f"frames/frame_{number:03d}.nii.gz")
        sitk.WriteImage(frame, str(out / report["frames"][-1]))
        path = out / "fields" / f"field_{number:03d}{fieldFormat}"
        if fieldFormat == ".h5":
            sitk.WriteTransform(sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64)), str(path))
        else:
            sitk.WriteImage(field, str(path))
        report["fields"].append(str(path))  # absolute paths work too
    (out / "report.json").write_text(json.dumps(report))
    browser = logic.loadGenerateOutputs(str(out), command.inputs)
    nodes = logic.outputNodes(browser)
    browser.SetSelectedItemNumber(2)
    np.testing.assert_allclose(sitk.GetArrayFromImage(imageFromVolumeNode(nodes["framesProxy"])),
                               sitk.GetArrayFromImage(frames[2]), atol=1e-5)
    np.testing.assert_allclose(sitk.GetArrayFromImage(displacementFieldFromGridTransformNode(nodes["fieldsProxy"])),
                               sitk.GetArrayFromImage(fields[2]), atol=1e-5)
    assert DDMInterpolationLogic.report(browser)["timings_s"] == {"total": 1.0}

    before = nodeIDs(scene)
    os.remove(out / report["frames"][1])
    with pytest.raises(ValueError, match="do not exist"):
        logic.loadGenerateOutputs(str(out), command.inputs)
    with pytest.raises(ValueError, match="report"):
        logic.loadGenerateOutputs(str(tmp_path / "nothing"), command.inputs)
    assert nodeIDs(scene) == before


def test_background_process_reads_output_without_blocking_and_cancels(tmp_path):
    script = ("import json, sys, time\n"
              "print(json.dumps({'event': 'progress', 'fraction': 0.5, 'message': 'half'}), flush=True)\n"
              "print('plain log line', flush=True)\n"
              "print('error: something clear', file=sys.stderr, flush=True)\n"
              "sys.exit(2)\n")
    process = BackgroundProcess([sys.executable, "-c", script]).start()
    assert process.wait(30) == 2
    lines = process.readLines()
    assert ("stdout", "plain log line") in lines
    assert [parseProgressLine(text) for _, text in lines if parseProgressLine(text)] == [(0.5, "half")]
    assert process.finished and process.errorMessage() == "error: something clear"

    sleeper = BackgroundProcess([sys.executable, "-c", "import time; time.sleep(60)"]).start()
    assert sleeper.readLines() == [] and not sleeper.finished
    sleeper.cancel(timeout=10)
    assert sleeper.wait(10) != 0 and sleeper.cancelled


def test_parse_progress_line():
    assert parseProgressLine("[ 42.0%] fitting 10/50: loss 0.1234") == (0.42, "fitting 10/50: loss 0.1234")
    assert parseProgressLine("[100.0%] done") == (1.0, "done")
    assert parseProgressLine('{"fraction": 1.5}') == (1.0, "")
    assert parseProgressLine('{"event": "progress", "progress": 0.25, "message": "fit"}') == (0.25, "fit")
    assert parseProgressLine("not json") is None
    assert parseProgressLine('{"event": "done"}') is None
    assert parseProgressLine("[1, 2]") is None


# ------------------------------------------------------------------------------------------ requirements

def test_requirements_ask_before_installing(monkeypatch):
    assert Requirements.torchVersionSatisfied("2.13.0+cpu") and not Requirements.torchVersionSatisfied("2.1.2")
    monkeypatch.setattr(Requirements, "PIP_REQUIREMENTS", {"ddm_missing_package_xyz": "ddm-missing-package-xyz>=1"})
    with pytest.raises(Requirements.InstallError, match="ddm-missing-package-xyz"):
        Requirements.ensureRequirements(confirm=None)
    with pytest.raises(Requirements.InstallError, match="ddm-missing-package-xyz"):
        Requirements.ensureRequirements(confirm=lambda message: False)
    installed = []
    with pytest.raises(Requirements.InstallError, match="did not succeed"):  # our fake pip installs nothing
        Requirements.ensureRequirements(confirm=lambda message: True, pipInstall=installed.append)
    assert installed == ["ddm-missing-package-xyz>=1"]


def test_one_question_lists_everything_before_anything_is_installed(monkeypatch):
    """As SlicerTotalSegmentator asks: one confirmation naming PyTorch (through the PyTorch extension)
    and then the pip packages; declined, nothing is installed; accepted, nothing more is asked."""
    monkeypatch.setattr(Requirements, "torchStatus", lambda: (False, None, False))
    monkeypatch.setattr(Requirements, "PIP_REQUIREMENTS", {"ddm_missing_package_xyz": "ddm-missing-package-xyz>=1"})
    calls = []

    class TorchInstaller:  # records what the PyTorch extension's PyTorchUtilsLogic would be asked
        def torchInstalled(self):
            return False

        def installTorch(self, askConfirmation, torchVersionRequirement):
            calls.append(("torch", askConfirmation, torchVersionRequirement))
            return object()

    questions = []
    with pytest.raises(Requirements.InstallError, match="Nothing was installed"):
        Requirements.ensureRequirements(confirm=lambda m: questions.append(m) or False,
                                        pipInstall=lambda names: calls.append(("pip", names)),
                                        torchLogic=TorchInstaller())
    assert calls == [] and len(questions) == 1
    question = questions[0]
    assert "PyTorch extension" in question and "ddm-missing-package-xyz>=1" in question
    assert question.index("PyTorch") < question.index("ddm-missing-package-xyz")
    with pytest.raises(Requirements.InstallError, match="did not succeed"):  # the recorded pip installs nothing
        Requirements.ensureRequirements(confirm=lambda m: questions.append(m) or True,
                                        pipInstall=lambda names: calls.append(("pip", names)),
                                        torchLogic=TorchInstaller())
    assert len(questions) == 2  # one more question for the second call, none inside the installation
    assert calls == [("torch", False, Requirements.TORCH_REQUIREMENT), ("pip", "ddm-missing-package-xyz>=1")]


def test_missing_torch_points_to_the_pytorch_extension(monkeypatch):
    monkeypatch.setattr(Requirements, "torchStatus", lambda: (False, None, False))
    with pytest.raises(Requirements.InstallError, match="PyTorch"):
        Requirements.ensureRequirements(confirm=None)
    # interactive, but the PyTorch extension (PyTorchUtils) is not installed: say so, install nothing
    with pytest.raises(Requirements.InstallError, match="Extensions Manager"):
        Requirements.ensureRequirements(confirm=lambda message: True)
    monkeypatch.setattr(Requirements, "torchStatus", lambda: (True, "2.0.1", False))
    with pytest.raises(Requirements.InstallError, match="2.0.1") as error:
        Requirements.ensureRequirements(confirm=lambda message: True)
    assert error.value.restartRequired


# ------------------------------------------------------------------------------------------ end to end (ddm4d)

REAL_CINE = ROOT.parent / "shared" / "data" / "real-cine-2d" / "heart_cine_16frames.dcm"


def tinyModel(spatialDims=3):
    """A small untrained DDM whose displacements are scaled up so the fields are not ~0 (seconds on CPU)."""
    import torch

    from ddm4d.config import DDMConfig
    from ddm4d.model import DDM
    torch.manual_seed(0)
    if spatialDims == 3:
        config = DDMConfig.for_dims(3, image_size=(32, 32, 8), spacing=(4.0, 4.0, 8.0))
    else:
        config = DDMConfig.for_dims(2, image_size=(64, 64), spacing=(4.0, 4.0))
    net = DDM(config)
    with torch.no_grad():
        net.deformation.flow.weight.mul_(50000.0)  # VoxelMorph starts the flow layer near zero
    return net.eval()


@pytest.fixture
def phantomPair(scene):
    """Phantom ED/ES and ED labels, given an oblique, anisotropic, off-origin geometry."""
    from ddm4d.phantom import make_subject
    subject = make_subject(0, n_frames=6, size=(40, 36, 6))

    def placed(image):
        placedImage = sitk.Image(image)
        placedImage.SetSpacing((2.1, 1.7, 7.5))
        placedImage.SetOrigin(ORIGIN)
        placedImage.SetDirection(tuple(DIRECTION.ravel()))
        return placedImage

    source, target = placed(subject.images[subject.ed]), placed(subject.images[subject.es])
    labels = placed(subject.labels[subject.ed])
    return dict(source=source, target=target, labels=labels,
                sourceNode=addVolumeNodeFromImage(scene, source, "phantom ED"),
                targetNode=addVolumeNodeFromImage(scene, target, "phantom ES"),
                labelNode=addVolumeNodeFromImage(scene, labels, "phantom ED labels", "vtkMRMLLabelMapVolumeNode"))


def test_generate_end_to_end_matches_ddm4d(scene, logic, phantomPair):
    from ddm4d.generation import Cancelled, generate
    net = tinyModel()
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "heart")
    centerLps = phantomPair["source"].TransformContinuousIndexToPhysicalPoint((18.0, 20.0, 2.5))
    roi.SetCenter(*(LPS_TO_RAS @ np.array(centerLps)))
    # forward mode: each frame is then the source pulled by its field, which ITK's resampling checks below
    expected = generate(phantomPair["source"], phantomPair["target"], model=net, frames=4, seg=phantomPair["labels"],
                        device="cpu", center=centerLps, mode="forward")
    progress = []
    browser = logic.generate(phantomPair["sourceNode"], phantomPair["targetNode"], numberOfFrames=4, model=net,
                             device="cpu", segmentationNode=phantomPair["labelNode"], roiNode=roi, mode="forward",
                             progressCallback=lambda fraction, message: progress.append(fraction))
    nodes = logic.outputNodes(browser)
    assert nodes["frames"].GetNumberOfDataNodes() == 4 and nodes["labels"].GetNumberOfDataNodes() == 4
    assert progress == sorted(progress) and progress[-1] == 1.0
    moved = 0.0
    for item in range(4):
        browser.SetSelectedItemNumber(item)
        frame = imageFromVolumeNode(nodes["framesProxy"])
        assertSameGeometry(frame, phantomPair["source"])
        np.testing.assert_allclose(sitk.GetArrayFromImage(frame), sitk.GetArrayFromImage(expected.frames[item]),
                                   atol=1e-4)
        field = displacementFieldFromGridTransformNode(nodes["fieldsProxy"])
        np.testing.assert_allclose(sitk.GetArrayFromImage(field), sitk.GetArrayFromImage(expected.fields[item]),
                                   atol=1e-9)
        # the grid transform applied to the source (ITK resampling) gives the frame
        np.testing.assert_allclose(sitk.GetArrayFromImage(pull(phantomPair["source"], field)),
                                   sitk.GetArrayFromImage(expected.frames[item]), atol=1e-2)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(imageFromVolumeNode(nodes["labelsProxy"])),
                                      sitk.GetArrayFromImage(expected.labels[item]))
        moved = max(moved, float(np.abs(sitk.GetArrayFromImage(field)).max()))
    assert moved > 1.0  # mm: the check above is not trivially about zero fields
    report = logic.report(browser)
    assert report["device"] == "cpu" and report["folding_fraction"] == pytest.approx(expected.folding_fraction)
    lv = slicer.util.arrayFromTableColumn(nodes["volumeTable"], "Label 3 (mL)")
    voxelMl = np.prod(phantomPair["source"].GetSpacing()) / 1000
    assert lv == pytest.approx([np.count_nonzero(sitk.GetArrayFromImage(l) == 3) * voxelMl for l in expected.labels])

    before = nodeIDs(scene)
    with pytest.raises(Cancelled):
        logic.generate(phantomPair["sourceNode"], phantomPair["targetNode"], model=net, device="cpu",
                       cancelCallback=lambda: True)
    assert nodeIDs(scene) == before


def test_generate_in_a_background_process_like_the_widget(scene, logic, phantomPair, tmp_path):
    from ddm4d.checkpoint import save_model
    from ddm4d.generation import generate
    modelPath = save_model(tinyModel(), tmp_path / "tiny.safetensors")
    command = logic.buildGenerateCommand(str(tmp_path / "out"), phantomPair["sourceNode"], phantomPair["targetNode"],
                                         numberOfFrames=3, model=str(modelPath), device="cpu",
                                         segmentationNode=phantomPair["labelNode"])
    process = BackgroundProcess(command.args, env=command.env).start()
    assert process.wait(600) == 0, process.stderrTail
    lines = process.readLines()
    assert any(parseProgressLine(text) for _, text in lines), lines[-5:]
    browser = logic.loadGenerateOutputs(command.outputDirectory, command.inputs)
    # the same files through the Python API (the tiny model's amplified flow layer makes it sensitive to
    # the last bit of the geometry, which a NRRD round trip may change: compare on the very same inputs)
    option = lambda name: command.args[command.args.index(name) + 1]  # noqa: E731
    expected = generate(option("--source"), option("--target"), model=str(modelPath), frames=3,
                        seg=option("--seg"), device="cpu")
    nodes = logic.outputNodes(browser)
    for item in range(3):
        browser.SetSelectedItemNumber(item)
        np.testing.assert_allclose(sitk.GetArrayFromImage(imageFromVolumeNode(nodes["framesProxy"])),
                                   sitk.GetArrayFromImage(expected.frames[item]), atol=1e-4)
        np.testing.assert_allclose(sitk.GetArrayFromImage(displacementFieldFromGridTransformNode(nodes["fieldsProxy"])),
                                   sitk.GetArrayFromImage(expected.fields[item]), atol=1e-6)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(imageFromVolumeNode(nodes["labelsProxy"])),
                                      sitk.GetArrayFromImage(expected.labels[item]))

    # a user mistake the command line finds (a file that is not a model): exit code 2 and one clear line
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not a model")
    command = logic.buildGenerateCommand(str(tmp_path / "out2"), phantomPair["sourceNode"], phantomPair["targetNode"],
                                         model=str(bogus), device="cpu")
    process = BackgroundProcess(command.args, env=command.env).start()
    assert process.wait(600) == 2
    process.readLines()
    assert process.errorMessage().startswith("ddm4d generate: error:") and "bogus.safetensors" in process.errorMessage()


def test_a_run_loads_into_its_scene_and_ends_with_it(scene, logic, phantomPair, tmp_path):
    """The widget's run (GenerationRun): results load into the scene they were started from and the work
    folder goes; closing that scene mid-run ends the process tree, removes the folder, and loads nothing."""
    import psutil
    from ddm4d.checkpoint import save_model
    from DDMInterpolationLib import GenerationRun
    modelPath = save_model(tinyModel(), tmp_path / "tiny.safetensors")
    kwargs = dict(sourceNode=phantomPair["sourceNode"], targetNode=phantomPair["targetNode"], numberOfFrames=3,
                  model=str(modelPath), device="cpu")

    work = tmp_path / "run1"
    run = GenerationRun(logic, str(work), **kwargs)
    deadline = time.monotonic() + 600
    while not run.finished and time.monotonic() < deadline:
        run.poll()
        time.sleep(0.05)
    run.poll()
    assert run.succeeded, run.process.stderrTail
    browser = run.load()
    assert scene.IsNodePresent(browser) and logic.outputNodes(browser)["frames"].GetNumberOfDataNodes() == 3
    assert not work.exists() and run.seconds["generate"] > 0 and run.seconds["load"] >= 0

    work = tmp_path / "run2"
    run = GenerationRun(logic, str(work), **kwargs)
    assert work.is_dir()
    tree = [psutil.Process(run.process.process.pid)]
    scene.Clear(0)  # File > Close Scene
    assert run.sceneClosed and run.abandoned == "the scene was closed" and run.finished
    assert not [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not work.exists()
    with pytest.raises(ValueError, match="has been closed"):
        run.load()
    assert not scene.GetNodesByClass("vtkMRMLSequenceBrowserNode").GetNumberOfItems()


def test_cancel_behind_a_launcher_ends_every_process_and_leaves_no_output(scene, logic, phantomPair, tmp_path):
    """Inside Slicer, ddm4d generate runs below the PythonSlicer launcher (which forwards no signals):
    Cancel must end the worker too, and leave no result behind."""
    import psutil
    from ddm4d.checkpoint import save_model
    modelPath = save_model(tinyModel(), tmp_path / "tiny.safetensors")
    command = logic.buildGenerateCommand(str(tmp_path / "work"), phantomPair["sourceNode"], phantomPair["targetNode"],
                                         numberOfFrames=40, model=str(modelPath), device="cpu")
    launcher = Path(__file__).with_name("pythonslicer_like.py")
    process = BackgroundProcess([command.args[0], str(launcher)] + command.args[1:], env=command.env).start()
    progress = []
    deadline = time.monotonic() + 300
    while not progress and not process.finished and time.monotonic() < deadline:
        progress += [text for _, text in process.readLines() if parseProgressLine(text)]
        time.sleep(0.05)
    assert progress and not process.finished, process.stderrTail  # the worker is at work
    tree = [psutil.Process(process.process.pid)] + psutil.Process(process.process.pid).children(recursive=True)
    assert len(tree) >= 2
    process.cancel(timeout=10)
    assert process.wait(10) != 0 and process.cancelled
    assert not [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not os.path.exists(os.path.join(command.outputDirectory, "report.json"))
    assert not os.path.exists(command.outputDirectory) or not os.listdir(command.outputDirectory)


@pytest.mark.skipif(not REAL_CINE.is_file(), reason=f"the real cine sample is not at {REAL_CINE}")
def test_generate_from_the_real_2d_cine_with_fitting(scene, logic):
    import warnings
    from ddm4d.io import read_cine
    from ddm4d.metrics import psnr as ddmPsnr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the sample has no PixelSpacing: ddm4d warns and assumes 1 mm
        cineFrames = read_cine(REAL_CINE)
    cine = addCine(scene, cineFrames, [f"{69.47 * number:.2f}" for number in range(len(cineFrames))], "real cine")
    messages = []
    browser = logic.generate(sequenceNode=cine, sourceItem=0, targetItem=6, model=tinyModel(2), fitSteps=2,
                             device="cpu", progressCallback=lambda fraction, message: messages.append(message))
    assert any(message.startswith("fitting") for message in messages)
    nodes = logic.outputNodes(browser)
    assert nodes["frames"].GetNumberOfDataNodes() == 7
    table = nodes["psnrTable"]
    items = slicer.util.arrayFromTableColumn(table, C.COLUMN_CINE_ITEM).astype(int)
    np.testing.assert_array_equal(items, [1, 2, 3, 4, 5])
    for row, item in enumerate(items):
        browser.SetSelectedItemNumber(item)  # generated frame k sits at cine item k here
        generated = imageFromVolumeNode(nodes["framesProxy"])
        assertSameGeometry(generated, cineFrames[0])
        real = sitk.GetArrayFromImage(cineFrames[item])
        assert slicer.util.arrayFromTableColumn(table, C.COLUMN_PSNR_DDM)[row] == pytest.approx(
            ddmPsnr(sitk.GetArrayFromImage(generated), real))
    assert float(nodes["frames"].GetNthIndexValue(6)) == pytest.approx(6 * 69.47)
