"""The model grid and the way back to the patient's own geometry, in one place.

The networks work on a fixed grid (the paper: 128 x 128 x 32 voxels of 1.5 x 1.5 x 3.15 mm). Users
give volumes with any size, anisotropic spacing and oblique orientation. This module

- builds the model grid around the source (same direction matrix, model size and spacing),
- resamples source and target onto it and normalises intensities to [-1, 1], and
- turns the model's voxel displacement field ``phi`` back into a physical displacement field on the
  source's ORIGINAL grid, so frames are generated at the source's own resolution and geometry.

Conventions (fixed, see ddm4d.config):
- sizes and spacings are in ITK order (x, y, z); numpy arrays are in (z, y, x) order;
- ``phi`` is float32 of shape (ndim, *spatial), one channel per array axis in array order
  ((dz, dy, dx) in 3D, (dy, dx) in 2D), in VOXELS of the model grid, pull: frame(p) = source(p + phi(p));
- physical fields are sitkVectorFloat64 images in LPS millimetres with ITK's pull convention
  (output point x samples the input at x + u(x)), usable as sitk.DisplacementFieldTransform.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError

__all__ = [
    "normalize_intensity", "make_model_grid", "ModelMapping", "to_model_grid", "resample_to_reference",
    "warp_image", "jacobian_determinant", "folding_fraction", "same_geometry", "physical_bounds",
]

_INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "bspline": sitk.sitkBSpline,
}


def _interpolator(value) -> int:
    if isinstance(value, str):
        try:
            return _INTERPOLATORS[value.lower()]
        except KeyError:
            raise ValueError(f"interpolator must be one of {sorted(_INTERPOLATORS)}, got {value!r}") from None
    return int(value)


def _direction(image: sitk.Image) -> np.ndarray:
    d = image.GetDimension()
    return np.asarray(image.GetDirection(), dtype=np.float64).reshape(d, d)


def _as_3d(image: sitk.Image) -> sitk.Image:
    if image.GetDimension() == 2:
        return sitk.JoinSeries([image])
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3D (or 2D) image, got {image.GetDimension()}D")
    return image


# ----------------------------------------------------------------------------------------- intensities

def normalize_intensity(array: np.ndarray) -> np.ndarray:
    """Map intensities to [-1, 1] as the authors do (min-shift, divide by std, min-shift, divide by max).

    The result is float32 with min exactly -1 and max exactly 1. A constant array has no contrast to
    normalise and becomes all -1 (the value padding gets), instead of dividing by zero.
    """
    x = np.array(array, dtype=np.float64, copy=True)
    if x.size == 0:
        raise ValueError("normalize_intensity got an empty array")
    if not np.isfinite(x).all():
        raise ValueError("normalize_intensity got NaN or infinite values")
    x -= x.min()
    std = x.std()
    if std == 0:
        return np.full(x.shape, -1.0, dtype=np.float32)
    x /= std
    x -= x.min()
    x /= x.max()
    return (x * 2.0 - 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------- grids, bounds

def same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-5) -> bool:
    """Same size, and origin/spacing/direction equal within `tol` (mm, and unitless for direction)."""
    return (a.GetDimension() == b.GetDimension() and a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=tol)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=tol)
            and np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=tol))


def physical_bounds(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned LPS box (mm) around the image's voxel extent (voxel centres +- half a voxel)."""
    size = np.asarray(image.GetSize(), dtype=np.float64)
    dim = len(size)
    corners = []
    for bits in range(2 ** dim):
        idx = [(-0.5 if not (bits >> k) & 1 else size[k] - 0.5) for k in range(dim)]
        corners.append(image.TransformContinuousIndexToPhysicalPoint(idx))
    corners = np.asarray(corners)
    return corners.min(axis=0), corners.max(axis=0)


def _physical_center(image: sitk.Image) -> np.ndarray:
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint(
        [(n - 1) / 2.0 for n in image.GetSize()]), dtype=np.float64)


