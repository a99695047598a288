"""Image grids and PNG encoding for reports (numpy + Pillow).

Our design (no paper behind it): images arrive NHWC as floats in [-1, 1] (the library-wide pixel
convention) or as uint8; grids are uint8 ``[H, W, 3]`` arrays. Small images (32 px CIFAR-like)
are enlarged by *nearest-neighbour* repetition so that pixels stay pixels. Text labels use
Pillow's built-in bitmap font (``ImageFont.load_default``), so nothing is downloaded and the
result does not depend on the fonts installed. PNG bytes are written atomically.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from jaxattrib.fileio import atomic_write_bytes  # noqa: F401  (re-exported)

__all__ = [
    "GREEN",
    "RED",
    "to_uint8",
    "png_bytes",
    "png_data_uri",
    "save_png",
    "image_grid",
    "topk_image",
    "BLANK_STD",
    "blank_mask",
]

GREEN = (22, 163, 74)
RED = (220, 38, 38)
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Converts pixels in [-1, 1] to uint8 in [0, 255] (``round((x + 1) * 127.5)``, clipped).

    Args:
      images: ``[..., H, W, C]`` float (any float dtype, values outside [-1, 1] are clipped), or
        already ``uint8`` (returned unchanged). Other integer/bool dtypes are rejected because
        their range is ambiguous.

    Returns:
      uint8 array of the same shape.
    """
    x = np.asarray(images)
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"to_uint8: expected float pixels in [-1, 1] or uint8; got {x.dtype}")
    x = np.nan_to_num(x.astype(np.float64), nan=-1.0)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _rgb(image: np.ndarray) -> np.ndarray:
    """``[H, W]``, ``[H, W, 1]``, ``[H, W, 3]`` or ``[H, W, 4]`` → uint8 ``[H, W, 3]``."""
    x = to_uint8(image)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an image [H, W, C] with C in (1, 3, 4); got shape {x.shape}")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return x[..., :3]


