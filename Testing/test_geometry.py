"""Model grid <-> physical space, checked against analytic expectations in LPS millimetres.

The sources are oblique (20 degrees about a tilted axis), anisotropic (1.25 x 1.4 x 6 mm) and off
origin, because that is where index/physical mix-ups (axis order, transposed direction, spacing on the
wrong side) show up; an identity-direction, 1 mm test would pass with most of those bugs.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from ddm4d.errors import InputError
from ddm4d.geometry import (
    ModelMapping, folding_fraction, jacobian_determinant, make_model_grid, normalize_intensity,
    resample_to_reference, same_geometry, to_model_grid, warp_image,
)

SPACING = (1.25, 1.4, 6.0)
ORIGIN = (-30.0, 12.0, 100.0)
MODEL_SIZE = (40, 40, 16)
MODEL_SPACING = (1.5, 1.5, 3.15)


def rotation(axis, degrees) -> np.ndarray:
    """Rodrigues' formula: a proper rotation matrix about `axis`."""
    k = np.asarray(axis, dtype=float)
    k /= np.linalg.norm(k)
    t = np.deg2rad(degrees)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(t) * kx + (1 - np.cos(t)) * kx @ kx


DIRECTION = rotation((0.3, 1.0, 0.5), 20.0)


def blank(size, spacing=SPACING, origin=ORIGIN, direction=DIRECTION, pixel=sitk.sitkFloat32) -> sitk.Image:
    image = sitk.Image([int(s) for s in size], pixel)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    image.SetDirection(tuple(np.asarray(direction, dtype=float).ravel()))
    return image


def physical_points(image: sitk.Image) -> np.ndarray:
    """LPS mm of every voxel centre, shape (z, y, x, 3) with components (x, y, z)."""
    nx, ny, nz = image.GetSize()
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    idx = np.stack([i, j, k], axis=-1).astype(float) * np.asarray(image.GetSpacing())
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    return idx @ d.T + np.asarray(image.GetOrigin())


def continuous_index(image: sitk.Image, points: np.ndarray) -> np.ndarray:
    """Continuous (i, j, k) index in `image` of LPS points (..., 3)."""
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    return ((points - np.asarray(image.GetOrigin())) @ d) / np.asarray(image.GetSpacing())


def with_values(reference: sitk.Image, array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def blob_source(size=(48, 44, 10), sigma=7.0, offset=(0.0, 0.0, 0.0), **kw) -> tuple[sitk.Image, np.ndarray]:
    """A Gaussian blob (sigma in mm) near the physical centre; returns the image and the blob centre."""
    geo = blank(size, **kw)
    x = physical_points(geo)
    centre = np.asarray(geo.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in size])) + offset
    values = 100.0 * np.exp(-((x - centre) ** 2).sum(-1) / (2 * sigma ** 2)) + 5.0
    return with_values(geo, values.astype(np.float32)), centre


def centroid(image: sitk.Image) -> np.ndarray:
    a = sitk.GetArrayFromImage(image).astype(float)
    a -= 5.0  # the background level of blob_source
    a[a < 1.0] = 0.0
    x = physical_points(image)
    return (x * a[..., None]).sum((0, 1, 2)) / a.sum()


# ------------------------------------------------------------------------------------------- intensities

def test_normalize_intensity_is_the_authors_formula_and_spans_minus_one_to_one():
    rng = np.random.default_rng(0)
    a = (rng.normal(300, 80, size=(5, 7, 9))).astype(np.float32)
    original = a.copy()
    out = normalize_intensity(a)
    assert out.dtype == np.float32 and out.shape == a.shape
    assert out.min() == -1.0 and out.max() == 1.0
    x = a.astype(np.float64)
    x -= x.min(); x /= x.std(); x -= x.min(); x /= x.max()  # noqa: E702  (the authors' lines)
    np.testing.assert_allclose(out, x * 2 - 1, atol=1e-6)
    assert np.all(normalize_intensity(np.full((3, 3), 7.0)) == -1.0)
    np.testing.assert_array_equal(a, original)  # the input was not modified in place


