"""Loading ml_collections experiment configs (``configs/*.py`` with ``get_config()``).

A config file is a Python file defining ``get_config(arg: str | None = None) ->
ml_collections.ConfigDict`` (big_vision style: ``path/to/config.py:arg`` passes ``arg``).
``overrides`` are ``dotted.key=value`` strings parsed as Python literals (fallback: string),
applied with the ConfigDict's type checking so a typo or wrong type is an error naming the key.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import Sequence

import ml_collections


class ConfigError(ValueError):
    """A config file or override could not be applied."""


def _configs_dir() -> Path:
    return Path(__file__).resolve().parent / "configs"


def resolve_config_path(name: str) -> Path:
    """A config path, or a bare name (``demo``) looked up in the package's ``configs/``."""
    p = Path(name)
    if p.suffix == ".py" and p.is_file():
        return p
    cand = _configs_dir() / f"{name}.py"
    if cand.is_file():
        return cand
    known = sorted(q.stem for q in _configs_dir().glob("*.py") if q.stem != "__init__")
    raise ConfigError(f"config {name!r}: no such file, and not one of the packaged configs "
                      f"{known}")


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """``spec`` = ``path.py`` / ``name`` / ``path.py:arg``; returns the ConfigDict with overrides."""
    path_s, _, arg = spec.partition(":")
    path = resolve_config_path(path_s)
    module_spec = importlib.util.spec_from_file_location(f"_jaxattrib_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError(f"{path}: could not be executed ({type(e).__name__}: {e})") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: defines no get_config()")
    config = module.get_config(arg) if arg else module.get_config()
    return apply_overrides(config, overrides, source=str(path))


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str],
                    source: str = "config") -> ml_collections.ConfigDict:
    """Applies ``key.sub=value`` overrides; unknown keys and type errors name the key."""
    config = ml_collections.ConfigDict(config.to_dict()) if config is not None else None
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        node = config
        parts = key.split(".")
        for part in parts[:-1]:
            if part not in node:
                raise ConfigError(f"override {item!r}: {source} has no field {key!r}")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"override {item!r}: {source} has no field {key!r}")
        old = node[parts[-1]]
        if isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if key in NUMBER_OR_NAME_FIELDS and isinstance(value, (int, float, str)) \
                and not isinstance(value, bool):
            del node[parts[-1]]                # a number or a name: the type may change
            if isinstance(value, int):
                value = float(value)
        if key in INT_OR_STEPS_FIELDS and isinstance(value, (int, list, tuple)) \
                and not isinstance(value, bool):
            del node[parts[-1]]                # M or a tuple of steps: the type may change
            value = tuple(value) if isinstance(value, list) else value
        try:
            node[parts[-1]] = value
        except (TypeError, ValueError) as e:
            raise ConfigError(f"override {item!r}: {e}") from e
    return config


#: fields that take either a number or a name (e.g. ``decision.delta0=0.15`` or
#: ``decision.delta0=calibrated``); every other override keeps the field's type
NUMBER_OR_NAME_FIELDS = ("decision.delta0",)
#: fields that take an int M (the last M checkpoints) or a tuple of checkpoint steps
INT_OR_STEPS_FIELDS = ("attribution.checkpoints",)


#: ``attribution`` fields added after run directories existed, with what those runs did: D-TRAK
#: / TRAK noise shared by all examples, one checkpoint, Concept-TRAK's inversion without CFG and
#: its query pairs by inversion (issue 19). A stored config whose
#: ``attribution`` section lacks one was made then; :func:`adopt_legacy` keeps it on that value.
ATTRIBUTION_LEGACY = {"attribution.noise": "shared", "attribution.checkpoints": 1,
                      "attribution.concept_inversion_guidance": 1.0,
                      "attribution.concept_query_pairs": "invert",
                      "attribution.concept_query_eta": 0.1}


def adopt_legacy(stored: dict, current, legacy: dict = ATTRIBUTION_LEGACY) -> list[str]:
    """For each ``'section.field'`` of ``legacy``: where ``stored`` (a run's ``config.json`` as
    a dict) has the section without the field and ``current`` (dict or ConfigDict, changed in
    place) has it, sets ``current``'s field to the legacy value, so the run resumes with what
    it was made with. Returns the dotted names whose current value this changed (for a
    notice)."""
    changed = []
    for dotted, value in legacy.items():
        *sections, name = dotted.split(".")
        old, new = stored, current
        for sec in sections:
            old = old.get(sec) if isinstance(old, dict) else None
            new = new[sec] if new is not None and sec in new else None
        if isinstance(old, dict) and name not in old and new is not None and name in new:
            if new[name] != value:
                changed.append(f"{dotted}={new[name]!r} -> {value!r}")
            new[name] = value
    return changed


def fields_from_section(cls, section, *, strict: bool = False, keys: dict | None = None,
                        **overrides) -> dict:
    """Keyword arguments for the dataclass ``cls`` from a config section: every field of
    ``cls`` that ``section`` (a ConfigDict or mapping) holds, then ``overrides`` (which win).
    Fields in neither keep the dataclass defaults; keys of ``section`` that are not fields are
    ignored, or with ``strict`` a ``TypeError`` naming them. ``keys`` (``{field: section
    key}``), when given, is the whole mapping: only those fields are read, each from its
    section key (e.g. ConceptTRAKConfig's ``proj_dim`` from ``attribution.k``), and strict mode
    refuses the section keys it does not name. [design] The one mapping behind the
    ``from_section`` classmethods: what differs between callers (e.g. the demo's constant
    schedule) is passed as ``overrides`` at the call, so every default stays where it is."""
    import dataclasses
    names = [f.name for f in dataclasses.fields(cls)]
    if keys is None:
        keys = {n: n for n in names}
    elif set(keys) - set(names):
        raise TypeError(f"{cls.__name__}: keys names no field: {sorted(set(keys) - set(names))}")
    unknown = sorted(set(section) - set(keys.values()))
    if strict and unknown:
        raise TypeError(f"{cls.__name__}: not a field: {unknown}")
    kw = {n: section[k] for n, k in keys.items() if k in section}
    kw.update(overrides)
    return kw
