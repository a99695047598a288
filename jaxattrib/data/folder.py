"""Image folders with captions (the DreamBooth layout) as an :class:`ImageDataset`.

Layout (as in the DreamBooth data set, Ruiz et al. 2023)::

    root/
      prompts_and_classes.txt   optional: "subject_name,class" lines (DreamBooth's file)
      captions.jsonl            optional: {"file_name": "dog/00.jpg", "caption": "..."} per line
      dog/                      one subfolder per subject
        00.jpg  01.jpg ...
        prompt.txt              optional: one caption for every image of this folder
        captions.jsonl          optional: {"file_name": "00.jpg", "caption": "..."} per line

A folder with images and no subfolders is one subject named after the folder.

Caption of an image, first found wins: root ``captions.jsonl`` (path relative to root), the
subject's ``captions.jsonl`` (file name), the subject's ``prompt.txt``, then ``caption_template``
formatted with ``subject`` (folder name, ``_`` -> space), ``class_name`` (from
``prompts_and_classes.txt``, else ``subject``) and ``token`` (the ``instance_token`` argument).
The default template is ``"a photo of a {class_name}"`` when ``prompts_and_classes.txt`` exists
and ``"a photo of a {subject}"`` otherwise. In ``captions.jsonl`` the name key may be
``file_name``/``file``/``image`` and the caption key ``caption``/``text``/``prompt``.

[design] Images are EXIF-transposed, converted to RGB (alpha composited on white), then the
centered square of side ``min(w, h)`` is resampled to ``size x size`` (bicubic), i.e. resize of
the shorter side + center crop. Files are visited in sorted order; ids are paths relative to
``root`` (posix). ``labels['subject']`` is the subfolder; ``labels['class']`` is added when
``prompts_and_classes.txt`` exists. Unreadable, corrupt, unsupported-mode or too-small images
raise :class:`DataError` naming the path, or with ``on_error='skip'`` are left out, listed in
``meta['skipped']`` and announced with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxattrib.data.dataset import DataError, ImageDataset, resize_center_crop, uint8_to_model

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
CLASSES_FILE = "prompts_and_classes.txt"
CAPTIONS_FILE = "captions.jsonl"
PROMPT_FILE = "prompt.txt"
_RGB_CONVERTIBLE = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr",
                    "La"}
_NAME_KEYS = ("file_name", "file", "image")
_CAPTION_KEYS = ("caption", "text", "prompt")


def read_classes(path: str | os.PathLike) -> dict[str, str]:
    """Reads DreamBooth's ``prompts_and_classes.txt``: ``subject_name,class`` lines -> dict.

    Only lines with exactly one comma and no quotes/braces are taken (the file also holds the
    paper's prompt lists); the ``subject_name,class`` header line is skipped.
    """
    classes = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line.count(",") != 1 or any(c in line for c in "'\"{}()[]="):
                continue
            subject, cls = (s.strip() for s in line.split(","))
            if subject and cls and (subject, cls) != ("subject_name", "class"):
                classes[subject] = cls
    return classes


def read_captions_jsonl(path: str | os.PathLike) -> dict[str, str]:
    """Reads a ``captions.jsonl`` file: one JSON object per line -> {file name: caption}."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                name = next(rec[k] for k in _NAME_KEYS if k in rec)
                cap = next(rec[k] for k in _CAPTION_KEYS if k in rec)
            except (json.JSONDecodeError, StopIteration, TypeError) as e:
                raise DataError(f"{path}:{lineno}: expected a JSON object with one of "
                                f"{_NAME_KEYS} and one of {_CAPTION_KEYS} ({e!r})") from e
            out[str(name).replace("\\", "/")] = str(cap)
    return out


def load_image(path: str | os.PathLike, size: int, min_size: int | None = None) -> np.ndarray:
    """Reads one image file as ``[size, size, 3]`` float32 in ``[-1, 1]`` (resize + crop).

    Raises :class:`DataError` naming ``path`` when the file is unreadable or corrupt, its mode
    has no RGB meaning (e.g. 16-bit or float), or its shorter side is below ``min_size``
    (default ``size``).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    min_size = size if min_size is None else min_size
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode not in _RGB_CONVERTIBLE:
                raise DataError(f"{path}: image mode {im.mode!r} cannot be read as RGB "
                                f"(expected 8-bit gray, palette, RGB or RGBA)")
            if min(im.size) < min_size:
                raise DataError(f"{path}: image is {im.size[0]}x{im.size[1]}, smaller than "
                                f"min_size={min_size}")
            if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
                    im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                im = Image.new("RGB", rgba.size, (255, 255, 255))
                im.paste(rgba, mask=rgba.getchannel("A"))
            else:
                im = im.convert("RGB")
            out = np.asarray(resize_center_crop(im, size), np.uint8)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: unreadable or corrupt image ({e})") from e
    return uint8_to_model(out)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith("."))


def notice_ignored_files(folder: Path, used: int, known: Sequence[str] = ()) -> list[str]:
    """Logs a notice (WARNING) naming the files of ``folder`` that are not images (by extension) and
    so are ignored, besides ``known`` metadata files and hidden files; returns their names."""
    ignored = sorted(p.name for p in folder.iterdir()
                     if p.is_file() and p.suffix.lower() not in IMAGE_EXTENSIONS
                     and not p.name.startswith(".") and p.name not in known)
    if ignored:
        logger.warning("%s: using %d image file(s); ignoring %d non-image file(s): %s%s",
                       folder, used, len(ignored), ", ".join(ignored[:5]),
                       " ..." if len(ignored) > 5 else "")
    return ignored


def scan_folder(root: str | os.PathLike, *, subjects: Sequence[str] | None = None,
                caption_template: str | None = None, instance_token: str = "sks",
                max_per_subject: int | None = None) -> dict:
    """Lists an image folder without reading any pixels (see the module docstring).

    Returns ``{'paths': [Path], 'ids': [str], 'captions': [str], 'subject': [int],
    'class': [int], 'subject_names': tuple, 'class_names': tuple, 'has_classes': bool,
    'caption_template': str}``, one entry per image file in visiting order.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    subdirs = sorted(p for p in root.iterdir()
                     if p.is_dir() and not p.name.startswith(".") and _images_in(p))
    if subdirs and _images_in(root):
        raise DataError(f"{root}: holds images both at the top level and in subfolders; "
                        f"expected one subfolder per subject or a flat folder")
    folders = {p.name: p for p in subdirs} if subdirs else (
        {root.name: root} if _images_in(root) else {})
    if subjects is not None:
        missing = [s for s in subjects if s not in folders]
        if missing:
            raise DataError(f"{root}: no image subfolder(s) {missing}; found {sorted(folders)}")
        folders = {s: folders[s] for s in subjects}
    if not folders:
        raise DataError(f"{root}: no images found (expected {IMAGE_EXTENSIONS} files in "
                        f"subfolders)")

    classes = read_classes(root / CLASSES_FILE) if (root / CLASSES_FILE).is_file() else None
    if caption_template is None:
        caption_template = "a photo of a {class_name}" if classes else "a photo of a {subject}"
    root_caps = (read_captions_jsonl(root / CAPTIONS_FILE)
                 if (root / CAPTIONS_FILE).is_file() else {})

    class_names: list[str] = []
    out = {"paths": [], "ids": [], "captions": [], "subject": [], "class": []}
    for si, (name, folder) in enumerate(folders.items()):
        pretty = name.replace("_", " ")
        class_name = (classes or {}).get(name, pretty)
        if class_name not in class_names:
            class_names.append(class_name)
        local_caps = (read_captions_jsonl(folder / CAPTIONS_FILE)
                      if folder != root and (folder / CAPTIONS_FILE).is_file() else {})
        prompt = None
        if (folder / PROMPT_FILE).is_file():
            prompt = (folder / PROMPT_FILE).read_text(encoding="utf-8").strip()
        fallback = caption_template.format(subject=pretty, class_name=class_name,
                                           token=instance_token)
        files = _images_in(folder)
        notice_ignored_files(folder, len(files), (CAPTIONS_FILE, PROMPT_FILE, CLASSES_FILE))
        if max_per_subject is not None:
            files = files[:max_per_subject]
        for path in files:
            rel = path.relative_to(root).as_posix()
            out["paths"].append(path)
            out["ids"].append(rel)
            out["captions"].append(root_caps.get(rel) or local_caps.get(path.name) or prompt
                                   or fallback)
            out["subject"].append(si)
            out["class"].append(class_names.index(class_name))
    out.update(subject_names=tuple(folders), class_names=tuple(class_names),
               has_classes=classes is not None, caption_template=caption_template)
    return out


def load_folder(root: str | os.PathLike, size: int = 64, *,
                subjects: Sequence[str] | None = None,
                caption_template: str | None = None,
                instance_token: str = "sks",
                min_size: int | None = None,
                max_per_subject: int | None = None,
                on_error: str = "raise") -> ImageDataset:
    """Loads an image folder (DreamBooth layout, see the module docstring).

    Args:
      root: the folder.
      size: output side in pixels.
      subjects: subfolder names to load, in this order (default: all, sorted).
      caption_template: fallback caption; fields ``{subject}``, ``{class_name}``, ``{token}``.
      instance_token: value of ``{token}`` (DreamBooth's rare identifier).
      min_size: smallest accepted shorter side in pixels (default ``size``).
      max_per_subject: keep the first this many images (sorted by name) per subject.
      on_error: ``'raise'`` (default) or ``'skip'`` bad images.

    Returns:
      an :class:`ImageDataset` with ``labels['subject']`` (and ``labels['class']``),
      ids = paths relative to ``root``. (:class:`jaxattrib.data.source.FolderSource` reads the
      same folder image by image instead of all at once.)
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error={on_error!r}: expected 'raise' or 'skip'")
    root = Path(root)
    listing = scan_folder(root, subjects=subjects, caption_template=caption_template,
                          instance_token=instance_token, max_per_subject=max_per_subject)
    images, keep, skipped = [], [], []
    for i, path in enumerate(listing["paths"]):
        try:
            images.append(load_image(path, size, min_size))
        except DataError as e:
            if on_error == "raise":
                raise
            skipped.append(str(e))
            continue
        keep.append(i)
    if skipped:
        warnings.warn(f"load_folder({root}): skipped {len(skipped)} bad image(s): "
                      + "; ".join(skipped), stacklevel=2)
    if not images:
        raise DataError(f"{root}: no readable images (skipped {len(skipped)})")
    labels = {"subject": np.asarray([listing["subject"][i] for i in keep], np.int32)}
    label_names = {"subject": listing["subject_names"]}
    if listing["has_classes"]:
        labels["class"] = np.asarray([listing["class"][i] for i in keep], np.int32)
        label_names["class"] = listing["class_names"]
    return ImageDataset(
        images=np.stack(images), captions=tuple(listing["captions"][i] for i in keep),
        labels=labels, label_names=label_names, ids=tuple(listing["ids"][i] for i in keep),
        meta={"source": "folder", "root": str(root), "size": size,
              "caption_template": listing["caption_template"],
              "instance_token": instance_token,
              "min_size": size if min_size is None else min_size,
              "max_per_subject": max_per_subject, "skipped": skipped},
    )
