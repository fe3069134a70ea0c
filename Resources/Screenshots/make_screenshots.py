"""Render Resources/Screenshots/DDMInterpolation-1.png: what DDMInterpolation makes, from its MRML nodes.

Runs headless with the PyPI package slicer-core (no Slicer application): DDMInterpolationLogic generates
phases between the ED and ES frames of a phantom subject (per-case fitting of a small network, since
the bundled models may not exist yet), then this script draws the generated frames with the propagated
labels and the displacement field (read back from the grid transforms), and the volume-over-time table.
It is a rendering of the module's outputs, not a screenshot of the Slicer application.

    python Resources/Screenshots/make_screenshots.py   (a few minutes on 2 CPU cores)
"""
import sys
from pathlib import Path

import matplotlib
import numpy as np
import SimpleITK as sitk

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import slicer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "DDMInterpolation"))

from ddm4d.config import DDMConfig  # noqa: E402
from ddm4d.model import DDM  # noqa: E402
from ddm4d.phantom import LABEL_NAMES, make_subject  # noqa: E402
from DDMInterpolationLib import Constants as C  # noqa: E402
from DDMInterpolationLib import DDMInterpolationLogic  # noqa: E402
from DDMInterpolationLib.Conversion import (addVolumeNodeFromImage, displacementFieldFromGridTransformNode,  # noqa: E402
                                            imageFromVolumeNode)

FRAMES = 6
FIT_STEPS = 60


def main(out=ROOT / "Resources" / "Screenshots" / "DDMInterpolation-1.png"):
    import torch
    torch.manual_seed(0)
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    sequencesLogic = slicer.vtkSlicerSequencesLogic()
    sequencesLogic.SetMRMLScene(scene)

    subject = make_subject(1)
    ed = addVolumeNodeFromImage(scene, subject.images[subject.ed], "ED")
    es = addVolumeNodeFromImage(scene, subject.images[subject.es], "ES")
    labels = addVolumeNodeFromImage(scene, subject.labels[subject.ed], "ED labels", "vtkMRMLLabelMapVolumeNode")
    network = DDM(DDMConfig.for_dims(3, image_size=(32, 32, 8), spacing=(6.5, 6.5, 11.0)))
    logic = DDMInterpolationLogic(scene, sequencesLogic)
    browser = logic.generate(ed, es, numberOfFrames=FRAMES, model=network, fitSteps=FIT_STEPS, device="cpu",
                             segmentationNode=labels,
                             progressCallback=lambda fraction, message: print(f"{100 * fraction:5.1f}% {message}"))
    nodes = logic.outputNodes(browser)

    k = subject.images[0].GetSize()[2] // 2
    fig = plt.figure(figsize=(13, 5.2), dpi=100)
    grid = fig.add_gridspec(2, FRAMES, height_ratios=[3, 2])
    low, high = np.percentile(sitk.GetArrayViewFromImage(subject.images[subject.ed]), (1, 99.5))
    for item in range(FRAMES):
        browser.SetSelectedItemNumber(item)
        frame = sitk.GetArrayFromImage(imageFromVolumeNode(nodes["framesProxy"]))[k]
        label = sitk.GetArrayFromImage(imageFromVolumeNode(nodes["labelsProxy"]))[k]
        field = sitk.GetArrayFromImage(displacementFieldFromGridTransformNode(nodes["fieldsProxy"]))[k]
        ax = fig.add_subplot(grid[0, item])
        ax.imshow(frame, cmap="gray", vmin=low, vmax=high)
        ax.contour(label, levels=[0.5, 1.5, 2.5], colors=["#2e86de", "#f1c40f", "#e74c3c"], linewidths=0.8)
        step = 8
        y, x = np.mgrid[0:frame.shape[0]:step, 0:frame.shape[1]:step]
        ax.quiver(x, y, field[::step, ::step, 0], field[::step, ::step, 1], color="#2ecc71", angles="xy",
                  scale_units="xy", scale=0.25, width=0.006)
        ax.set_title(f"gamma {float(nodes['frames'].GetNthIndexValue(item)):.2f}", fontsize=9)
        ax.axis("off")
    table = nodes["volumeTable"]
    gammas = slicer.util.arrayFromTableColumn(table, C.COLUMN_GAMMA)
    ax = fig.add_subplot(grid[1, :])
    for value, name in LABEL_NAMES.items():
        column = f"Label {value} (mL)"
        if table.GetTable().GetColumnByName(column) is not None:
            ax.plot(gammas, slicer.util.arrayFromTableColumn(table, column), marker="o", label=name)
    ax.set_xlabel("gamma (end-diastole to end-systole)")
    ax.set_ylabel("volume (mL)")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    fig.suptitle("DDM Interpolation: generated phases with propagated labels and displacement (green), "
                 "and the volume-over-time table (phantom subject; rendered from the module's MRML outputs)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
