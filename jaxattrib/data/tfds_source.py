"""TensorFlow Datasets (tfds) image data sets, read from a local ``data_dir``, as
:class:`ImageDataset`.

``tensorflow-datasets`` is an optional extra (``pip install 'jaxattrib[tfds]'``) and is imported
only when these functions run. Nothing is downloaded: the data set must already be prepared in
``data_dir`` (``tfds build NAME --data_dir DIR`` on a machine with network, then copy ``DIR``).

[design] Reading path by file format:

* ``array_record`` (or ``parquet``) data sets are read with ``builder.as_data_source`` and need
  no TensorFlow (build them with ``tfds build NAME --data_dir DIR --file_format=array_record``).
* ``tfrecord`` data sets (tfds' default) need TensorFlow (``builder.as_dataset`` +
  ``tfds.as_numpy``); without it a :class:`DataError` says which of the two to do.

Examples are read in the split's stored order. Images (uint8 ``[H, W, C]``, C in 1/3/4, or float
in ``[0, 1]``) are converted to RGB (gray repeated, alpha composited on white) and resized
(shorter side) + center-cropped to ``size`` like :mod:`jaxattrib.data.folder`. Captions come from
``caption_key`` (a text feature), or else from the class name: ``"a photo of a {label}"``.
Ids are ``"{name}/{split}/{index:06d}"``.

:func:`load_tfds_image_folder` wraps tfds' ``ImageFolder`` builder (``root/split/label/*.jpg``),
which always needs TensorFlow; :func:`jaxattrib.data.folder.load_folder` reads such a folder
without it.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import numpy as np

from jaxattrib.data.dataset import DataError, ImageDataset, resize_center_crop, uint8_to_model

INSTALL_HINT = ("tensorflow-datasets is not installed; install the optional extra with "
                "`pip install 'jaxattrib[tfds]'` (or `pip install tensorflow-datasets`)")


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return tfds


def _has_tensorflow() -> bool:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return False
    return True


def _prepare_hint(name: str, data_dir) -> str:
    return (f"prepare it on a machine with network access with `tfds build {name} "
            f"--data_dir {data_dir} --file_format=array_record` (or the default tfrecord "
            f"format, which needs TensorFlow to read) and copy that folder here")


def to_rgb_uint8(image: Any, where: str = "image") -> np.ndarray:
    """A tfds image value -> uint8 ``[H, W, 3]``: gray repeated, RGBA composited on white,
    float images taken as ``[0, 1]``."""
    x = np.asarray(image)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[-1] not in (1, 3, 4):
        raise DataError(f"{where}: expected an image [H, W, 1|3|4], got shape {x.shape}")
    if np.issubdtype(x.dtype, np.floating):
        x = np.clip(np.rint(x * 255.0), 0, 255)
    elif x.dtype != np.uint8:
        raise DataError(f"{where}: expected uint8 or float pixels, got {x.dtype}")
    x = x.astype(np.float64)
    if x.shape[-1] == 4:
        a = x[..., 3:] / 255.0
        x = x[..., :3] * a + 255.0 * (1.0 - a)
    elif x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _resize(image_uint8: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(resize_center_crop(Image.fromarray(image_uint8, "RGB"), size), np.uint8)


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _text(value.item())
    return str(value)


def _records(tfds, builder, split: str, name: str, data_dir) -> Iterable[dict]:
    fmt = str(getattr(builder.info, "file_format", "") or "").lower()
    if "array_record" in fmt or "parquet" in fmt:
        source = builder.as_data_source(split=split)
        return (source[i] for i in range(len(source)))
    if not _has_tensorflow():
        raise DataError(
            f"tfds data set {name!r} in {data_dir} is stored as {fmt or 'tfrecord'}, which needs "
            f"TensorFlow to read: `pip install tensorflow`, or rebuild it with "
            f"`tfds build {name} --data_dir {data_dir} --file_format=array_record`")
    return tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))


def records_to_dataset(records: Iterable[dict], *, size: int, source_name: str, split: str,
                       image_key: str = "image", caption_key: str | None = None,
                       label_key: str | None = "label",
                       label_names: tuple[str, ...] | None = None,
                       limit: int | None = None, meta: dict | None = None) -> ImageDataset:
    """Turns tfds-style example dicts into an :class:`ImageDataset` (see module docstring).

    ``label_names`` are the class names of ``label_key`` (a tfds ``ClassLabel``); without them the
    labels are named by their integer value.
    """
    images, captions, ids, labels = [], [], [], []
    for i, rec in enumerate(records):
        if limit is not None and i >= limit:
            break
        where = f"{source_name}/{split}[{i}]"
        if image_key not in rec:
            raise DataError(f"{where}: no feature {image_key!r}; features are {sorted(rec)}")
        images.append(uint8_to_model(_resize(to_rgb_uint8(rec[image_key], where), size)))
        lab = None
        if label_key is not None:
            if label_key not in rec:
                raise DataError(f"{where}: no feature {label_key!r}; features are {sorted(rec)}"
                                f" (pass label_key=None for unlabelled data)")
            lab = int(np.asarray(rec[label_key]))
            labels.append(lab)
        if caption_key is not None:
            if caption_key not in rec:
                raise DataError(f"{where}: no feature {caption_key!r}; features are "
                                f"{sorted(rec)}")
            captions.append(_text(rec[caption_key]))
        elif lab is not None:
            cls = label_names[lab] if label_names else str(lab)
            captions.append(f"a photo of a {cls.replace('_', ' ')}")
        else:
            captions.append("")
        ids.append(f"{source_name}/{split}/{i:06d}")
    if not images:
        raise DataError(f"{source_name}/{split}: no examples")
    label_dict, names_dict = {}, {}
    if label_key is not None:
        lab_arr = np.asarray(labels, np.int32)
        names = tuple(label_names) if label_names else tuple(
            str(k) for k in range(int(lab_arr.max()) + 1))
        label_dict, names_dict = {label_key: lab_arr}, {label_key: names}
    return ImageDataset(images=np.stack(images), captions=tuple(captions), labels=label_dict,
                        label_names=names_dict, ids=tuple(ids),
                        meta={"source": "tfds", "name": source_name, "split": split,
                              "size": size, **(meta or {})})


def _class_names(builder, label_key: str | None) -> tuple[str, ...] | None:
    if label_key is None:
        return None
    try:
        feature = builder.info.features[label_key]
    except (KeyError, TypeError):
        return None
    names = getattr(feature, "names", None)
    return tuple(names) if names else None


def open_builder(tfds, name: str, data_dir: str, image_key: str = "image"):
    """The prepared tfds builder of ``name`` in ``data_dir`` (nothing is downloaded);
    :class:`DataError` saying how to prepare it when it is missing or lacks ``image_key``."""
    data_dir = os.fspath(data_dir)
    try:
        builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    except Exception as e:  # DatasetNotFoundError and friends
        raise DataError(f"tfds data set {name!r} not found in {data_dir}: "
                        f"{_prepare_hint(name, data_dir)} ({type(e).__name__})") from e
    if not builder.is_prepared():
        raise DataError(f"tfds data set {name!r} is not prepared in {data_dir}: "
                        f"{_prepare_hint(name, data_dir)}")
    if image_key not in builder.info.features:
        raise DataError(f"tfds data set {name!r}: no feature {image_key!r}; features are "
                        f"{sorted(builder.info.features.keys())}")
    return builder


def load_tfds(name: str, split: str, data_dir: str | os.PathLike, size: int, *,
              image_key: str = "image", caption_key: str | None = None,
              label_key: str | None = "label", limit: int | None = None) -> ImageDataset:
    """Loads a locally prepared tfds image data set.

    Args:
      name: tfds name, optionally with config/version (``"mnist"``, ``"cifar10:3.0.2"``).
      split: tfds split string (``"train"``, ``"test[:100]"``).
      data_dir: the folder ``tfds build --data_dir`` wrote to.
      size: output side in pixels.
      image_key, caption_key, label_key: feature names (``label_key=None`` for no labels).
      limit: read at most this many examples.

    Raises:
      ImportError: tensorflow-datasets is not installed (message says how to install it).
      DataError: the data set is not prepared in ``data_dir`` (message says how to prepare it),
        its format needs TensorFlow, or a feature is missing.
    """
    tfds = _import_tfds()
    data_dir = os.fspath(data_dir)
    builder = open_builder(tfds, name, data_dir, image_key)
    records = _records(tfds, builder, split, name, data_dir)
    return records_to_dataset(records, size=size, source_name=name.split(":")[0], split=split,
                              image_key=image_key, caption_key=caption_key, label_key=label_key,
                              label_names=_class_names(builder, label_key), limit=limit,
                              meta={"data_dir": data_dir, "version": str(builder.version)})


def load_tfds_image_folder(root_dir: str | os.PathLike, split: str, size: int, *,
                           limit: int | None = None) -> ImageDataset:
    """Reads ``root_dir/split/label/*.jpg`` with tfds' ``ImageFolder`` builder (needs
    TensorFlow). Labels are ``labels['label']`` with the folder names; captions
    ``"a photo of a {label}"``."""
    tfds = _import_tfds()
    if not _has_tensorflow():
        raise DataError(f"tfds.ImageFolder needs TensorFlow (`pip install tensorflow`); "
                        f"jaxattrib.data.load_folder reads {root_dir} without it")
    try:
        builder = tfds.ImageFolder(os.fspath(root_dir))
    except Exception as e:
        raise DataError(f"{root_dir}: not a tfds ImageFolder layout root/split/label/image "
                        f"({e})") from e
    if split not in builder.info.splits:
        raise DataError(f"{root_dir}: no split {split!r}; found {sorted(builder.info.splits)}")
    records = tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))
    return records_to_dataset(records, size=size, source_name="image_folder", split=split,
                              label_names=_class_names(builder, "label"), limit=limit,
                              meta={"root": os.fspath(root_dir)})
