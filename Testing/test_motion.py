"""Motion that is right: velocity-field paths, per-case refinement, symmetric generation, the classical
baselines and the scoring against a real cine's own frames."""
import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ddm4d.classical import demons_field, demons_frames, linear_blend
from ddm4d.cine import frame_gammas, inbetween, score_frames
from ddm4d.cli import main as cli
from ddm4d.config import DDMConfig, RefineConfig
from ddm4d.errors import Cancelled, InputError
from ddm4d.generation import generate
from ddm4d.losses import local_ncc
from ddm4d.model import DDM
from ddm4d.refine import _converged, path_fields, refine_velocity
from ddm4d.svf import compose, integrate, invert, logarithm, resize_field
from ddm4d.warp import warp

STEPS = RefineConfig.integration_steps  # the squarings of the refinement's own exp(v)


def disc(shape=(64, 64), center=(32.0, 32.0), radius=14.0, ring=6.0):
    """A bright cavity in a darker wall on a dark background, [-1, 1] like the model's inputs."""
    yy, xx = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    r = ((yy - center[0]) ** 2 + (xx - center[1]) ** 2).sqrt()
    image = -1 + 1.6 * torch.sigmoid((radius - r) * 1.5) + 0.5 * torch.sigmoid((radius + ring - r) * 1.5)
    return image[None, None]


