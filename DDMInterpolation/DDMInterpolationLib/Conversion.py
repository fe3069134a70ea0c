"""SimpleITK images and fields <-> MRML volume and grid transform nodes, with exact geometry.

Conventions (see slicer-notes.md, section 2), in one place:
- SimpleITK (ITK) works in LPS, Slicer in RAS: the x and y signs of points *and* vectors flip.
- A displacement field from ddm4d pulls: frame(x) = source(x + u(x)) (LPS mm). In Slicer that is the
  transform *from parent*, stored with ``SetAndObserveTransformFromParent``; a volume placed under it
  (or hardened through it) shows the frame.
- numpy arrays of volumes are indexed [k, j, i] (slice, row, column); SimpleITK images are (i, j, k).
"""
import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

import slicer

# LPS <-> RAS (its own inverse)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def as3D(image):
    """A 2D SimpleITK image as a single-slice 3D image (unit slice spacing); 3D images unchanged."""
    if image.GetDimension() == 3:
        return image
    if image.GetDimension() == 2:
        return sitk.JoinSeries(image)
    raise ValueError(f"expected a 2D or 3D image, got {image.GetDimension()}D")


def isSingleSlice(image):
    """True for 2D images and for 3D images with one voxel along any axis."""
    return image.GetDimension() == 2 or 1 in image.GetSize()


def ijkToRasFromImage(image):
    """4x4 IJK -> RAS matrix of a SimpleITK image (LPS geometry)."""
    image = as3D(image)
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = LPS_TO_RAS @ np.array(image.GetOrigin(), dtype=float)
    return matrix


def geometryFromIjkToRas(matrix):
    """(origin, spacing, direction) in LPS, SimpleITK order, from a 4x4 IJK -> RAS matrix."""
    matrix = np.asarray(matrix, dtype=float)
    columns = matrix[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"the volume's IJK to RAS matrix is singular:\n{matrix}")
    direction = LPS_TO_RAS @ (columns / spacing)
    origin = LPS_TO_RAS @ matrix[:3, 3]
    return tuple(origin), tuple(spacing), tuple(direction.ravel())