def png_bytes(image: np.ndarray) -> bytes:
    """Encodes one image (``[H, W, C]`` float in [-1, 1] or uint8; C in 1/3/4) as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(_rgb(image)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def png_data_uri(image: np.ndarray | bytes) -> str:
    """``data:image/png;base64,...`` for an image array or for PNG bytes."""
    data = image if isinstance(image, (bytes, bytearray)) else png_bytes(image)
    if not bytes(data[:8]) == b"\x89PNG\r\n\x1a\n":
        raise ValueError("png_data_uri: bytes are not a PNG file")
    return "data:image/png;base64," + base64.b64encode(bytes(data)).decode("ascii")


def save_png(path: str | os.PathLike, image: np.ndarray | bytes) -> Path:
    """Writes one image (array as in :func:`png_bytes`, or PNG bytes) to ``path`` atomically."""
    data = image if isinstance(image, (bytes, bytearray)) else png_bytes(image)
    return atomic_write_bytes(path, bytes(data))


#: [design] An image is *blank* (near-constant: all white, all black, one flat colour) when the
#: standard deviation of all its pixel values (every pixel and channel, in the [-1, 1] pixel
#: convention) is below this: 0.05 is 6.4 of 255 grey levels. Every render of the synthetic
#: concept set has a std of at least 0.126 (300 renders at 16 and at 32 px, seed 0; a shape
#: on a background), so a blank generation is one that drew nothing.
BLANK_STD = 0.05


def blank_mask(images: np.ndarray, threshold: float = BLANK_STD) -> np.ndarray:
    """``[N]`` bool: which of ``images`` are blank (per-image pixel std < ``threshold``).

    Args:
      images: ``[N, H, W, C]`` floats in [-1, 1] (NaN counts as -1, as :func:`to_uint8`) or
        uint8 (rescaled to [-1, 1] first).
      threshold: std in [-1, 1] units (default :data:`BLANK_STD`).
    """
    x = np.asarray(images)
    if x.ndim != 4:
        raise ValueError(f"blank_mask: expected images [N, H, W, C]; got shape {x.shape}")
    x = (x.astype(np.float64) / 127.5 - 1.0 if x.dtype == np.uint8
         else np.nan_to_num(np.asarray(x, np.float64), nan=-1.0))
    return x.reshape(len(x), -1).std(axis=1) < float(threshold)


def _auto_upscale(h: int, w: int, min_side: int = 96) -> int:
    return max(1, int(np.ceil(min_side / max(1, min(h, w)))))


def _font():
    return ImageFont.load_default()


def fit_label(draw, text: str, font, width: float) -> str:
    """``text`` if it fits in ``width`` pixels, else its tail behind ``..`` cut to fit (the tail
    of an id or file name tells more than its head), so labels never run into the next cell."""
    if draw.textlength(text, font=font) <= width:
        return text
    for i in range(1, len(text)):
        cut = ".." + text[i:]
        if draw.textlength(cut, font=font) <= width:
            return cut
    return ""


def _text_height(lines: int) -> int:
    # Pillow's bitmap default font is 11 px high; 12 px per line with 2 px margins.
    return 0 if lines == 0 else 4 + 12 * lines


def image_grid(images: np.ndarray | Sequence[np.ndarray], nrow: int = 8, pad: int = 2,
               labels: Sequence[str] | None = None, upscale: int | None = None,
               borders: Sequence[tuple[int, int, int] | None] | None = None,
               border_width: int = 3, background: tuple[int, int, int] = WHITE) -> np.ndarray:
    """Tiles images into one uint8 ``[H', W', 3]`` grid.

    Args:
      images: ``[N, H, W, C]`` (float in [-1, 1] or uint8; C in 1/3/4) or a list of ``[H, W, C]``
        of equal size.
      nrow: images per row (torchvision's ``make_grid`` convention); rows = ceil(N / nrow).
      pad: background pixels between cells and around the grid.
      labels: optional text per image, drawn under it (``"\\n"`` separates lines); Pillow's
        built-in font. A line wider than its cell keeps its tail behind ``..``
        (:func:`fit_label`), so labels never overlap.
      upscale: integer nearest-neighbour factor; ``None`` picks the smallest factor making the
        short side >= 96 px (so 32-px images are enlarged 3×).
      borders: optional RGB colour (or ``None``) per image, drawn as a frame of ``border_width``
        pixels around the image (e.g. :data:`GREEN` for a correct attribution, :data:`RED` not).
      background: RGB of the padding.

    Returns:
      uint8 ``[rows * cell_h + pad * (rows + 1), nrow * cell_w + pad * (nrow + 1), 3]``, with
      ``cell = image * upscale + 2 * border_width (if borders) + label height``.
    """
    imgs = [_rgb(im) for im in (images if not isinstance(images, np.ndarray) or images.ndim == 4
                                else [images])]
    n = len(imgs)
    if n == 0:
        raise ValueError("image_grid: no images")
    h, w = imgs[0].shape[:2]
    if any(im.shape[:2] != (h, w) for im in imgs):
        raise ValueError(f"image_grid: images differ in size: {sorted({im.shape for im in imgs})}")
    if labels is not None and len(labels) != n:
        raise ValueError(f"image_grid: {len(labels)} labels for {n} images")
    if borders is not None and len(borders) != n:
        raise ValueError(f"image_grid: {len(borders)} borders for {n} images")
    if nrow < 1 or pad < 0:
        raise ValueError(f"image_grid: need nrow >= 1 and pad >= 0; got {nrow}, {pad}")
    up = _auto_upscale(h, w) if upscale is None else int(upscale)
    if up < 1:
        raise ValueError(f"image_grid: upscale must be >= 1; got {upscale}")
    bw = border_width if borders is not None else 0
    ih, iw = h * up, w * up
    n_lines = max((str(lb).count("\n") + 1 for lb in labels), default=0) if labels else 0
    th = _text_height(n_lines)
    cell_h, cell_w = ih + 2 * bw + th, iw + 2 * bw
    cols = min(nrow, n)
    rows = -(-n // cols)
    canvas = np.empty((rows * cell_h + pad * (rows + 1), cols * cell_w + pad * (cols + 1), 3),
                      np.uint8)
    canvas[...] = np.asarray(background, np.uint8)
    for k, im in enumerate(imgs):
        r, c = divmod(k, cols)
        y0, x0 = pad + r * (cell_h + pad), pad + c * (cell_w + pad)
        if bw and borders[k] is not None:
            canvas[y0:y0 + ih + 2 * bw, x0:x0 + iw + 2 * bw] = np.asarray(borders[k], np.uint8)
        big = np.repeat(np.repeat(im, up, axis=0), up, axis=1)
        canvas[y0 + bw:y0 + bw + ih, x0 + bw:x0 + bw + iw] = big
    if labels:
        pil = Image.fromarray(canvas)
        draw = ImageDraw.Draw(pil)
        font = _font()
        for k, lb in enumerate(labels):
            r, c = divmod(k, cols)
            y0, x0 = pad + r * (cell_h + pad), pad + c * (cell_w + pad)
            text = "\n".join(fit_label(draw, line, font, cell_w - 2)
                             for line in str(lb).split("\n"))
            draw.multiline_text((x0 + 1, y0 + ih + 2 * bw + 2), text, fill=BLACK, font=font,
                                spacing=1)
        canvas = np.asarray(pil).copy()
    return canvas


def topk_image(query: np.ndarray, train_images: np.ndarray, scores: np.ndarray, k: int = 8,
               labels: Sequence[str] | None = None, correct: np.ndarray | None = None,
               upscale: int | None = None, query_label: str = "query") -> tuple[np.ndarray, np.ndarray]:
    """One row: the query on the left, then its k highest-scoring training images.

    Args:
      query: ``[H, W, C]`` generated / query image.
      train_images: ``[N, H, W, C]`` candidates (the whole training set or a pre-selected subset).
      scores: ``[N]`` attribution scores of the candidates; the top k are shown in decreasing
        order (ties: lower index first, as :func:`jaxattrib.metrics.ranking`).
      k: how many to show (``min(k, N)``).
      labels: optional ``[N]`` names (e.g. training indices); drawn with the score under each.
      correct: optional ``[N]`` boolean ground truth; shown images get a green (True) or red
        (False) frame.

    Returns:
      ``(grid uint8 [H', W', 3], shown_indices [k])``.
    """
    train_images = np.asarray(train_images)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = train_images.shape[0]
    if scores.shape[0] != n:
        raise ValueError(f"topk_image: {scores.shape[0]} scores for {n} training images")
    if labels is not None and len(labels) != n:
        raise ValueError(f"topk_image: {len(labels)} labels for {n} training images")
    if correct is not None and np.asarray(correct).reshape(-1).shape[0] != n:
        raise ValueError(f"topk_image: correct_mask must have {n} entries")
    k = max(1, min(int(k), n))
    idx = np.argsort(-scores, kind="stable")[:k]
    q = _rgb(query)
    if q.shape[:2] != _rgb(train_images[0]).shape[:2]:
        # Different sizes: bring the query to the training size (nearest) so cells align.
        q = np.asarray(Image.fromarray(q).resize(train_images.shape[2:0:-1], Image.NEAREST))
    cells = [q] + [_rgb(train_images[i]) for i in idx]
    texts = [query_label] + [
        (f"{labels[i]}\n" if labels is not None else f"#{i}\n") + f"{scores[i]:.4g}" for i in idx]
    if correct is not None:
        cm = np.asarray(correct).reshape(-1).astype(bool)
        frames = [None] + [GREEN if cm[i] else RED for i in idx]
    else:
        frames = [None] * (k + 1)
    grid = image_grid(np.stack(cells), nrow=k + 1, pad=4, labels=texts, upscale=upscale,
                      borders=frames)
    # A vertical separator after the query cell.
    h, w = q.shape[:2]
    up = _auto_upscale(h, w) if upscale is None else int(upscale)
    x = 4 + w * up + 2 * 3 + 1
    grid[:, x:x + 2] = np.array([120, 120, 120], np.uint8)
    return grid, idx