def smooth_field(shape, amplitude, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(1, len(shape), *[max(2, n // 8) for n in shape], generator=g) * amplitude
    return torch.nn.functional.interpolate(v, size=shape, mode="bilinear" if len(shape) == 2 else "trilinear",
                                           align_corners=True)


def as_image(t: torch.Tensor, spacing=(1.5, 1.5, 8.0)) -> sitk.Image:
    a = t.detach().numpy()[0, 0]
    image = sitk.GetImageFromArray((a[None] if a.ndim == 2 else a).astype(np.float32) * 200 + 300)
    image.SetSpacing(spacing)
    return image


# ---------------------------------------------------------------------------------------- velocity paths

def test_exp_of_a_constant_velocity_is_that_translation_and_exp_minus_v_inverts_exp_v():
    v = torch.zeros(1, 2, 32, 32)
    v[:, 1] = 2.5
    phi = integrate(v)
    assert torch.allclose(phi[..., 4:-4, 4:-4], v[..., 4:-4, 4:-4], atol=1e-4)
    assert integrate(torch.zeros(1, 3, 6, 8, 8)).abs().max().item() == 0.0
    v = smooth_field((40, 40), 1.0)
    round_trip = compose(integrate(-v), integrate(v))[..., 3:-3, 3:-3].abs()
    assert round_trip.mean().item() < 0.01 and round_trip.quantile(0.99).item() < 0.05


def test_invert_and_logarithm_recover_smooth_fields():
    phi = integrate(smooth_field((48, 48), 1.0, seed=1))
    inverse = invert(phi)
    error = compose(inverse, phi)[..., 4:-4, 4:-4].abs()
    assert error.mean().item() < 0.01 and error.quantile(0.99).item() < 0.1
    v = logarithm(phi)
    assert (integrate(v) - phi)[..., 4:-4, 4:-4].abs().mean().item() < 0.01


def test_resize_field_keeps_a_constant_displacement_in_millimetres():
    v = torch.full((1, 2, 16, 16), 1.0)
    up = resize_field(v, (32, 48))
    assert torch.allclose(up[0, 0], torch.full((32, 48), 2.0)) and torch.allclose(up[0, 1], torch.full((32, 48), 3.0))


def test_path_fields_at_half_are_exp_of_half_the_velocity_and_backward_ends_at_the_identity():
    v = smooth_field((32, 32), 1.0, seed=2)
    fields = path_fields(v, [0.0, 0.5, 1.0])  # with the refinement's own squarings by default
    assert fields[0].abs().max().item() == 0.0
    assert torch.allclose(fields[1:2], integrate(0.5 * v, STEPS), atol=1e-6)
    back = path_fields(v, [0.0, 0.5, 1.0], backward=True)
    assert back[2].abs().max().item() == 0.0 and torch.allclose(back[0:1], integrate(-v, STEPS), atol=1e-6)


# -------------------------------------------------------------------------------------------- refinement

@pytest.mark.parametrize("symmetric", [True, False])
def test_refinement_recovers_a_contraction_and_a_shift(symmetric):
    source = disc()
    target = disc(center=(30.0, 35.0), radius=10.0)
    result = refine_velocity(source, target, [1.5, 1.5], symmetric=symmetric)
    assert result.start == "zero"
    end = warp(source, integrate(result.velocity, STEPS))
    assert local_ncc(end, target).item() > local_ncc(source, target).item() + 0.08
    assert (end - target).pow(2).mean().item() < 0.02 * (source - target).pow(2).mean().item()
    # halfway along the path: the cavity halfway (radius ~12, centre ~(31, 33.5))
    half = warp(source, integrate(0.5 * result.velocity, STEPS))[0, 0]
    bright = (half > 0.2).float()
    ys, xs = torch.nonzero(bright, as_tuple=True)
    assert abs(ys.float().mean().item() - 31.0) < 1.0 and abs(xs.float().mean().item() - 33.5) < 1.0
    radius = (bright.sum().item() / np.pi) ** 0.5
    assert 10.7 < radius < 13.3
    # diffeomorphic: no folding anywhere on the path
    from ddm4d.geometry import jacobian_determinant
    for g in (0.25, 0.5, 1.0):
        assert jacobian_determinant(integrate(g * result.velocity, STEPS)[0].numpy()).min() > 0


def test_symmetric_objective_compares_the_source_half_way_forward_with_the_target_half_way_back():
    """The two halves are warped in one batch for speed; each must still be its own image and half."""
    from ddm4d.refine import _Objective
    source, target = disc(), disc(center=(30.0, 35.0), radius=10.0)
    v = smooth_field((64, 64), 3.0, seed=5)
    a, b, halves = _Objective(source, target, [1.5, 1.5], RefineConfig(), symmetric=True).images(v)
    assert torch.allclose(a, warp(source, integrate(v / 2, STEPS)), atol=1e-5)
    assert torch.allclose(b, warp(target, integrate(-v / 2, STEPS)), atol=1e-5)
    assert torch.allclose(halves, integrate(torch.cat([v, -v]) / 2, STEPS))  # what the fold penalty composes
    assert (a - b).abs().max().item() > 0.1  # not the same image twice


def test_refinement_adam_takes_torch_adams_steps():
    from ddm4d.refine import Adam
    torch.manual_seed(0)
    ours = torch.randn(3, 5, requires_grad=True)
    theirs = ours.detach().clone().requires_grad_(True)
    start = ours.detach().clone()
    mine, reference = Adam(ours, lr=0.1), torch.optim.Adam([theirs], lr=0.1)
    for _ in range(30):
        grad = torch.randn(3, 5)
        for param, opt in ((ours, mine), (theirs, reference)):
            opt.zero_grad()
            (param * grad).sum().backward()
            opt.step()
    assert torch.allclose(ours, theirs, atol=1e-6) and (ours - theirs).abs().max() < 1e-6
    assert (ours.detach() - start).abs().max() > 0.1  # it moved


def test_refinement_does_not_import_torch_dynamo():
    """Importing torch._dynamo (what any torch.optim optimizer does) costs 1.3-2.5 s per process."""
    import subprocess
    import sys
    code = ("import sys, torch\n"
            "from ddm4d.refine import refine_velocity\n"
            "s = torch.zeros(1, 1, 32, 32); s[..., 8:20, 10:22] = 1\n"
            "t = torch.roll(s, 2, dims=3)\n"
            "refine_velocity(s, t, [1.5, 1.5])\n"
            "print('torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_refinement_starts_from_the_model_only_where_that_is_better():
    source, target = disc(), disc(center=(32.0, 36.0), radius=12.0)
    good = refine_velocity(source, target, [1.5, 1.5]).velocity
    started = refine_velocity(source, target, [1.5, 1.5], start=good)
    assert started.start == "model"
    garbage = smooth_field((64, 64), 6.0, seed=3)
    assert refine_velocity(source, target, [1.5, 1.5], start=garbage).start == "zero"
    assert refine_velocity(source, target, [1.5, 1.5], start={"bad": garbage, "good": good}).start == "good"
    assert refine_velocity(source, target, [1.5, 1.5], start={"bad": garbage}).start == "zero"


def test_identical_images_do_not_move_and_constant_images_are_refused():
    source = disc()
    result = refine_velocity(source, source.clone(), [1.5, 1.5])
    assert result.velocity.abs().max().item() < 0.05
    with pytest.raises(InputError, match="constant"):
        refine_velocity(source, torch.zeros_like(source), [1.5, 1.5])


def test_refinement_cancel_stops_within_a_second():
    source, target = disc(), disc(center=(30.0, 35.0), radius=10.0)
    begun = time.perf_counter()
    with pytest.raises(Cancelled):
        refine_velocity(source, target, [1.5, 1.5], cancel=lambda: time.perf_counter() - begun > 0.2)
    assert time.perf_counter() - begun < 1.2


def _steps_taken(source, target, config):
    calls = []
    result = refine_velocity(source, target, [1.5, 1.5], config=config, cancel=lambda: calls.append(1) and False)
    return result, len(calls)


def test_refinement_ends_a_level_when_its_objective_stops_improving_and_not_before():
    source, target = disc(), disc(center=(30.0, 35.0), radius=10.0)
    config = RefineConfig()
    full, full_steps = _steps_taken(source, target, dataclasses.replace(config, tolerance=0.0))
    early, early_steps = _steps_taken(source, target, config)
    assert full_steps == sum(config.steps) and early_steps < 0.8 * full_steps
    assert full.steps == list(config.steps) and sum(early.steps) == early_steps  # as the report says
    end_full, end_early = (warp(source, integrate(r.velocity, STEPS)) for r in (full, early))
    assert local_ncc(end_early, target).item() > local_ncc(end_full, target).item() - 0.005
    # an identical pair never improves: each level stops at its first check, two patience windows in
    _, steps = _steps_taken(source, source.clone(), config)
    assert steps == 2 * config.patience * len(config.levels)
    # the rule itself, on the windows' mean objectives: a gain under the tolerance from one to the next
    tol = config.tolerance
    assert _converged([-0.5, -0.5 - 0.5 * tol], tol) and not _converged([-0.5, -0.5 - 2 * tol], tol)
    assert not _converged([-0.5], tol) and not _converged([-0.5, -0.5], 0.0)


def test_thick_slices_get_a_thinner_window_and_3d_refinement_works():
    source = disc((64, 64))[0, 0]
    vol_s = torch.stack([source] * 6)[None, None]
    vol_t = torch.stack([disc((64, 64), center=(31.0, 34.0), radius=11.0)[0, 0]] * 6)[None, None]
    result = refine_velocity(vol_s, vol_t, [8.0, 1.5, 1.5])
    end = warp(vol_s, integrate(result.velocity, RefineConfig().squarings(3)))
    assert (end - vol_t).pow(2).mean().item() < 0.3 * (vol_s - vol_t).pow(2).mean().item()
    # through-plane motion stays small: the slices are all alike
    assert result.velocity[0, 0].abs().mean().item() < 0.1


def test_an_isotropic_volume_is_refined_at_its_own_resolution_and_a_large_one_is_capped():
    """Up to 128 x 128 x 64 voxels the refinement grid is the volume's own: 56 slices of 2 mm stay 56
    (squeezed to 32 they under-moved; benchmarks/motion.py --cases phantom3d-iso), larger is capped
    with the field of view kept."""
    from ddm4d.refine import refinement_grid

    def volume(size, spacing):
        image = sitk.Image(size, sitk.sitkFloat32) + 1.0
        image.SetSpacing(spacing)
        return image

    iso = volume((100, 100, 56), (2.0, 2.0, 2.0))
    _, _, mapping = refinement_grid(iso, iso)
    assert mapping.grid.GetSize() == (100, 100, 56)
    assert mapping.grid.GetSpacing() == pytest.approx((2.0, 2.0, 2.0))
    big = volume((256, 256, 100), (1.0, 1.0, 1.5))
    _, _, mapping = refinement_grid(big, big)
    assert mapping.grid.GetSize() == (128, 128, 64)
    assert mapping.grid.GetSpacing() == pytest.approx((2.0, 2.0, 100 * 1.5 / 64))


# ---------------------------------------------------------------------------------------- generation

def zero_field_model(dims=2):
    """An untrained DDM whose deformation outputs exactly zero: every frame pair is unmoved."""
    model = DDM(DDMConfig.for_dims(dims, image_size=(64, 64)))
    with torch.no_grad():
        model.deformation.flow.weight.zero_()
        model.deformation.flow.bias.zero_()
    return model


@pytest.mark.parametrize("direction", ["model", "reversed model"])
def test_refinement_starts_from_the_model_run_either_way_whichever_fits_the_pair(direction):
    """The model is also run from the target to the source; its field inverted (-log) is the other
    start. A model that always answers one translation fits one direction only: the start must be the
    direction it fits, with the sign that moves the source onto the target."""
    s, t = as_image(disc()), as_image(disc(center=(32.0, 35.0)))  # the target 3 pixels (4.5 mm) along x
    model = zero_field_model()
    with torch.no_grad():  # pull fields, 1.5 mm voxels: source -> target is -3 voxels along x, back +3
        model.deformation.flow.bias[1] = -3.0 if direction == "model" else 3.0
    result = generate(s, t, model=model, frames=3, device="cpu", subtract_gamma0=False)
    assert result.refinement["start"] == direction
    assert result.refinement["smoothed"] is False  # a smooth pair's path compresses nowhere near folding
    assert ("inverted" in result.motion_source) == (direction == "reversed model")
    middle = sitk.GetArrayViewFromImage(result.frames[1])
    truth = sitk.GetArrayFromImage(as_image(disc(center=(32.0, 33.5))))
    assert np.abs(middle - truth).mean() < 0.2 * np.abs(sitk.GetArrayFromImage(s) - truth).mean()


def test_symmetric_generation_cross_fades_with_one_minus_gamma_and_gamma():
    """With a model that moves nothing, symmetric frames are exactly (1 - gamma) S + gamma T, computed here
    by hand (not by ddm4d's own blend, which shares the cross-fade code)."""
    s, t = as_image(disc()), as_image(disc(center=(30.0, 35.0), radius=10.0))
    gammas = [0.0, 0.25, 0.5, 1.0]
    result = generate(s, t, model=zero_field_model(), gammas=gammas, mode="symmetric", refine=False, device="cpu")
    a, b = sitk.GetArrayFromImage(s).astype(np.float64), sitk.GetArrayFromImage(t).astype(np.float64)
    for g, frame, blend in zip(gammas, result.frames, linear_blend(s, t, gammas)):
        np.testing.assert_allclose(sitk.GetArrayViewFromImage(frame), (1 - g) * a + g * b, atol=1e-3)
        np.testing.assert_allclose(sitk.GetArrayViewFromImage(blend), (1 - g) * a + g * b, atol=1e-3)


@pytest.mark.parametrize("model", ["none", "zero"])
def test_symmetric_refined_end_frames_are_exact_and_the_middle_has_moved(model):
    s, t = as_image(disc()), as_image(disc(center=(30.0, 35.0), radius=10.0))
    net = "none" if model == "none" else zero_field_model()
    result = generate(s, t, model=net, frames=5, device="cpu")
    assert result.mode == "symmetric" and result.refinement is not None
    a = [sitk.GetArrayViewFromImage(f) for f in result.frames]
    np.testing.assert_array_equal(a[0], sitk.GetArrayViewFromImage(s))
    np.testing.assert_allclose(a[-1], sitk.GetArrayViewFromImage(t), atol=1e-3)
    blend = sitk.GetArrayFromImage(linear_blend(s, t, [0.5])[0])
    truth = sitk.GetArrayFromImage(as_image(disc(center=(31.0, 33.5), radius=12.0)))
    assert np.mean((a[2] - truth) ** 2) < 0.5 * np.mean((blend - truth) ** 2)
    assert max(result.folding_fraction) == 0.0


def test_confidence_fade_beats_the_linear_cross_fade_on_an_unseen_phantom_and_keeps_fields_and_ends():
    """The default fade scores better against the true in-between frames of a phantom subject no model
    saw than the plain cross-fade of the same moved images; fields and end frames do not change."""
    from ddm4d.metrics import psnr
    from ddm4d.phantom import make_subject, subject_seed
    subject = make_subject(subject_seed(7, 2), size=(128, 128, 1))
    gammas = [0.0] + [k / subject.es for k in range(1, subject.es)] + [1.0]
    results = {fade: generate(subject.images[0], subject.images[subject.es], model="none", gammas=gammas,
                              device="cpu", fade=fade) for fade in ("confidence", "linear")}
    src = sitk.GetArrayViewFromImage(subject.images[0])
    lo, hi = float(src.min()), float(src.max())

    def score(result):
        return np.mean([psnr((sitk.GetArrayViewFromImage(f) - lo) / (hi - lo), (sitk.GetArrayViewFromImage(r) - lo) / (hi - lo),
                             data_range=1.0) for f, r in zip(result.frames[1:-1], subject.images[1:subject.es])])

    confidence, linear = results["confidence"], results["linear"]
    assert confidence.fade == "confidence" and linear.fade == "linear"
    assert score(confidence) > score(linear) + 0.1
    for a, b in zip(confidence.fields, linear.fields):
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(confidence.frames[0]), src)
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(confidence.frames[-1]),
                               sitk.GetArrayViewFromImage(subject.images[subject.es]), atol=1e-3)


def test_cli_fade_is_reported_and_a_wrong_one_is_refused(tmp_path, capsys):
    s, t = tmp_path / "s.nii.gz", tmp_path / "t.nii.gz"
    sitk.WriteImage(as_image(disc()), str(s))
    sitk.WriteImage(as_image(disc(center=(30.0, 35.0), radius=10.0)), str(t))
    common = ["generate", "--source", str(s), "--target", str(t), "--model", "none", "--frames", "3", "--quiet",
              "--no-quicklook", "--outputs", "none"]
    assert cli(common + ["--fade", "linear", "--out", str(tmp_path / "out")]) == 0
    import json
    assert json.loads((tmp_path / "out" / "report.json").read_text())["fade"] == "linear"
    with pytest.raises(SystemExit) as exit_info:
        cli(common + ["--fade", "cubic", "--out", str(tmp_path / "o2")])
    assert exit_info.value.code == 2 and "invalid choice: 'cubic'" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_forward_mode_frames_are_the_source_warped_by_the_written_fields():
    s, t = as_image(disc()), as_image(disc(center=(30.0, 35.0), radius=10.0))
    result = generate(s, t, model="none", frames=3, mode="forward", device="cpu")
    from ddm4d.geometry import warp_image
    for frame, field in zip(result.frames, result.fields):
        np.testing.assert_allclose(sitk.GetArrayViewFromImage(frame),
                                   sitk.GetArrayFromImage(warp_image(s, field)), atol=1e-3)


def test_model_field_at_half_gamma_is_the_field_of_half_the_code():
    torch.manual_seed(0)
    model = DDM(DDMConfig.for_dims(2, image_size=(32, 32)))
    with torch.no_grad():
        model.deformation.flow.weight.mul_(50)
    s, t = disc((32, 32), (16.0, 16.0), 8.0), disc((32, 32), (15.0, 18.0), 6.0)
    code = 50 * torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))  # untrained codes are ~0
    gen = model.generate(s, t, [0.5], code=code)
    expected = model._field_from_net(model._deform(s, 0.5 * code) - model._deform(s, torch.zeros_like(code)))
    torch.testing.assert_close(gen.fields, expected, atol=1e-5, rtol=1e-4)
    # and the check can tell: the field of a quarter of the code is visibly another one
    quarter = model.generate(s, t, [0.25], code=code).fields
    assert (quarter - expected).abs().max().item() > 1e-3


def test_gpu_out_of_memory_retries_smaller_then_falls_back_to_the_cpu(monkeypatch, capsys):
    """Tested on the CPU: the first passes raise CUDA's out-of-memory error as a GPU would."""
    import ddm4d.generation as gen_module

    calls = []
    real_run_on = gen_module._run_on

    def flaky(net, src, tgt, gammas, device, chunk_size, subtract, precision):
        calls.append((str(device), chunk_size))
        if len(calls) <= 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_run_on(net, src, tgt, gammas, torch.device("cpu"), chunk_size, subtract, precision)

    monkeypatch.setattr(gen_module, "_run_on", flaky)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    s, t = as_image(disc()), as_image(disc(center=(30.0, 35.0), radius=10.0))
    model = zero_field_model()
    monkeypatch.setattr(model, "auto_chunk_size", lambda source: 2)
    result = generate(s, t, model=model, frames=4, refine=False, device="cpu")
    assert calls[0] == ("cpu", None) and calls[1] == ("cpu", 1) and calls[2] == ("cpu", 1)
    assert result.messages[:2] == ["GPU out of memory: retrying with 1 gammas per pass",
                                   "GPU out of memory even one gamma at a time: continuing on the CPU"]
    assert "continuing on the CPU" in capsys.readouterr().err
    assert len(result.frames) == 4


def test_a_bf16_pass_with_impossible_displacements_is_done_again_in_fp32(monkeypatch, capsys):
    """A bf16 kernel that reads unwritten memory gave NaN or 1e36-voxel fields: such a pass is redone in
    fp32, the result says fp32 and why, and an fp32 pass is never second-guessed (tested on the CPU,
    the bf16 pass made to return what the defective kernel did)."""
    import ddm4d.generation as gen_module

    calls = []
    real_run_on = gen_module._run_on

    def defective(net, src, tgt, gammas, device, chunk_size, subtract, precision):
        calls.append(precision)
        run = real_run_on(net, src, tgt, gammas, device, chunk_size, subtract, precision)
        if precision != "fp32":
            run.generation.fields[:, :, :2] = bad
        return run

    monkeypatch.setattr(gen_module, "_run_on", defective)
    s, t = as_image(disc()), as_image(disc(center=(30.0, 35.0), radius=10.0))
    model = zero_field_model()
    for bad in (float("nan"), 1e36):
        calls.clear()
        result = generate(s, t, model=model, frames=4, refine=False, device="cpu", precision="bf16")
        assert calls == ["bf16", "fp32"] and result.precision == "fp32"
        assert result.messages == ["the networks' bf16 pass gave displacements that are not finite or reach beyond "
                                   "the grid: done again in fp32 (--precision fp32 skips bf16)"]
        assert "done again in fp32" in capsys.readouterr().err
        assert all(np.isfinite(sitk.GetArrayViewFromImage(f)).all() for f in result.frames + result.fields)
    bad = 3.0  # a plausible bf16 field is kept as it is
    calls.clear()
    result = generate(s, t, model=model, frames=4, refine=False, device="cpu", precision="bf16")
    assert calls == ["bf16"] and result.precision == "bf16" and result.messages == []
    bad = float("nan")  # and fp32 runs once, whatever it gives
    calls.clear()
    generate(s, t, model=model, frames=4, refine=False, device="cpu", precision="fp32")
    assert calls == ["fp32"]


# ------------------------------------------------------------------------------- classical baselines

def test_demons_recovers_a_shift_on_an_oblique_single_slice_and_symmetric_ends_are_exact():
    s = as_image(disc(), spacing=(1.5, 1.5, 8.0))
    t = as_image(disc(center=(32.0, 36.0)), spacing=(1.5, 1.5, 8.0))
    direction = np.array([[0.8, -0.6, 0], [0.6, 0.8, 0], [0, 0, 1.0]]) @ np.array([[1, 0, 0], [0, 0.96, -0.28], [0, 0.28, 0.96]])
    for image in (s, t):
        image.SetDirection(direction.ravel().tolist())
    field = demons_field(t, s)  # s(x + u) ~ t(x): u points 4 voxels (6 mm) back along the image's x axis
    u = sitk.GetArrayViewFromImage(field)[0, 28:36, 40:48] @ direction  # LPS -> along the image axes
    assert np.mean(u[..., 0]) == pytest.approx(-6.0, abs=1.5) and abs(np.mean(u[..., 1])) < 1.0
    assert np.abs(u[..., 2]).max() < 1e-9
    frames, _ = demons_frames(s, t, [0.0, 0.5, 1.0], symmetric=True)
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(frames[0]), sitk.GetArrayViewFromImage(s), atol=1e-3)
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(frames[2]), sitk.GetArrayViewFromImage(t), atol=1e-3)


