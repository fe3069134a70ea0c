"""ddm4d: the Diffusion Deformable Model (Kim & Ye, MICCAI 2022) for 4D cardiac frame generation."""
__version__ = "0.1.0"
