"""The synthetic concept data set: colored shapes on backgrounds, with exact concept labels.

Follows the idea of Concept-TRAK's synthetic benchmark [paper]: every image shows one shape of
one color on one background (optionally textured), so "which training images carry concept c"
is known by construction, and *out-of-distribution* queries are concept combinations withheld
from training (e.g. no red circle in the training set, but red things and circles).

[design] Everything else is ours:

* Rendering is pure numpy with exact box-filter anti-aliasing (``supersample**2`` point samples
  per pixel). Geometry lives in unit coordinates (the shape's box is about ``[-1, 1]^2``) and is
  placed at a jittered center with a jittered radius, always fully inside the image.
* Each image's randomness comes from ``np.random.default_rng([seed, crc32(combination), k])``,
  so an image does not depend on which other combinations are generated or withheld, and
  :func:`make_withheld` returns exactly the images the withheld combinations would have had.
* Shape colors are chromatic only (``SHAPE_COLORS``); backgrounds may be ``black``, ``white``,
  ``gray`` or a shape color. A combination whose color equals its background is skipped.
* Textures darken parts of the shape (``stripes``: diagonal bands, ``dots``: a grid of dots) to
  ``DARK_FACTOR`` times its color; the dominant hue is unchanged.
* :func:`classify_concepts` inverts the renderer with pixel statistics: background = the median
  of the border ring (nearest palette color); foreground = pixels nearer to a shape color (or
  its dark variant) than to the background; color = majority vote of interior foreground
  pixels; texture = the image-anchored texture pattern that best
  matches the dark interior pixels; shape = the template with the highest IoU
  after matching its bounding box to the foreground's largest connected component.
  On clean renders of the default spec, with jitter and all three textures, it is exact
  (tested on every image of such a set).
"""

from __future__ import annotations

import dataclasses
import itertools
import zlib
from typing import Mapping, Sequence

import numpy as np

from jaxattrib.data.dataset import DataError, ImageDataset

# RGB in [0, 255]. Chosen to be far apart, also from each other's dark variants.
SHAPE_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "cyan": (40, 200, 210),
    "pink": (240, 120, 180),
}
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    **SHAPE_COLORS,
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
TEXTURES = ("solid", "stripes", "dots")
DARK_FACTOR = 0.55
CONCEPTS = ("shape", "color", "background", "texture")


def _star_vertices(points: int = 5, inner: float = 0.42) -> np.ndarray:
    ang = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    rad = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([rad * np.cos(ang), rad * np.sin(ang)], -1)


_POLYGONS = {
    "triangle": np.array([[0.0, -0.95], [1.0, 0.8], [-1.0, 0.8]]),
    "star": _star_vertices(),
}


