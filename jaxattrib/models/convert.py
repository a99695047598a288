"""Reading diffusers / transformers checkpoint folders into Flax parameters.

A *component folder* is what ``save_pretrained`` writes for one model: ``config.json`` plus
``*.safetensors`` weights (possibly sharded, with a ``*.safetensors.index.json``). A *pipeline
folder* holds ``model_index.json`` and one component folder per part (``unet/``,
``text_encoder/``, ``vae/``, ``tokenizer/``, ``scheduler/``).

Safety and completeness rules (shared by every model port):

* Pickle-based weights (``.bin``, ``.ckpt``, ``.pt``, ``.pth``, ``.pkl``) are refused unless the
  caller passes ``allow_pickle=True``; PyTorch is then needed to read them.
* Every tensor must be mapped: :class:`StateDict` records missing keys, unexpected keys and shape
  mismatches and :meth:`StateDict.finish` raises **one** :class:`CheckpointError` listing all of
  them. Nothing is returned half-loaded.

The per-model key mappings live beside each port (``unet.py``, ``clip_text.py``, ``vae.py``);
this module owns the file handling and the error reporting they share.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")


class CheckpointError(ValueError):
    """A checkpoint folder or file could not be read or does not match the model."""


def read_config(folder: str | os.PathLike, name: str = "config.json") -> dict:
    """Reads ``folder/name`` as JSON; raises :class:`CheckpointError` naming the file."""
    path = Path(folder) / name
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; expected the component's {name} "
                              f"(as written by save_pretrained)")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def _weight_files(folder: Path) -> tuple[list[Path], list[Path]]:
    safes = sorted(p for p in folder.iterdir() if p.name.endswith(".safetensors"))
    pickles = sorted(p for p in folder.iterdir()
                     if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))
    return safes, pickles


def _read_one_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: corrupt or unreadable safetensors file ({e})") from e
    except Exception as e:  # bf16 tensors need torch-free handling below
        if "bfloat16" in str(e) or "dtype" in str(e).lower():
            return _read_safetensors_via_flax(path)
        raise CheckpointError(f"{path}: corrupt or unreadable safetensors file ({e})") from e


def _read_safetensors_via_flax(path: Path) -> dict[str, np.ndarray]:
    from safetensors.flax import load_file
    try:
        return {k: np.asarray(v, dtype=np.float32) for k, v in load_file(str(path)).items()}
    except Exception as e:
        raise CheckpointError(f"{path}: corrupt or unreadable safetensors file ({e})") from e


def _read_pickle(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(f"{path}: reading pickle weights needs PyTorch installed") from e
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: could not read pickle weights ({e})") from e
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()}


def read_weights(folder: str | os.PathLike, *, allow_pickle: bool = False,
                 variant: str | None = None) -> dict[str, np.ndarray]:
    """All tensors of a component folder as ``{torch_key: np.ndarray}``.

    Reads every ``*.safetensors`` file in ``folder`` (sharded checkpoints included). If the
    folder holds only pickle files they are refused, unless ``allow_pickle`` is set.
    ``variant`` (e.g. ``"fp16"``) selects ``*.{variant}.safetensors`` files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory; expected a component folder "
                              f"with config.json and *.safetensors")
    safes, pickles = _weight_files(folder)
    if variant is not None:
        safes = [p for p in safes if p.name.endswith(f".{variant}.safetensors")]
    else:
        safes = [p for p in safes if len(p.name.split(".")) == 2 or "-of-" in p.name]
    if safes:
        out: dict[str, np.ndarray] = {}
        for p in safes:
            for k, v in _read_one_safetensors(p).items():
                if k in out:
                    raise CheckpointError(f"{p}: tensor {k!r} also appears in another shard")
                out[k] = v
        return out
    if pickles:
        if not allow_pickle:
            names = ", ".join(p.name for p in pickles)
            raise CheckpointError(
                f"{folder}: only pickle-based weights found ({names}). Pickle files can run "
                f"arbitrary code when loaded and are refused by default. Convert them to "
                f"safetensors (e.g. diffusers' save_pretrained(safe_serialization=True)), or "
                f"pass allow_pickle=True (CLI: --allow-pickle) if you trust the source.")
        out = {}
        for p in pickles:
            out.update(_read_pickle(p))
        return out
    raise CheckpointError(f"{folder}: no weights found; expected *.safetensors files")