# -------------------------------------------------------------------------------------------- model grid

def test_model_grid_takes_reference_direction_and_centre():
    source, _ = blob_source()
    grid = make_model_grid(source, MODEL_SIZE, MODEL_SPACING)
    assert grid.GetSize() == MODEL_SIZE and grid.GetSpacing() == MODEL_SPACING
    assert grid.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(grid.GetDirection(), source.GetDirection(), atol=1e-12)
    centre = lambda im: np.asarray(im.TransformContinuousIndexToPhysicalPoint(  # noqa: E731
        [(n - 1) / 2 for n in im.GetSize()]))
    np.testing.assert_allclose(centre(grid), centre(source), atol=1e-9)
    given = centre(source) + np.array([5.0, -4.0, 3.0])
    np.testing.assert_allclose(centre(make_model_grid(source, MODEL_SIZE, MODEL_SPACING, center=given)), given,
                               atol=1e-9)


def test_to_model_grid_arrays_are_normalised_and_padding_is_minus_one():
    source, _ = blob_source()
    s, t, mapping = to_model_grid(source, source, (64, 64, 24), MODEL_SPACING)  # larger than the source
    assert s.shape == t.shape == (24, 64, 64) and s.dtype == np.float32
    assert s.min() == -1.0 and s.max() == 1.0
    assert s[0, 0, 0] == -1.0  # a corner outside the source: padding
    assert mapping.model_shape == (24, 64, 64) and mapping.spatial_dims == 3
    np.testing.assert_array_equal(s, t)


# ----------------------------------------------------------------------------------- fields and warping

def test_constant_model_shift_moves_blob_by_expected_mm():
    source, _ = blob_source()
    _, _, mapping = to_model_grid(source, source, MODEL_SIZE, MODEL_SPACING)
    shift = np.array([2.0, -3.0, 1.5])  # (dz, dy, dx) model voxels
    phi = np.broadcast_to(shift[:, None, None, None], (3,) + mapping.model_shape).astype(np.float32)
    field = mapping.field_to_physical(phi)
    assert field.GetPixelID() == sitk.sitkVectorFloat64
    assert same_geometry(field, source, tol=0) and field.GetSize() == source.GetSize()
    frame = warp_image(source, field)
    assert same_geometry(frame, source, tol=0) and frame.GetPixelID() == source.GetPixelID()
    # pull: frame(x) = source(x + u), so content moves by -u; u = D (spacing * (dx, dy, dz))
    u = DIRECTION @ (np.asarray(MODEL_SPACING) * shift[::-1])
    moved = centroid(source) - centroid(frame)
    np.testing.assert_allclose(moved, u, atol=0.1)  # 0.1 mm: < 1/10 of the smallest voxel


