"""The model interface (ddm4d.interface.Model) that DDM and the VM / VM-diff baselines share, and the
one table of methods (ddm4d.methods)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import torch

from ddm4d.checkpoint import load_any_model, read_model_metadata, save_any_model
from ddm4d.config import DDMConfig
from ddm4d.interface import Model
from ddm4d.methods import BASELINE_METHODS, METHODS, MODEL_METHODS
from ddm4d.model import DDM


def _models() -> list:
    config = DDMConfig.for_dims(2, image_size=(32, 32))
    torch.manual_seed(0)
    models = [DDM(config)]
    if importlib.util.find_spec("voxelmorph") is None:  # the baselines are an optional extra
        return models
    from ddm4d.baselines import BaselineModel

    return models + [BaselineModel(config, method) for method in BASELINE_METHODS]


def test_ddm_and_the_baselines_answer_one_interface(tmp_path):
    """Each model is a Model with its own method, its code reused by generate gives the same frames, and
    save_any_model / load_any_model pick the file format from the method and back from the file."""
    axes = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    source = (torch.exp(-((axes[0] - 16) ** 2 + (axes[1] - 14) ** 2) / 40) * 2 - 1)[None, None]
    target = torch.roll(source, 2, dims=-1)
    for model in _models():
        model.eval()
        assert isinstance(model, Model) and model.method in METHODS and model.info == {}
        code = model.latent_code(source, target)
        again = model.generate(source, target, [0.0, 0.5, 1.0], code=code, chunk_size=2)
        assert torch.equal(again.frames, model.generate(source, target, [0.0, 0.5, 1.0]).frames)
        path = save_any_model(model, tmp_path / f"{model.method}.safetensors", iteration=3)
        loaded = load_any_model(path)
        assert type(loaded) is type(model) and loaded.method == model.method and loaded.info == {"iteration": 3}
        assert read_model_metadata(path)["format"] == ("ddm4d-model" if model.method == "ddm" else "ddm4d-baseline")
    assert not isinstance(object(), Model)


def test_the_methods_table_needs_no_torch():
    code = ("import sys, ddm4d.methods as m; assert 'torch' not in sys.modules, 'torch imported'; "
            "print(','.join(m.METHODS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ddm,vm,vmdiff" == ",".join(MODEL_METHODS)
    from ddm4d.evaluation import METHODS as EVALUATION, MODEL_OPTIONS  # evaluation's table derives from it

    assert list(EVALUATION) == ["initial", "linear", *METHODS] and list(MODEL_OPTIONS) == list(METHODS)
    assert all(EVALUATION[m] == MODEL_METHODS[m] for m in METHODS)

