"""Every gamma's field, frame, Jacobian and labels on the source grid in a few batched torch passes.

`ddm4d generate` ends by mapping each gamma's model-grid field back to the source's own geometry and
warping the source through it. With SimpleITK (geometry.field_to_physical, warp_image,
jacobian_determinant) that is several filters per gamma, one gamma after another (ITK filters that
share an input image must not run at once); here the same arithmetic runs over batches of gammas.

SimpleITK's conventions are kept, so the results match geometry.py's (Testing/test_resample.py):
voxel centres at integer indices; linear interpolation repeats the edge voxel within half a voxel of
the edge and, beyond it, takes the nearest voxel (ITK's nearest-neighbour extrapolator; a given
default value instead, as for labels); nearest neighbour rounds halves up; where a field is exactly
zero the image's own voxel is kept (warp_image's exact identity).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .geometry import ModelMapping, _det_entries, _direction

#: gammas per batch: about this many voxel-gammas, so a batch's temporaries stay a few hundred MB
BATCH_VOXELS = 2 ** 22


def gamma_batches(gammas: Sequence[float], image: sitk.Image) -> list[list[float]]:
    """`gammas` in order, in batches of about BATCH_VOXELS voxels of `image`: the temporaries stay
    bounded however many frames are asked for (only the results grow with them)."""
    per = max(1, BATCH_VOXELS // int(np.prod(image.GetSize())))
    return [list(gammas[i:i + per]) for i in range(0, len(gammas), per)]


def _index_to_physical(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(M, origin): physical point = M @ index + origin, index in (x, y, z) order."""
    return _direction(image) * np.asarray(image.GetSpacing()), np.asarray(image.GetOrigin(), dtype=np.float64)


def _indices(image: sitk.Image) -> list[torch.Tensor]:
    """Index along x, y and z of every voxel (float64), each broadcastable to (z, y, x)."""
    size = image.GetSize()
    return [torch.arange(n, dtype=torch.float64).view([-1 if a == 2 - k else 1 for a in range(3)])
            for k, n in enumerate(size)]