def test_smooth_field_matches_analytic_displacement_and_warp():
    # a source linear in LPS mm: linear interpolation reproduces it exactly, so any error is geometry
    geo = blank((48, 44, 10))
    x = physical_points(geo)
    slope = np.array([0.5, -0.3, 0.2])
    source = with_values(geo, (x @ slope + 50.0).astype(np.float32))
    _, _, mapping = to_model_grid(source, source, MODEL_SIZE, MODEL_SPACING)
    nz, ny, nx = mapping.model_shape

    def phi_at(ijk):  # analytic model field at continuous model index (i, j, k) -> (dz, dy, dx)
        i, j, k = ijk[..., 0], ijk[..., 1], ijk[..., 2]
        return np.stack([0.8 * np.sin(np.pi * i / nx), 1.5 * np.cos(np.pi * k / nz),
                         1.2 * np.sin(np.pi * (j / ny + 0.25))], axis=0)

    kk, jj, ii = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    phi = phi_at(np.stack([ii, jj, kk], -1).astype(float)).astype(np.float32)
    field = mapping.field_to_physical(phi)

    ijk = continuous_index(mapping.grid, x)  # source voxels in model-grid index space
    inner = np.all((ijk >= 1) & (ijk <= np.asarray(MODEL_SIZE) - 2), axis=-1)
    assert inner.sum() > 1000
    p = phi_at(ijk)  # (3, z, y, x)
    expected_u = np.stack([p[2], p[1], p[0]], -1) * np.asarray(MODEL_SPACING) @ DIRECTION.T
    u = sitk.GetArrayFromImage(field)
    np.testing.assert_allclose(u[inner], expected_u[inner], atol=0.03)  # mm; sine sampled on the grid

    frame = sitk.GetArrayFromImage(warp_image(source, field))
    target_points = x + expected_u
    inside_src = np.all((continuous_index(geo, target_points) >= 0)
                        & (continuous_index(geo, target_points) <= np.asarray(geo.GetSize()) - 1), axis=-1)
    ok = inner & inside_src
    assert ok.sum() > 1000
    np.testing.assert_allclose(frame[ok], (target_points @ slope + 50.0)[ok], atol=0.03)

    back = mapping.field_to_model(field)
    np.testing.assert_allclose(back[:, 2:-2, 2:-2, 2:-2], phi[:, 2:-2, 2:-2, 2:-2], atol=0.25)


def test_zero_field_returns_source_exactly():
    source, _ = blob_source()
    _, _, mapping = to_model_grid(source, source, MODEL_SIZE, MODEL_SPACING)
    field = mapping.field_to_physical(np.zeros((3,) + mapping.model_shape, np.float32))
    assert not sitk.GetArrayViewFromImage(field).any()
    frame = warp_image(source, field)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(frame), sitk.GetArrayFromImage(source))
    assert frame.GetOrigin() == source.GetOrigin() and frame.GetSpacing() == source.GetSpacing()
    assert frame.GetDirection() == source.GetDirection() and frame.GetSize() == source.GetSize()
    assert frame.GetPixelID() == source.GetPixelID()


def test_plain_sitk_resample_with_the_field_gives_the_same_frame():
    source, _ = blob_source()
    _, _, mapping = to_model_grid(source, source, MODEL_SIZE, MODEL_SPACING)
    rng = np.random.default_rng(1)
    phi = (rng.normal(size=(3, 4, 4, 4)) * 1.5).astype(np.float32)  # smooth: upsample a coarse field
    phi = np.stack([sitk.GetArrayFromImage(sitk.Resample(
        sitk.GetImageFromArray(c), list(reversed(mapping.model_shape)), sitk.Transform(), sitk.sitkLinear,
        (0, 0, 0), (4 / MODEL_SIZE[0], 4 / MODEL_SIZE[1], 4 / MODEL_SIZE[2]))) for c in phi])
    field = mapping.field_to_physical(phi.astype(np.float32))
    ours = sitk.GetArrayFromImage(warp_image(source, field))
    # beyond the image: the nearest edge voxel (ITK's nearest-neighbour extrapolator)
    plain = sitk.Resample(source, source, sitk.DisplacementFieldTransform(sitk.Image(field)), sitk.sitkLinear,
                          0.0, sitk.sitkUnknown, True)
    np.testing.assert_allclose(ours, sitk.GetArrayFromImage(plain), atol=1e-4)
    assert not np.allclose(ours, sitk.GetArrayFromImage(source), atol=1e-2)  # it did move


