"""The two networks of DDM, dimension-generic (spatial_dims 2 or 3)."""
from .deformation_unet import DeformationUNet
from .diffusion_unet import DiffusionUNet

__all__ = ["DiffusionUNet", "DeformationUNet"]
