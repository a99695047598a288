"""Model and image-folder specs of the commands' configs ('embedded', 'pipeline', a folder).

:func:`load_unet` resolves a config's model spec to UNet parameters, :func:`image_folder`
reads a folder of images at the model's size, :func:`model_image_size` is that size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxattrib.config import ConfigError
from jaxattrib.runs.rundir import RunDir


def load_model(model: str):
    """The pipeline of a config's ``model`` field: the shipped base model for ``''`` /
    ``'embedded'``, else the diffusers pipeline folder ``model``."""
    from jaxattrib.train.base_model import load_base_model
    from jaxattrib.models.pipeline import load_pipeline
    return load_base_model() if model in ("", "embedded") else load_pipeline(model)


def synthetic_spec(model, size: int | None = None):
    """The synthetic concept spec (:class:`~jaxattrib.data.synthetic.SyntheticConceptSpec`)
    that belongs to a config's ``model`` (``''`` / ``'embedded'`` / a pipeline folder): the
    ``data_spec`` of its ``jaxattrib_base.json`` (the shipped latent model's for the embedded
    one: 32 px, 6 backgrounds), else the package's 16-px pixel spec
    (:func:`jaxattrib.train.base_model.data_spec`: 3 backgrounds). ``size``: the image side
    to render at instead of the spec's (pixels). [design]"""
    import dataclasses

    from jaxattrib.train.base_model import ASSET_DIR, base_model_info, data_spec, spec_from_info
    folder = ASSET_DIR if str(model) in ("", "embedded") else Path(model)
    info_path = folder / "jaxattrib_base.json"
    info = {}
    if info_path.is_file():
        try:
            info = base_model_info(folder)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{info_path}: unreadable ({e})") from e
    spec = spec_from_info(info) if isinstance(info, dict) and "data_spec" in info \
        else data_spec()
    return spec if size is None else dataclasses.replace(spec, size=int(size))


MODEL_SPEC_HELP = ("'pipeline' (the UNet of model.pipeline), 'embedded' (the shipped base "
                   "model), a diffusers pipeline folder, or a trajectory record / `jaxattrib "
                   "train` run directory with an optional @STEP ('@0' = the weights it started "
                   "from, '@last' = the default)")


def load_unet(spec: str, pipe, field: str = "model") -> tuple[dict, str]:
    """UNet parameters named by a model spec, and a description of where they came from.

    ``spec`` (see :data:`MODEL_SPEC_HELP`): ``'pipeline'`` = ``pipe.unet_params``;
    ``'embedded'``; a pipeline folder (its UNet config must equal ``pipe``'s); ``PATH[@STEP]``
    where PATH is a record folder (``manifest.json``) or a run directory holding ``record/``.
    Errors are :class:`ConfigError` naming ``field``.
    """
    import dataclasses

    from jaxattrib.models.convert import CheckpointError
    spec = str(spec).strip()
    if not spec:
        raise ConfigError(f"{field} is empty: expected {MODEL_SPEC_HELP}")
    if spec == "pipeline":
        return pipe.unet_params, f"UNet of {pipe.folder}"
    path_s, _, step_s = spec.rpartition("@") if "@" in spec else (spec, "", "")
    path = Path(path_s).expanduser()
    record_dir = path if (path / "manifest.json").is_file() else RunDir(path).record
    if spec != "embedded" and (record_dir / "manifest.json").is_file():
        from jaxattrib.train.record import TrajectoryRecord
        rec = TrajectoryRecord.open(record_dir.resolve())
        try:
            steps = rec.steps()
            if step_s in ("", "last"):
                step = steps[-1] if steps else None
            else:
                try:
                    step = int(step_s)
                except ValueError:
                    raise ConfigError(f"{field}={spec!r}: @{step_s}: expected an integer step or "
                                      f"'last'") from None
            if step not in steps:
                raise ConfigError(f"{field}={spec!r}: {record_dir} has checkpoints {steps}, not "
                                  f"{step}")
            params = rec.load(step)["unet"]
        finally:
            rec.close()
        desc = f"{record_dir} step {step}"
    elif step_s:
        raise ConfigError(f"{field}={spec!r}: @STEP needs a record or run directory; "
                          f"{path} has no manifest.json or record/manifest.json")
    else:
        try:
            other = load_model(spec)
        except CheckpointError as e:
            raise ConfigError(f"{field}={spec!r}: expected {MODEL_SPEC_HELP}; loading it as a "
                              f"pipeline failed: {e}") from e
        if dataclasses.asdict(other.unet_config) != dataclasses.asdict(pipe.unet_config):
            raise ConfigError(f"{field}={spec!r}: its UNet config differs from model.pipeline's "
                              f"({pipe.folder}); both models must share one architecture")
        params, desc = other.unet_params, f"UNet of {other.folder}"
    from jaxattrib.authentication.cgi_dm import IncompatibleModelsError, check_compatible
    try:
        check_compatible(pipe.unet_params, params)
    except IncompatibleModelsError as e:
        raise ConfigError(f"{field}={spec!r} does not fit model.pipeline's UNet: {e}") from e
    return params, desc


