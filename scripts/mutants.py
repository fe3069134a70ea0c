#!/usr/bin/env python3
"""Mutation check: do the tests catch real breakage?

Each mutant is one deliberate bug (a text replacement in one file). For each, a scratch copy of the
project gets that bug alone and the tests that should catch it run against the copy; a mutant is caught
when those tests fail. Not part of `make test` (about 3 minutes on 2 cores):

    .venv/bin/python scripts/mutants.py            # every mutant, last line "mutants: N/N caught"
    .venv/bin/python scripts/mutants.py -k ema     # those whose name contains "ema"

Tests that compare the Slicer path with ddm4d.generate (the same code) or use a fake result would not
catch an engine bug, so every mutant names tests that check against ground truth.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("ddm4d", "Testing", "DDMInterpolation", "DDMTraining", "Resources", "scripts", "pyproject.toml",
          "README.md", "Makefile", "CMakeLists.txt")


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the project root
    old: str  # must occur exactly once
    new: str
    tests: tuple[str, ...]  # pytest node ids (relative to the project root)


MUTANTS = (
    Mutant("warp pushes instead of pulls", "ddm4d/warp.py",
           "offsets = phi.float().movedim(1, -1).flip(-1)", "offsets = -phi.float().movedim(1, -1).flip(-1)",
           ("Testing/test_core.py::test_integer_translation_moves_content_along_the_right_axis",)),
    Mutant("local NCC made global", "ddm4d/losses.py",
           "stats = box_mean(torch.cat([x, y, x * x, y * y, x * y], dim=1), windows)",
           "stats = box_mean(torch.cat([x, y, x * x, y * y, x * y], dim=1), tuple(2 * n + 1 for n in x.shape[2:]))",
           ("Testing/test_core.py::test_local_ncc_matches_a_brute_force_windowed_reference_and_is_not_global",)),
    Mutant("gamma squared", "ddm4d/model.py",
           "g.to(code.dtype) * net_code", "g.to(code.dtype) ** 2 * net_code",
           ("Testing/test_motion.py::test_model_field_at_half_gamma_is_the_field_of_half_the_code",)),
    Mutant("labels not warped", "ddm4d/generation.py",
           "labels = resample.to_images(warp.nearest(labels_img, default_value=0), labels_img)",
           "labels = [sitk.Image(labels_img) for _ in batch]",
           ("Testing/test_generate.py::test_label_propagation_on_a_phantom_follows_the_true_labels",)),
    Mutant("smoothness dropped", "ddm4d/losses.py",
           "    return total / ndim", "    return 0.0 * total / ndim",
           ("Testing/test_core.py::test_smoothness_of_zero_and_constant_fields_is_zero_and_positive_otherwise",)),
    Mutant("no noising in training", "ddm4d/model.py",
           "x_t = self.schedule.q_sample(target, t, noise)", "x_t = target",
           ("Testing/test_core.py::test_training_noises_the_target_as_the_schedule_says",)),
    Mutant("fit keeps the last weights", "ddm4d/generation.py",
           "    net.load_state_dict(best_state)", "    net.load_state_dict(net.state_dict())",
           ("Testing/test_motion.py::test_network_fitting_keeps_its_best_iterate_not_its_last",)),
    Mutant("EMA inverted", "ddm4d/training/state.py",
           "self.shadow[name].lerp_(p.detach().float(), 1.0 - decay)",
           "self.shadow[name].lerp_(p.detach().float(), decay)",
           ("Testing/test_train.py::test_ema_follows_its_warm_up_ramp_and_decay",)),
    Mutant("the trainer fed (source, source)", "ddm4d/training/loop.py",
           "out = self.step_module(pairs[:, :1], pairs[:, 1:], middle, gammas, generator=generator)",
           "out = self.step_module(pairs[:, :1], pairs[:, :1], middle, gammas, generator=generator)",
           ("Testing/test_train.py::test_training_on_a_small_phantom_makes_the_model_move_towards_the_target",)),
    Mutant("bidirectional cross-fade weights swapped", "ddm4d/classical.py",
           "return sitk.Cast(first, sitk.sitkFloat32) * (1.0 - g) + sitk.Cast(second, sitk.sitkFloat32) * g",
           "return sitk.Cast(first, sitk.sitkFloat32) * g + sitk.Cast(second, sitk.sitkFloat32) * (1.0 - g)",
           ("Testing/test_motion.py::test_symmetric_generation_cross_fades_with_one_minus_gamma_and_gamma",)),
    Mutant("confidence fade trusts the motion where it explains least", "ddm4d/fade.py",
           "w = e_blend / (e_blend + e_motion + tiny)", "w = e_motion / (e_blend + e_motion + tiny)",
           ("Testing/test_fade.py::test_where_the_moved_images_agree_the_frame_is_the_motion_compensated_one",
            "Testing/test_motion.py::test_confidence_fade_beats_the_linear_cross_fade_on_an_unseen_phantom_and_keeps_fields_and_ends")),
    Mutant("symmetric fade weights swapped", "ddm4d/fade.py",
           "motion = moved_source * (1.0 - g) + moved_target * g", "motion = moved_source * g + moved_target * (1.0 - g)",
           ("Testing/test_fade.py::test_linear_fade_is_the_cross_fade_of_the_moved_images",
            "Testing/test_motion.py::test_symmetric_refined_end_frames_are_exact_and_the_middle_has_moved")),
    Mutant("out-of-memory handler re-raises", "ddm4d/generation.py",
           "        except torch.cuda.OutOfMemoryError:\n            torch.cuda.empty_cache()",
           "        except torch.cuda.OutOfMemoryError:\n            raise",
           ("Testing/test_motion.py::test_gpu_out_of_memory_retries_smaller_then_falls_back_to_the_cpu",)),
    Mutant("field direction matrix not transposed", "ddm4d/geometry.py",
           "return np.ascontiguousarray(d_xyz @ _direction(self.grid).T)",
           "return np.ascontiguousarray(d_xyz @ _direction(self.grid))",
           ("Testing/test_geometry.py::test_smooth_field_matches_analytic_displacement_and_warp",
            "Testing/test_geometry.py::test_physical_field_agrees_with_the_models_own_warp")),
    Mutant("Slicer grid transform sign flipped", "DDMInterpolation/DDMInterpolationLib/Conversion.py",
           "vectors = vectors.astype(np.float32) * np.diag(LPS_TO_RAS)",
           "vectors = -vectors.astype(np.float32) * np.diag(LPS_TO_RAS)",
           ("Testing/test_slicer_interpolation.py::test_hardening_the_grid_transform_reproduces_the_frame",)),
    Mutant("refinement stops a level while it still improves", "ddm4d/refine.py",
           "return tolerance > 0 and len(means) >= 2 and means[-2] - means[-1] < tolerance",
           "return tolerance > 0 and len(means) >= 2 and means[-2] - means[-1] > tolerance",
           ("Testing/test_motion.py::test_refinement_ends_a_level_when_its_objective_stops_improving_and_not_before",)),
    Mutant("the model's reversed field used without inverting it", "ddm4d/generation.py",
           'starts["reversed model"] = -velocity(paths.reverse_end)',
           'starts["reversed model"] = velocity(paths.reverse_end)',
           ("Testing/test_motion.py::test_refinement_starts_from_the_model_run_either_way_whichever_fits_the_pair",)),
)


def copy_project(destination: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=ignore, symlinks=True)
        elif source.is_file():
            shutil.copy2(source, destination / name)


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str]:
    """pytest on the copy, importing the copy's ddm4d (PYTHONPATH first); (exit code, last output line)."""
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1",
               OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        done = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout:.0f} s"
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    return done.returncode, lines[-1] if lines else ""


