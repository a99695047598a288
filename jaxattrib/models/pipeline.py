"""Loading a diffusers Stable Diffusion pipeline folder (or one component folder) into Flax.

A pipeline folder is what ``StableDiffusionPipeline.save_pretrained`` writes::

    model_index.json
    unet/           config.json + diffusion_pytorch_model.safetensors
    text_encoder/   config.json + model.safetensors                (transformers CLIPTextModel)
    vae/            config.json + diffusion_pytorch_model.safetensors  (absent: pixel space)
    tokenizer/      vocab.json + merges.txt, or tokenizer.json     (+ tokenizer_config.json)
    scheduler/      scheduler_config.json

Our design ([design]):

* :func:`load_pipeline` returns a frozen :class:`Pipeline` of ``(config, params)`` per model
  part, our offline :class:`~jaxattrib.models.tokenizer.CLIPTokenizer`, and the raw scheduler
  config dict (the diffusion code builds its schedule from it). Optional parts not used for
  attribution (``safety_checker``, ``feature_extractor``, ``image_encoder``) are ignored.
* ``vae`` may be absent from ``model_index.json`` (or ``[null, null]``): the pipeline is then a
  pixel-space model and ``Pipeline.vae_config``/``vae_params`` are ``None``.
* Every component is attempted; all failures are collected and raised as **one**
  :class:`~jaxattrib.models.convert.CheckpointError` whose lines name each failing component
  folder. Pickle weights are refused unless ``allow_pickle=True``.
* :func:`load_component` loads one component folder on its own, recognising it from its files
  (``_class_name`` / ``architectures`` in ``config.json``, tokenizer or scheduler files) and
  dispatching to the per-model ``from_pretrained``.

The UNet and VAE modules are imported lazily so that text-only use needs neither.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from jaxattrib.models.convert import CheckpointError, read_config, read_pipeline_index
from jaxattrib.models.tokenizer import CLIPTokenizer

# model_index.json class names we can load, per component.
SUPPORTED = {
    "unet": ("UNet2DConditionModel",),
    "text_encoder": ("CLIPTextModel",),
    "vae": ("AutoencoderKL",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
}
REQUIRED = ("unet", "text_encoder", "tokenizer", "scheduler")
IGNORED = ("safety_checker", "feature_extractor", "image_encoder")


@dataclasses.dataclass(frozen=True, eq=False)
class Pipeline:
    """A loaded Stable Diffusion pipeline: configs and Flax params of each part.

    ``unet_*``: :class:`~jaxattrib.models.unet.UNetConfig` and params;
    ``text_*``: :class:`~jaxattrib.models.clip_text.CLIPTextConfig` and params;
    ``vae_*``: :class:`~jaxattrib.models.vae.VAEConfig` and params, or ``None`` (pixel space);
    ``tokenizer``: offline CLIP tokenizer; ``scheduler_config``: raw
    ``scheduler/scheduler_config.json`` dict (``_class_name`` included);
    ``model_index``: raw ``model_index.json``; ``folder``: where it was loaded from.
    """

    unet_config: Any
    unet_params: dict
    text_config: Any
    text_params: dict
    tokenizer: CLIPTokenizer
    scheduler_config: dict
    vae_config: Any = None
    vae_params: dict | None = None
    model_index: dict = dataclasses.field(default_factory=dict)
    folder: str = ""

    @property
    def is_latent(self) -> bool:
        """True when the diffusion runs in a VAE latent space."""
        return self.vae_config is not None

    def encode_prompts(self, texts, *, layer: str = "last"):
        """Prompts -> text conditioning [B, L, D] (tokenizer + :func:`clip_text.encode_text`).

        ``layer='last'`` is diffusers' default; ``'penultimate'`` is ``clip_skip=1``.
        """
        from jaxattrib.models.clip_text import encode_text
        ids = self.tokenizer(texts, max_length=self.text_config.max_position_embeddings)
        return encode_text(self.text_params, self.text_config, ids, layer=layer)


def _component_class(index: dict, name: str, index_path: Path) -> str | None:
    """The class name listed for ``name`` in model_index.json (None if absent or null)."""
    entry = index.get(name)
    if entry is None:
        return None
    if (isinstance(entry, (list, tuple)) and len(entry) == 2
            and all(e is None or isinstance(e, str) for e in entry)):
        return entry[1]
    raise CheckpointError(f"{index_path}: entry {name!r} = {entry!r}; expected "
                          f"[library, class name]")


def _load_part(name: str, folder: Path, *, allow_pickle: bool, variant: str | None):
    if name == "unet":
        from jaxattrib.models import unet
        return unet.from_pretrained(folder, allow_pickle=allow_pickle, variant=variant)
    if name == "vae":
        from jaxattrib.models import vae
        return vae.from_pretrained(folder, allow_pickle=allow_pickle, variant=variant)
    if name == "text_encoder":
        from jaxattrib.models import clip_text
        return clip_text.from_pretrained(folder, allow_pickle=allow_pickle, variant=variant)
    if name == "tokenizer":
        return CLIPTokenizer.from_folder(folder)
    if name == "scheduler":
        return read_config(folder, "scheduler_config.json")
    raise ValueError(f"unknown component {name!r}")


def load_pipeline(folder: str | os.PathLike, *, allow_pickle: bool = False,
                  variant: str | None = None) -> Pipeline:
    """Loads a diffusers Stable Diffusion pipeline folder into a :class:`Pipeline`.

    Raises one :class:`CheckpointError` listing every failing component, each line naming its
    component folder (missing folder, unsupported class, bad config, missing/mis-shaped
    tensors, corrupt or pickle-only weights).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory; expected a diffusers pipeline folder "
                              f"with model_index.json")
    if not (folder / "model_index.json").is_file() and (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: has config.json but no model_index.json; this is a "
                              f"single component folder — use load_component()")
    index = read_pipeline_index(folder)
    index_path = folder / "model_index.json"
    if not isinstance(index, dict):
        raise CheckpointError(f"{index_path}: expected a JSON object")

    errors: list[str] = []
    loaded: dict[str, Any] = {}
    for name in REQUIRED + ("vae",):
        try:
            cls = _component_class(index, name, index_path)
        except CheckpointError as e:
            errors.append(f"{name}: {e}")
            continue
        sub = folder / name
        if cls is None:
            if name in REQUIRED:
                errors.append(f"{name}: {index_path} does not list a {name!r} component "
                              f"(required)")
            continue
        if name in SUPPORTED and cls not in SUPPORTED[name]:
            errors.append(f"{name}: {sub}: class {cls!r} is not supported; expected one of "
                          f"{SUPPORTED[name]}")
            continue
        if not sub.is_dir():
            errors.append(f"{name}: {sub}: missing component folder (listed in "
                          f"model_index.json as {cls!r})")
            continue
        try:
            loaded[name] = _load_part(name, sub, allow_pickle=allow_pickle, variant=variant)
        except CheckpointError as e:
            msg = str(e)
            if str(sub) not in msg:
                msg = f"{sub}: {msg}"
            errors.append(f"{name}: {msg}")
    if errors:
        body = "\n".join("  " + line.replace("\n", "\n  ") for line in errors)
        raise CheckpointError(f"{folder}: could not load the pipeline "
                              f"({len(errors)} component(s) failed):\n{body}")

    unet_config, unet_params = loaded["unet"]
    text_config, text_params = loaded["text_encoder"]
    vae_config, vae_params = loaded.get("vae", (None, None))
    _check_consistency(folder, unet_config, text_config, vae_config)
    return Pipeline(unet_config=unet_config, unet_params=unet_params,
                    text_config=text_config, text_params=text_params,
                    tokenizer=loaded["tokenizer"], scheduler_config=loaded["scheduler"],
                    vae_config=vae_config, vae_params=vae_params,
                    model_index=index, folder=str(folder))