def image_folder(folder: str | Path, size: int, field: str, *, default_caption: str = "",
                 labelled: bool = False) -> dict:
    """Images of a folder for authentication-style commands, sorted by relative path.

    Images directly in ``folder`` have label -1 (unknown); with ``labelled``, images in the
    sub-folders ``member/`` and ``non_member/`` have labels 1 and 0. Captions: ``prompts.txt``
    (one line per top-level image, as ``jaxattrib generate`` writes), else ``captions.jsonl``
    (``file_name`` relative to ``folder``), else ``default_caption``.

    Returns ``{'images': [N, size, size, 3] float32 in [-1, 1], 'captions': [N] str, 'ids':
    [N] str, 'labels': [N] int8}``; errors are :class:`ConfigError` naming ``field``.
    """
    from jaxattrib.data.dataset import DataError
    from jaxattrib.data.folder import (IMAGE_EXTENSIONS, load_image, notice_ignored_files,
                                       read_captions_jsonl)
    root = Path(folder).expanduser()
    if not str(folder) or not root.is_dir():
        raise ConfigError(f"{field}={str(folder)!r}: expected an existing image folder")

    def images_in(d):
        return sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    groups = [(root, -1)] + ([(root / "member", 1), (root / "non_member", 0)] if labelled
                             else [])
    paths, labels = [], []
    for d, lab in groups:
        if d.is_dir():
            found = images_in(d)
            notice_ignored_files(d, len(found), ("prompts.txt", "captions.jsonl",
                                                 "trajectory.npz"))
            paths += found
            labels += [lab] * len(found)
    if not paths:
        where = f"{root}" + (" (or its member/ and non_member/ sub-folders)" if labelled else "")
        raise ConfigError(f"{field}: no images in {where}")
    ids = [p.relative_to(root).as_posix() for p in paths]
    captions = [default_caption] * len(paths)
    prompts, jsonl = root / "prompts.txt", root / "captions.jsonl"
    if prompts.is_file():
        lines = [ln for ln in prompts.read_text().splitlines() if ln.strip()]
        top = [i for i, lab in enumerate(labels) if lab == -1]
        if len(lines) != len(top):
            raise ConfigError(f"{field}: {prompts} has {len(lines)} prompts for {len(top)} "
                              f"images in {root}")
        for i, line in zip(top, lines):
            captions[i] = line
    elif jsonl.is_file():
        try:
            caps = read_captions_jsonl(jsonl)
        except DataError as e:
            raise ConfigError(f"{field}: {e}") from e
        captions = [caps.get(i, default_caption) for i in ids]
    try:
        images = np.stack([load_image(p, size, min_size=1) for p in paths]).astype(np.float32)
    except DataError as e:
        raise ConfigError(f"{field}: {e}") from e
    return {"images": images, "captions": np.array(captions), "ids": np.array(ids),
            "labels": np.array(labels, np.int8)}


def model_image_size(pipe) -> int:
    """Pixel side of the pipeline's images (UNet sample size × the VAE's down-sampling)."""
    vae = pipe.vae_config
    return pipe.unet_config.sample_size * (1 if vae is None else
                                           2 ** (len(vae.block_out_channels) - 1))


__all__ = ["MODEL_SPEC_HELP", "image_folder", "load_unet", "model_image_size"]