def test_displacement_is_zero_outside_the_model_field_of_view():
    source, _ = blob_source()
    size = (16, 16, 4)  # a small model grid inside the source
    _, _, mapping = to_model_grid(source, source, size, MODEL_SPACING)
    phi = np.ones((3,) + mapping.model_shape, np.float32)
    u = sitk.GetArrayFromImage(mapping.field_to_physical(phi))
    ijk = continuous_index(mapping.grid, physical_points(source))
    outside = np.any((ijk < -0.6) | (ijk > np.asarray(size) - 0.4), axis=-1)
    inside = np.all((ijk > 0.1) & (ijk < np.asarray(size) - 1.1), axis=-1)
    assert outside.sum() > 100 and inside.sum() > 100
    assert np.all(u[outside] == 0.0)
    fov = sitk.GetArrayFromImage(mapping.fov_mask())
    assert fov.shape == u.shape[:3] and np.all(fov[outside] == 0) and np.all(fov[inside] == 1)
    field = mapping.field_to_physical(phi)
    assert folding_fraction(field) > 0  # the step to zero at the edge of the field of view...
    assert folding_fraction(field, mapping.fov_mask(erode=1)) == 0.0  # ...is left out with the mask
    np.testing.assert_allclose(u[inside], np.broadcast_to(DIRECTION @ np.asarray(MODEL_SPACING), u[inside].shape),
                               atol=1e-9)


def test_labels_warp_with_nearest_neighbour_and_stay_in_label_set():
    source, centre = blob_source()
    a = sitk.GetArrayFromImage(source)
    labels = np.zeros(a.shape, np.uint8)
    labels[a > 20] = 2
    labels[a > 50] = 3
    labels[a > 90] = 1
    lab = with_values(source, labels)
    _, _, mapping = to_model_grid(source, source, MODEL_SIZE, MODEL_SPACING)
    kk, jj, ii = np.meshgrid(*[np.arange(n) for n in mapping.model_shape], indexing="ij")
    phi = np.stack([0.5 * np.sin(ii / 6.0), 2.3 * np.cos(jj / 7.0), 1.7 * np.sin(kk / 3.0 + ii / 9.0)])
    field = mapping.field_to_physical(phi.astype(np.float32))
    out = warp_image(lab, field, interpolator="nearest")
    assert out.GetPixelID() == sitk.sitkUInt8 and same_geometry(out, lab, tol=0)
    values = sitk.GetArrayFromImage(out)
    assert set(np.unique(values)) <= {0, 1, 2, 3}
    assert not np.array_equal(values, labels)
    assert set(np.unique(values)) == {0, 1, 2, 3}


def test_target_on_another_grid_is_resampled_onto_the_source_grid_first():
    geo = blank((48, 44, 10))
    slope = np.array([0.5, -0.3, 0.2])
    source = with_values(geo, (physical_points(geo) @ slope + 50.0).astype(np.float32))
    other = blank((40, 36, 14), spacing=(1.6, 1.5, 4.0), origin=(-25.0, 15.0, 104.0),
                  direction=rotation((1.0, 0.0, 0.2), -10.0))
    target = with_values(other, (physical_points(other) @ slope + 50.0).astype(np.float32))
    s, t, mapping = to_model_grid(source, target, MODEL_SIZE, MODEL_SPACING)
    assert same_geometry(mapping.target, source, tol=0)
    # where the target covers the source grid, it is the same linear function
    ijk = continuous_index(other, physical_points(geo))
    covered = np.all((ijk >= 0) & (ijk <= np.asarray(other.GetSize()) - 1), axis=-1)
    assert covered.sum() > 1000
    np.testing.assert_allclose(sitk.GetArrayFromImage(mapping.target)[covered],
                               sitk.GetArrayFromImage(source)[covered], atol=1e-3)
    _, t2, _ = to_model_grid(source, resample_to_reference(target, source), MODEL_SIZE, MODEL_SPACING)
    np.testing.assert_array_equal(t, t2)


def test_non_overlapping_target_is_refused():
    source, _ = blob_source()
    far, _ = blob_source(origin=(900.0, 12.0, 100.0))
    with pytest.raises(InputError, match="does not overlap"):
        to_model_grid(source, far, MODEL_SIZE, MODEL_SPACING, target_name="es.nii.gz")
    with pytest.raises(InputError, match="es.nii.gz"):
        to_model_grid(source, far, MODEL_SIZE, MODEL_SPACING, target_name="es.nii.gz")


