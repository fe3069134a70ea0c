"""Live loss curves of a training run as MRML nodes: tables, one plot series per loss, a chart.

Filled from the progress events (``iteration`` rows into the training table, ``validation`` rows
into the validation table); the widget only shows the chart (Plots module, plot view layout).
The terms differ in scale by orders of magnitude (smoothness ~0.01, diffusion ~1) and a chart has
one y axis, so each curve is drawn scaled to its own range (0: its lowest value so far, 1: its
highest; training and validation of one term share a range); the tables keep the values.
"""
import math

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

from . import Constants as C
from .Events import parseEventLine


def _addColumns(table, names):
    for name in names:
        array = vtk.vtkDoubleArray()
        array.SetName(name)
        table.AddColumn(array)


def scaledColumn(column):
    """The table column the chart draws for a loss column: its values scaled to the term's range."""
    return f"{column} scaled"


def _value(event, key):
    value = event.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


class LossCurves:
    """The loss tables and chart of one run, updated from events.

    :param scene: the MRML scene.
    :param name: base name of the nodes (made unique in the scene).
    :param runDirectory: stored as an attribute of the chart (to find the run again).
    :param maxPoints: the training table keeps at most about this many rows: beyond it, every
      second row is dropped and from then on every second iteration is kept (then 4th, ...).
    """

    def __init__(self, scene, name="DDM training", runDirectory=None, maxPoints=C.MAX_PLOT_POINTS):
        self.scene = scene
        self.maxPoints = max(int(maxPoints), 2)
        self.stride = 1  # one table row per `stride` iteration events
        self._skipped = 0
        self.name = scene.GenerateUniqueName(name)
        self.trainingTableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{self.name} losses")
        _addColumns(self.trainingTableNode.GetTable(), (C.COLUMN_ITERATION,) + C.TRAINING_LOSS_COLUMNS
                    + tuple(scaledColumn(c) for c in C.TRAINING_LOSS_COLUMNS))
        self.validationTableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{self.name} validation")
        _addColumns(self.validationTableNode.GetTable(), (C.COLUMN_ITERATION,) + C.VALIDATION_LOSS_COLUMNS
                    + tuple(scaledColumn(c) for c in C.VALIDATION_LOSS_COLUMNS))

        self.chartNode = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", self.name)
        self.chartNode.SetTitle(f"{self.name}: losses")
        self.chartNode.SetXAxisTitle("iteration")
        self.chartNode.SetYAxisTitle("each term scaled to its range (0: lowest, 1: highest so far)")
        self.chartNode.SetNodeReferenceID(C.REFERENCE_TRAINING_TABLE, self.trainingTableNode.GetID())
        self.chartNode.SetNodeReferenceID(C.REFERENCE_VALIDATION_TABLE, self.validationTableNode.GetID())
        if runDirectory is not None:
            self.chartNode.SetAttribute(C.ATTRIBUTE_RUN_DIRECTORY, str(runDirectory))
        self.seriesNodes = {}  # series name -> vtkMRMLPlotSeriesNode
        for column in C.TRAINING_LOSS_COLUMNS:
            self._addSeries(column, self.trainingTableNode, column)

    def _addSeries(self, seriesName, tableNode, column):
        seriesNode = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{self.name} {seriesName}")
        seriesNode.SetAndObserveTableNodeID(tableNode.GetID())
        seriesNode.SetXColumnName(C.COLUMN_ITERATION)
        seriesNode.SetYColumnName(scaledColumn(column))
        seriesNode.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        seriesNode.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone
                                  if tableNode is self.trainingTableNode else slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
        seriesNode.SetColor(*C.SERIES_COLORS.get(seriesName, (0.5, 0.5, 0.5)))
        self.chartNode.AddAndObservePlotSeriesNodeID(seriesNode.GetID())
        self.seriesNodes[seriesName] = seriesNode
        return seriesNode

    # ---------------------------------------------------------------------------------------------- data

    @property
    def numberOfRows(self):
        return self.trainingTableNode.GetTable().GetNumberOfRows()

    @property
    def numberOfValidationRows(self):
        return self.validationTableNode.GetTable().GetNumberOfRows()

    def column(self, name, validation=False):
        """The values of one column as a list of floats."""
        table = (self.validationTableNode if validation else self.trainingTableNode).GetTable()
        array = table.GetColumnByName(name)
        return [array.GetValue(row) for row in range(array.GetNumberOfTuples())] if array is not None else []

    def update(self, events):
        """Add the rows these events bring; returns the number of rows added (both tables)."""
        added = 0
        changed = set()
        for event in events:
            name = event.get("event")
            if name == "start":
                if self._truncateAfter(_value(event, "iteration")):
                    changed |= {self.trainingTableNode, self.validationTableNode}
            elif name == "iteration":
                self._skipped += 1
                if self._skipped < self.stride:
                    continue
                self._skipped = 0
                self._appendRow(self.trainingTableNode, event, C.TRAINING_LOSS_COLUMNS)
                changed.add(self.trainingTableNode)
                added += 1
            elif name == "validation":
                if not any(key.startswith(C.VALIDATION_SERIES_PREFIX) for key in self.seriesNodes):
                    for column in C.VALIDATION_LOSS_COLUMNS:
                        self._addSeries(C.VALIDATION_SERIES_PREFIX + column, self.validationTableNode, column)
                self._appendRow(self.validationTableNode, event, C.VALIDATION_LOSS_COLUMNS)
                changed.add(self.validationTableNode)
                added += 1
        while self.numberOfRows > self.maxPoints:
            self._thin()
            changed.add(self.trainingTableNode)
        if changed:
            self._rescale()
        for tableNode in changed:  # one Modified per table and poll: the plot view redraws once
            tableNode.GetTable().Modified()
            tableNode.Modified()
        return added

    def loadLog(self, path):
        """Fill the tables from a run's log.jsonl (its earlier progress, e.g. before a resume).

        Lines that are not progress events are ignored; returns the rows added.
        """
        events = []
        try:
            with open(path, encoding="utf-8", errors="replace") as file:
                for line in file:
                    event = parseEventLine(line)
                    if event is not None:
                        events.append(event)
        except OSError:
            return 0
        # a resumed run logs a start event at its checkpoint: only its last stretch after each start counts
        return self.update(events)

    def _appendRow(self, tableNode, event, columns):
        table = tableNode.GetTable()
        table.GetColumnByName(C.COLUMN_ITERATION).InsertNextValue(_value(event, "iteration"))
        for column in columns:
            table.GetColumnByName(column).InsertNextValue(_value(event, column))
            table.GetColumnByName(scaledColumn(column)).InsertNextValue(math.nan)  # set by _rescale

    def _rescale(self):
        """Every scaled column from its term's range over both tables (what the chart draws)."""
        tables = ((self.trainingTableNode.GetTable(), C.TRAINING_LOSS_COLUMNS),
                  (self.validationTableNode.GetTable(), C.VALIDATION_LOSS_COLUMNS))
        for column in C.TRAINING_LOSS_COLUMNS:
            pairs = [(numpy_support.vtk_to_numpy(table.GetColumnByName(column)),  # views of the tables
                      numpy_support.vtk_to_numpy(table.GetColumnByName(scaledColumn(column))))
                     for table, columns in tables if column in columns]
            finite = np.concatenate([raw[np.isfinite(raw)] for raw, _ in pairs])
            low, high = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
            for raw, scaled in pairs:
                scaled[:] = 0.5 if high == low else (raw - low) / (high - low)  # NaN stays NaN
                scaled[~np.isfinite(raw)] = np.nan

    def _truncateAfter(self, iteration):
        """Drop rows after ``iteration`` (a resumed run repeats the iterations after its checkpoint)."""
        if math.isnan(iteration):
            return False
        changed = False
        for tableNode in (self.trainingTableNode, self.validationTableNode):
            changed |= self._keepRows(tableNode, lambda row, x: x <= iteration)
        return changed

    def _thin(self):
        self._keepRows(self.trainingTableNode, lambda row, x: row % 2 == 0)
        self.stride *= 2

    @staticmethod
    def _keepRows(tableNode, keep):
        table = tableNode.GetTable()
        iterations = table.GetColumnByName(C.COLUMN_ITERATION)
        count = iterations.GetNumberOfTuples()
        rows = [row for row in range(count) if keep(row, iterations.GetValue(row))]
        if len(rows) == count:
            return False
        for number in range(table.GetNumberOfColumns()):
            array = table.GetColumn(number)
            values = [array.GetValue(row) for row in rows]
            array.SetNumberOfTuples(len(values))
            for row, value in enumerate(values):
                array.SetValue(row, value)
        return True

    def removeNodes(self):
        """Remove the chart, its series and its tables from the scene."""
        for node in list(self.seriesNodes.values()) + [self.chartNode, self.trainingTableNode,
                                                        self.validationTableNode]:
            if node is not None and self.scene.IsNodePresent(node):
                self.scene.RemoveNode(node)
        self.seriesNodes = {}