def _check_consistency(folder: Path, unet_config, text_config, vae_config) -> None:
    """Shapes that must agree between parts (text width vs cross-attention, latent channels)."""
    problems = []
    cad = getattr(unet_config, "cross_attention_dim", None)
    cads = cad if isinstance(cad, (tuple, list)) else (cad,)
    if cad is not None and any(c != text_config.hidden_size for c in cads):
        problems.append(f"unet/config.json cross_attention_dim={cad} but text_encoder "
                        f"hidden_size={text_config.hidden_size}")
    if vae_config is not None:
        c_in = getattr(unet_config, "in_channels", None)
        if c_in is not None and c_in != vae_config.latent_channels:
            problems.append(f"unet/config.json in_channels={c_in} but vae latent_channels="
                            f"{vae_config.latent_channels}")
    if problems:
        raise CheckpointError(f"{folder}: components do not fit together:\n  "
                              + "\n  ".join(problems))


def detect_component(folder: str | os.PathLike) -> str:
    """Which component a single folder holds: 'unet', 'vae', 'text_encoder', 'tokenizer' or
    'scheduler' (from its files and ``config.json``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory")
    if (folder / "scheduler_config.json").is_file():
        return "scheduler"
    if any((folder / n).is_file() for n in ("vocab.json", "merges.txt", "tokenizer.json")):
        return "tokenizer"
    raw = read_config(folder)
    cls = raw.get("_class_name")
    archs = raw.get("architectures") or []
    if cls in SUPPORTED["unet"]:
        return "unet"
    if cls in SUPPORTED["vae"]:
        return "vae"
    if raw.get("model_type") == "clip_text_model" or "CLIPTextModel" in archs:
        return "text_encoder"
    raise CheckpointError(f"{folder / 'config.json'}: cannot tell which component this is "
                          f"(_class_name={cls!r}, architectures={archs!r}); supported: "
                          f"UNet2DConditionModel, AutoencoderKL, CLIPTextModel, a CLIP "
                          f"tokenizer or a scheduler folder")


def load_component(folder: str | os.PathLike, *, allow_pickle: bool = False,
                   variant: str | None = None) -> tuple[str, Any]:
    """Loads one component folder: ``(kind, value)`` where value is ``(config, params)`` for
    'unet' / 'vae' / 'text_encoder', a :class:`CLIPTokenizer` for 'tokenizer' and the raw
    config dict for 'scheduler'."""
    kind = detect_component(folder)
    return kind, _load_part(kind, Path(folder), allow_pickle=allow_pickle, variant=variant)
