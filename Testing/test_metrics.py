"""ddm4d.metrics: exact values on tiny arrays, so a wrong formula or unit cannot hide."""
from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from ddm4d.metrics import (ACDC_STRUCTURES, dice, dice_coefficient, ejection_fraction, label_volumes_ml, mse,
                           nmse, psnr, psnr_from_mse)

# a 1 x 2 x 6 label map: RV 1, myocardium 2, LV 3 (counts: 0 -> 3, 1 -> 2, 2 -> 3, 3 -> 4)
LABELS_A = np.array([[[0, 0, 0, 1, 1, 2],
                      [2, 2, 3, 3, 3, 3]]], dtype=np.uint8)
# one RV voxel becomes myocardium, one LV voxel becomes background, one background voxel becomes RV
LABELS_B = np.array([[[1, 0, 0, 1, 2, 2],
                      [2, 2, 3, 3, 3, 0]]], dtype=np.uint8)


# ------------------------------------------------------------------------------------------ PSNR, MSE

def test_psnr_of_identical_images_is_infinite():
    ref = np.linspace(-1, 1, 24).reshape(2, 3, 4)
    assert psnr(ref.copy(), ref) == math.inf
    assert psnr_from_mse(0.0, 2.0) == math.inf


def test_psnr_of_a_known_mse():
    ref = np.linspace(-1, 1, 24).reshape(2, 3, 4)
    pred = ref + 0.1  # MSE = 0.01
    assert mse(pred, ref) == pytest.approx(0.01)
    assert psnr(pred, ref, data_range=2.0) == pytest.approx(10 * math.log10(4 / 0.01))  # 26.0206 dB
    assert psnr_from_mse(0.01, 2.0) == pytest.approx(26.020599913)


def test_psnr_defaults_to_the_reference_range():
    ref = np.array([0.0, 10.0, 5.0, 5.0])  # max - min = 10
    pred = ref + np.array([1.0, -1.0, 1.0, -1.0])  # MSE = 1
    assert psnr(pred, ref) == pytest.approx(20.0)  # 10 log10(100 / 1)


@pytest.mark.parametrize("pred, ref, kwargs", [
    (np.zeros(3), np.zeros(4), {}),  # shapes differ
    (np.array([0.0, np.nan]), np.zeros(2), {}),  # not finite
    (np.ones(3), np.zeros(3), {}),  # constant reference, no data range
    (np.ones(0), np.ones(0), {}),  # empty
])
def test_psnr_refuses_what_it_cannot_measure(pred, ref, kwargs):
    with pytest.raises(ValueError):
        psnr(pred, ref, **kwargs)


def test_psnr_from_mse_checks_its_inputs():
    with pytest.raises(ValueError):
        psnr_from_mse(-1.0, 2.0)
    with pytest.raises(ValueError):
        psnr_from_mse(1.0, 0.0)


# ------------------------------------------------------------------------------------------ NMSE

def test_nmse_exact():
    ref = np.array([1.0, 2.0, 2.0])  # ||ref||^2 = 9
    pred = np.array([1.0, 2.0, 3.0])  # ||pred - ref||^2 = 1
    assert nmse(pred, ref) == pytest.approx(1 / 9)
    assert nmse(ref, ref) == 0.0


def test_nmse_of_an_all_zero_reference_is_undefined():
    with pytest.raises(ValueError, match="all zero"):
        nmse(np.ones(3), np.zeros(3))


# ------------------------------------------------------------------------------------------ Dice

def test_dice_coefficient_exact_and_empty():
    a = np.array([1, 1, 1, 0], bool)
    b = np.array([0, 1, 1, 1], bool)
    assert dice_coefficient(a, b) == pytest.approx(2 * 2 / 6)
    assert math.isnan(dice_coefficient(np.zeros(3, bool), np.zeros(3, bool)))


def test_dice_per_acdc_structure_on_known_overlaps():
    d = dice(LABELS_A, LABELS_B)
    assert set(d) == set(ACDC_STRUCTURES)
    assert d["lv_blood_pool"] == pytest.approx(2 * 3 / (4 + 3))  # LV: A 4, B 3, shared 3
    assert d["lv_myocardium"] == pytest.approx(2 * 3 / (3 + 4))  # myo: A 3, B 4, shared 3
    assert d["lv_epicardium"] == pytest.approx(2 * 6 / (7 + 7))  # myo or LV: A 7, B 7, shared 6
    assert d["rv"] == pytest.approx(2 * 1 / (2 + 2))  # RV: A 2, B 2, shared 1
    assert d["total"] == pytest.approx(2 * 8 / (9 + 9))  # foreground: A 9, B 9, shared 8
    assert all(v == 1.0 for v in dice(LABELS_A, LABELS_A).values())


def test_dice_with_chosen_labels_and_absent_structures():
    assert dice(LABELS_A, LABELS_B, labels=[3]) == {"3": pytest.approx(6 / 7)}
    assert dice(LABELS_A, LABELS_B, labels={"lv": 3, "both": (2, 3)}) == {
        "lv": pytest.approx(6 / 7), "both": pytest.approx(12 / 14)}
    no_rv = np.where(LABELS_A == 1, 0, LABELS_A)
    assert math.isnan(dice(no_rv, no_rv)["rv"])
    with pytest.raises(ValueError, match="differ in shape"):
        dice(LABELS_A, LABELS_A[..., :3])


# ------------------------------------------------------------------------------------------ volumes, EF

def test_label_volumes_ml_from_an_array_and_its_spacing():
    vols = label_volumes_ml(LABELS_A, spacing=(2.0, 1.5, 10.0))  # 30 mm^3 = 0.03 mL per voxel
    assert vols["lv_blood_pool"] == pytest.approx(4 * 0.03)
    assert vols["lv_myocardium"] == pytest.approx(3 * 0.03)
    assert vols["lv_epicardium"] == pytest.approx(7 * 0.03)
    assert vols["rv"] == pytest.approx(2 * 0.03)
    assert vols["total"] == pytest.approx(9 * 0.03)


def test_label_volumes_ml_uses_the_image_spacing():
    image = sitk.GetImageFromArray(LABELS_A)
    image.SetSpacing((1.25, 2.0, 8.0))  # 20 mm^3 = 0.02 mL per voxel
    assert label_volumes_ml(image)["lv_blood_pool"] == pytest.approx(4 * 0.02)
    with pytest.raises(ValueError, match="spacing"):
        label_volumes_ml(LABELS_A)
    with pytest.raises(ValueError, match="positive"):
        label_volumes_ml(LABELS_A, spacing=(1.0, 0.0, 1.0))


def test_ejection_fraction():
    assert ejection_fraction([150.0, 120.0, 60.0]) == pytest.approx(0.6)
    assert ejection_fraction([60.0, 150.0]) == pytest.approx(0.6)  # EDV = max, ESV = min, any order
    assert ejection_fraction([100.0, 100.0]) == 0.0
    for bad in ([100.0], [0.0, 0.0], [100.0, -1.0], [np.nan, 1.0]):
        with pytest.raises(ValueError):
            ejection_fraction(bad)