def _inside(index: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
    """ITK's IsInsideBuffer: -0.5 <= index < n - 0.5 along every axis (index per axis x, y, z)."""
    inside = None
    for i, n in zip(index, size):
        axis = (i >= -0.5) & (i < n - 0.5)
        inside = axis if inside is None else inside & axis
    return inside


def _linear(volume: torch.Tensor, index: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
    """grid_sample of `volume` (B, C, z, y, x) at continuous indices (per axis x, y, z, each (B, *out)):
    with align_corners the corner voxels' centres are -1 and 1; border padding is ITK's edge clamp."""
    shape = np.broadcast_shapes(*(tuple(i.shape) for i in index))  # torch.broadcast_shapes imports sympy (0.3 s)
    grid = torch.empty(*shape, 3, dtype=torch.float64)  # filled in place: no temporaries of its size
    for k, (i, n) in enumerate(zip(index, size)):
        torch.mul(i, 2.0 / (n - 1) if n > 1 else 0.0, out=grid[..., k])
    return F.grid_sample(volume, grid.sub_(1.0).to(volume.dtype), mode="bilinear", padding_mode="border",
                         align_corners=True)


def _along(values: torch.Tensor, dim: int, scale: float, shift: float, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear interpolation of `values` along `dim` at indices scale * i + shift, i < n_out, with
    ITK's edge clamp (one axis of a separable trilinear resampling), and where those indices lie
    within half a voxel of the input (ITK's inside test; beyond it the caller sets zero)."""
    n_in = values.shape[dim]
    p = scale * torch.arange(n_out, dtype=torch.float64) + shift
    inside = (p >= -0.5) & (p < n_in - 0.5)
    if n_in == n_out and torch.allclose(p, torch.arange(n_out, dtype=torch.float64), rtol=0, atol=1e-9):
        return values, inside  # the same grid along this axis
    low = p.floor()
    i0, i1 = low.long().clamp(0, n_in - 1), (low.long() + 1).clamp(0, n_in - 1)
    w = (p - low).to(values.dtype).view([-1 if d == dim else 1 for d in range(values.dim())])
    return torch.lerp(_take(values, dim, i0), _take(values, dim, i1), w), inside


def _take(values: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """values.index_select(dim, index) as one gather: index_select along the last axis measured 5-20x
    slower, and along any inner axis far slower on a busy machine (torch 2.13, CPU)."""
    shape = list(values.shape)
    shape[dim] = len(index)
    return torch.gather(values, dim, index.view([-1 if d == dim else 1 for d in range(values.dim())]).expand(shape))


def fields_on_source(mapping: ModelMapping, phi: torch.Tensor) -> torch.Tensor:
    """Model voxel fields (N, ndim, *model grid) -> LPS mm pull fields on the source grid, float64
    (N, 3, z, y, x), components (x, y, z): ModelMapping.field_to_physical for N fields at once."""
    grid, source = mapping.grid, mapping.source
    phi = phi.detach().cpu().float()  # interpolated in float32 (1e-6 mm), converted to mm in float64
    phi = phi.flip(1) if mapping.spatial_dims == 3 else phi.flip(1)[:, :, None]  # (dx, dy[, dz]) on (z, y, x)
    m_grid, o_grid = _index_to_physical(grid)
    m_src, o_src = _index_to_physical(source)
    inv = np.linalg.inv(m_grid)
    a, b = inv @ m_src, inv @ (o_src - o_grid)  # model grid index = a @ source index + b
    size = source.GetSize()
    if np.abs(a - np.diag(np.diag(a))).max() <= 1e-9 * np.abs(a).max():
        # same directions (to_model_grid's grids): a separable resampling, one axis after the other
        inside = []
        for k in range(3):
            phi, axis = _along(phi, 4 - k, a[k, k], b[k], size[k])
            inside.append(axis.view([-1 if d == 2 - k else 1 for d in range(3)]))
        inside = inside[0] & inside[1] & inside[2]
    else:
        i = _indices(source)
        index = [sum(float(a[k, j]) * i[j] for j in range(3)) + float(b[k]) for k in range(3)]
        n = phi.shape[0]
        sampled = _linear(phi.reshape(1, -1, *phi.shape[2:]), [x.expand(1, *size[::-1]) for x in index],
                          grid.GetSize())
        phi, inside = sampled.reshape(n, -1, *sampled.shape[2:]), _inside(index, grid.GetSize())
    # voxels -> mm: D @ (spacing * (dx, dy, dz)), after the resampling (both are linear: they commute);
    # zero outside the model's field of view
    return _times(m_grid[:, :phi.shape[1]], phi if bool(inside.all()) else phi * inside)


def _times(matrix: np.ndarray, vectors: torch.Tensor) -> torch.Tensor:
    """matrix @ v at every voxel of vectors (N, C, *spatial) -> (N, rows, *spatial), float64: one
    matmul (8x faster than summing scaled channels)."""
    n, c, *spatial = vectors.shape
    matrix = torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float64))
    return torch.matmul(matrix, vectors.to(torch.float64).reshape(n, c, -1)).view(n, -1, *spatial)


class Warp:
    """Where each voxel of `image`'s grid samples through each of `fields` (N, 3, z, y, x; LPS mm pull
    on that grid), worked out once for every image on that grid (the source, its labels) and for the
    fields' Jacobians: geometry.warp_image and geometry.jacobian_determinant for N fields at once."""

    def __init__(self, fields: torch.Tensor, image: sitk.Image):
        self.size = image.GetSize()
        inv = np.linalg.inv(_index_to_physical(image)[0])
        # continuous indices and interpolation in float64, as ITK: in float32 a 128-voxel axis is only
        # resolved to ~4e-6 voxel, which on a sharp edge of 400 is a 1.6e-3 error
        self.offsets = _times(inv, fields).unbind(1)  # the fields in voxels along x, y, z
        self.index = [i + offset for i, offset in zip(_indices(image), self.offsets)]
        self.inside = _inside(self.index, self.size)
        self.still = (fields == 0).all(dim=1)  # kept exactly, as warp_image does

    def _nearest(self, array: torch.Tensor) -> torch.Tensor:
        """The voxel nearest to each sampling point, the index clamped to the image (ITK rounds halves up)."""
        i, j, k = [torch.floor(x + 0.5).long().clamp_(0, n - 1) for x, n in zip(self.index, self.size)]
        return array.reshape(-1)[(k * self.size[1] + j) * self.size[0] + i]

    def _finish(self, out: torch.Tensor, array: torch.Tensor, default_value: float | None) -> torch.Tensor:
        if default_value is not None and not bool(self.inside.all()):
            out = torch.where(self.inside, out, torch.tensor(default_value, dtype=out.dtype))
        return torch.where(self.still, array.to(out.dtype), out)

    def linear(self, image: sitk.Image, default_value: float | None = None) -> torch.Tensor:
        """(N, z, y, x) float32 (the images here are float32); beyond the image the nearest edge voxel,
        or `default_value` (geometry.warp_image's convention)."""
        array = torch.from_numpy(sitk.GetArrayFromImage(image)).double()
        out = _linear(array[None, None].expand(len(self.still), 1, *array.shape), self.index, self.size)[:, 0]
        if default_value is None and not bool(self.inside.all()):
            out = torch.where(self.inside, out, self._nearest(array))
        return self._finish(out, array, default_value).float()

    def nearest(self, image: sitk.Image, default_value: float | None = None) -> torch.Tensor:
        """(N, z, y, x) in the image's own type (labels); beyond the image `default_value`, or without
        one the nearest edge voxel (which the clamped index already is)."""
        array = torch.from_numpy(sitk.GetArrayFromImage(image))
        return self._finish(self._nearest(array), array, default_value)

    def jacobians(self) -> torch.Tensor:
        """det(I + grad u) of each field, float32 (N, z, y, x): central differences, one-sided at the
        edges, as geometry.jacobian_determinant.

        The field in voxels is o = S^-1 D^T u (D: direction, S: spacing; a voxel index i sits at D S i),
        so its gradient along the index axes is (D S)^-1 (grad u) (D S), a similar matrix:
        det(I + grad o) = det(I + grad u), with no spacing and no rotation left to apply."""
        o = [offset.float() for offset in self.offsets]  # float32: 1e-6 off float64, 2.5x faster

        def gradient(w: torch.Tensor, i: int) -> torch.Tensor:
            axis = w.dim() - 1 - i
            return torch.gradient(w, dim=axis)[0] if w.shape[axis] > 1 else torch.zeros_like(w)

        g = [[gradient(o[k], i) for i in range(3)] for k in range(3)]
        for k in range(3):
            g[k][k] += 1.0
        return _det_entries(g)


def to_images(arrays: torch.Tensor, reference: sitk.Image, vector: bool = False) -> list[sitk.Image]:
    """One SimpleITK image per item of `arrays` ((N, z, y, x), or (N, 3, z, y, x) with vector=True),
    carrying `reference`'s exact origin, spacing and direction."""
    images = []
    for array in arrays:
        image = sitk.GetImageFromArray(array.movedim(0, -1).contiguous().numpy() if vector else array.numpy(),
                                       isVector=vector)
        image.CopyInformation(reference)
        images.append(image)
    return images
