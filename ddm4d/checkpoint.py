"""Model and training-state files: safetensors tensors + JSON metadata, written atomically.

Nothing here unpickles: safetensors stores raw tensors and a JSON header, so a file handed in by a user
cannot execute code. Files that look like PyTorch pickles or zip archives are refused before any read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import DDMConfig
from .errors import InputError
from .files import atomic_write  # noqa: F401  (one implementation, in ddm4d.files; re-exported for callers)
from .runfolder import MODEL_FORMAT  # the formats have one owner, ddm4d.runfolder



def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Tensors (made contiguous, on CPU) and JSON-serialisable metadata in one safetensors file."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {k: json.dumps(v) for k, v in metadata.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


_PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin"}


def _refuse_non_safetensors(path: Path) -> None:
    """Only a safetensors layout passes: 8-byte little-endian header length, then a JSON header."""
    if not path.is_file():
        raise InputError(f"model file {path} does not exist; pass a .safetensors file written by ddm4d")
    pickle_message = (f"{path} looks like a PyTorch pickle/zip checkpoint; ddm4d never unpickles files "
                      "(they can run code). Use a .safetensors model written by ddm4d")
    if path.suffix in _PICKLE_SUFFIXES:
        raise InputError(pickle_message)
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= path.stat().st_size:
        return
    if head[:2] == b"PK" or head[:1] == b"\x80":  # zip archive (torch.save) or pickle protocol 2+
        raise InputError(pickle_message)
    raise InputError(f"{path} is not a safetensors file; pass a .safetensors model written by ddm4d")


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    _refuse_non_safetensors(path)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise InputError(f"{path} is not a readable safetensors file ({err}); pass a model written by ddm4d") from None
    except Exception as err:  # safetensors raises its own SafetensorError for corrupt headers
        raise InputError(f"{path} is corrupt or not a safetensors file ({err})") from None
    return tensors, meta


def save_model(model, path: str | os.PathLike, **info: Any) -> Path:
    """Weights of a :class:`ddm4d.model.DDM` and its configuration (and free `info`) in one file."""
    return save_tensors(path, dict(model.state_dict()),
                        {"format": MODEL_FORMAT, "config": model.config.to_dict(), "info": info})


def read_model_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a model file, without loading its weights."""
    path = Path(path)
    _refuse_non_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    except Exception as err:
        raise InputError(f"{path} is corrupt or not a safetensors file ({err})") from None


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """A :class:`ddm4d.model.DDM` from a model file, in eval mode on `device`."""
    from .model import DDM

    path = Path(path)
    tensors, meta = load_tensors(path, "cpu")
    if meta.get("format") != MODEL_FORMAT or "config" not in meta:
        raise InputError(f"{path} is a safetensors file but not a ddm4d model (no ddm4d configuration inside); "
                         "pass a model written by `ddm4d train` or ddm4d.save_model")
    try:
        config = DDMConfig.from_dict(meta["config"])
        model = DDM(config)
        model.load_state_dict(tensors, strict=True)
    except (ValueError, RuntimeError) as err:
        raise InputError(f"{path}: model configuration and weights do not fit this ddm4d ({err})") from None
    model.info = meta.get("info", {})
    return model.to(device).eval()


def load_any_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """A DDM or a VM / VM-diff baseline (a :class:`ddm4d.interface.Model`), chosen by the file's "format";
    pickles are refused before any read."""
    from .baselines import BASELINE_FORMAT, load_baseline

    kind = read_model_metadata(path).get("format")
    loaders = {MODEL_FORMAT: load_model, BASELINE_FORMAT: load_baseline}
    if kind not in loaders:
        raise InputError(f"{path} is a safetensors file but not a ddm4d model (format {kind!r}); pass a model "
                         "written by `ddm4d train`")
    return loaders[kind](path, device)


def save_any_model(model, path: str | os.PathLike, **info: Any) -> Path:
    """Any :class:`ddm4d.interface.Model` in the file format of its `method`: save_model for DDM,
    ddm4d.baselines.save_baseline for VM / VM-diff."""
    from .methods import DDM_METHOD

    if model.method == DDM_METHOD:
        return save_model(model, path, **info)
    from .baselines import save_baseline

    return save_baseline(model, path, **info)
