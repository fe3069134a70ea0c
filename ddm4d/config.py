"""Every default of the paper in one place (Kim & Ye, MICCAI 2022, and the authors' configuration).

Spatial conventions used throughout ddm4d:
- ``image_size`` and ``spacing`` are in ITK order (x, y[, z]); tensors are (batch, channel, [z,] y, x).
- A displacement field ``phi`` has one channel per tensor axis in tensor order ([z,] y, x), in voxels
  of the model grid, and pulls: frame(p) = source(p + phi(p)).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

FORMAT_VERSION = 1

# generation (ddm4d.generation; the Slicer module reads these too, so this module never imports torch):
# "symmetric" warps the source forward and the target backward along one path and cross-fades them,
# "forward" warps the source only (the paper). The defaults are what measured best on real cines and
# unseen phantom subjects (benchmarks/motion.py, README "Motion on real scans").
MODES = ("symmetric", "forward")
MODE_ALIASES = {"bidirectional": "symmetric"}  # the old name of symmetric generation
DEFAULT_MODE = "symmetric"
DEFAULT_REFINE = True  # per-case refinement of the path (ddm4d.refine), started from the model
# False: frames evenly spaced along the refined path (True: at the model's own pace, which scored lower)
DEFAULT_MODEL_TIMING = False
# how symmetric generation joins the two moved images (ddm4d.fade): "confidence" weighs, voxel by voxel,
# the motion-compensated cross-fade against the plain blend by how well each explains the pair there;
# "linear" is the plain cross-fade (1 - gamma, gamma) of the moved images
FADES = ("confidence", "linear")
DEFAULT_FADE = "confidence"
CONFIDENCE_SIGMA = 2.0  # finest-axis voxels over which the fade compares disagreements (1 to 4 measured alike)
# where the networks run: auto (CUDA when present, else the CPU), or one of them; mps is Apple's GPU
DEVICES = ("auto", "cpu", "cuda", "mps")
#: precision of the networks' passes: auto (bf16 on CUDA, and on CPUs with AMX where the caller
#: measured it within tolerance), fp32 or bf16
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class DDMConfig:
    spatial_dims: int = 3
    # model grid: the paper resamples ACDC to 1.5 x 1.5 x 3.15 mm and crops 128 x 128 x 32
    image_size: tuple[int, ...] = (128, 128, 32)
    spacing: tuple[float, ...] = (1.5, 1.5, 3.15)
    intensity_range: tuple[float, float] = (-1.0, 1.0)

    # diffusion module G_diffuse (DDPM UNet): inner 8 channels, multipliers [1, 2, 4, 4]
    diffusion_channels: int = 8
    channel_mults: tuple[int, ...] = (1, 2, 4, 4)
    res_blocks: int = 1  # per level going down; one more going up
    attention_heads: int = 4  # linear attention after the first middle block
    norm_groups: int = 8
    dropout: float = 0.0

    # deformation module G_deform (VoxelMorph-1 UNet), LeakyReLU 0.2
    encoder_channels: tuple[int, ...] = (16, 32, 32, 32, 32)
    decoder_channels: tuple[int, ...] = (32, 32, 32, 8, 8, 3)  # last = spatial_dims (the field)
    leaky_slope: float = 0.2

    # noise schedule: beta linear 1e-6 .. 1e-2 over u = 2000 steps
    timesteps: int = 2000
    beta_start: float = 1e-6
    beta_end: float = 1e-2

    # loss L = L_diffuse + lambda * (-NCC_9 + lambda_R * |grad phi|^2)
    loss_lambda: float = 20.0
    lambda_r: float = 1.0
    ncc_window: int = 9

    # optimisation: Adam lr 2e-4, the authors' betas (0.5, 0.999), batch 1, 800 epochs
    lr: float = 2e-4
    adam_betas: tuple[float, float] = (0.5, 0.999)
    batch_size: int = 1
    epochs: int = 800

    # generation: subtract phi at gamma = 0 so frame 0 is the source (the paper does not)
    subtract_gamma0: bool = True
    # training on that same subtracted field, phi(c) - phi(0), in the loss's deformation terms (not in
    # the paper; one more deformation pass per step). With the paper's loss the network may learn part
    # of the field from the source alone, which the subtraction then removes: frames under-move and are
    # not monotone in gamma (Testing/test_core.py learning test, 3 of 9 runs; real-cine fitting moved
    # nothing). Only used while subtract_gamma0 is on; off for the paper's loss.
    subtracted_field_loss: bool = True
    # weight of a real in-between frame's similarity, relative to the target's (training on the cine's
    # frames, not in the paper): gamma becomes normalised time and the code has to carry the target
    inbetween_weight: float = 1.0
    # per-case fitting (not in the paper): a few hundred steps need a larger step than 800 epochs do,
    # and steps t < fit_max_timestep only, near the t = 0 at which generation computes the code (with
    # t uniform over 2000 steps the fit learned no motion on the real cine; see generate.fit_pair)
    fit_lr: float = 1e-3
    fit_max_timestep: int = 10

    # free-form notes carried into the model file (training data, iterations, ...)
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        for name in ("image_size", "spacing"):
            value = tuple(getattr(self, name))
            if len(value) != self.spatial_dims:
                raise ValueError(f"{name} needs {self.spatial_dims} values for spatial_dims={self.spatial_dims}, got {value}")
            setattr(self, name, value)
        self.channel_mults = tuple(self.channel_mults)
        self.encoder_channels = tuple(self.encoder_channels)
        self.decoder_channels = tuple(self.decoder_channels)
        self.intensity_range = tuple(self.intensity_range)
        self.adam_betas = tuple(self.adam_betas)
        if self.decoder_channels[-1] != self.spatial_dims:
            raise ValueError(
                f"the last decoder channel is the field and must equal spatial_dims={self.spatial_dims}, "
                f"got decoder_channels={self.decoder_channels}")
        if len(self.encoder_channels) != 5 or len(self.decoder_channels) != 6:
            raise ValueError("the VoxelMorph-1 UNet takes 5 encoder and 6 decoder channel counts")
        if self.ncc_window % 2 != 1:
            raise ValueError(f"ncc_window must be odd, got {self.ncc_window}")

    @classmethod
    def for_dims(cls, spatial_dims: int, **overrides: Any) -> "DDMConfig":
        """The paper's configuration in 3D, or its single-slice (2D) counterpart."""
        if spatial_dims == 2:
            base = dict(spatial_dims=2, image_size=(128, 128), spacing=(1.5, 1.5),
                        decoder_channels=(32, 32, 32, 8, 8, 2))
        else:
            base = dict(spatial_dims=3)
        base.update(overrides)
        return cls(**base)

    @property
    def stride(self) -> int:
        """Inputs are padded internally to a multiple of this (both UNets' total downsampling)."""
        return max(2 ** (len(self.channel_mults) - 1), 2 ** (len(self.encoder_channels) - 1))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["format_version"] = FORMAT_VERSION
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DDMConfig":
        d = dict(d)
        version = d.pop("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise ValueError(f"model configuration format {version} is newer than this ddm4d supports ({FORMAT_VERSION}); upgrade ddm4d")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown configuration keys {unknown}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "DDMConfig":
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class RefineConfig:
    """Per-case refinement (not in the paper): a stationary velocity field v optimised for one pair,
    multi-scale, started from the model's own field; frames follow exp(gamma v). Values measured with
    benchmarks/motion.py on the real cine and on held-out phantom subjects."""

    # refinement grid: the source's whole field of view, at its own resolution up to this many voxels
    # (x, y, z). 64 slices, not 32: an isotropic 2 mm volume of 56 slices squeezed to 32 under-moved
    # (3 phantom subjects, default path: |EF error| 5.4 -> 3.7 points, +0.07 dB, 13% more time);
    # stacks of thick slices have far fewer
    max_size: tuple[int, ...] = (128, 128, 64)
    # pyramid: downsampling factor (in-plane) of each level, coarse to fine, and at most this many Adam
    # steps on each; a volume stops at half resolution (its velocity is smooth; the full level would
    # double the time)
    levels: tuple[int, ...] = (4, 2, 1)
    steps: tuple[int, ...] = (100, 100, 60)
    levels_3d: tuple[int, ...] = (4, 2)
    steps_3d: tuple[int, ...] = (100, 100)
    lr: float = 0.1  # Adam step, in voxels of the level
    # a level ends early once converged: the objective's mean over the last `patience` steps improved on
    # that of the `patience` before by less than `tolerance` (-NCC units; 0: every step runs). 3D
    # phantom pairs: 13.7 -> 8.5 s a case, PSNR, Dice and EF as before (benchmarks/motion.py)
    tolerance: float = 5e-4
    patience: int = 10
    # -local NCC(window, in-plane voxels) + smoothness * mean |grad v|^2 (v in in-plane voxels). 0.5 with
    # the fold penalty below (since 2026-12-08); 1 without it, where below 1 the fit folded and the guard
    # below did the regularising (docs/measurements.md, "Smoothness, weaker and stronger")
    window: int = 9
    smoothness: float = 0.5
    # squarings of exp(v), each one grid_sample per step. Slices: v / 2^5 moves about a quarter voxel
    # per step at most for the few voxels a slice's velocity spans; 7 gave the same figures. Volumes: 7
    # (VoxelMorph's). Their velocity keeps the model's through-plane motion, whose gradients are steeper
    # (up to 16 voxels per voxel against 2-3 in slices); with 5, exp(v) folded a voxel of one unseen 3D
    # phantom subject, with 7 none (and the same PSNR, Dice and EF), for about 40% more refinement time
    integration_steps: int = 5
    integration_steps_3d: int = 7
    # a volume's last level is half its grid: linearly upsampled, v's gradient on the full grid is its
    # change from one coarse voxel to the next, steeper than the level's central differences saw, and
    # exp(v) there folded where the level's had not (2 voxels of an unseen 3D phantom, --model none).
    # Where exp(v) on the full grid compresses below `upsample_min_det` anywhere, the upsampled v is
    # smoothed by a Gaussian of `upsample_smoothing` voxels of the last level along the axes that were
    # upsampled (0: never). Only then: smoothing every volume's v shrank the motion of isotropic 2 mm
    # phantoms (|EF error| 4.8 -> 6.6 points) and cost forward refinement 0.05 dB on thick slices
    # A slice's v (fitted on its own grid) is smoothed the same way along its axes, pass after pass (at
    # most 3), while exp(v) or, for symmetric generation, exp(-v) folds (det J <= 0): noise made
    # refinement alone fold background pixels of noisy real pairs (ddm4d.refine._unfolded)
    upsample_smoothing: float = 0.5
    upsample_min_det: float = 0.05
    # a penalty on the fit's own folds, fold_weight * mean(relu(fold_margin - det J)^2) over the path
    # exp(v) (and exp(-v) for symmetric generation), so that the weaker smoothness above need not lean on
    # the guard. 0: off. Against smoothness 1 without it (docs/measurements.md, "Smoothness"): the
    # phantoms' |EF error| fell by 0.4-1.5 points (isotropic 3D 3.7 -> 2.2), the real groups' mean PSNR
    # moved by at most 0.02 dB, a refinement takes about a third longer
    fold_weight: float = 1000.0
    fold_margin: float = 0.1
    # through-plane motion is not measurable from slices this many times thicker than the pixels: the
    # velocity along such an axis keeps its start (the model's, or zero); refinement moves in-plane
    thick_slice_ratio: float = 2.0

    def squarings(self, spatial_dims: int) -> int:
        """Squarings of exp(v) for a velocity of 2 or 3 spatial dimensions."""
        return self.integration_steps_3d if spatial_dims == 3 else self.integration_steps

    def __post_init__(self) -> None:
        if min(self.integration_steps, self.integration_steps_3d) < 1:
            raise ValueError(f"integration steps must be >= 1, got {self.integration_steps} / "
                             f"{self.integration_steps_3d}")
        for levels, steps in ((self.levels, self.steps), (self.levels_3d, self.steps_3d)):
            if len(levels) != len(steps) or not levels:
                raise ValueError(f"levels {levels} and steps {steps} need one entry each per level")
            if min(levels) < 1 or min(steps) < 0:
                raise ValueError(f"levels must be >= 1 and steps >= 0, got {levels} / {steps}")
        if self.upsample_smoothing < 0 or not 0 <= self.upsample_min_det < 1:
            raise ValueError(f"upsample_smoothing must be >= 0 and upsample_min_det in [0, 1), got "
                             f"{self.upsample_smoothing} / {self.upsample_min_det}")
        if self.tolerance < 0 or self.patience < 1:
            raise ValueError(f"tolerance must be >= 0 and patience >= 1, got {self.tolerance} / {self.patience}")
        if self.fold_weight < 0 or not 0 <= self.fold_margin < 1:
            raise ValueError(f"fold_weight must be >= 0 and fold_margin in [0, 1), got {self.fold_weight} / "
                             f"{self.fold_margin}")
        if self.window % 2 != 1:
            raise ValueError(f"window must be odd, got {self.window}")