# ------------------------------------------------------------------------------------ cine scoring

def test_in_between_frames_and_their_gammas_in_both_directions():
    assert inbetween(2, 6) == [(3, 0.25), (4, 0.5), (5, 0.75)]
    assert inbetween(6, 2) == [(5, 0.25), (4, 0.5), (3, 0.75)]
    assert frame_gammas(0, 3) == [0.0, 1 / 3, 2 / 3, 1.0]
    assert inbetween(4, 5) == []


def test_scores_compare_with_the_blend_and_the_source_on_one_intensity_map():
    cine = [as_image(disc(center=(32.0, 32.0 + k), radius=14.0 - k)) for k in range(5)]
    gammas = frame_gammas(0, 4)
    blend = linear_blend(cine[0], cine[4], gammas)
    score = score_frames(blend, gammas, cine, 0, 4)
    assert [r["frame"] for r in score["frames"]] == [1, 2, 3]
    for r in score["frames"]:
        assert r["generated_psnr_db"] == pytest.approx(r["blend_psnr_db"])
        assert r["generated_psnr_db"] > r["initial_psnr_db"]
    perfect = score_frames(cine, gammas, cine, 0, 4)
    assert all(np.isinf(r["generated_psnr_db"]) for r in perfect["frames"])
    with pytest.raises(InputError, match="no generated frame at gamma"):
        score_frames(blend[:2], gammas[:2], cine, 0, 4)
    with pytest.raises(InputError, match="neighbours"):
        score_frames(blend, gammas, cine, 1, 2)