def make_model_grid(reference: sitk.Image, size: Sequence[int], spacing: Sequence[float],
                    center: Sequence[float] | None = None) -> sitk.Image:
    """A float32 zero image defining the model grid (size/spacing in ITK order x, y[, z]; mm).

    It takes the reference's direction matrix and is centred on the reference's physical centre, or
    on `center` (an LPS point in mm). A 2D model (len(size) == 2) needs a single-slice reference and
    gets a single-slice grid in the reference's slice plane with the reference's z spacing.
    """
    reference = _as_3d(reference)
    size = [int(s) for s in size]
    spacing = [float(s) for s in spacing]
    if len(size) not in (2, 3) or len(spacing) != len(size):
        raise ValueError(f"size and spacing need 2 or 3 values each, got size={size} spacing={spacing}")
    if min(size) < 1 or min(spacing) <= 0:
        raise ValueError(f"size must be >= 1 and spacing > 0, got size={size} spacing={spacing}")
    direction = _direction(reference)
    c = _physical_center(reference) if center is None else np.asarray(center, dtype=np.float64)
    if c.shape != (3,):
        raise ValueError(f"center must be an LPS point (3 values, mm), got {center}")
    if len(size) == 2:
        nz = reference.GetSize()[2]
        if nz != 1:
            raise InputError(f"a 2D model needs a single-slice image, but this one has {nz} slices; use a "
                             "3D model, or pass one slice (e.g. extract it in Slicer)")
        # keep the in-plane position of the centre, put it on the reference's slice
        ci = np.asarray(reference.TransformPhysicalPointToContinuousIndex(c.tolist()))
        ci[2] = 0.0
        c = np.asarray(reference.TransformContinuousIndexToPhysicalPoint(ci.tolist()))
        size = size + [1]
        spacing = spacing + [float(reference.GetSpacing()[2])]
    half = np.asarray(spacing) * (np.asarray(size, dtype=np.float64) - 1) / 2.0
    origin = c - direction @ half
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing(spacing)
    grid.SetDirection(tuple(direction.ravel()))
    grid.SetOrigin(tuple(origin))
    return grid


def resample_to_reference(image: sitk.Image, reference: sitk.Image, interpolator="linear",
                          default_value: float | None = None, pixel_type: int | None = None) -> sitk.Image:
    """Resample `image` onto `reference`'s grid (identity transform); default value = image minimum."""
    if default_value is None:
        default_value = float(sitk.GetArrayViewFromImage(image).min())
    out_type = image.GetPixelID() if pixel_type is None else pixel_type
    return sitk.Resample(image, reference, sitk.Transform(), _interpolator(interpolator), float(default_value),
                         out_type)


def _check_overlap(source: sitk.Image, target: sitk.Image, source_name: str, target_name: str,
                   fix: str = "pass two phases of the same acquisition, or fix the origin/direction of one of "
                              "the files") -> None:
    slo, shi = physical_bounds(source)
    tlo, thi = physical_bounds(target)
    if np.any(np.minimum(shi, thi) <= np.maximum(slo, tlo)):
        fmt = lambda v: "(" + ", ".join(f"{x:.1f}" for x in v) + ")"  # noqa: E731
        raise InputError(
            f"{target_name} does not overlap {source_name} in physical space ({source_name} spans "
            f"{fmt(slo)}..{fmt(shi)} mm, {target_name} {fmt(tlo)}..{fmt(thi)} mm, LPS); {fix}")


# ------------------------------------------------------------------------------------------- the mapping

