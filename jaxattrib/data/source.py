"""Training sets read on demand: :class:`DataSource` and its kinds (see ``docs/data.md``).

[design] A data source holds only per-example metadata in memory (ids, captions, integer
labels); pixels are read when asked for, row by row, so a run over 100k images at 512 px never
holds more than the batch (or featurization chunk) it works on. Every source has

* ``fingerprint()``: a sha256 hex digest of its content, computed once by a streaming pass
  (folder: file bytes; tfds: each record's stored image; synthetic: spec + seed, since the
  renderer is deterministic; digits: the selected raw 8x8 arrays; npz / memory: the float32
  pixels, identical to :meth:`ImageDataset.fingerprint`). Ids and captions are always part of
  it, and the options that change pixels (``size``, ``min_size``, ...).
* ``describe()``: a JSON-able reference (``kind``, arguments, ``n``, ``fingerprint``) from which
  :func:`open_source` builds the same source again, e.g. in a run directory's
  ``data/source.json``.
* ``read(indices)``: float32 ``[b, H, W, 3]`` in ``[-1, 1]``, one example at a time, so a row's
  pixels do not depend on which other rows are read with it (streamed and in-memory fine-tuning
  see identical bytes).

:func:`iter_batches` streams batches through grain (``grain.MapDataset`` + threaded prefetch;
chosen over tfds data sources because it is a 5 MB pure-python package without TensorFlow that
reads any random-access source, tfds' array_record ones included; see ``docs/data.md``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from jaxattrib.data.dataset import DataError, ImageDataset, pixel_fingerprint

KINDS = ("folder", "synthetic", "digits", "tfds", "npz", "memory", "subset")


def _hash_strings(h, *fields: Sequence[str]) -> None:
    for field in fields:
        for s in field:
            b = str(s).encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
        h.update(b"\1")


def _as_indices(indices, n: int) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise DataError(f"indices out of range for {n} examples: "
                        f"{idx[(idx < 0) | (idx >= n)][:5].tolist()}")
    return idx


class ImageRows:
    """A lazy array-like view ``[N, H, W, 3]`` float32 of a source's images: ``a[lo:hi]``,
    ``a[int_array]`` and ``a[i]`` read those rows (numpy); ``shape``, ``dtype``, ``len``.
    Use it where code slices an image array per chunk (``trak.featurize``)."""

    def __init__(self, source: "DataSource"):
        self.source = source
        self.shape = (len(source), *source.image_shape)
        self.dtype = np.dtype(np.float32)
        self.ndim = 4

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, tuple):
            return self[key[0]][(slice(None), *key[1:])]
        if isinstance(key, slice):
            return self.source.read(np.arange(*key.indices(len(self))))
        if isinstance(key, (int, np.integer)):
            return self.source.read([int(key) % len(self)])[0]
        return self.source.read(key)

    def __array__(self, dtype=None, copy=None):
        out = self.source.read(np.arange(len(self)))
        return out if dtype is None else out.astype(dtype)


class DataSource:
    """Base class: subclasses set ``ids``, ``captions``, ``labels``, ``label_names``,
    ``image_shape`` and implement ``_read_one``, ``_fingerprint`` and ``_args``."""

    kind = "abstract"
    ids: tuple[str, ...]
    captions: tuple[str, ...]
    labels: Mapping[str, np.ndarray]
    label_names: Mapping[str, tuple[str, ...]]
    image_shape: tuple[int, int, int]

    def _init_meta(self, ids, captions, labels=None, label_names=None, image_shape=None):
        self.ids = tuple(str(i) for i in ids)
        self.captions = tuple(str(c) for c in captions)
        if len(self.captions) != len(self.ids):
            raise DataError(f"{self.kind}: {len(self.captions)} captions for {len(self.ids)} ids")
        if len(set(self.ids)) != len(self.ids):
            raise DataError(f"{self.kind}: ids must be unique")
        self.labels = {k: np.asarray(v, np.int32) for k, v in (labels or {}).items()}
        self.label_names = {k: tuple(v) for k, v in (label_names or {}).items()}
        self.image_shape = tuple(int(d) for d in image_shape)
        self._fp = None

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} n={len(self)} image_shape={self.image_shape}>"

    # ------------------------------------------------------------------ subclass hooks
    def _read_one(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def _fingerprint(self) -> str:
        raise NotImplementedError

    def _args(self) -> dict:
        raise NotImplementedError

    # ------------------------------------------------------------------ public API
    def read(self, indices) -> np.ndarray:
        """float32 ``[b, H, W, 3]`` in ``[-1, 1]``: the examples at ``indices`` in that order."""
        idx = _as_indices(indices, len(self))
        out = np.empty((idx.size, *self.image_shape), np.float32)
        for j, i in enumerate(idx):
            x = np.asarray(self._read_one(int(i)), np.float32)
            if x.shape != self.image_shape:
                raise DataError(f"{self.kind} example {self.ids[i]!r}: image shape {x.shape}, "
                                f"expected {self.image_shape}")
            out[j] = x
        return out

    def batch(self, indices) -> dict[str, Any]:
        """``{'images' [b,H,W,3], 'captions', 'ids', 'indices' [b], 'labels'}`` of ``indices``."""
        idx = _as_indices(indices, len(self))
        return {"images": self.read(idx), "captions": tuple(self.captions[i] for i in idx),
                "ids": tuple(self.ids[i] for i in idx), "indices": idx,
                "labels": {k: v[idx] for k, v in self.labels.items()}}

    @property
    def images(self) -> ImageRows:
        return ImageRows(self)

    def fingerprint(self) -> str:
        """sha256 hex of the data (computed once, by one streaming pass; see module doc)."""
        if self._fp is None:
            self._fp = self._fingerprint()
        return self._fp

    def describe(self) -> dict:
        """JSON-able reference: ``{'kind', **arguments, 'n', 'fingerprint'}``."""
        return {"kind": self.kind, **self._args(), "n": len(self),
                "fingerprint": self.fingerprint()}

    def subset(self, indices) -> "SubsetSource":
        return SubsetSource(self, indices)

    def to_dataset(self) -> ImageDataset:
        """All of it in memory (small sets and tests only)."""
        return ImageDataset(images=self.read(np.arange(len(self))), captions=self.captions,
                            labels=self.labels, label_names=self.label_names, ids=self.ids,
                            meta={"source": self.kind, **self._args()})


# ---------------------------------------------------------------------------------- kinds

class MemorySource(DataSource):
    """An in-memory :class:`ImageDataset` as a source (its fingerprint is the data set's)."""

    kind = "memory"

    def __init__(self, dataset: ImageDataset):
        self.dataset = dataset
        self._init_meta(dataset.ids, dataset.captions, dataset.labels, dataset.label_names,
                        dataset.image_shape)

    def _read_one(self, i):
        return self.dataset.images[i]

    def read(self, indices):
        return np.array(self.dataset.images[_as_indices(indices, len(self))], np.float32)

    def _fingerprint(self):
        return self.dataset.fingerprint()

    def _args(self):
        return {}


class NpzSource(DataSource):
    """A legacy run directory's ``data/train.npz`` (``images``, ``captions``, ``ids``): the
    pixels are loaded on first read; the fingerprint equals the ImageDataset one that such runs
    recorded in their manifest."""

    kind = "npz"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with np.load(self.path) as z:
                ids, captions = z["ids"].tolist(), z["captions"].tolist()
                shape = z["images"].shape
        except (OSError, KeyError, ValueError) as e:
            raise DataError(f"{self.path}: expected an npz with images, captions and ids "
                            f"({e})") from e
        self._images = None
        self._init_meta(ids, captions, image_shape=shape[1:])

    def _pixels(self):
        if self._images is None:
            with np.load(self.path) as z:
                self._images = np.asarray(z["images"], np.float32)
        return self._images

    def _read_one(self, i):
        return self._pixels()[i]

    def read(self, indices):
        return np.array(self._pixels()[_as_indices(indices, len(self))], np.float32)

    def _fingerprint(self):
        return pixel_fingerprint(self._pixels(), self.captions, self.ids)

    def _args(self):
        return {"path": str(self.path.resolve())}


class FolderSource(DataSource):
    """A DreamBooth-layout image folder (:mod:`jaxattrib.data.folder`), read image by image.

    Same listing, captions, labels, ids and pixels as :func:`~jaxattrib.data.folder.load_folder`
    with ``on_error='raise'``; a bad image raises :class:`DataError` naming its path when it is
    read (the fingerprint pass reads file bytes only)."""

    kind = "folder"

    def __init__(self, root, size: int, *, subjects: Sequence[str] | None = None,
                 caption_template: str | None = None, instance_token: str = "sks",
                 min_size: int | None = None, max_per_subject: int | None = None):
        from jaxattrib.data.folder import scan_folder
        self.root = Path(root).expanduser().resolve()
        self.size, self.min_size = int(size), (None if min_size is None else int(min_size))
        self.subjects = None if subjects is None else [str(s) for s in subjects]
        self.instance_token, self.max_per_subject = instance_token, max_per_subject
        listing = scan_folder(self.root, subjects=self.subjects,
                              caption_template=caption_template, instance_token=instance_token,
                              max_per_subject=max_per_subject)
        self.caption_template = listing["caption_template"]
        self.paths = listing["paths"]
        labels = {"subject": listing["subject"]}
        names = {"subject": listing["subject_names"]}
        if listing["has_classes"]:
            labels["class"], names["class"] = listing["class"], listing["class_names"]
        self._init_meta(listing["ids"], listing["captions"], labels, names,
                        (self.size, self.size, 3))

    def _read_one(self, i):
        from jaxattrib.data.folder import load_image
        return load_image(self.paths[i], self.size, self.min_size)

    def _fingerprint(self):
        h = hashlib.sha256(b"jaxattrib.FolderSource/v1\0")
        h.update(json.dumps([self.size, self.min_size]).encode())
        _hash_strings(h, self.ids, self.captions)
        for p in self.paths:
            try:
                with open(p, "rb") as f:
                    h.update(hashlib.file_digest(f, "sha256").digest())
            except OSError as e:
                raise DataError(f"{p}: unreadable ({e})") from e
        return h.hexdigest()

    def _args(self):
        return {"root": str(self.root), "size": self.size, "subjects": self.subjects,
                "caption_template": self.caption_template,
                "instance_token": self.instance_token, "min_size": self.min_size,
                "max_per_subject": self.max_per_subject}


class SyntheticSource(DataSource):
    """The synthetic concept set (:func:`~jaxattrib.data.synthetic.make_synthetic`), rendered per
    example: same ids, captions, labels and pixels as ``make_synthetic(spec, seed, ...)``."""

    kind = "synthetic"

    def __init__(self, spec=None, seed: int = 0, withhold=(), only=None):
        import dataclasses

        from jaxattrib.data.synthetic import CONCEPTS, SyntheticConceptSpec, synthetic_plan
        if isinstance(spec, Mapping):
            spec = SyntheticConceptSpec(**{k: tuple(v) if isinstance(v, list) else v
                                           for k, v in spec.items()})
        self.spec = spec or SyntheticConceptSpec()
        self.seed = int(seed)
        plan = synthetic_plan(self.spec, self.seed, withhold, only)
        self.withhold, self.only, self._examples = plan["withhold"], plan["only"], \
            plan["examples"]
        self._spec_dict = dataclasses.asdict(self.spec)
        self._init_meta(plan["ids"], plan["captions"], plan["labels"],
                        {k: self.spec.vocab(k) for k in CONCEPTS},
                        (self.spec.size, self.spec.size, 3))

    def _read_one(self, i):
        from jaxattrib.data.synthetic import render_example
        return render_example(self.spec, self.seed, *self._examples[i])

    def _fingerprint(self):
        h = hashlib.sha256(b"jaxattrib.SyntheticSource/v1\0")
        h.update(json.dumps(self._args(), sort_keys=True).encode())
        _hash_strings(h, self.ids, self.captions)
        return h.hexdigest()

    def _args(self):
        return {"spec": json.loads(json.dumps(self._spec_dict)), "seed": self.seed,
                "withhold": self.withhold, "only": self.only}


class DigitsSource(DataSource):
    """scikit-learn's digits (:func:`~jaxattrib.data.digits.load_digits`), upsampled per example."""

    kind = "digits"

    def __init__(self, size: int = 32, resample: str = "nearest", digits=None,
                 max_per_digit: int | None = None):
        from jaxattrib.data.digits import DIGIT_NAMES, select_digits
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        self.size, self.resample = int(size), resample
        self.digits = None if digits is None else [int(d) for d in digits]
        self.max_per_digit = max_per_digit
        raw, target, index = select_digits(self.digits, max_per_digit)
        self._raw = np.ascontiguousarray(raw[index])  # [n, 8, 8], 0..16 (tiny)
        self._init_meta([f"digits/{int(i):04d}" for i in index],
                        [f"a handwritten digit {int(target[i])}" for i in index],
                        {"digit": target[index]}, {"digit": DIGIT_NAMES},
                        (self.size, self.size, 3))

    def _read_one(self, i):
        from jaxattrib.data.digits import upsample
        gray = upsample(self._raw[i:i + 1] / 16.0, self.size, self.resample)[0] * 2.0 - 1.0
        return np.repeat(np.clip(gray, -1.0, 1.0)[..., None], 3, axis=-1).astype(np.float32)

    def _fingerprint(self):
        h = hashlib.sha256(b"jaxattrib.DigitsSource/v1\0")
        h.update(json.dumps(self._args(), sort_keys=True).encode())
        h.update(self._raw.astype("<f8").tobytes())
        _hash_strings(h, self.ids, self.captions)
        return h.hexdigest()

    def _args(self):
        return {"size": self.size, "resample": self.resample, "digits": self.digits,
                "max_per_digit": self.max_per_digit}


class TfdsSource(DataSource):
    """A locally prepared tfds data set stored as array_record (or parquet), read through
    ``builder.as_data_source`` (random access, no TensorFlow). Opening it makes one pass over
    the split for captions, labels and the fingerprint (sha256 of each record's stored image,
    encoded bytes for ``tfds.features.Image``); images are decoded, converted to RGB and
    resized + center-cropped to ``size`` as :func:`~jaxattrib.data.tfds_source.load_tfds` does.
    """

    kind = "tfds"

    def __init__(self, name: str, split: str, data_dir, size: int, *, image_key: str = "image",
                 caption_key: str | None = None, label_key: str | None = "label",
                 limit: int | None = None):
        from jaxattrib.data import tfds_source as T
        tfds = T._import_tfds()
        self.name, self.split, self.size = str(name), str(split), int(size)
        self.data_dir = str(Path(data_dir).expanduser().resolve())
        self.image_key, self.caption_key, self.label_key = image_key, caption_key or None, \
            label_key or None
        self.limit = limit
        builder = T.open_builder(tfds, self.name, self.data_dir, image_key)
        fmt = str(getattr(builder.info, "file_format", "") or "").lower()
        if "array_record" not in fmt and "parquet" not in fmt:
            raise DataError(
                f"tfds data set {self.name!r} in {self.data_dir} is stored as "
                f"{fmt or 'tfrecord'}; streaming needs random access: rebuild it with `tfds "
                f"build {self.name} --data_dir {self.data_dir} --file_format=array_record`")
        feature = builder.info.features[image_key]
        self._encoded = isinstance(feature, tfds.features.Image)
        decoders = {image_key: tfds.decode.SkipDecoding()} if self._encoded else None
        try:
            self._records = builder.as_data_source(split=self.split, decoders=decoders)
        except Exception as e:
            raise DataError(f"tfds data set {self.name!r} in {self.data_dir}: split "
                            f"{self.split!r} unreadable ({type(e).__name__}: {e})") from e
        names = T._class_names(builder, self.label_key)
        self.version = str(builder.version)
        n = len(self._records) if limit is None else min(int(limit), len(self._records))
        if n == 0:
            raise DataError(f"{self.name}/{self.split} in {self.data_dir}: no examples")
        h = hashlib.sha256(b"jaxattrib.TfdsSource/v1\0")
        captions, labels = [], []
        for i in range(n):  # one streaming pass: captions, labels, fingerprint
            rec = self._records[i]
            where = f"{self.name}/{self.split}[{i}]"
            for key in (image_key, self.caption_key, self.label_key):
                if key is not None and key not in rec:
                    raise DataError(f"{where}: no feature {key!r}; features are {sorted(rec)}")
            img = rec[image_key]
            h.update(img if isinstance(img, bytes) else np.ascontiguousarray(img).tobytes())
            lab = None if self.label_key is None else int(np.asarray(rec[self.label_key]))
            if lab is not None:
                labels.append(lab)
            if self.caption_key is not None:
                captions.append(T._text(rec[self.caption_key]))
            elif lab is not None:
                cls = names[lab] if names else str(lab)
                captions.append(f"a photo of a {cls.replace('_', ' ')}")
            else:
                captions.append("")
        short = self.name.split(":")[0]
        ids = [f"{short}/{self.split}/{i:06d}" for i in range(n)]
        lab_d, names_d = {}, {}
        if self.label_key is not None:
            arr = np.asarray(labels, np.int32)
            lab_d = {self.label_key: arr}
            names_d = {self.label_key: tuple(names) if names else
                       tuple(str(k) for k in range(int(arr.max()) + 1))}
        self._init_meta(ids, captions, lab_d, names_d, (self.size, self.size, 3))
        where = {k: v for k, v in self._args().items() if k != "data_dir"}  # content, not place
        h.update(json.dumps(where, sort_keys=True).encode())
        _hash_strings(h, self.ids, self.captions)
        self._fp = h.hexdigest()

    def _read_one(self, i):
        from jaxattrib.data.dataset import uint8_to_model
        from jaxattrib.data.tfds_source import _resize, to_rgb_uint8
        where = f"{self.name}/{self.split}[{i}]"
        img = self._records[i][self.image_key]
        if isinstance(img, bytes):
            import io

            from PIL import Image
            try:
                with Image.open(io.BytesIO(img)) as im:
                    img = np.asarray(im)
            except OSError as e:
                raise DataError(f"{where}: undecodable image ({e})") from e
        return uint8_to_model(_resize(to_rgb_uint8(img, where), self.size))

    def _fingerprint(self):
        return self._fp

    def _args(self):
        return {"name": self.name, "split": self.split, "data_dir": self.data_dir,
                "size": self.size, "image_key": self.image_key, "caption_key": self.caption_key,
                "label_key": self.label_key, "limit": self.limit, "version": self.version}


class SubsetSource(DataSource):
    """Rows ``indices`` (in that order) of another source."""

    kind = "subset"

    def __init__(self, parent: DataSource, indices):
        self.parent = parent
        self.indices = _as_indices(indices, len(parent))
        idx = self.indices
        self._init_meta([parent.ids[i] for i in idx], [parent.captions[i] for i in idx],
                        {k: v[idx] for k, v in parent.labels.items()}, parent.label_names,
                        parent.image_shape)

    def _read_one(self, i):
        return self.parent.read([self.indices[i]])[0]

    def read(self, indices):
        return self.parent.read(self.indices[_as_indices(indices, len(self))])

    def _fingerprint(self):
        h = hashlib.sha256(b"jaxattrib.SubsetSource/v1\0")
        h.update(self.parent.fingerprint().encode())
        h.update(self.indices.astype("<i8").tobytes())
        return h.hexdigest()

    def _args(self):
        return {"parent": self.parent.describe(), "indices": self.indices.tolist()}


def open_source(desc: Mapping) -> DataSource:
    """The source a :meth:`DataSource.describe` dict names (its fingerprint is not checked;
    compare ``src.fingerprint()`` with ``desc['fingerprint']``)."""
    d = dict(desc)
    kind = d.pop("kind", None)
    d.pop("n", None)
    d.pop("fingerprint", None)
    if kind == "folder":
        root, size = d.pop("root"), d.pop("size")
        return FolderSource(root, size, **d)
    if kind == "synthetic":
        return SyntheticSource(d["spec"], d["seed"], d.get("withhold") or (), d.get("only"))
    if kind == "digits":
        return DigitsSource(**d)
    if kind == "tfds":
        d.pop("version", None)
        return TfdsSource(d.pop("name"), d.pop("split"), d.pop("data_dir"), d.pop("size"), **d)
    if kind == "npz":
        return NpzSource(d["path"])
    if kind == "subset":
        return SubsetSource(open_source(d["parent"]), d["indices"])
    raise DataError(f"data source kind {kind!r} cannot be reopened; expected one of "
                    f"{[k for k in KINDS if k != 'memory']}")


# ---------------------------------------------------------------------------------- loading

def shard_range(n: int, shard_index: int, shard_count: int) -> tuple[int, int]:
    """``[lo, hi)`` of shard ``shard_index`` of ``shard_count`` contiguous, near-equal blocks
    of ``range(n)`` (the first ``n % shard_count`` blocks hold one more)."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} not in [0, {shard_count})")
    q, r = divmod(int(n), int(shard_count))
    lo = shard_index * q + min(shard_index, r)
    return lo, lo + q + (1 if shard_index < r else 0)


def prefetch_map(fn, items: Sequence, *, num_threads: int = 2,
                 prefetch: int = 2) -> Iterator:
    """``fn(item)`` for each item of ``items``, in order, computed ahead by grain's threaded
    prefetch (``grain.MapDataset`` -> ``to_iter_dataset``); with ``num_threads=0`` in the
    calling thread. Exceptions of ``fn`` propagate to the caller."""
    if num_threads <= 0 or prefetch <= 0:
        return (fn(x) for x in items)
    import grain

    ds = grain.MapDataset.source(items).map(fn)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                     prefetch_buffer_size=prefetch)))


def iter_batches(source: DataSource, batch_size: int, *, indices=None,
                 shard_index: int | str | None = None, shard_count: int | str | None = None,
                 num_threads: int = 2, prefetch: int = 2,
                 drop_remainder: bool = False) -> Iterator[dict]:
    """Batches (``source.batch`` dicts) over ``indices`` (default ``range(len(source))``), in
    that order, read ahead by grain. With ``shard_index``/``shard_count`` (``'auto'`` =
    ``jax.process_index()``/``process_count()``) only that shard's contiguous block of
    ``indices`` (:func:`shard_range`) is read: the per-host stream."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    idx = np.arange(len(source)) if indices is None else _as_indices(indices, len(source))
    if shard_index is not None or shard_count is not None:
        import jax
        si = jax.process_index() if shard_index in (None, "auto") else int(shard_index)
        sc = jax.process_count() if shard_count in (None, "auto") else int(shard_count)
        lo, hi = shard_range(idx.size, si, sc)
        idx = idx[lo:hi]
    stop = (idx.size // batch_size) * batch_size if drop_remainder else idx.size
    blocks = [idx[s:s + batch_size] for s in range(0, stop, batch_size)]
    return prefetch_map(source.batch, blocks, num_threads=num_threads, prefetch=prefetch)
