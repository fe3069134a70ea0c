"""VM and VM-diff baselines (VoxelMorph PyPI package) behind DDM's interface: conventions, generation, files."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("voxelmorph", reason="the VM / VM-diff baselines need the voxelmorph package: pip install -e '.[baselines]' (in the test extra)")

from ddm4d.baselines import BaselineModel, save_baseline  # noqa: E402
from ddm4d.checkpoint import load_any_model, save_model  # noqa: E402
from ddm4d.config import DDMConfig  # noqa: E402
from ddm4d.errors import InputError  # noqa: E402
from ddm4d.model import DDM, Generation  # noqa: E402
from ddm4d.warp import warp  # noqa: E402

SIZES = {2: (32, 32), 3: (16, 32, 32)}  # tensor order ([z,] y, x)


def config(dims: int) -> DDMConfig:
    return DDMConfig.for_dims(dims, image_size=tuple(reversed(SIZES[dims])), spacing=(1.5,) * dims)


def blob(dims: int, shift_x: float = 0.0) -> torch.Tensor:
    """A Gaussian blob in [-1, 1], centred off the middle, moved `shift_x` voxels along x."""
    axes = torch.meshgrid(*[torch.arange(float(s)) for s in SIZES[dims]], indexing="ij")
    centre = [s / 2 for s in SIZES[dims]]
    centre[-1] = 13.0 + shift_x
    r2 = sum((a - c) ** 2 for a, c in zip(axes, centre))
    return (torch.exp(-r2 / (2 * 3.5**2)) * 2 - 1)[None, None]


def centroid_x(image: torch.Tensor) -> float:
    w = image + 1
    return float((w * torch.arange(float(image.shape[-1]))).sum() / w.sum())


def set_constant_field(model: BaselineModel, vector: list[float]) -> None:
    """Make the network output the constant `vector` (tensor order) everywhere: zero weights, bias = vector."""
    conv = model.network.flow_layer.conv0
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor(vector))


@pytest.mark.parametrize("dims", [2, 3])
def test_voxelmorph_field_convention_is_ours(dims):
    """VoxelMorph's transformer and ddm4d.warp agree inside the image: channel order, voxels, pull."""
    import voxelmorph as vxm

    g = torch.Generator().manual_seed(0)
    image = torch.rand((1, 1) + SIZES[dims], generator=g)
    phi = torch.randn((1, dims) + SIZES[dims], generator=g)
    ours = warp(image, phi)
    theirs = vxm.nn.modules.SpatialTransformer()(image, phi)
    inner = (slice(None), slice(None)) + tuple(slice(4, -4) for _ in range(dims))
    assert torch.allclose(ours[inner], theirs[inner], atol=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("method", ["vm", "vmdiff"])
def test_known_shift_is_scaled_by_gamma(dims, method):
    """A constant field of 2 voxels along x: gamma 0 is the source, 0.5 moves 1 voxel, 1 reaches the target."""
    torch.manual_seed(0)
    model = BaselineModel(config(dims), method).eval()
    shift = [0.0] * (dims - 1) + [2.0]
    set_constant_field(model, shift)
    source = blob(dims)
    target = blob(dims, shift_x=-2.0)  # target(p) = source(p + 2 x): the pull field is +2 along x
    out = model.generate(source, target, [0.0, 0.5, 1.0])
    assert isinstance(out, Generation)
    assert out.frames.shape == (3, 1) + SIZES[dims]
    assert out.fields.shape == (3, dims) + SIZES[dims]
    assert torch.allclose(out.frames[0:1], source, atol=1e-5)
    assert torch.equal(out.fields[0], torch.zeros_like(out.fields[0]))
    inner = (slice(None),) + tuple(slice(6, -6) for _ in range(dims))  # VM-diff pads with zeros
    for k, gamma in enumerate((0.0, 0.5, 1.0)):
        expected = torch.tensor(shift).view(dims, *([1] * dims)) * gamma
        assert torch.allclose(out.fields[k][inner], expected.expand_as(out.fields[k])[inner], atol=1e-4)
    assert torch.allclose(out.frames[2][inner], target[0][inner], atol=1e-4)
    assert centroid_x(out.frames[1]) == pytest.approx(centroid_x(source) - 1.0, abs=0.05)


@pytest.mark.parametrize("method", ["vm", "vmdiff"])
def test_short_training_moves_frames_toward_target(method):
    """Trained on one shifted blob pair, gamma = 1 lands near the target and gamma = 0.5 in between."""
    torch.manual_seed(0)
    model = BaselineModel(config(2), method)
    source, target = blob(2), blob(2, shift_x=3.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        losses = model.training_losses(source, target)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    assert set(losses) == {"loss", "diffusion", "ncc", "smooth"}
    assert float(losses["diffusion"]) == 0.0
    out = model.eval().generate(source, target, [0.0, 0.5, 1.0])
    c0, c_half, c1 = (centroid_x(f) for f in out.frames)
    start, goal = centroid_x(source), centroid_x(target)
    assert c0 == pytest.approx(start, abs=1e-3)
    assert c1 - start > 0.7 * (goal - start)
    assert start < c_half < c1


def test_vmdiff_integrates_velocity_by_scaling_and_squaring():
    """A non-constant velocity: the gamma = 1 field is exp(v) (VoxelMorph's integrator), not v itself."""
    torch.manual_seed(0)
    model = BaselineModel(config(2), "vmdiff").eval()
    with torch.no_grad():
        model.network.flow_layer.conv0.weight.normal_(std=0.5)
    source = blob(2)
    out = model.generate(source, source, [1.0])
    v = out.code
    assert model.integration_steps == 7
    assert torch.allclose(out.fields, model.network.velocity_field_integrator(v), atol=1e-6)
    assert not torch.allclose(out.fields, v, atol=1e-3)


@pytest.mark.parametrize("method", ["vm", "vmdiff"])
def test_baseline_file_round_trip(tmp_path, method):
    torch.manual_seed(1)
    model = BaselineModel(config(2), method).eval()
    with torch.no_grad():
        model.network.flow_layer.conv0.weight.normal_(std=0.05)
    path = save_baseline(model, tmp_path / "m.safetensors", iteration=5)
    loaded = load_any_model(path)
    assert isinstance(loaded, BaselineModel) and loaded.method == method
    assert loaded.config == model.config and loaded.info["iteration"] == 5
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    source, target = blob(2), blob(2, 2.0)
    assert torch.equal(model.generate(source, target, [0.3, 1.0]).frames,
                       loaded.generate(source, target, [0.3, 1.0]).frames)


def test_load_any_model_dispatches_and_refuses_pickles(tmp_path):
    ddm = DDM(config(2))
    path = save_model(ddm, tmp_path / "ddm.safetensors")
    loaded = load_any_model(path)
    assert isinstance(loaded, DDM) and loaded.method == "ddm"
    pickle_file = tmp_path / "model.pt"
    torch.save(ddm.state_dict(), pickle_file)  # a pickle/zip checkpoint: must never be read
    with pytest.raises(InputError, match="pickle"):
        load_any_model(pickle_file)
    with pytest.raises(InputError):
        load_any_model(tmp_path / "missing.safetensors")


def test_interface_matches_ddm():
    model = BaselineModel(config(3), "vm")
    assert model.method == "vm" and model.config.spatial_dims == 3
    with pytest.raises(ValueError, match="3D vm model"):
        model.generate(blob(2), blob(2), [0.5])
    with pytest.raises(ValueError, match="gammas"):
        model.generate(blob(3), blob(3), [1.5])
    with pytest.raises(ValueError):
        BaselineModel(config(2), "ddm")