@dataclass
class ModelMapping:
    """How the model grid sits in the source's physical space, both ways.

    `source` is the original source image (its grid is where frames and fields are produced), `grid`
    the model grid (a zero image carrying the geometry), `spatial_dims` 2 or 3 (a 2D model uses a
    single-slice grid and squeezed (y, x) arrays), `target` the target resampled onto the source grid.
    """

    source: sitk.Image
    grid: sitk.Image
    spatial_dims: int = 3
    target: sitk.Image | None = None

    @property
    def model_shape(self) -> tuple[int, ...]:
        """Array shape on the model grid: (z, y, x) in 3D, (y, x) for a 2D model."""
        shape = tuple(reversed(self.grid.GetSize()))
        return shape[1:] if self.spatial_dims == 2 else shape

    def _to_array(self, image3d: sitk.Image) -> np.ndarray:
        a = sitk.GetArrayFromImage(image3d)
        return a[0] if self.spatial_dims == 2 else a

    def image_to_model(self, image: sitk.Image, interpolator="linear", normalize: bool = True,
                       default_value: float | None = None) -> np.ndarray:
        """Any image (e.g. labels with "nearest", normalize=False) as an array on the model grid."""
        image = _as_3d(image)
        if normalize:
            resampled = resample_to_reference(sitk.Cast(image, sitk.sitkFloat32), self.grid, interpolator,
                                               default_value)
            return normalize_intensity(self._to_array(resampled))
        return self._to_array(resample_to_reference(image, self.grid, interpolator,
                                                    0.0 if default_value is None else default_value))

    def array_to_image(self, array: np.ndarray) -> sitk.Image:
        """A model-grid array ((z, y, x) or (y, x)) as an image carrying the model grid's geometry."""
        array = np.asarray(array)
        if array.shape != self.model_shape:
            raise ValueError(f"array shape {array.shape} does not match the model grid {self.model_shape}")
        image = sitk.GetImageFromArray(array[None] if self.spatial_dims == 2 else array)
        image.CopyInformation(self.grid)
        return image

    def array_to_source(self, array: np.ndarray, interpolator="linear", default_value: float = 0.0) -> sitk.Image:
        """A model-grid array resampled onto the source's original grid (outside the model: default)."""
        return resample_to_reference(self.array_to_image(array), self.source, interpolator, default_value)

    def fov_mask(self, erode: int = 0) -> sitk.Image:
        """uint8 image on the source grid: 1 where the model grid covers the voxel (its field of view).

        `erode` source voxels are taken off the edge (1 keeps finite differences away from the edge).
        """
        ones = sitk.Image(self.grid.GetSize(), sitk.sitkUInt8) + 1
        ones.CopyInformation(self.grid)
        mask = sitk.Resample(ones, self.source, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        if erode > 0:
            radius = [int(erode) if n > 1 else 0 for n in mask.GetSize()]
            mask = sitk.BinaryErode(mask, radius, sitk.sitkBox, 0, 1)
        return mask

    def field_to_physical(self, phi: np.ndarray) -> sitk.Image:
        """Model voxel field -> displacement field on the ORIGINAL source grid, LPS mm, pull.

        Each vector is direction @ (model spacing * voxel displacement in (x, y, z) order); the field is
        interpolated linearly onto the source grid and is zero outside the model's field of view. For a
        2D model the through-plane component is zero.
        """
        phi = np.asarray(phi)
        if phi.ndim == self.spatial_dims + 2 and phi.shape[0] == 1:
            phi = phi[0]  # a batch of one, as the networks return it
        expected = (self.spatial_dims,) + self.model_shape
        if phi.shape != expected:
            raise ValueError(f"phi has shape {phi.shape}; expected {expected} (channels in array order, "
                             "then the model grid in array order)")
        vectors = self._voxels_to_mm(phi)  # (z, y, x, 3) on the model grid
        field = sitk.GetImageFromArray(vectors, isVector=True)
        field.CopyInformation(self.grid)
        out = sitk.Resample(field, self.source, sitk.Transform(), sitk.sitkLinear, 0.0,
                            sitk.sitkVectorFloat64)
        out.CopyInformation(self.source)
        return out

    def field_to_model(self, field: sitk.Image) -> np.ndarray:
        """Physical displacement field (LPS mm, any grid) -> model voxel field phi (inverse mapping).

        Zero where the field does not cover the model grid; a 2D model drops the through-plane part.
        """
        if field.GetNumberOfComponentsPerPixel() != 3 or field.GetDimension() != 3:
            raise ValueError("field must be a 3D displacement field with 3 components (LPS mm)")
        on_grid = sitk.Resample(sitk.Cast(field, sitk.sitkVectorFloat64), self.grid, sitk.Transform(),
                                sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
        v = sitk.GetArrayFromImage(on_grid)  # (z, y, x, 3) LPS mm
        d_xyz = (v @ _direction(self.grid)) / np.asarray(self.grid.GetSpacing())  # D^T v / spacing
        phi = np.moveaxis(d_xyz[..., ::-1], -1, 0)  # (dz, dy, dx) channels first
        if self.spatial_dims == 2:
            phi = phi[1:, 0]
        return np.ascontiguousarray(phi, dtype=np.float32)

    def _voxels_to_mm(self, phi: np.ndarray) -> np.ndarray:
        phi = phi.astype(np.float64)
        if self.spatial_dims == 2:
            d_xyz = np.stack([phi[1], phi[0], np.zeros_like(phi[0])], axis=-1)[None]  # (1, y, x, 3)
        else:
            d_xyz = np.stack([phi[2], phi[1], phi[0]], axis=-1)  # (z, y, x, 3)
        d_xyz *= np.asarray(self.grid.GetSpacing())
        return np.ascontiguousarray(d_xyz @ _direction(self.grid).T)


def to_model_grid(source: sitk.Image, target: sitk.Image, size: Sequence[int], spacing: Sequence[float],
                  center: Sequence[float] | None = None, *, source_name: str = "the source image",
                  target_name: str = "the target image") -> tuple[np.ndarray, np.ndarray, ModelMapping]:
    """Source and target as normalised float32 arrays on the model grid, and the mapping back.

    The target is first resampled (linear) onto the source grid when its geometry differs, so both
    phases share the source's geometry; then both go onto the model grid (linear, padding = image
    minimum, so padding normalises to -1) and are normalised to [-1, 1] each. Arrays are (z, y, x), or
    (y, x) for a 2D model (len(size) == 2). Raises InputError when the two do not overlap physically.
    """
    source = sitk.Cast(_as_3d(source), sitk.sitkFloat32)
    target = sitk.Cast(_as_3d(target), sitk.sitkFloat32)
    if not same_geometry(source, target):
        _check_overlap(source, target, source_name, target_name)
        target = resample_to_reference(target, source, "linear")
    grid = make_model_grid(source, size, spacing, center)
    mapping = ModelMapping(source=source, grid=grid, spatial_dims=len(size), target=target)
    return mapping.image_to_model(source), mapping.image_to_model(target), mapping


# -------------------------------------------------------------------------------------- warping, folding

def warp_image(image: sitk.Image, field: sitk.Image, interpolator="linear",
               default_value: float | None = None) -> sitk.Image:
    """Resample `image` on its own grid through a physical pull field (LPS mm): out(x) = image(x + u(x)).

    Output keeps the image's exact origin, spacing, direction, size and pixel type (use "nearest" for
    labels; they stay integer and within their label set). Where the field is exactly zero the input
    voxel is returned unchanged, so an identity field is an exact identity (interpolating at a voxel
    centre after an index->physical->index round trip is not).

    Where x + u(x) leaves the image, the output takes the nearest edge voxel (ITK's nearest-neighbour
    extrapolator), or `default_value` when one is given (labels: 0). Why the edge: through-plane motion
    pulls the end slices of a stack from beyond it, and a constant there (ITK's default) made them a
    band of that value; the edge is the better guess (3D phantoms: demons scaled by gamma 26.6 -> 28.3
    dB, refinement on isotropic volumes 27.9 -> 29.4 dB; benchmarks/motion.py).
    """
    interp = _interpolator(interpolator)
    if field.GetNumberOfComponentsPerPixel() != image.GetDimension():
        raise ValueError(f"field has {field.GetNumberOfComponentsPerPixel()} components; a "
                         f"{image.GetDimension()}D image needs {image.GetDimension()}")
    src = sitk.GetArrayViewFromImage(image)
    edge = default_value is None
    pixel = image.GetPixelID()
    is_float = pixel in (sitk.sitkFloat32, sitk.sitkFloat64)
    work_type = pixel if (is_float or interp == sitk.sitkNearestNeighbor) else sitk.sitkFloat64
    vec = field if field.GetPixelID() == sitk.sitkVectorFloat64 else sitk.Cast(field, sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(sitk.Image(vec))  # the transform takes its input: copy
    out = sitk.Resample(image, image, transform, interp, 0.0 if edge else float(default_value), work_type, edge)
    array = sitk.GetArrayFromImage(out)
    if same_geometry(field, image, tol=1e-6):
        still = ~np.any(sitk.GetArrayViewFromImage(field) != 0, axis=-1)
        array[still] = src[still]
    if work_type != pixel:
        info = np.iinfo(src.dtype)
        array = np.clip(np.rint(array), info.min, info.max).astype(src.dtype)
    result = sitk.GetImageFromArray(array)
    result.CopyInformation(image)
    return result


def _chain(gradients: list[np.ndarray], row: np.ndarray, diagonal: bool) -> np.ndarray:
    """delta + sum_i gradients[i] * row[i]: one entry of I + g D^T, skipping the zeros of D."""
    out = np.full_like(gradients[0], 1.0 if diagonal else 0.0)
    for grad, weight in zip(gradients, row):
        if weight != 0.0:
            out += grad * weight if weight != 1.0 else grad
    return out


def _det_entries(j: list[list[np.ndarray]]) -> np.ndarray:
    """Determinant per voxel of a 2x2 or 3x3 matrix given as nested lists of arrays."""
    if len(j) == 2:
        return j[0][0] * j[1][1] - j[0][1] * j[1][0]
    return (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
            - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
            + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))


def _gradient(u: np.ndarray, axis: int, step: float) -> np.ndarray:
    if u.shape[axis] < 2:
        return np.zeros_like(u)
    return np.gradient(u, step, axis=axis)


def jacobian_determinant(field):
    """det(I + grad u) per voxel: <= 0 where the deformation folds (central differences).

    `field` is a physical displacement image (LPS mm; derivatives are taken in physical space, so an
    oblique direction matrix and anisotropic spacing are accounted for) -> float32 image on its grid;
    or a model voxel field phi (ndim, *spatial) in array order -> float32 array of shape `spatial`.
    """
    if isinstance(field, sitk.Image):
        dim = field.GetDimension()
        if field.GetNumberOfComponentsPerPixel() != dim:
            raise ValueError("jacobian_determinant needs a displacement field with one component per axis")
        u = sitk.GetArrayViewFromImage(field)  # (z, y, x, 3) components (x, y, z)
        spacing = field.GetSpacing()
        direction = _direction(field)
        # g[c][i] = d u_c / d xi_i, xi_i the mm coordinate along index axis i (x, y, z order); one
        # contiguous float64 array per entry (a (..., 3, 3) stack and a batched matmul cost 3x more)
        g = [[_gradient(np.ascontiguousarray(u[..., c], dtype=np.float64), dim - 1 - i, spacing[i])
              for i in range(dim)] for c in range(dim)]
        jac = [[_chain(g[c], direction[k], c == k) for k in range(dim)] for c in range(dim)]  # d xi / d x = D^T
        det = _det_entries(jac)
        out = sitk.GetImageFromArray(det.astype(np.float32))
        out.CopyInformation(field)
        return out
    phi = np.asarray(field, dtype=np.float64)
    dim = phi.shape[0]
    if dim not in (2, 3) or phi.ndim != dim + 1:
        raise ValueError(f"phi must have shape (ndim, *spatial) with ndim 2 or 3, got {phi.shape}")
    eye = np.eye(dim)
    g = [[_gradient(phi[c], a, 1.0) for a in range(dim)] for c in range(dim)]
    return _det_entries([[_chain(g[c], eye[a], c == a) for a in range(dim)] for c in range(dim)]).astype(np.float32)


def folding_fraction(field, mask=None) -> float:
    """Fraction of voxels (inside `mask` when given: image or array, nonzero = inside) with det <= 0.

    On a source-grid field from field_to_physical the step to zero at the edge of the model's field of
    view can count as folding; pass mask=mapping.fov_mask(erode=1) (or a heart mask) to leave it out.
    """
    return folding_of(jacobian_determinant(field), mask)


def folding_of(det, mask=None) -> float:
    """folding_fraction from a Jacobian determinant already computed (image or array)."""
    det = sitk.GetArrayFromImage(det) if isinstance(det, sitk.Image) else np.asarray(det)
    if mask is not None:
        m = sitk.GetArrayViewFromImage(mask) if isinstance(mask, sitk.Image) else np.asarray(mask)
        if m.shape != det.shape:
            raise ValueError(f"mask shape {m.shape} does not match the field's {det.shape}")
        det = det[m != 0]
    if det.size == 0:
        return 0.0
    return float(np.count_nonzero(det <= 0)) / float(det.size)


# also reachable as ModelMapping.to_model_grid(...), the constructor callers usually want
ModelMapping.to_model_grid = staticmethod(to_model_grid)