def write_cine4d(path: Path, frames: list[sitk.Image]) -> None:
    arrays = np.stack([sitk.GetArrayViewFromImage(f) for f in frames])  # (t, z, y, x)
    image = sitk.GetImageFromArray(arrays, isVector=False)
    image.SetSpacing(frames[0].GetSpacing() + (1.0,))
    sitk.WriteImage(image, str(path))


def test_cli_takes_frames_of_a_4d_cine_and_scores_against_its_own_frames(tmp_path, capsys, monkeypatch):
    cine = [as_image(disc(center=(32.0, 32.0 + k), radius=14.0 - k)) for k in range(6)]
    path = tmp_path / "cine.nii.gz"
    write_cine4d(path, cine)
    out = tmp_path / "out"
    code = cli(["generate", "--source", str(path), "--source-frame", "0", "--target-frame", "4", "--model", "none",
                "--score", "--out", str(out), "--quiet", "--no-quicklook"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "against the real frames in between" in printed
    import json
    report = json.loads((out / "report.json").read_text())
    assert report["gammas"] == frame_gammas(0, 4)
    score = json.loads((out / "score.json").read_text())
    assert score["mean"]["generated_psnr_db"] > score["mean"]["blend_psnr_db"]
    assert (out / "score.md").read_text().startswith("# Generated frames against the real cine")
    # a 4D file without frames, and frames out of range: exit 2, one line
    for args, message in ((["--target", str(path)], "choose frames with --source-frame"),
                          (["--source-frame", "0", "--target-frame", "9"], "out of range: the cine has 6 frames"),
                          (["--source-frame", "0", "--target-frame", "3", "--score", "--frames", "5"], "drop --frames")):
        code = cli(["generate", "--source", str(path), "--out", str(tmp_path / "o2"), "--quiet", *args])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    # neighbouring frames have nothing to score against: refused before anything is generated
    import ddm4d.generation

    monkeypatch.setattr(ddm4d.generation, "generate", lambda *a, **k: pytest.fail("generated before refusing"))
    code = cli(["generate", "--source", str(path), "--source-frame", "2", "--target-frame", "3", "--score",
                "--out", str(tmp_path / "o3"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "neighbours" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o3").exists()


def test_refine_config_rejects_inconsistent_levels():
    with pytest.raises(ValueError, match="one entry each"):
        RefineConfig(levels=(4, 2), steps=(10,))
    with pytest.raises(ValueError, match="tolerance"):
        RefineConfig(tolerance=-1e-3)
    with pytest.raises(ValueError, match="integration steps"):
        RefineConfig(integration_steps_3d=0)
    with pytest.raises(ValueError, match="upsample_smoothing"):
        RefineConfig(upsample_smoothing=-0.5)
    with pytest.raises(ValueError, match="upsample_min_det"):
        RefineConfig(upsample_min_det=1.0)


def test_a_volume_path_takes_more_squarings_than_a_slice():
    """Volumes carry the model's steep through-plane motion: exp(v) with 7 squarings there (5 folded a
    voxel of an unseen 3D phantom), 5 for slices; the path's fields use the same count as the fit."""
    config = RefineConfig()
    assert (config.squarings(2), config.squarings(3)) == (5, 7)
    v2, v3 = smooth_field((32, 32), 3.0), smooth_field((8, 32, 32), 3.0)
    assert torch.equal(path_fields(v2, [1.0]), integrate(v2, 5))
    assert torch.equal(path_fields(v3, [1.0]), integrate(v3, 7))
    assert not torch.allclose(integrate(v3, 7), integrate(v3, 5), atol=1e-4)  # the count matters


def test_a_velocity_fitted_at_half_resolution_is_not_sharper_once_upsampled():
    """A volume's refinement ends at half its grid. Linearly upsampled, v's gradient on the full grid is
    its change from one coarse voxel to the next, which the fit's central differences did not see, and
    exp(v) there folded where the fit's had not (2 voxels of an unseen 3D phantom, --model none); the
    Gaussian of RefineConfig.upsample_smoothing keeps the fine exp(v) near the coarse one and the motion's size."""
    from ddm4d.refine import min_det, upsample_velocity

    coarse = torch.zeros(1, 3, 8, 16, 16)
    coarse[0, 2, :, :, 7], coarse[0, 2, :, :, 8] = 2.0, -2.0  # two neighbouring coarse columns converge
    fine_size = [8, 32, 32]
    steps = RefineConfig().squarings(3)

    assert min_det(integrate(coarse, steps)) > 0.7  # what the fit saw
    assert min_det(integrate(resize_field(coarse, fine_size), steps)) < 0.05  # linear upsampling alone: nearly folded
    smoothing = RefineConfig().upsample_smoothing
    smoothed = upsample_velocity(coarse, fine_size, smoothing)
    assert min_det(integrate(smoothed, steps)) > 0.2
    assert float(smoothed.abs().max()) > 0.5 * float(resize_field(coarse, fine_size).abs().max())
    assert torch.equal(upsample_velocity(coarse, coarse.shape[2:], smoothing), coarse)  # no level above: as fitted
    assert torch.equal(upsample_velocity(coarse, fine_size, 0.0), resize_field(coarse, fine_size))
    # axes that do not grow (a thick-slice axis) are not smoothed along
    slab = torch.zeros(1, 3, 8, 16, 16)
    slab[0, 0, 4] = 1.0
    assert torch.equal(upsample_velocity(slab, fine_size, smoothing)[0, 0, 3], torch.zeros(32, 32))


def test_a_volume_velocity_is_smoothed_only_where_its_upsampled_path_would_compress_too_far():
    """The smoothing shrinks motion a little (isotropic phantoms: the EF 1.8 points further off), so it
    is kept for a field whose exp on the full grid compresses below RefineConfig.upsample_min_det; a
    slice's last level is its grid and is never smoothed."""
    from ddm4d.refine import min_det

    vol_s = torch.stack([disc((48, 48))[0, 0]] * 6)[None, None]
    vol_t = torch.stack([disc((48, 48), center=(23.0, 26.0), radius=9.0)[0, 0]] * 6)[None, None]
    quick = dict(steps_3d=(20, 20), tolerance=0.0)
    never = refine_velocity(vol_s, vol_t, [8.0, 1.5, 1.5], config=RefineConfig(upsample_min_det=0.0, **quick))
    always = refine_velocity(vol_s, vol_t, [8.0, 1.5, 1.5], config=RefineConfig(upsample_min_det=0.999, **quick))
    assert not never.smoothed and always.smoothed
    assert never.objective == always.objective  # the same fit; only its way to the full grid differs
    steps = RefineConfig().squarings(3)
    assert min_det(integrate(always.velocity, steps)) > min_det(integrate(never.velocity, steps))
    assert 0.8 < float(always.velocity.abs().max() / never.velocity.abs().max()) < 1.0  # a little less motion
    slice_fit = dict(steps=(10, 10, 10), tolerance=0.0)
    assert not refine_velocity(disc((32, 32)), disc((32, 32), center=(15.0, 17.0)), [1.5, 1.5],
                               config=RefineConfig(**slice_fit)).smoothed


def test_a_slice_velocity_that_would_fold_is_smoothed_until_its_path_stays_invertible():
    """A slice is fitted on its own grid, and noise can make its velocity rough from one pixel to the
    next: refinement alone folded background pixels of noisy real pairs. The last level's v is smoothed,
    along the fitted axes only, while exp(v) (or, when the target is warped too, exp(-v)) folds; a
    strong but unfolded compression (a contracting heart) is left as fitted."""
    from ddm4d.refine import _unfolded, min_det

    config = RefineConfig()
    steps = config.squarings(2)

    def noise(seed, size=1.5):  # pixels
        return torch.randn(1, 2, 32, 32, generator=torch.Generator().manual_seed(seed)) * size

    rough = noise(0)
    assert min_det(integrate(rough, steps)) < 0 and min_det(integrate(-rough, steps)) < 0  # folds both ways
    v, smoothed = _unfolded(rough, [32, 32], config, True, frozen=[])
    assert smoothed and min(min_det(integrate(u, steps)) for u in (v, -v)) > 0
    assert float(v.abs().max()) > 0.5 * float(rough.abs().max())  # less motion, not none
    # folding one way only: a forward path (the target never warped) minds exp(v) alone
    one_way = noise(7, 0.8)
    assert min_det(integrate(one_way, steps)) > 0 >= min_det(integrate(-one_way, steps))
    v, smoothed = _unfolded(one_way, [32, 32], config, False, frozen=[])
    assert not smoothed and torch.equal(v, one_way)
    v, smoothed = _unfolded(one_way, [32, 32], config, True, frozen=[])
    assert smoothed and min_det(integrate(-v, steps)) > 0
    v, smoothed = _unfolded(-one_way, [32, 32], config, False, frozen=[])
    assert smoothed and min_det(integrate(v, steps)) > 0
    # a flow converging on one column compresses it to det J 0.03 without folding: kept as fitted
    x = torch.arange(32.0) - 16
    converge = torch.zeros(1, 2, 32, 32)
    converge[0, 1] = -4.0 * x * torch.exp(-x ** 2 / (2 * 1.5 ** 2))
    assert 0 < min_det(integrate(converge, steps)) < config.upsample_min_det
    assert not _unfolded(converge, [32, 32], config, True, frozen=[])[1]
    # a frozen axis (a volume's thick slices) is not smoothed along
    slab = torch.zeros(1, 3, 4, 32, 32)
    slab[0, 1:] = rough[0, :, None]
    slab[0, 0, 2] = 0.2  # through-plane motion of one slice: the model's, kept
    assert min_det(integrate(slab, config.squarings(3))) <= 0
    v, smoothed = _unfolded(slab, [4, 32, 32], config, False, frozen=[0])
    assert smoothed and torch.allclose(v[0, 0], slab[0, 0]) and not v[0, 0, 1].any() and not v[0, 0, 3].any()
    assert min_det(integrate(v, config.squarings(3))) > 0
    # switched off: as fitted
    off = RefineConfig(upsample_smoothing=0.0)
    assert torch.equal(_unfolded(rough, [32, 32], off, True, frozen=[])[0], rough)


def test_the_fold_penalty_is_the_paths_folds_and_keeps_a_weakly_smoothed_fit_from_folding():
    """RefineConfig.fold_weight adds weight * mean(relu(margin - det J)^2) of the path exp(v) (both
    ways when the target is warped too) to the fit's objective: nothing where the path stays above the
    margin, and a fit too weakly smoothed to stay invertible by itself stays so with it."""
    from ddm4d.geometry import jacobian_determinant
    from ddm4d.refine import _Objective, jacobian_det, min_det

    smooth = torch.randn(1, 3, 6, 12, 12, generator=torch.Generator().manual_seed(1)) * 2.0
    assert torch.allclose(jacobian_det(smooth)[0], torch.from_numpy(jacobian_determinant(smooth[0].numpy())),
                          atol=1e-5)
    a, b = disc((32, 32)), disc((32, 32), center=(15.0, 18.0))
    rough = torch.randn(1, 2, 32, 32, generator=torch.Generator().manual_seed(0)) * 1.5
    steps = RefineConfig().squarings(2)
    assert min_det(integrate(rough, steps)) < 0
    plain, penalised = (_Objective(a, b, [1.0, 1.0], RefineConfig(fold_weight=w), symmetric=False) for w in (0, 100))
    det = torch.from_numpy(jacobian_determinant(integrate(rough, steps)[0].numpy()))
    expected = 100 * torch.relu(0.1 - det).pow(2).mean()
    assert float(expected) > 0 and abs(float(penalised(rough) - plain(rough) - expected)) < 1e-4
    gentle = 0.3 * disc((32, 32)).expand(1, 2, 32, 32)  # a small smooth shift: det J near 1 everywhere
    assert float(penalised(gentle)) == pytest.approx(float(plain(gentle)), abs=1e-7)
    both = _Objective(a, b, [1.0, 1.0], RefineConfig(fold_weight=100), symmetric=True)
    one_way = torch.randn(1, 2, 32, 32, generator=torch.Generator().manual_seed(7)) * 0.8
    assert min_det(integrate(one_way, steps)) > 0.1 and min_det(integrate(-one_way, steps)) < 0
    unpenalised = _Objective(a, b, [1.0, 1.0], RefineConfig(fold_weight=0), symmetric=True)
    assert float(both(one_way)) > float(unpenalised(one_way))
    # a fit of two noise images with almost no smoothness folds; with the penalty it does not
    noise = [torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(k)) * 2 - 1 for k in (3, 4)]
    weak = dict(smoothness=0.01, steps=(20, 20, 20), tolerance=0.0, upsample_smoothing=0.0)  # no guard after it
    for symmetric in (False, True):
        folded = refine_velocity(*noise, [1.0, 1.0], config=RefineConfig(fold_weight=0, **weak),
                                 symmetric=symmetric).velocity
        kept = refine_velocity(*noise, [1.0, 1.0], config=RefineConfig(fold_weight=1000, **weak),
                               symmetric=symmetric).velocity
        assert min_det(integrate(folded, steps)) < 0
        assert min(min_det(integrate(u, steps)) for u in ((kept, -kept) if symmetric else (kept,))) > 0
    with pytest.raises(ValueError, match="fold_weight"):
        RefineConfig(fold_weight=-1)
    # on by default: the measured default (docs/measurements.md, "Smoothness")
    assert RefineConfig().fold_weight > 0


def test_network_fitting_keeps_its_best_iterate_not_its_last():
    """A step size that wrecks the network: nothing beats the starting weights, so they come back."""
    from ddm4d.generation import fit_pair

    torch.manual_seed(0)
    model = DDM(DDMConfig.for_dims(2, image_size=(32, 32), fit_lr=50.0))
    source = disc((32, 32), (16.0, 16.0), 8.0)[0, 0].numpy()
    target = disc((32, 32), (15.0, 18.0), 6.0)[0, 0].numpy()
    fitted, losses = fit_pair(model, source, target, steps=6, device=torch.device("cpu"), checks=6)
    assert 1 <= len(losses) <= 6  # a diverged loss (NaN) ends the fit early
    for name, value in model.state_dict().items():
        assert torch.equal(value, fitted.state_dict()[name]), name


def test_auto_precision_takes_bf16_on_the_cpu_only_where_it_is_faster(monkeypatch):
    """bf16 on the CPU only with AMX: with AVX512-BF16 alone it measured 1.4x slower than fp32."""
    import ddm4d.device as device

    assert device.bf16_faster_with({"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"})
    assert not device.bf16_faster_with({"avx512f", "avx512_bf16"})
    assert not device.bf16_faster_with({"avx2", "fma"})
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for faster in (True, False):
        monkeypatch.setattr(device, "cpu_bf16_is_faster", lambda: faster)
        assert device.uses_bf16(cpu, "auto", cpu_auto=True) is faster
        assert not device.uses_bf16(cpu, "auto")  # a caller that did not measure bf16 stays in fp32
        assert device.uses_bf16(cpu, "bf16") and not device.uses_bf16(cpu, "fp32")
        assert device.uses_bf16(cuda) and not device.uses_bf16(cuda, "fp32")


def test_bf16_networks_stay_within_tolerance_of_fp32():
    """The bf16 path of the networks (automatic on CPUs with AMX) against fp32 on the same
    inputs, with the bundled 2D model on an unseen phantom slice: the same geometry, every frame within
    0.05 dB of fp32's PSNR against the true frames, the same folding; and the report says which ran."""
    from ddm4d.device import cpu_bf16_is_faster
    from ddm4d.generation import bundled_model_path
    from ddm4d.metrics import psnr
    from ddm4d.phantom import make_subject

    if bundled_model_path(2) is None:
        pytest.skip("no bundled 2D model in this checkout (scripts/train_default_models.sh makes it)")
    subject = make_subject(11, size=(160, 160, 1))
    source, target = subject.images[subject.ed], subject.images[subject.es]
    gammas = frame_gammas(subject.ed, subject.es)
    runs = {p: generate(source, target, gammas=gammas, mode="forward", refine=False, device="cpu", precision=p)
            for p in ("fp32", "bf16", "auto")}
    assert runs["fp32"].precision == "fp32" and runs["bf16"].precision == "bf16"
    assert runs["auto"].precision == ("bf16" if cpu_bf16_is_faster() else "fp32")
    scale = float(sitk.GetArrayViewFromImage(source).max())
    truth = [sitk.GetArrayFromImage(subject.images[k]) / scale for k in range(subject.ed, subject.es + 1)]
    moved = 0.0
    for k, (a, b) in enumerate(zip(runs["fp32"].frames, runs["bf16"].frames)):
        assert a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing() and a.GetOrigin() == b.GetOrigin()
        pa, pb = (psnr(sitk.GetArrayViewFromImage(f) / scale, truth[k], data_range=1.0) for f in (a, b))
        assert abs(pa - pb) <= 0.05, (k, pa, pb)
        moved = max(moved, float(np.abs(sitk.GetArrayViewFromImage(runs["fp32"].fields[k])).max()))
    assert moved > 1.0  # mm: the model really moves this heart, so the comparison means something
    assert runs["bf16"].folding_fraction == pytest.approx(runs["fp32"].folding_fraction, abs=1e-4)
    with pytest.raises(InputError, match="unknown precision"):
        generate(source, target, frames=2, refine=False, device="cpu", precision="fp16")


def test_the_bundled_3d_model_in_bf16_is_repeatable_and_within_tolerance_of_fp32():
    """The 3D path of bf16 (automatic on CPUs with AMX): the bundled 3D model on an unseen
    phantom subject gives the same fields every run, within 0.2 mm of fp32's (0.08 measured) and
    within 0.05 dB of fp32's PSNR against the true frames. Its 16-slice grid makes a convolution
    whose bf16 kernel read unwritten memory (networks.blocks.Conv3d): fields up to 3.1 mm off fp32's
    (0.18 dB), NaN in some runs."""
    from ddm4d.generation import bundled_model_path
    from ddm4d.metrics import psnr
    from ddm4d.phantom import make_subject

    if bundled_model_path(3) is None:
        pytest.skip("no bundled 3D model in this checkout (scripts/train_default_models.sh makes it)")
    subject = make_subject(12, size=(96, 96, 12))
    source, target = subject.images[subject.ed], subject.images[subject.es]
    gammas = frame_gammas(subject.ed, subject.es)
    runs = [generate(source, target, gammas=gammas, mode="forward", refine=False, device="cpu", precision=p)
            for p in ("fp32", "bf16", "bf16", "bf16")]
    fields = [np.stack([sitk.GetArrayFromImage(f) for f in run.fields]) for run in runs]
    assert np.isfinite(fields[1]).all()
    for other in fields[2:]:
        np.testing.assert_array_equal(other, fields[1])
    assert np.abs(fields[0]).max() > 1.0  # mm: the model moves this heart
    assert np.abs(fields[1] - fields[0]).max() < 0.2  # mm, on a grid of 3 mm voxels (before the fix: 3.1, or NaN)
    scale = float(sitk.GetArrayViewFromImage(source).max())
    for k, (a, b) in enumerate(zip(runs[0].frames, runs[1].frames)):
        truth = sitk.GetArrayFromImage(subject.images[subject.ed + k]) / scale
        pa, pb = (psnr(sitk.GetArrayViewFromImage(f) / scale, truth, data_range=1.0) for f in (a, b))
        assert abs(pa - pb) <= 0.05, (k, pa, pb)


def test_the_result_says_where_its_motion_came_from():
    """A user reads whether a model trained on synthetic data made the motion, and whether it was refined
    on the pair (report.json "motion_source", the CLI's last line, the Slicer module's status)."""
    from ddm4d.generation import bundled_model_path
    s, t = as_image(disc()), as_image(disc(radius=10.0))
    alone = generate(s, t, model="none", frames=3, device="cpu")
    assert alone.motion_source.startswith("Motion from no network, refined on this pair")
    if bundled_model_path(2) is None:
        pytest.skip("no bundled 2D model in this checkout (scripts/train_default_models.sh makes it)")
    paper = generate(s, t, model="default", frames=3, device="cpu", mode="forward", refine=False)
    assert "bundled model, trained on synthetic phantom cines (not on real scans)" in paper.motion_source
    assert paper.motion_source.endswith("not refined on this pair.")
    default = generate(s, t, model="default", frames=3, device="cpu")
    assert "synthetic" in default.motion_source and "refined on this pair starting from" in default.motion_source