def test_single_slice_source_with_2d_model_round_trips():
    source, _ = blob_source(size=(64, 60, 1), spacing=(1.3, 1.3, 8.0), sigma=6.0)
    s, t, mapping = to_model_grid(source, source, (32, 32), (1.5, 1.5))
    assert s.shape == (32, 32) and mapping.spatial_dims == 2 and mapping.model_shape == (32, 32)
    assert mapping.grid.GetSize() == (32, 32, 1) and mapping.grid.GetSpacing()[2] == 8.0
    # the grid lies in the source's slice plane
    k = continuous_index(source, physical_points(mapping.grid))[..., 2]
    np.testing.assert_allclose(k, 0.0, atol=1e-9)
    phi = np.zeros((2, 32, 32), np.float32)
    phi[0], phi[1] = -3.0, 2.0  # (dy, dx) model voxels
    field = mapping.field_to_physical(phi)
    assert same_geometry(field, source, tol=0)
    u = DIRECTION @ (np.array([1.5, 1.5, 8.0]) * np.array([2.0, -3.0, 0.0]))
    vectors = sitk.GetArrayFromImage(field)
    # no through-plane component
    np.testing.assert_allclose((vectors @ DIRECTION)[..., 2], 0.0, atol=1e-9)
    np.testing.assert_allclose(centroid(source) - centroid(warp_image(source, field)), u, atol=0.1)
    np.testing.assert_allclose(mapping.field_to_model(field)[:, 1:-1, 1:-1], phi[:, 1:-1, 1:-1], atol=1e-5)
    zero = mapping.field_to_physical(np.zeros_like(phi))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(warp_image(source, zero)), sitk.GetArrayFromImage(source))


def test_2d_model_needs_a_single_slice_reference():
    source, _ = blob_source()
    with pytest.raises(InputError, match="single-slice"):
        make_model_grid(source, (32, 32), (1.5, 1.5))


def test_phi_shape_is_checked():
    source, _ = blob_source()
    _, _, mapping = to_model_grid(source, source, MODEL_SIZE, MODEL_SPACING)
    with pytest.raises(ValueError, match="expected"):
        mapping.field_to_physical(np.zeros((3, 40, 40, 16), np.float32))  # ITK order by mistake


def test_image_to_model_with_labels_keeps_values():
    source, _ = blob_source()
    labels = with_values(source, (sitk.GetArrayFromImage(source) > 50).astype(np.uint8) * 3)
    _, _, mapping = to_model_grid(source, source, MODEL_SIZE, MODEL_SPACING)
    on_grid = mapping.image_to_model(labels, "nearest", normalize=False)
    assert on_grid.shape == mapping.model_shape and set(np.unique(on_grid)) == {0, 3}
    assert isinstance(mapping, ModelMapping)


# ------------------------------------------------------------------------------------ Jacobian, folding

def _linear_field(reference: sitk.Image, m: np.ndarray) -> sitk.Image:
    x = physical_points(reference)
    centre = x.reshape(-1, 3).mean(0)
    field = sitk.GetImageFromArray((x - centre) @ m.T, isVector=True)
    field.CopyInformation(reference)
    return field


def test_jacobian_determinant_of_a_linear_field_on_an_oblique_grid():
    geo = blank((20, 18, 8))
    m = np.array([[0.1, 0.05, 0.0], [-0.02, -0.2, 0.03], [0.0, 0.1, 0.15]])
    det = sitk.GetArrayFromImage(jacobian_determinant(_linear_field(geo, m)))
    np.testing.assert_allclose(det, np.linalg.det(np.eye(3) + m), rtol=1e-5)
    assert folding_fraction(_linear_field(geo, m)) == 0.0
    assert folding_fraction(_linear_field(geo, np.diag([-2.0, 0.0, 0.0]))) == 1.0  # det = -1 everywhere


