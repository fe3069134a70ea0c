"""The batched torch postprocess (ddm4d.resample) against the SimpleITK path it replaces (geometry.py).

The cases are anisotropic, most are oblique, and the model grid differs from the source grid (size,
spacing, an off-centre field of view that leaves part of the source outside), so a wrong axis order,
a transposed direction or a half-voxel shift costs far more than the tolerances (checked by breaking
resample.py in each of those ways: the comparison fails).
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ddm4d import resample
from ddm4d.classical import cross_fade
from ddm4d.geometry import ModelMapping, folding_of, jacobian_determinant, to_model_grid, warp_image

DIRECTION = np.array([[0.94, -0.29, 0.18], [0.30, 0.95, -0.05], [-0.16, 0.10, 0.98]])
DIRECTION = np.linalg.qr(DIRECTION)[0] * np.sign(np.diag(np.linalg.qr(DIRECTION)[1]))  # a proper rotation


def image(size, spacing, origin=(-30.0, 12.0, 100.0), direction=DIRECTION, seed=0, labels=False) -> sitk.Image:
    """Smooth random content (or labels 0-3 from it) on the given grid."""
    rng = np.random.default_rng(seed)
    shape = tuple(reversed(size))
    coarse = rng.normal(size=tuple(max(2, n // 4) for n in shape))
    values = torch.nn.functional.interpolate(torch.from_numpy(coarse)[None, None], size=shape, mode="trilinear"
                                             if len(shape) == 3 else "bilinear", align_corners=True)[0, 0].numpy()
    if labels:
        array = np.digitize(values, [-0.5, 0.0, 0.5]).astype(np.uint8)
    else:
        array = (300 * values + 500).astype(np.float32)
    out = sitk.GetImageFromArray(array)
    out.SetSpacing(spacing)
    out.SetOrigin(origin)
    out.SetDirection(np.asarray(direction).ravel().tolist())
    return out


def smooth_fields(count, shape, voxels=3.0, seed=1) -> torch.Tensor:
    """(count, ndim, *shape) model voxel fields of a few voxels, the first one zero (gamma 0)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn((count, len(shape)) + tuple(max(2, n // 6) for n in shape), generator=gen)
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    phi = voxels * torch.nn.functional.interpolate(coarse, size=shape, mode=mode, align_corners=True)
    phi[0] = 0
    return phi


# source size, spacing, direction; model size, spacing; field-of-view centre offset from the source's centre (mm)
CASES = {
    "3d anisotropic, other grid": ((40, 36, 9), (1.6, 1.4, 6.0), DIRECTION, (24, 28, 12), (2.0, 1.8, 4.0),
                                   (6.0, -4.0, 3.0)),
    "3d, the model grid is the source grid": ((32, 30, 8), (1.5, 1.5, 3.15), np.eye(3), (32, 30, 8),
                                              (1.5, 1.5, 3.15), None),
    "2d single slice": ((48, 40, 1), (1.3, 1.2, 8.0), DIRECTION, (28, 30), (1.9, 1.7), (5.0, -3.0, 0.0)),
    "2d single slice, axis-aligned": ((36, 40, 1), (1.4, 1.2, 8.0), np.eye(3), (28, 30), (1.9, 1.7), (5.0, -3.0, 0.0)),
    "3d, the model grid rotated against the source": ((40, 36, 9), (1.6, 1.4, 6.0), DIRECTION, (24, 28, 12),
                                                      (2.0, 1.8, 4.0), (6.0, -4.0, 3.0)),
}


def mapping_of(case):
    size, spacing, direction, model_size, model_spacing, offset = CASES[case]
    source = image(size, spacing, direction=direction, seed=1)
    target = image(size, spacing, direction=direction, seed=2)  # on the source grid, as to_model_grid leaves it
    centre = None
    if offset is not None:
        centre = np.asarray(source.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in size])) + offset
    _, _, mapping = to_model_grid(source, target, model_size, model_spacing, centre)
    if "rotated" in case:  # not a grid to_model_grid makes, but a ModelMapping may hold one
        grid = mapping.grid
        grid.SetDirection((DIRECTION @ DIRECTION).ravel().tolist())
        mapping = ModelMapping(mapping.source, grid, mapping.spatial_dims, mapping.target)
    labels = image(size, spacing, direction=direction, seed=3, labels=True)
    return mapping, labels


def arr(img: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(img)


@pytest.mark.parametrize("case", list(CASES))
def test_batched_postprocess_matches_simpleitk(case):
    mapping, labels = mapping_of(case)
    phi = smooth_fields(4, mapping.model_shape)
    back = smooth_fields(4, mapping.model_shape, seed=2)
    gammas = [0.0, 0.3, 0.7, 1.0]

    fields = resample.fields_on_source(mapping, phi)
    warp = resample.Warp(fields, mapping.source)
    frames = warp.linear(mapping.source)
    weight = torch.tensor(gammas).view(-1, 1, 1, 1)
    back_fields = resample.fields_on_source(mapping, back)
    blended = frames * (1 - weight) + resample.Warp(back_fields, mapping.target).linear(mapping.target) * weight
    dets = warp.jacobians()
    moved = warp.nearest(labels, default_value=0)
    fov = mapping.fov_mask(erode=1)
    span = float(np.ptp(arr(mapping.source)))
    outside = 0
    for i, g in enumerate(gammas):
        field = mapping.field_to_physical(phi[i].numpy())
        (image_field,) = resample.to_images(fields[i:i + 1], mapping.source, vector=True)
        assert image_field.GetPixelID() == sitk.sitkVectorFloat64
        for a, b in ((image_field, field), (resample.to_images(frames[i:i + 1], mapping.source)[0], mapping.source)):
            assert a.GetSize() == b.GetSize() and a.GetOrigin() == b.GetOrigin()
            assert a.GetSpacing() == b.GetSpacing() and a.GetDirection() == b.GetDirection()
        np.testing.assert_allclose(arr(image_field), arr(field), rtol=0, atol=1e-4)  # mm
        outside += int(np.count_nonzero(~arr(field).any(-1)))
        frame = warp_image(mapping.source, field, "linear")
        np.testing.assert_allclose(frames[i].numpy(), arr(frame), rtol=0, atol=1e-4 * span)
        reference = cross_fade(frame, warp_image(mapping.target, mapping.field_to_physical(back[i].numpy())), g)
        np.testing.assert_allclose(blended[i].numpy(), arr(reference), rtol=0, atol=1e-4 * span)
        det = jacobian_determinant(field)
        np.testing.assert_allclose(dets[i].numpy(), arr(det), rtol=0, atol=1e-4)
        assert folding_of(dets[i].numpy(), fov) == folding_of(det, fov)
        expected = arr(warp_image(labels, field, "nearest", default_value=0))
        assert moved[i].dtype == torch.uint8
        assert np.count_nonzero(moved[i].numpy() != expected) <= 1e-4 * expected.size  # ties only
    np.testing.assert_array_equal(frames[0].numpy(), arr(mapping.source))  # gamma 0: the source, exactly
    np.testing.assert_array_equal(moved[0].numpy(), arr(labels))
    if CASES[case][5] is not None:
        assert outside > 0  # part of the source lies outside the model's field of view: zero there


def test_the_tolerances_are_far_below_a_half_voxel_or_axis_order_error():
    mapping, _ = mapping_of("3d anisotropic, other grid")
    phi = smooth_fields(2, mapping.model_shape)[1]
    field = mapping.field_to_physical(phi.numpy())
    half = 0.5 * mapping.source.GetSpacing()[0] * np.asarray(mapping.source.GetDirection()).reshape(3, 3)[:, 0]
    shifted = sitk.GetImageFromArray(arr(field) + half, isVector=True)  # half a voxel along x, in LPS mm
    shifted.CopyInformation(field)
    span = float(np.ptp(arr(mapping.source)))
    frame = arr(warp_image(mapping.source, field))
    assert np.abs(arr(warp_image(mapping.source, shifted)) - frame).max() > 100 * 1e-4 * span
    swapped = mapping.field_to_physical(phi.flip(0).numpy())  # (dz, dy, dx) read as (dx, dy, dz)
    assert np.abs(arr(swapped) - arr(field)).max() > 100 * 1e-4


def test_batches_cover_every_gamma_in_order():
    source = image((64, 64, 32), (1.0, 1.0, 1.0))
    gammas = [i / 99 for i in range(100)]
    batches = resample.gamma_batches(gammas, source)
    assert [g for b in batches for g in b] == gammas and len(batches) > 1


@pytest.mark.parametrize("mode", ["forward", "symmetric"])
def test_frames_that_do_not_move_are_the_source_and_the_rest_as_resampled(mode):
    """generate's postprocess skips the resampling of a gamma whose field is zero (forward mode; gamma 0
    in symmetric mode, where the fade keeps the source): those outputs must be exactly what the full
    batched path gives, and every other gamma must be the full path's too."""
    from ddm4d.generation import _on_source, _Paths

    mapping, labels = mapping_of("3d anisotropic, other grid")
    gammas = [0.0, 0.4, 0.7, 1.0]
    phi = smooth_fields(4, mapping.model_shape)
    phi[2] = 0  # a zero field at 0.7 too: skipped in forward mode only
    back = smooth_fields(4, mapping.model_shape, seed=2)
    paths = _Paths(mapping, {g: phi[i:i + 1] for i, g in enumerate(gammas)},
                   {g: back[i:i + 1] for i, g in enumerate(gammas)})
    frames, fields, jacobians, folding, moved = _on_source(paths, gammas, mode, "confidence", labels)

    expected_fields = resample.fields_on_source(mapping, phi)
    warp = resample.Warp(expected_fields, mapping.source)
    expected = warp.linear(mapping.source)
    if mode == "symmetric":
        from ddm4d.fade import join
        ends = [torch.from_numpy(arr(im)).float() for im in (mapping.source, mapping.target)]
        moved_target = resample.Warp(resample.fields_on_source(mapping, back), mapping.target).linear(mapping.target)
        expected = join(*ends, expected, moved_target, gammas, spacing=mapping.source.GetSpacing()[::-1])
    expected_labels = warp.nearest(labels, default_value=0)
    expected_jacobians = warp.jacobians()
    for i in range(len(gammas)):
        np.testing.assert_array_equal(arr(frames[i]), expected[i].numpy())
        np.testing.assert_array_equal(arr(fields[i]), expected_fields[i].movedim(0, -1).numpy())
        np.testing.assert_array_equal(arr(jacobians[i]), expected_jacobians[i].numpy())
        np.testing.assert_array_equal(arr(moved[i]), expected_labels[i].numpy())
        for image_ in (frames[i], fields[i], jacobians[i], moved[i]):
            assert image_.GetOrigin() == mapping.source.GetOrigin() and image_.GetSize() == mapping.source.GetSize()
        assert frames[i].GetPixelID() == sitk.sitkFloat32 and fields[i].GetPixelID() == sitk.sitkVectorFloat64
        assert jacobians[i].GetPixelID() == sitk.sitkFloat32 and moved[i].GetPixelID() == labels.GetPixelID()
        assert folding[i] == folding_of(expected_jacobians[i].numpy(), mapping.fov_mask(erode=1))
    np.testing.assert_array_equal(arr(frames[0]), arr(mapping.source))
    assert frames[0] is not mapping.source and moved[0] is not labels  # the caller's images stay theirs


def test_points_pulled_from_beyond_the_image_take_its_nearest_edge_voxel():
    """Through-plane motion pulls a stack's end slices from beyond it: the frame there repeats the edge
    (ITK's nearest-neighbour extrapolator), not a band of the image minimum; labels take their default."""
    size, spacing = (20, 18, 6), (1.5, 1.5, 6.0)
    source = image(size, spacing, direction=DIRECTION, seed=4)
    labels = image(size, spacing, direction=DIRECTION, seed=5, labels=True)
    offset = np.array([2.3, 0.0, 1.7])  # voxels along x, y, z (no rounding ties)
    u = DIRECTION @ (np.asarray(spacing) * offset)  # LPS mm
    field = sitk.GetImageFromArray(np.broadcast_to(u, arr(source).shape + (3,)).copy(), isVector=True)
    field.CopyInformation(source)
    warp = resample.Warp(torch.from_numpy(arr(field)).movedim(-1, 0)[None].double(), source)
    frame = warp.linear(source)[0].numpy()
    src = arr(source)
    # slices 4 and 5 pull from z = 5.7 and 6.7, beyond the last slice's half voxel: the nearest voxel,
    # every axis rounded and clamped (x + 2.3 -> x + 2)
    edge = src[-1][:, np.clip(np.arange(size[0]) + 2, 0, size[0] - 1)]
    np.testing.assert_allclose(frame[-2:], np.broadcast_to(edge, (2,) + edge.shape), rtol=0, atol=1e-4)
    span = float(np.ptp(src))
    assert np.ptp(frame[-1]) > 0.1 * span  # not a band of one value (ITK's default value)
    np.testing.assert_allclose(frame, arr(warp_image(source, field, "linear")), rtol=0, atol=1e-4 * span)
    moved = warp.nearest(labels, default_value=0)[0].numpy()
    assert not moved[-2:].any()  # labels: nothing is known to lie beyond the stack
    np.testing.assert_array_equal(moved, arr(warp_image(labels, field, "nearest", default_value=0)))
    np.testing.assert_array_equal(warp.linear(source, default_value=-7.0)[0].numpy()[-2:], -7.0)
