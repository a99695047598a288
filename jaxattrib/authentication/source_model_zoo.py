"""The model zoo of source-model attribution: models fine-tuned with a known share ρ of a source
model's generations, and the suspect source model itself.

:func:`build_model_zoo` fine-tunes ``base_params`` on :func:`mix_training_set` (a fraction ρ of
generated images, the rest real) for each ρ of ``DEFAULT_RHOS`` and several seeds
(:func:`member_seed`), resumably (``zoo.json`` manifest + one ``.msgpack`` per member; a zoo
built for another config is refused with :class:`ZooMismatchError`); the statistical-level
discriminator of :mod:`jaxattrib.authentication.source_model` is trained on such a zoo.
:func:`diffusion_finetune_fn` is the fine-tuning used for diffusion models.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import flax.serialization
import flax.struct
import jax
import numpy as np
from jaxattrib.authentication.source_model import SourceModelError

logger = logging.getLogger(__name__)


DEFAULT_RHOS = (0.0, 0.3, 0.5, 0.7, 1.0)


class ZooMismatchError(SourceModelError):
    """A run directory holds a model zoo built with another configuration or data."""


@dataclasses.dataclass(frozen=True)
class ZooMember:
    """One zoo model. ``role``: 'source' | 'infringing' | 'innocent'; ``label`` 1 = infringing;
    ``rho`` is the generated fraction of its training set (-1 for the source).
    ``n_generated``/``n_real``: how many training images came from the source's generations /
    from real data, with their ids; ``path``: params file relative to the run directory."""

    name: str
    role: str
    rho: float
    index: int
    seed: int
    label: int
    n_generated: int
    n_real: int
    ids: tuple[str, ...]
    path: str

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ids"] = list(self.ids)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "ZooMember":
        d = dict(d)
        d["ids"] = tuple(d["ids"])
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class ModelZoo:
    """The built zoo: ``run_dir`` and ``members`` (source first if present, then by ρ, index)."""

    run_dir: Path
    members: tuple[ZooMember, ...]

    def load(self, member: ZooMember | str) -> Any:
        """The params pytree saved for a member (by name or :class:`ZooMember`)."""
        name = member if isinstance(member, str) else member.name
        m = {x.name: x for x in self.members}.get(name)
        if m is None:
            raise SourceModelError(f"ModelZoo: no member {name!r} in {self.run_dir}")
        return load_params(self.run_dir / m.path)

    def suspects(self) -> tuple[ZooMember, ...]:
        """Infringing and innocent members (the source excluded)."""
        return tuple(m for m in self.members if m.role != "source")

    def split(self, n_shadow: int) -> tuple[tuple[ZooMember, ...], tuple[ZooMember, ...]]:
        """``(shadow, held_out)``: per ρ, members with ``index < n_shadow`` are shadows."""
        sus = self.suspects()
        return (tuple(m for m in sus if m.index < n_shadow),
                tuple(m for m in sus if m.index >= n_shadow))


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_params(path: str | os.PathLike, params: Any) -> Path:
    """Writes a params pytree (nested dicts of arrays) as flax msgpack, atomically."""
    path = Path(path)
    host = jax.tree.map(lambda a: np.asarray(jax.device_get(a)), params)
    _atomic_write_bytes(path, flax.serialization.msgpack_serialize(host))
    return path


def load_params(path: str | os.PathLike) -> Any:
    """Reads a params pytree written by :func:`save_params` (numpy arrays)."""
    path = Path(path)
    if not path.is_file():
        raise SourceModelError(f"params file {path} does not exist")
    return flax.serialization.msgpack_restore(path.read_bytes())


def member_seed(seed: int, rho_index: int, index: int) -> int:
    """Per-member seed (data subset and fine-tuning), a pure function of its position."""
    return int(np.random.SeedSequence([int(seed), int(rho_index), int(index)])
               .generate_state(1)[0] & 0x7FFFFFFF)


def mix_training_set(real, generated, rho: float, n_train: int, seed: int):
    """``n_train`` examples: ``round(rho·n_train)`` of ``generated`` and the rest of ``real``,
    each drawn without replacement by ``numpy.random.default_rng(seed)``; generated first.

    ``real`` and ``generated`` are :class:`~jaxattrib.data.dataset.ImageDataset` (ids must not
    collide). Returns ``(dataset, n_generated, n_real)``.
    """
    from jaxattrib.data.dataset import concat
    if not 0.0 <= rho <= 1.0:
        raise SourceModelError(f"rho={rho} must be in [0, 1]")
    n_gen = int(round(rho * n_train))
    n_real = n_train - n_gen
    if n_gen > len(generated) or n_real > len(real):
        raise SourceModelError(f"rho={rho}, n_train={n_train} needs {n_gen} generated and "
                               f"{n_real} real examples; have {len(generated)} and {len(real)}")
    rng = np.random.default_rng(seed)
    parts = []
    if n_gen:
        parts.append(generated.subset(np.sort(rng.permutation(len(generated))[:n_gen])))
    if n_real:
        parts.append(real.subset(np.sort(rng.permutation(len(real))[:n_real])))
    ds = parts[0] if len(parts) == 1 else concat(parts)
    return ds, n_gen, n_real


def _rho_name(rho: float) -> str:
    return f"rho{int(round(rho * 100)):03d}"


def _read_manifest(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ZooMismatchError(f"{path}: not valid JSON ({e})") from e


def _write_manifest(path: Path, config: dict, members: Sequence[ZooMember]) -> None:
    text = json.dumps({"config": config, "members": [m.to_dict() for m in members]}, indent=1)
    _atomic_write_bytes(path, text.encode())


def build_model_zoo(base_params: Any, source_params: Any, real, generated,
                    run_dir: str | os.PathLike,
                    finetune_fn: Callable[[Any, Any, int, Path], Any], *,
                    rhos: Sequence[float] = DEFAULT_RHOS, n_models: int = 2,
                    n_train: int | None = None, seed: int = 0,
                    progress: bool = False) -> ModelZoo:
    """Fine-tunes and caches the infringing (ρ > 0) and innocent (ρ = 0) models; resumable.

    Args:
      base_params: the base model's params, passed to ``finetune_fn`` as the initial point.
      source_params: the source model's params (saved as member ``'source'``) or None.
      real: :class:`~jaxattrib.data.dataset.ImageDataset` of real (non-source) images.
      generated: the source model's generations with their prompts as captions.
      run_dir: where ``zoo.json`` and ``members/<name>/params.msgpack`` live.
      finetune_fn: ``(init_params, dataset, seed, workdir) -> params``; ``workdir`` is the
        member's folder (for a resumable trajectory record, see
        :func:`diffusion_finetune_fn`). Its result is what :meth:`ModelZoo.load` returns.
      rhos: generated fractions; 0 gives innocent models.
      n_models: models per ρ (member ``index`` 0..n_models-1).
      n_train: training-set size of every model (default ``min(len(real), len(generated))``).
      seed: zoo seed; member seeds come from :func:`member_seed`.
      progress: print one line per member.
    Returns:
      :class:`ModelZoo`. Raises :class:`ZooMismatchError` when ``run_dir`` holds a zoo with a
      different configuration or different data (fingerprints).
    """
    run_dir = Path(run_dir)
    rhos = tuple(float(r) for r in rhos)
    if len(set(rhos)) != len(rhos) or not rhos:
        raise SourceModelError(f"rhos must be distinct and non-empty; got {rhos}")
    if n_models < 1:
        raise SourceModelError(f"n_models must be >= 1; got {n_models}")
    n_train = min(len(real), len(generated)) if n_train is None else int(n_train)
    config = {"rhos": list(rhos), "n_models": int(n_models), "n_train": n_train,
              "seed": int(seed), "real": real.fingerprint(),
              "generated": generated.fingerprint(),
              "has_source": source_params is not None, "format": "jaxattrib.zoo/v1"}
    manifest_path = run_dir / "zoo.json"
    old = _read_manifest(manifest_path)
    done: dict[str, ZooMember] = {}
    if old is not None:
        if old.get("config") != config:
            diff = sorted(k for k in set(config) | set(old.get("config", {}))
                          if config.get(k) != old.get("config", {}).get(k))
            raise ZooMismatchError(f"{manifest_path}: the zoo there was built with another "
                                   f"configuration (differs in {diff}); use a new run directory")
        done = {m["name"]: ZooMember.from_dict(m) for m in old.get("members", [])}

    members: list[ZooMember] = []

    def finish(member: ZooMember, make: Callable[[], Any]) -> None:
        if member.name in done and (run_dir / member.path).is_file():
            members.append(done[member.name])
            return
        if progress:
            logger.info("[zoo] building %s (rho=%s, seed=%s)", member.name, member.rho, member.seed)
        save_params(run_dir / member.path, make())
        members.append(member)
        _write_manifest(manifest_path, config, members + [m for n, m in done.items()
                                                          if n not in {x.name for x in members}])

    if source_params is not None:
        finish(ZooMember("source", "source", -1.0, 0, int(seed), 0, 0, 0, (),
                         "members/source/params.msgpack"), lambda: source_params)
    for ri, rho in enumerate(rhos):
        for i in range(n_models):
            s = member_seed(seed, ri, i)
            ds, n_gen, n_real = mix_training_set(real, generated, rho, n_train, s)
            name = f"{_rho_name(rho)}_{i:02d}"
            m = ZooMember(name, "infringing" if rho > 0 else "innocent", rho, i, s,
                          int(rho > 0), n_gen, n_real, ds.ids, f"members/{name}/params.msgpack")
            workdir = run_dir / "members" / name
            finish(m, lambda: finetune_fn(base_params, ds, s, workdir))
    _write_manifest(manifest_path, config, members)
    return ModelZoo(run_dir=run_dir, members=tuple(members))


def build_source_model(base_params: Any, source_data, run_dir: str | os.PathLike,
                       finetune_fn: Callable[[Any, Any, int, Path], Any], *,
                       seed: int = 0) -> Any:
    """Fine-tunes the source model from the base on ``source_data``; cached, resumable.

    The source is the model whose generations the infringers train on; it should memorize
    some of ``source_data`` (e.g. duplicated or few images per caption, several epochs). Its
    params go to ``run_dir/source/params.msgpack`` with ``run_dir/source/source.json`` (seed and
    data fingerprint); a second call returns them without training, and a call with another
    seed or data raises :class:`ZooMismatchError`. ``finetune_fn`` as in
    :func:`build_model_zoo` (its workdir is ``run_dir/source``).
    """
    folder = Path(run_dir) / "source"
    config = {"seed": int(seed), "data": source_data.fingerprint(), "n": len(source_data),
              "format": "jaxattrib.source/v1"}
    meta, params_path = folder / "source.json", folder / "params.msgpack"
    old = _read_manifest(meta)
    if old is not None and old != config:
        raise ZooMismatchError(f"{meta}: the source model there was built with another seed or "
                               f"data; use a new run directory")
    if old is not None and params_path.is_file():
        return load_params(params_path)
    _atomic_write_bytes(meta, json.dumps(config, indent=1).encode())
    params = finetune_fn(base_params, source_data, int(seed), folder)
    save_params(params_path, params)
    return load_params(params_path)


def diffusion_finetune_fn(pipe, train_config, *, mesh=None, progress: bool = False
                          ) -> Callable[[Any, Any, int, Path], dict]:
    """A ``finetune_fn`` for :func:`build_model_zoo` that fine-tunes a pipeline's UNet.

    Uses :func:`jaxattrib.train.finetune.finetune` with the loss of
    :func:`jaxattrib.train.diffusion_task.make_diffusion_loss`; the member's seed replaces
    ``train_config.seed``; the trajectory record goes to ``workdir / 'record'`` (so an
    interrupted member resumes). ``init_params`` is ``{'unet': ...}`` (the text encoder and VAE
    of ``pipe`` are frozen); returns ``{'unet': fine-tuned params}`` — pass
    ``params['unet']`` to :func:`pipeline_generate_fn`.
    """
    from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
    from jaxattrib.train.diffusion_task import make_diffusion_loss
    from jaxattrib.train.finetune import finetune

    if getattr(train_config, "train_text_encoder", False):
        raise SourceModelError("diffusion_finetune_fn trains the UNet only")
    sched = schedule_from_diffusers_config(pipe.scheduler_config)
    loss_fn = make_diffusion_loss(pipe.unet_config, pipe.text_config, sched, pipe.vae_config)

    def finetune_fn(init_params, dataset, seed, workdir):
        params = {"unet": init_params["unet"], "text_encoder": pipe.text_params}
        if pipe.vae_config is not None:
            params["vae"] = pipe.vae_params
        ids = pipe.tokenizer(list(dataset.captions),
                             max_length=pipe.text_config.max_position_embeddings)

        def get_batch(idx):
            return {"images": dataset.images[idx], "input_ids": ids[idx]}

        cfg = dataclasses.replace(train_config, seed=int(seed))
        out, _ = finetune(loss_fn, params, len(dataset), get_batch, cfg,
                          Path(workdir) / "record", mesh=mesh, progress=progress,
                          dataset_info={"fingerprint": dataset.fingerprint()})
        return {"unet": out["unet"]}
    return finetune_fn


__all__ = ["DEFAULT_RHOS", "ModelZoo", "ZooMember", "ZooMismatchError", "build_model_zoo",
           "build_source_model", "diffusion_finetune_fn", "load_params", "member_seed",
           "mix_training_set", "save_params"]
