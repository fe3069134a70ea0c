"""Sequences of generated frames, fields and labels, their browser, and how they are shown.

The sequences logic must observe the scene before the browser node is made, otherwise proxy nodes are
not updated (slicer-notes.md): inside Slicer it is ``slicer.modules.sequences.logic()``; headless, a
``slicer.vtkSlicerSequencesLogic`` whose ``SetMRMLScene(scene)`` was called.
"""
import numpy as np
import SimpleITK as sitk

import slicer

from .Constants import (PLAYBACK_MAX_FPS, PLAYBACK_MIN_FPS, PLAYBACK_PASS_DURATION_S, TRANSFORM_VISUALIZATIONS)


def indexValueStrings(values):
    """Sequence index values as short unique strings ('0', '0.111', ...); item numbers if they collide."""
    strings = [f"{float(value):.6g}" for value in values]
    if len(set(strings)) != len(strings):
        strings = [str(number) for number in range(len(values))]
    return strings


def addSequence(scene, name, dataNodes, indexValues, indexName, indexUnit=""):
    """A new sequence node holding copies of ``dataNodes`` (nodes outside the scene) at ``indexValues``."""
    sequenceNode = scene.AddNewNodeByClass("vtkMRMLSequenceNode", scene.GenerateUniqueName(name))
    sequenceNode.SetIndexName(indexName)
    sequenceNode.SetIndexUnit(indexUnit)
    sequenceNode.SetIndexType(slicer.vtkMRMLSequenceNode.NumericIndex)
    for dataNode, value in zip(dataNodes, indexValues):
        sequenceNode.SetDataNodeAtValue(dataNode, value)
    return sequenceNode


def playbackRateFps(numberOfFrames):
    """A rate at which one pass through the frames lasts about PLAYBACK_PASS_DURATION_S."""
    return float(np.clip(numberOfFrames / PLAYBACK_PASS_DURATION_S, PLAYBACK_MIN_FPS, PLAYBACK_MAX_FPS))


def addBrowser(scene, name, masterSequence, synchronizedSequences=(), playbackRate=None):
    """A browser for cine playback: looped, every item shown, ``masterSequence`` first."""
    browserNode = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", scene.GenerateUniqueName(name))
    browserNode.SetAndObserveMasterSequenceNodeID(masterSequence.GetID())
    for sequenceNode in synchronizedSequences:
        browserNode.AddSynchronizedSequenceNode(sequenceNode)
    browserNode.SetPlaybackItemSkippingEnabled(False)
    browserNode.SetPlaybackLooped(True)
    browserNode.SetPlaybackRateFps(playbackRate or playbackRateFps(masterSequence.GetNumberOfDataNodes()))
    browserNode.SetSelectedItemNumber(0)
    return browserNode


def setTransformVisualization(transformNode, mode, regionNode=None):
    """Show a (proxy) transform in the slice views as 'glyph', 'grid' or 'contour'."""
    if mode not in TRANSFORM_VISUALIZATIONS:
        raise ValueError(f"transform visualization must be one of {TRANSFORM_VISUALIZATIONS}, got {mode!r}")
    if transformNode.GetDisplayNode() is None:
        transformNode.CreateDefaultDisplayNodes()
    displayNode = transformNode.GetDisplayNode()
    modes = {
        "glyph": slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GLYPH,
        "grid": slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GRID,
        "contour": slicer.vtkMRMLTransformDisplayNode.VIS_MODE_CONTOUR,
    }
    wasModified = displayNode.StartModify()
    displayNode.SetVisualizationMode(modes[mode])
    if regionNode is not None:
        displayNode.SetAndObserveRegionNode(regionNode)
    displayNode.SetVisibility(True)
    displayNode.SetVisibility2D(True)
    displayNode.SetVisibility3D(False)  # dense 3D glyphs are slow; the user can switch them on
    displayNode.EndModify(wasModified)
    return displayNode


def transformVisualization(transformNode):
    """The current mode name of a transform's display ('glyph', 'grid', 'contour'), or None."""
    displayNode = transformNode.GetDisplayNode() if transformNode is not None else None
    if displayNode is None:
        return None
    names = {
        slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GLYPH: "glyph",
        slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GRID: "grid",
        slicer.vtkMRMLTransformDisplayNode.VIS_MODE_CONTOUR: "contour",
    }
    return names.get(displayNode.GetVisualizationMode())


def setFixedWindowLevel(volumeNode, image, percentiles=(0.5, 99.5)):
    """One window/level for every frame, from the source's intensities (no flicker during playback)."""
    if volumeNode.GetDisplayNode() is None:
        volumeNode.CreateDefaultDisplayNodes()
    displayNode = volumeNode.GetDisplayNode()
    low, high = np.percentile(sitk.GetArrayViewFromImage(image), percentiles)
    if high <= low:
        high = low + 1.0
    displayNode.SetAutoWindowLevel(False)
    displayNode.SetWindowLevelMinMax(float(low), float(high))


def showInSliceViews(scene, backgroundVolume, labelVolume=None):
    """Put the volumes in every slice view and make them the active volumes (pure MRML)."""
    selectionNode = scene.GetFirstNodeByClass("vtkMRMLSelectionNode")
    if selectionNode is not None:
        selectionNode.SetActiveVolumeID(backgroundVolume.GetID())
        selectionNode.SetActiveLabelVolumeID(labelVolume.GetID() if labelVolume is not None else None)
    for compositeNode in _nodesByClass(scene, "vtkMRMLSliceCompositeNode"):
        compositeNode.SetBackgroundVolumeID(backgroundVolume.GetID())
        compositeNode.SetForegroundVolumeID(None)
        compositeNode.SetLabelVolumeID(labelVolume.GetID() if labelVolume is not None else None)


def _nodesByClass(scene, className):
    nodes = scene.GetNodesByClass(className)
    return [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]