def check_copy_is_imported(copy: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(copy))
    where = subprocess.run([sys.executable, "-c", "import ddm4d; print(ddm4d.__file__)"], cwd=copy, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(copy.resolve()):
        sys.exit(f"mutants: the tests would import {where}, not the scratch copy; nothing was checked")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", dest="select", help="only mutants whose name contains this text")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per test run")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.select or args.select.lower() in m.name.lower()]
    if not mutants:
        print(f"no mutant matches {args.select!r}")
        return 2
    with tempfile.TemporaryDirectory(prefix="ddm4d-mutants-") as scratch:
        copy = Path(scratch) / "project"
        copy.mkdir()
        copy_project(copy)
        check_copy_is_imported(copy)
        # the unmutated tests must pass, or a "caught" mutant would mean nothing
        union = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
        code, last = run_tests(copy, union, args.timeout)
        if code != 0:
            print(f"the tests fail without any mutant ({last}); fix them first")
            return 1
        caught = 0
        for mutant in mutants:
            path = copy / mutant.path
            original = path.read_text(encoding="utf-8")
            count = original.count(mutant.old)
            if count != 1:
                print(f"STALE   {mutant.name}: its text occurs {count} times in {mutant.path}; update the mutant")
                continue
            path.write_text(original.replace(mutant.old, mutant.new), encoding="utf-8")
            started = time.perf_counter()
            try:
                code, last = run_tests(copy, mutant.tests, args.timeout)
            finally:
                path.write_text(original, encoding="utf-8")
            seconds = time.perf_counter() - started
            if code == 1:  # tests ran and failed: caught (2: interrupted / collection error, 5: no tests)
                caught += 1
                verdict = "caught "
            else:
                verdict = "MISSED " if code == 0 else "ERROR  "
            print(f"{verdict} {mutant.name} ({seconds:.0f} s): {last}", flush=True)
    print(f"mutants: {caught}/{len(mutants)} caught")
    return 0 if caught == len(mutants) else 1


if __name__ == "__main__":
    sys.exit(main())