def _inside_polygon(u: np.ndarray, v: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon for arrays of points ``(u, v)``; ``poly [K, 2]``."""
    inside = np.zeros(u.shape, bool)
    for (x1, y1), (x2, y2) in zip(poly, np.roll(poly, -1, axis=0)):
        if y1 == y2:
            continue
        crosses = (y1 > v) != (y2 > v)
        x_at = (x2 - x1) * (v - y1) / (y2 - y1) + x1
        inside ^= crosses & (u < x_at)
    return inside


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether unit-coordinate points ``(u, v)`` (v pointing down) lie inside ``shape``."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.32) & (av <= 0.95)) | ((av <= 0.32) & (au <= 0.95))
    if shape in _POLYGONS:
        return _inside_polygon(u, v, _POLYGONS[shape])
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def shape_box(shape: str) -> tuple[float, float, float, float]:
    """The unit-coordinate bounding box ``(u0, v0, u1, v1)`` of ``shape``."""
    if shape in ("circle", "diamond"):
        return (-1.0, -1.0, 1.0, 1.0)
    if shape == "square":
        return (-0.85, -0.85, 0.85, 0.85)
    if shape == "cross":
        return (-0.95, -0.95, 0.95, 0.95)
    if shape in _POLYGONS:
        p = _POLYGONS[shape]
        return (float(p[:, 0].min()), float(p[:, 1].min()), float(p[:, 0].max()),
                float(p[:, 1].max()))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def texture_dark(texture: str, x: np.ndarray, y: np.ndarray, size: int) -> np.ndarray:
    """Which image points (pixel units) a texture darkens. Independent of the shape."""
    if texture == "solid":
        return np.zeros(np.broadcast(x, y).shape, bool)
    if texture == "stripes":
        period = size / 4.0
        return np.mod((x + y) / period, 1.0) < 0.5
    if texture == "dots":
        period = size / 5.0
        fx = np.mod(x / period, 1.0) - 0.5
        fy = np.mod(y / period, 1.0) - 0.5
        return fx * fx + fy * fy <= 0.3 ** 2
    raise ValueError(f"unknown texture {texture!r}; expected one of {TEXTURES}")


def _sample_points(size: int, supersample: int) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel sample positions ``[size*ss, size*ss]`` (pixel units, pixel i spans [i, i+1))."""
    t = (np.arange(size * supersample) + 0.5) / supersample
    return np.meshgrid(t, t, indexing="xy")


def _box_reduce(a: np.ndarray, size: int, ss: int) -> np.ndarray:
    return a.reshape(size, ss, size, ss, *a.shape[2:]).mean(axis=(1, 3))


def rasterize(shape: str, color: str, background: str, texture: str, size: int,
              center: tuple[float, float], radius: float, supersample: int = 4) -> np.ndarray:
    """Renders one shape deterministically.

    Args:
      center: ``(cx, cy)`` in pixels (x to the right, y down); radius: in pixels (the unit box
        ``[-1, 1]^2`` maps to ``center +- radius``).
    Returns:
      ``[size, size, 3]`` float32 in ``[-1, 1]``.
    """
    if color not in SHAPE_COLORS:
        raise ValueError(f"unknown shape color {color!r}; expected one of {tuple(SHAPE_COLORS)}")
    if background not in BACKGROUND_COLORS:
        raise ValueError(f"unknown background {background!r}; expected one of "
                         f"{tuple(BACKGROUND_COLORS)}")
    x, y = _sample_points(size, supersample)
    inside = shape_mask(shape, (x - center[0]) / radius, (y - center[1]) / radius)
    dark = texture_dark(texture, x, y, size)
    fg = np.asarray(SHAPE_COLORS[color], np.float64)
    bg = np.asarray(BACKGROUND_COLORS[background], np.float64)
    shade = np.where(dark, DARK_FACTOR, 1.0)[..., None] * fg
    pix = np.where(inside[..., None], shade, bg)
    img = _box_reduce(pix, size, supersample)
    return (img / 127.5 - 1.0).astype(np.float32)


def sample_placement(rng: np.random.Generator, size: int, position_jitter: float,
                     scale_range: tuple[float, float]) -> tuple[tuple[float, float], float]:
    """Draws ``(center, radius)`` in pixels.

    The diameter is ``U(scale_range) * size``; the center is the image center plus
    ``U(-position_jitter, position_jitter) * size`` per axis, clamped so the shape stays at least
    one pixel away from the border.
    """
    scale = rng.uniform(*scale_range)
    offset = rng.uniform(-position_jitter, position_jitter, size=2)
    radius = 0.5 * scale * size
    lo, hi = radius + 1.0, size - radius - 1.0
    c = np.clip(size / 2.0 + offset * size, lo, hi) if lo <= hi else np.full(2, size / 2.0)
    return (float(c[0]), float(c[1])), float(radius)


def render(shape: str, color: str, background: str, texture: str = "solid", size: int = 32,
           rng: np.random.Generator | int | None = None, *, position_jitter: float = 0.0,
           scale_range: tuple[float, float] = (0.65, 0.65),
           supersample: int = 4) -> np.ndarray:
    """Renders ``shape`` in ``color`` on ``background`` with ``texture``.

    ``rng`` (a numpy Generator or int seed) draws the position/scale jitter; with ``rng=None``
    the shape is centered at the mean scale. Returns ``[size, size, 3]`` float32 in ``[-1, 1]``.
    """
    if rng is None:
        scale = 0.5 * (scale_range[0] + scale_range[1])
        center, radius = (size / 2.0, size / 2.0), 0.5 * scale * size
    else:
        rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
        center, radius = sample_placement(rng, size, position_jitter, scale_range)
    return rasterize(shape, color, background, texture, size, center, radius, supersample)


@dataclasses.dataclass(frozen=True)
class SyntheticConceptSpec:
    """Which concepts the synthetic set combines and how images vary.

    Attributes:
      shapes, colors, backgrounds, textures: concept vocabularies (see ``SHAPES``,
        ``SHAPE_COLORS``, ``BACKGROUND_COLORS``, ``TEXTURES``); their order defines the label ids.
      size: image side in pixels.
      per_combination: images per (shape, color, background, texture) combination.
      position_jitter: max center offset per axis, as a fraction of ``size``.
      scale_range: shape diameter range, as fractions of ``size``.
      supersample: anti-aliasing samples per pixel side.
    """

    shapes: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
    backgrounds: tuple[str, ...] = ("black", "white", "gray")
    textures: tuple[str, ...] = ("solid",)
    size: int = 32
    per_combination: int = 4
    position_jitter: float = 0.12
    scale_range: tuple[float, float] = (0.5, 0.75)
    supersample: int = 4

    def __post_init__(self):
        for field, vocab in (("shapes", SHAPES), ("colors", tuple(SHAPE_COLORS)),
                             ("backgrounds", tuple(BACKGROUND_COLORS)), ("textures", TEXTURES)):
            values = tuple(getattr(self, field))
            object.__setattr__(self, field, values)
            bad = [v for v in values if v not in vocab]
            if bad or not values or len(set(values)) != len(values):
                raise ValueError(f"SyntheticConceptSpec.{field}={values!r}: expected distinct "
                                 f"names from {vocab}")
        object.__setattr__(self, "scale_range", tuple(float(s) for s in self.scale_range))
        lo, hi = self.scale_range
        if not 0.1 <= lo <= hi <= 0.95:
            raise ValueError(f"SyntheticConceptSpec.scale_range={self.scale_range}: expected "
                             f"0.1 <= lo <= hi <= 0.95")
        if self.size < 16 or self.per_combination < 1 or self.supersample < 1:
            raise ValueError("SyntheticConceptSpec: need size >= 16, per_combination >= 1, "
                             "supersample >= 1")
        if not 0.0 <= self.position_jitter <= 0.5:
            raise ValueError("SyntheticConceptSpec.position_jitter: expected in [0, 0.5]")

    def vocab(self, concept: str) -> tuple[str, ...]:
        """The names of one concept: ``'shape'``, ``'color'``, ``'background'``, ``'texture'``."""
        return {"shape": self.shapes, "color": self.colors, "background": self.backgrounds,
                "texture": self.textures}[concept]

    def combinations(self) -> list[dict[str, str]]:
        """All (shape, color, background, texture) combinations, color != background."""
        return [dict(shape=s, color=c, background=b, texture=t)
                for s, c, b, t in itertools.product(self.shapes, self.colors, self.backgrounds,
                                                    self.textures) if c != b]


def caption(shape: str, color: str, background: str, texture: str = "solid") -> str:
    """``"a red circle on a blue background"`` (+ ``" with stripes"`` / ``" with dots"``)."""
    text = f"a {color} {shape} on a {background} background"
    return text if texture == "solid" else f"{text} with {texture}"


def _check_patterns(spec: SyntheticConceptSpec, patterns, arg: str) -> list[dict[str, str]]:
    if isinstance(patterns, Mapping):
        patterns = [patterns]
    out = []
    for p in patterns:
        if not p:
            raise ValueError(f"{arg}: an empty pattern would match every combination")
        for k, v in p.items():
            if k not in CONCEPTS:
                raise ValueError(f"{arg}: unknown concept {k!r}; expected one of {CONCEPTS}")
            if v not in spec.vocab(k):
                raise ValueError(f"{arg}: {k}={v!r} is not in the spec's {spec.vocab(k)}")
        out.append(dict(p))
    return out


def _matches(combo: Mapping[str, str], patterns: Sequence[Mapping[str, str]]) -> bool:
    return any(all(combo[k] == v for k, v in p.items()) for p in patterns)


def make_synthetic(spec: SyntheticConceptSpec = SyntheticConceptSpec(), seed: int = 0,
                   withhold: Sequence[Mapping[str, str]] = (),
                   only: Sequence[Mapping[str, str]] | None = None) -> ImageDataset:
    """Generates the synthetic concept set.

    Args:
      spec: vocabularies, size, images per combination, jitter.
      seed: non-negative int; same seed -> identical arrays.
      withhold: patterns like ``{'color': 'red', 'shape': 'circle'}``; every combination that
        matches any pattern (all its keys equal) is left out.
      only: if given, keep only combinations matching one of these patterns.

    Returns:
      an :class:`ImageDataset` with labels ``shape``, ``color``, ``background``, ``texture``
      (indices into the spec's vocabularies), captions from :func:`caption` and ids
      ``synthetic/{color}_{shape}_{background}_{texture}_{k:03d}``.
    """
    plan = synthetic_plan(spec, seed, withhold, only)
    images = [render_example(spec, seed, c, k) for c, k in plan["examples"]]
    captions, ids, labels = plan["captions"], plan["ids"], plan["labels"]
    withhold, only_p = plan["withhold"], plan["only"]
    return ImageDataset(
        images=np.stack(images),
        captions=tuple(captions),
        labels={k: np.asarray(v, np.int32) for k, v in labels.items()},
        label_names={k: spec.vocab(k) for k in CONCEPTS},
        ids=tuple(ids),
        meta={"source": "synthetic", "seed": int(seed), "size": spec.size,
              "spec": dataclasses.asdict(spec), "withhold": withhold, "only": only_p},
    )


def synthetic_plan(spec: SyntheticConceptSpec, seed: int,
                   withhold: Sequence[Mapping[str, str]] = (),
                   only: Sequence[Mapping[str, str]] | None = None) -> dict:
    """What :func:`make_synthetic` generates, without rendering: ``{'examples': [(combination,
    k)], 'captions', 'ids', 'labels' (concept -> list of int), 'withhold', 'only'}`` (the
    checked patterns). Render example ``j`` with ``render_example(spec, seed, *examples[j])``."""
    if int(seed) < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    withhold = _check_patterns(spec, withhold, "withhold")
    only_p = None if only is None else _check_patterns(spec, only, "only")
    combos = [c for c in spec.combinations()
              if not _matches(c, withhold) and (only_p is None or _matches(c, only_p))]
    if not combos:
        raise DataError(f"synthetic: no combination left (withhold={withhold}, only={only_p})")
    examples, captions, ids = [], [], []
    labels: dict[str, list[int]] = {k: [] for k in CONCEPTS}
    for c in combos:
        name = f"{c['color']}_{c['shape']}_{c['background']}_{c['texture']}"
        for k in range(spec.per_combination):
            examples.append((c, k))
            captions.append(caption(**c))
            ids.append(f"synthetic/{name}_{k:03d}")
            for concept in CONCEPTS:
                labels[concept].append(spec.vocab(concept).index(c[concept]))
    return {"examples": examples, "captions": captions, "ids": ids, "labels": labels,
            "withhold": withhold, "only": only_p}


def render_example(spec: SyntheticConceptSpec, seed: int, combination: Mapping[str, str],
                   k: int) -> np.ndarray:
    """Image ``k`` of one combination: float32 ``[size, size, 3]`` in ``[-1, 1]``, drawn from
    ``default_rng([seed, crc32(name), k])`` (independent of every other example)."""
    c = combination
    name = f"{c['color']}_{c['shape']}_{c['background']}_{c['texture']}"
    rng = np.random.default_rng([int(seed), zlib.crc32(name.encode()), k])
    return render(c["shape"], c["color"], c["background"], c["texture"], spec.size, rng,
                  position_jitter=spec.position_jitter, scale_range=spec.scale_range,
                  supersample=spec.supersample)


def make_withheld(spec: SyntheticConceptSpec, seed: int,
                  withhold: Sequence[Mapping[str, str]]) -> ImageDataset:
    """Exactly the combinations ``make_synthetic(spec, seed, withhold)`` leaves out (the
    out-of-distribution set), with the images and ids they would have had."""
    if not withhold:
        raise ValueError("make_withheld: withhold must name at least one pattern")
    ds = make_synthetic(spec, seed, only=withhold)
    return dataclasses.replace(ds, meta={**ds.meta, "withheld": True})


# ----------------------------------------------------------------------------- classification

def _palette(spec: SyntheticConceptSpec, bg: str):
    """Reference colors for pixel assignment: index 0 = background, then (color, dark?)."""
    refs, tags = [BACKGROUND_COLORS[bg]], [(-1, False)]
    for i, c in enumerate(spec.colors):
        rgb = np.asarray(SHAPE_COLORS[c], np.float64)
        refs += [rgb, DARK_FACTOR * rgb]
        tags += [(i, False), (i, True)]
    return np.asarray(refs, np.float64), tags


def _texture_coverage(texture: str, h: int, w: int, supersample: int = 4) -> np.ndarray:
    """Per-pixel fraction ``[h, w]`` of an image that ``texture`` darkens (image-anchored)."""
    x, y = _sample_points(max(h, w), supersample)
    d = texture_dark(texture, x, y, max(h, w)).astype(np.float64)
    return _box_reduce(d, max(h, w), supersample)[:h, :w]


def _template_iou(shape: str, mask: np.ndarray, box: tuple[int, int, int, int],
                  supersample: int = 2) -> float:
    """Soft IoU between ``mask [H, W]`` and ``shape`` stretched onto pixel box (x0, y0, x1, y1)."""
    h, w = mask.shape
    x0, y0, x1, y1 = box
    u0, v0, u1, v1 = shape_box(shape)
    t = (np.arange(max(h, w) * supersample) + 0.5) / supersample
    x, y = np.meshgrid(t[:w * supersample], t[:h * supersample], indexing="xy")
    u = u0 + (x - x0) / (x1 - x0) * (u1 - u0)
    v = v0 + (y - y0) / (y1 - y0) * (v1 - v0)
    a = shape_mask(shape, u, v).astype(np.float64)
    a = a.reshape(h, supersample, w, supersample).mean(axis=(1, 3))
    return float(np.minimum(a, mask).sum() / max(np.maximum(a, mask).sum(), 1e-9))


def classify_concepts(images: np.ndarray,
                      spec: SyntheticConceptSpec | None = None) -> dict[str, np.ndarray]:
    """Recovers background, color, texture and shape labels from images by pixel statistics.

    Args:
      images: ``[N, H, W, 3]`` (or ``[H, W, 3]``) float in ``[-1, 1]``.
      spec: the vocabularies to choose from (default: ``SyntheticConceptSpec()``).

    Returns:
      ``shape``, ``color``, ``background``, ``texture``: ``[N]`` int32 indices into the spec's
      vocabularies; ``shape_score``: ``[N]`` IoU of the best template (1 = perfect, low values
      mean the image shows no clear shape); ``foreground_fraction``: ``[N]``.
    """
    from scipy import ndimage

    spec = spec or SyntheticConceptSpec()
    x = np.asarray(images, np.float64)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images: expected [N, H, W, 3], got {x.shape}")
    rgb = (np.clip(x, -1.0, 1.0) + 1.0) * 127.5
    bg_refs = np.asarray([BACKGROUND_COLORS[b] for b in spec.backgrounds], np.float64)
    coverage = np.stack([_texture_coverage(t, *rgb.shape[1:3]) for t in spec.textures])
    out = {k: np.zeros(len(rgb), np.int32) for k in CONCEPTS}
    out["shape_score"] = np.zeros(len(rgb), np.float32)
    out["foreground_fraction"] = np.zeros(len(rgb), np.float32)
    for n, img in enumerate(rgb):
        ring = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
        bg_i = int(np.argmin(np.linalg.norm(bg_refs - np.median(ring, 0), axis=-1)))
        refs, tags = _palette(spec, spec.backgrounds[bg_i])
        nearest = np.argmin(np.linalg.norm(img[:, :, None, :] - refs, axis=-1), axis=-1)
        fg = nearest != 0
        lab, count = ndimage.label(fg)
        if count:
            sizes = ndimage.sum(fg, lab, index=np.arange(1, count + 1))
            fg = lab == 1 + int(np.argmax(sizes))
        fg = ndimage.binary_fill_holes(fg)
        out["background"][n] = bg_i
        out["foreground_fraction"][n] = fg.mean()
        if not fg.any():
            continue
        interior = ndimage.binary_erosion(fg)
        votes_from = interior & (nearest != 0)
        if votes_from.sum() < 3:
            votes_from = fg & (nearest != 0)
        picked = nearest[votes_from]
        color_votes = np.bincount([tags[p][0] for p in picked], minlength=len(spec.colors))
        out["color"][n] = int(np.argmax(color_votes))
        dark = np.asarray([tags[p][1] for p in picked], np.float64)
        mismatch = np.abs(coverage[:, votes_from] - dark).mean(axis=1)
        out["texture"][n] = int(np.argmin(mismatch))
        rows, cols = np.nonzero(fg)
        box = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
        scores = [_template_iou(s, fg.astype(np.float64), box) for s in spec.shapes]
        out["shape"][n] = int(np.argmax(scores))
        out["shape_score"][n] = max(scores)
    return out


def concept_accuracy(ds: ImageDataset, spec: SyntheticConceptSpec | None = None,
                     images: np.ndarray | None = None) -> dict[str, float]:
    """Fraction of images whose classified concepts equal ``ds``'s labels (per concept).

    ``images`` replaces ``ds.images`` (e.g. generations prompted with ``ds.captions``). The
    vocabularies default to ``ds.label_names`` (so concatenated or subset data sets work);
    predictions and labels are compared by name.
    """
    if spec is None:
        spec = SyntheticConceptSpec(**{f: ds.label_names[k] for f, k in (
            ("shapes", "shape"), ("colors", "color"), ("backgrounds", "background"),
            ("textures", "texture")) if k in ds.label_names})
    pred = classify_concepts(ds.images if images is None else images, spec)
    return {k: float(np.mean([spec.vocab(k)[p] == t for p, t in zip(pred[k],
                                                                   ds.label_strings(k))]))
            for k in CONCEPTS if k in ds.labels}


def parse_caption(text: str) -> dict[str, str]:
    """Inverts :func:`caption`: ``"a red circle on a blue background with dots"`` ->
    ``{'color': 'red', 'shape': 'circle', 'background': 'blue', 'texture': 'dots'}``.

    Raises ``ValueError`` for text not in that form.
    """
    words = text.strip().split()
    texture = "solid"
    if len(words) == 9 and words[7] == "with":
        texture, words = words[8], words[:7]
    if (len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"]
            or words[6] != "background" or words[2] not in SHAPES
            or words[1] not in SHAPE_COLORS or words[5] not in BACKGROUND_COLORS
            or texture not in TEXTURES):
        raise ValueError(f"not a synthetic concept caption: {text!r}")
    return {"shape": words[2], "color": words[1], "background": words[5], "texture": texture}


__all__ = [
    "SHAPES", "SHAPE_COLORS", "BACKGROUND_COLORS", "TEXTURES", "SyntheticConceptSpec", "caption",
    "classify_concepts", "concept_accuracy", "make_synthetic", "make_withheld",
    "parse_caption", "rasterize",
    "render", "sample_placement", "shape_mask",
]