class StateDict:
    """A torch-layout state dict consumed key by key, collecting every problem.

    ``take(key, shape, transform)`` returns the (transformed) array for ``key`` and marks it
    used. A missing key or a shape mismatch is recorded and a zero array of the expected shape
    returned, so a whole model can be walked before :meth:`finish` raises one error listing
    everything: missing keys, unexpected (unused) keys and shape mismatches.
    """

    def __init__(self, tensors: dict[str, np.ndarray], source: str = "<state dict>"):
        self.tensors = dict(tensors)
        self.source = source
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.mismatched: list[str] = []

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def take(self, key: str, shape: Iterable[int] | None = None,
             transform: Callable[[np.ndarray], np.ndarray] | None = None,
             dtype=np.float32) -> np.ndarray:
        """The array for ``key`` after ``transform``, checked against ``shape`` (Flax layout)."""
        shape = tuple(shape) if shape is not None else None
        if key not in self.tensors:
            self.missing.append(key)
            return np.zeros(shape or (), dtype)
        self.used.add(key)
        arr = np.asarray(self.tensors[key])
        if transform is not None:
            arr = transform(arr)
        if shape is not None and tuple(arr.shape) != shape:
            self.mismatched.append(f"{key}: got {tuple(self.tensors[key].shape)} "
                                   f"(as {tuple(arr.shape)} after layout change), "
                                   f"model expects {shape}")
            return np.zeros(shape, dtype)
        return arr.astype(dtype)

    def ignore(self, predicate: Callable[[str], bool]) -> None:
        """Marks keys matching ``predicate`` as used (buffers such as ``position_ids``)."""
        self.used.update(k for k in self.tensors if predicate(k))

    def finish(self) -> None:
        """Raises one :class:`CheckpointError` if any key was missing, unused or mis-shaped."""
        unexpected = sorted(set(self.tensors) - self.used)
        if not (self.missing or unexpected or self.mismatched):
            return
        lines = [f"{self.source}: checkpoint does not match the model configuration"]
        for title, items in (("missing tensors", self.missing),
                             ("unexpected tensors", unexpected),
                             ("shape mismatches", self.mismatched)):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {k}" for k in items[:50])
                if len(items) > 50:
                    lines.append(f"    ... and {len(items) - 50} more")
        raise CheckpointError("\n".join(lines))


# Layout changes between torch and Flax.
def linear_kernel(w: np.ndarray) -> np.ndarray:
    """torch Linear weight (out, in) -> Flax Dense kernel (in, out)."""
    return np.ascontiguousarray(w.T)


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """torch Conv2d weight (out, in, kh, kw) -> Flax Conv kernel (kh, kw, in, out)."""
    return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def conv1x1_as_linear(w: np.ndarray) -> np.ndarray:
    """torch 1x1 Conv2d weight (out, in, 1, 1) -> Flax Dense kernel (in, out)."""
    if w.ndim == 4:
        w = w[:, :, 0, 0]
    return np.ascontiguousarray(w.T)


def read_pipeline_index(folder: str | os.PathLike) -> dict:
    """``model_index.json`` of a diffusers pipeline folder."""
    return read_config(folder, "model_index.json")


def write_component(folder: str | os.PathLike, config_dict: dict,
                    tensors: dict[str, np.ndarray], weights_name: str) -> None:
    """Writes a component folder as ``save_pretrained`` does: ``weights_name`` (safetensors,
    ``format=pt`` metadata) and ``config.json``, each atomically."""
    from safetensors.numpy import save

    from jaxattrib.fileio import atomic_write_bytes, atomic_write_text
    folder = Path(folder)
    data = save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                metadata={"format": "pt"})
    atomic_write_bytes(folder / weights_name, data)
    atomic_write_text(folder / "config.json", json.dumps(config_dict, indent=2, sort_keys=True))