def _vtkMatrixToArray(vtkMatrix):
    return np.array([[vtkMatrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _arrayToVtkMatrix(array):
    vtkMatrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            vtkMatrix.SetElement(r, c, float(array[r][c]))
    return vtkMatrix


def ijkToWorldMatrix(volumeNode):
    """IJK -> world RAS of a volume node, including a linear parent transform.

    :raises ValueError: when the volume is under a non-linear transform (harden it first).
    """
    ijkToRas = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToRas)
    matrix = _vtkMatrixToArray(ijkToRas)
    transformNode = volumeNode.GetParentTransformNode()
    if transformNode is not None:
        if not transformNode.IsTransformToWorldLinear():
            raise ValueError(f"volume '{volumeNode.GetName()}' is under the non-linear transform "
                             f"'{transformNode.GetName()}': harden the transform first (Data module, right-click)")
        toWorld = vtk.vtkMatrix4x4()
        transformNode.GetMatrixTransformToWorld(toWorld)
        matrix = _vtkMatrixToArray(toWorld) @ matrix
    return matrix


def imageFromVolumeNode(volumeNode, pixelType=None):
    """A SimpleITK image (LPS, world geometry) with a copy of a scalar volume node's voxels.

    :param pixelType: numpy dtype to cast the voxels to (None keeps the node's type).
    :raises ValueError: for a node without voxels, a multi-component volume or a non-linear parent transform.
    """
    imageData = volumeNode.GetImageData() if volumeNode is not None else None
    if imageData is None or imageData.GetNumberOfPoints() == 0:
        name = volumeNode.GetName() if volumeNode is not None else "None"
        raise ValueError(f"volume '{name}' has no voxels")
    if imageData.GetNumberOfScalarComponents() != 1:
        raise ValueError(f"volume '{volumeNode.GetName()}' has {imageData.GetNumberOfScalarComponents()} "
                         "components per voxel; use a scalar (grayscale) volume")
    array = np.array(slicer.util.arrayFromVolume(volumeNode), copy=True)
    if pixelType is not None:
        array = array.astype(pixelType, copy=False)
    image = sitk.GetImageFromArray(array)
    origin, spacing, direction = geometryFromIjkToRas(ijkToWorldMatrix(volumeNode))
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def updateVolumeNodeFromImage(volumeNode, image):
    """Set a volume node's voxels and IJK -> RAS geometry from a SimpleITK image (deep copy)."""
    image = as3D(image)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("a scalar image is needed for a volume node")
    volumeNode.SetIJKToRASMatrix(_arrayToVtkMatrix(ijkToRasFromImage(image)))
    slicer.util.updateVolumeFromArray(volumeNode, sitk.GetArrayFromImage(image))
    return volumeNode


def volumeNodeFromImage(image, name="", className="vtkMRMLScalarVolumeNode"):
    """A volume node *outside any scene* holding the image (for copying into a sequence)."""
    volumeNode = getattr(slicer, className)()
    volumeNode.SetName(name)
    return updateVolumeNodeFromImage(volumeNode, image)


def addVolumeNodeFromImage(scene, image, name="", className="vtkMRMLScalarVolumeNode"):
    """A new volume node in ``scene`` holding the image, with default display nodes."""
    volumeNode = scene.AddNewNodeByClass(className, name)
    updateVolumeNodeFromImage(volumeNode, image)
    volumeNode.CreateDefaultDisplayNodes()
    return volumeNode


def gridTransformFromDisplacementField(field):
    """A ``slicer.vtkOrientedGridTransform`` (RAS) from a SimpleITK displacement field (LPS mm, pull).

    The result is meant for ``SetAndObserveTransformFromParent``.
    """
    field = as3D(field)
    components = field.GetNumberOfComponentsPerPixel()
    if components not in (2, 3):
        raise ValueError(f"a displacement field has 2 or 3 components per voxel, got {components}")
    vectors = sitk.GetArrayViewFromImage(field)  # [k, j, i, c], LPS
    if components == 2:
        vectors = np.concatenate([vectors, np.zeros(vectors.shape[:-1] + (1,))], axis=-1)
    # float32: half the memory of a frame's grid (a 256 x 256 x 100 field is 79 MB, not 157), ~1e-7 relative
    vectors = vectors.astype(np.float32) * np.diag(LPS_TO_RAS).astype(np.float32)  # flip x and y of every vector

    grid = vtk.vtkImageData()
    grid.SetDimensions(field.GetSize())
    grid.SetSpacing(field.GetSpacing())
    grid.SetOrigin(LPS_TO_RAS @ np.array(field.GetOrigin(), dtype=float))
    grid.AllocateScalars(vtk.VTK_FLOAT, 3)
    numpy_support.vtk_to_numpy(grid.GetPointData().GetScalars())[:] = vectors.reshape(-1, 3)

    directionRas = LPS_TO_RAS @ np.array(field.GetDirection(), dtype=float).reshape(3, 3)
    directionMatrix = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            directionMatrix.SetElement(r, c, directionRas[r, c])

    transform = slicer.vtkOrientedGridTransform()
    transform.SetDisplacementGridData(grid)
    transform.SetGridDirectionMatrix(directionMatrix)
    transform.SetInterpolationModeToLinear()
    return transform


def gridTransformNodeFromField(field, name=""):
    """A grid transform node *outside any scene* whose from-parent transform is the field."""
    transformNode = slicer.vtkMRMLGridTransformNode()
    transformNode.SetName(name)
    transformNode.SetAndObserveTransformFromParent(gridTransformFromDisplacementField(field))
    return transformNode


def displacementFieldFromGridTransformNode(transformNode):
    """The inverse of :func:`gridTransformNodeFromField`: a SimpleITK field (LPS mm, pull, float64)."""
    transform = transformNode.GetTransformFromParent()
    if transform is None or not hasattr(transform, "GetDisplacementGrid"):
        raise ValueError(f"'{transformNode.GetName()}' holds no grid transform from parent")
    transform.Update()
    grid = transform.GetDisplacementGrid()
    vectors = np.array(slicer.util.arrayFromGridTransform(transformNode), dtype=np.float64)
    vectors = vectors * np.diag(LPS_TO_RAS)
    field = sitk.GetImageFromArray(vectors, isVector=True)
    field.SetSpacing(grid.GetSpacing())
    field.SetOrigin(tuple(LPS_TO_RAS @ np.array(grid.GetOrigin(), dtype=float)))
    directionMatrix = transform.GetGridDirectionMatrix()
    directionRas = np.array([[directionMatrix.GetElement(r, c) for c in range(3)] for r in range(3)])
    field.SetDirection(tuple((LPS_TO_RAS @ directionRas).ravel()))
    return field