def test_jacobian_matches_sitk_on_an_axis_aligned_grid():
    geo = blank((20, 18, 8), direction=np.eye(3))
    x = physical_points(geo)
    u = np.stack([2 * np.sin(x[..., 1] / 5), 1.5 * np.cos(x[..., 0] / 6), np.sin(x[..., 2] / 9)], -1)
    field = sitk.GetImageFromArray(u, isVector=True)
    field.CopyInformation(geo)
    ours = sitk.GetArrayFromImage(jacobian_determinant(field))
    theirs = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field))
    np.testing.assert_allclose(ours[1:-1, 1:-1, 1:-1], theirs[1:-1, 1:-1, 1:-1], atol=1e-4)


def test_jacobian_of_a_voxel_field_and_folding_with_mask():
    phi = np.zeros((2, 10, 10), np.float32)
    assert np.allclose(jacobian_determinant(phi), 1.0)
    phi[1] = -2.0 * np.arange(10)[None, :]  # dx = -2 x: det = -1
    assert folding_fraction(phi) == 1.0
    mask = np.zeros((10, 10), bool)
    assert folding_fraction(phi, mask) == 0.0


def test_physical_field_agrees_with_the_models_own_warp():
    """The model warps its grid with ddm4d.warp; the physical field must describe the same motion.

    A source linear in mm makes every linear interpolation exact, so what is left is geometry.
    """
    import torch

    from ddm4d.warp import warp

    geo = blank((48, 44, 10))
    source = with_values(geo, (physical_points(geo) @ np.array([0.5, -0.3, 0.2]) + 50.0).astype(np.float32))
    _, _, mapping = to_model_grid(source, source, (24, 24, 10), MODEL_SPACING)  # well inside the source
    on_grid = mapping.image_to_model(source, normalize=False)
    kk, jj, ii = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in mapping.model_shape], indexing="ij")
    phi = np.stack([1.0 + 0.5 * np.sin(ii / 7.0), -2.0 + np.cos(kk / 5.0), 1.5 * np.sin(jj / 9.0)]).astype(np.float32)
    model_frame = warp(torch.from_numpy(on_grid)[None, None], torch.from_numpy(phi)[None])[0, 0].numpy()
    physical_frame = warp_image(source, mapping.field_to_physical(phi))
    back_on_grid = mapping.image_to_model(physical_frame, normalize=False)
    # compare where the model samples inside its grid (it clamps at the border) and away from the edge
    # of the field of view (the source voxels there, up to 6 mm apart, straddle the zero outside)
    points = np.stack([kk, jj, ii]) + phi
    valid = np.all((points >= 0) & (points <= np.asarray(mapping.model_shape)[:, None, None, None] - 1), axis=0)
    valid[:3], valid[-3:], valid[:, :2], valid[:, -2:], valid[..., :2], valid[..., -2:] = (False,) * 6
    assert valid.sum() > 500
    np.testing.assert_allclose(back_on_grid[valid], model_frame[valid], atol=0.02)  # intensity slope 0.6/mm


def test_nan_displacement_does_not_move_and_backpropagates():
    """A diverged field (NaN) must not crash the backward pass (grid_sample's CPU kernel does on NaN)."""
    import torch

    from ddm4d.warp import warp

    image = torch.rand(1, 1, 8, 8, requires_grad=True)
    phi = torch.zeros(1, 2, 8, 8)
    phi[0, 0, 3, 4] = float("nan")
    phi[0, 1, 2, 2] = 1.0
    phi.requires_grad_(True)
    out = warp(image, phi)
    out.sum().backward()
    assert torch.isclose(out[0, 0, 3, 4], image[0, 0, 3, 4]) and torch.isclose(out[0, 0, 2, 2], image[0, 0, 2, 3])
    assert torch.isfinite(phi.grad).all() and phi.grad[0, 0, 3, 4] == 0
    with torch.no_grad():
        assert torch.equal(warp(image, phi), out)
