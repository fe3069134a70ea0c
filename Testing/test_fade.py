"""The fade that joins symmetric generation's two moved images (ddm4d.fade), against hand-computed values."""
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from ddm4d.fade import join, smooth


def _pair(seed=0, shape=(1, 24, 20)):
    rng = np.random.default_rng(seed)
    s, t = (torch.from_numpy(rng.normal(size=shape).astype(np.float32)) for _ in range(2))
    return s, t


@pytest.mark.parametrize("fade", ["confidence", "linear"])
def test_end_frames_are_the_source_and_the_target(fade):
    s, t = _pair()
    moved_t = torch.roll(t, 2, dims=-1)  # the target moved back over the whole path at gamma 0
    moved_s = torch.roll(s, -2, dims=-1)  # the source moved over the whole path at gamma 1
    frames = join(s, t, torch.stack([s, moved_s]), torch.stack([moved_t, t]), [0.0, 1.0], (1.0, 1.0, 1.0), fade)
    assert torch.equal(frames[0], s)
    assert torch.allclose(frames[1], t, atol=1e-6)


def test_linear_fade_is_the_cross_fade_of_the_moved_images():
    s, t = _pair()
    a, b = _pair(1)
    frame = join(s, t, a[None], b[None], [0.3], (1.0, 1.0, 1.0), "linear")[0]
    assert torch.allclose(frame, 0.7 * a + 0.3 * b, atol=1e-6)


def test_where_the_moved_images_agree_the_frame_is_the_motion_compensated_one():
    s, t = _pair()
    a, _ = _pair(2)
    frame = join(s, t, a[None], a[None], [0.4], (1.0, 1.0, 1.0))[0]
    assert torch.allclose(frame, a, atol=1e-5)


def test_where_motion_explains_nothing_the_frame_halves_between_motion_and_blend():
    s, t = _pair()
    a = s + 0.5
    b = t + 0.5  # a - b == s - t everywhere: the same disagreement as no motion
    frame = join(s, t, a[None], b[None], [0.25], (1.0, 1.0, 1.0))[0]
    motion, blend = 0.75 * a + 0.25 * b, 0.75 * s + 0.25 * t
    assert torch.allclose(frame, 0.5 * (motion + blend), atol=1e-5)


def test_weights_follow_the_local_disagreement():
    """Left half: the moved images agree (motion explains the change); right half: they disagree as
    much as the unmoved ones. Away from the seam the left is the motion frame, the right the mean."""
    s, t = _pair(shape=(1, 16, 40))
    a = s.clone()
    b = s.clone()
    b[..., 20:] = a[..., 20:] - (s - t)[..., 20:]
    frame = join(s, t, a[None], b[None], [0.5], (1.0, 1.0, 1.0), sigma=1.0)[0]
    motion, blend = 0.5 * (a + b), 0.5 * (s + t)
    assert torch.allclose(frame[..., :12], motion[..., :12], atol=1e-5)
    assert torch.allclose(frame[..., 28:], 0.5 * (motion + blend)[..., 28:], atol=1e-5)


def test_smooth_matches_scipy_with_anisotropic_sigmas():
    x = torch.from_numpy(np.random.default_rng(3).normal(size=(2, 6, 30, 25)))
    sigmas = (0.5, 2.0, 1.3)
    expected = np.stack([gaussian_filter(v, sigmas, mode="nearest", truncate=3.0) for v in x.numpy()])
    # scipy's radius is int(truncate * sigma + 0.5), ours ceil(3 sigma): equal for these sigmas
    assert np.allclose(smooth(x, sigmas).numpy(), expected, atol=1e-10)


def test_smooth_leaves_single_voxel_axes_and_tiny_sigmas_alone():
    x = torch.rand(1, 1, 9, 9, dtype=torch.float64)
    assert torch.equal(smooth(x, (2.0, 0.2, 0.2)), x)


def test_unknown_fade_is_refused():
    s, t = _pair()
    with pytest.raises(ValueError, match="unknown fade"):
        join(s, t, s[None], t[None], [0.5], (1.0, 1.0, 1.0), "cubic")
