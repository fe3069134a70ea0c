"""Which CPU layout is fastest for our networks (kept for the record; the numbers are in
docs/measurements.md, "Speed and memory").

PyTorch picks oneDNN for a 3D convolution only when batch*channels*D*H > 20480 (or batch > 1);
otherwise it takes a slow generic path. ddm4d.model runs the networks with z last and the
networks channels-last; this script times that against alternatives.

    python benchmarks/variants.py [threads] [variant ...]
"""
import sys
import time

import torch

from ddm4d.config import DDMConfig
from ddm4d.model import DDM


def run(variant: str, size=(128, 128, 32), frames: int = 10) -> dict:
    torch.manual_seed(0)
    m = DDM(DDMConfig(image_size=size))
    if variant == "no_channels_last":
        m.to(memory_format=torch.contiguous_format)
    shape = (1, 1) + tuple(reversed(size))
    s = torch.rand(shape) * 2 - 1
    t = torch.rand(shape) * 2 - 1
    opt = torch.optim.Adam(m.parameters())

    def step():
        loss = m.training_losses(s, t)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    result = {"variant": variant}
    step()
    t0 = time.perf_counter()
    step()
    result["train_s"] = time.perf_counter() - t0
    for chunk in (5, 10):
        with torch.no_grad():
            m.generate(s, t, torch.linspace(0, 1, frames), chunk_size=chunk)
            t0 = time.perf_counter()
            m.generate(s, t, torch.linspace(0, 1, frames), chunk_size=chunk)
        result[f"generate_chunk{chunk}_s"] = time.perf_counter() - t0
    return result


if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    for variant in sys.argv[2:] or ["default", "no_channels_last"]:
        print(run(variant), flush=True)
