"""The benchmark scripts as a user runs them where they cannot measure (no GPU), and their reports."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import bench  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: the benchmark would measure it")
def test_gpu_benchmark_without_a_gpu_says_so_and_exits_0(tmp_path):
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench.py"), "--device", "cuda", "--name",
                           str(tmp_path / "gpu")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "no CUDA GPU here" in done.stdout and "nothing measured" in done.stdout
    assert not list(tmp_path.iterdir())  # nothing written


def test_gpu_run_times_the_compiled_networks_and_a_failed_case_reads_as_such():
    assert {"generate", "generate_compiled", "train", "train_compiled"} <= set(bench.DEFAULT_CASES["cuda"].split(","))
    report = {"machine": "m", "device": "cuda", "threads": 2, "size": [128, 128, 32], "torch": "2", "frames": 10,
              "results": [{"case": "generate", "seconds_min": 0.04, "gflops": 5000.0, "matmul_gflops_after": 9000.0,
                           "fraction_of_matmul": 0.55, "peak_memory_gib": 0.8},
                          {"case": "generate_compiled", "error": "RuntimeError: capture failed",
                           "matmul_gflops_after": 9000.0}]}
    text = bench.markdown(report)
    assert "| generate | 0.040 |" in text
    assert "| generate_compiled | failed: RuntimeError: capture failed |" in text


def test_a_compiled_case_that_cannot_compile_reports_the_reason(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler\nmore detail")
    monkeypatch.setattr(bench, "compiled_case", broken)
    result = bench.case("generate_compiled", [16, 16, 8], "cpu", 2, 1)
    assert result == {"case": "generate_compiled", "error": "RuntimeError: no compiler"}
