"""Tables and plot charts (label volume over time, PSNR against the real cine frames)."""
import numpy as np
import SimpleITK as sitk

import slicer

from .Conversion import as3D

# colours of plot lines when nothing better is known (matplotlib's tab10)
_PLOT_COLORS = ((0.12, 0.47, 0.71), (1.0, 0.5, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16),
                (0.58, 0.4, 0.74), (0.55, 0.34, 0.29), (0.89, 0.47, 0.76), (0.5, 0.5, 0.5))


def addTable(scene, name, columns):
    """A table node with one column per ``columns`` item (name -> 1D numbers), in that order."""
    tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    names = list(columns)
    arrays = [np.asarray(columns[column], dtype=np.float64) for column in names]
    slicer.util.updateTableFromArray(tableNode, arrays, names)
    return tableNode


def addChart(scene, name, tableNode, xColumn, yColumns, xTitle, yTitle, colors=None):
    """A chart with one line-and-marker series per y column of ``tableNode``."""
    chartNode = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName(name))
    chartNode.SetTitle(name)
    chartNode.SetXAxisTitle(xTitle)
    chartNode.SetYAxisTitle(yTitle)
    for number, column in enumerate(yColumns):
        seriesNode = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", scene.GenerateUniqueName(f"{name} {column}"))
        seriesNode.SetAndObserveTableNodeID(tableNode.GetID())
        seriesNode.SetXColumnName(xColumn)
        seriesNode.SetYColumnName(column)
        seriesNode.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        seriesNode.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
        color = (colors[number] if colors is not None and number < len(colors)
                 else _PLOT_COLORS[number % len(_PLOT_COLORS)])
        seriesNode.SetColor(*color)
        chartNode.AddAndObservePlotSeriesNodeID(seriesNode.GetID())
    return chartNode


def labelVolumesMl(labelImages, labelValues):
    """Volume in mL of each label value in each label image: array [image, label]."""
    volumes = np.zeros((len(labelImages), len(labelValues)))
    for row, image in enumerate(labelImages):
        image = as3D(image)
        voxelMl = float(np.prod(image.GetSpacing())) / 1000.0
        array = sitk.GetArrayViewFromImage(image)
        for column, value in enumerate(labelValues):
            volumes[row, column] = np.count_nonzero(array == value) * voxelMl
    return volumes

