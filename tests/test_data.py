"""Tests for jaxattrib.data: the dataset type, synthetic concepts, folders, digits, tfds."""

import io
import json
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxattrib.data import (DataError, ImageDataset, SyntheticConceptSpec, caption,
                            classify_concepts, concat, concept_accuracy, load_digits, load_folder,
                            load_tfds, make_synthetic, make_withheld, parse_caption, render)
from jaxattrib.data import synthetic as syn
from jaxattrib.data.digits import upsample

SMALL = SyntheticConceptSpec(shapes=("circle", "square", "star"), colors=("red", "blue"),
                             backgrounds=("black", "white"), per_combination=2, size=32)
FULL = SyntheticConceptSpec(shapes=syn.SHAPES, colors=tuple(syn.SHAPE_COLORS),
                            backgrounds=("black", "white", "gray", "blue"),
                            textures=syn.TEXTURES, size=32, per_combination=1)


# ----------------------------------------------------------------------------- ImageDataset

def _tiny(n=5, seed=0):
    rng = np.random.default_rng(seed)
    return ImageDataset(
        images=rng.uniform(-1, 1, (n, 4, 4, 3)).astype(np.float32),
        captions=tuple(f"c{i}" for i in range(n)),
        labels={"k": np.arange(n) % 2},
        label_names={"k": ("even", "odd")},
        ids=tuple(f"x/{i}" for i in range(n)),
        meta={"source": "test"})


def test_fingerprint_changes_with_one_pixel_caption_or_id():
    ds = _tiny()
    assert ds.fingerprint() == _tiny().fingerprint()
    img = np.array(ds.images)
    img[3, 2, 1, 0] = np.nextafter(img[3, 2, 1, 0], np.float32(1.0))
    other = ImageDataset(img, ds.captions, ds.labels, ds.label_names, ds.ids)
    assert other.fingerprint() != ds.fingerprint()
    cap = ImageDataset(ds.images, ds.captions[:-1] + ("changed",), ds.labels, ds.label_names,
                       ds.ids)
    assert cap.fingerprint() != ds.fingerprint()
    ids = ImageDataset(ds.images, ds.captions, ds.labels, ds.label_names,
                       ds.ids[:-1] + ("y/4",))
    assert ids.fingerprint() != ds.fingerprint()
    # The data set owns its pixels: mutating the caller's array does not change it.
    src = np.array(ds.images)
    owned = ImageDataset(src, ds.captions, ds.labels, ds.label_names, ds.ids)
    src[0] = 0.0
    assert owned.fingerprint() == ds.fingerprint()
    assert not owned.images.flags.writeable


def test_dataset_validation_errors():
    ds = _tiny()
    with pytest.raises(DataError, match=r"\[-1, 1\]"):
        ImageDataset(ds.images * 2, ds.captions, ds.labels, ds.label_names, ds.ids)
    with pytest.raises(DataError, match="unique"):
        ImageDataset(ds.images, ds.captions, ds.labels, ds.label_names, ("a",) * 5)
    with pytest.raises(DataError, match="labels"):
        ImageDataset(ds.images, ds.captions, {"k": np.full(5, 2)}, ds.label_names, ds.ids)
    with pytest.raises(DataError, match="captions"):
        ImageDataset(ds.images, ds.captions[:4], ds.labels, ds.label_names, ds.ids)


@pytest.mark.parametrize("key_kind", ["seed", "jax"])
@pytest.mark.parametrize("drop_last", [False, True])
def test_batches_cover_each_example_once_per_epoch(key_kind, drop_last):
    ds = _tiny(n=11)
    key = 3 if key_kind == "seed" else jax.random.key(3)
    batches = list(ds.batches(4, key, drop_last=drop_last))
    sizes = [len(b["indices"]) for b in batches]
    assert sizes == ([4, 4] if drop_last else [4, 4, 3])
    seen = np.concatenate([b["indices"] for b in batches])
    assert len(set(seen.tolist())) == len(seen)
    if not drop_last:
        assert sorted(seen.tolist()) == list(range(11))
    assert not np.array_equal(seen, np.arange(len(seen)))  # actually shuffled
    for b in batches:  # everything follows the indices
        np.testing.assert_array_equal(b["images"], ds.images[b["indices"]])
        assert b["captions"] == tuple(ds.captions[i] for i in b["indices"])
        assert b["ids"] == tuple(ds.ids[i] for i in b["indices"])
        np.testing.assert_array_equal(b["labels"]["k"], b["indices"] % 2)
    again = np.concatenate([b["indices"] for b in ds.batches(4, key, drop_last=drop_last)])
    np.testing.assert_array_equal(seen, again)
    other = 4 if key_kind == "seed" else jax.random.fold_in(key, 1)
    assert not np.array_equal(
        seen, np.concatenate([b["indices"] for b in ds.batches(4, other, drop_last=drop_last)]))


def test_batches_unshuffled_and_key_required():
    ds = _tiny(n=5)
    idx = np.concatenate([b["indices"] for b in ds.batches(2, shuffle=False)])
    np.testing.assert_array_equal(idx, np.arange(5))
    with pytest.raises(ValueError, match="key"):
        next(ds.batches(2))


def test_subset_and_concat_remap_labels():
    a = make_synthetic(SMALL, seed=0, only=[{"color": "red"}])
    spec_b = SyntheticConceptSpec(shapes=("star", "cross"), colors=("green", "red"),
                                  backgrounds=("gray",), per_combination=1)
    b = make_synthetic(spec_b, seed=0)
    c = concat([a, b])
    assert len(c) == len(a) + len(b)
    assert c.label_names["shape"] == ("circle", "square", "star", "cross")
    assert c.label_strings("shape") == a.label_strings("shape") + b.label_strings("shape")
    assert c.label_strings("color") == a.label_strings("color") + b.label_strings("color")
    assert c.ids == a.ids + b.ids
    s = c.subset([len(a) + 1, 0])
    assert s.ids == (b.ids[1], a.ids[0])
    np.testing.assert_array_equal(s.images, np.stack([b.images[1], a.images[0]]))
    assert s.label_strings("shape") == (b.label_strings("shape")[1], a.label_strings("shape")[0])
    mask = np.zeros(len(c), bool)
    mask[[2, 5]] = True
    assert c.subset(mask).ids == (c.ids[2], c.ids[5])
    assert c.subset(np.arange(len(c))).fingerprint() == c.fingerprint()
    with pytest.raises(DataError, match="unique"):
        concat([a, a])


# ----------------------------------------------------------------------------- synthetic

def test_synthetic_is_deterministic_per_seed():
    a, b = make_synthetic(SMALL, seed=7), make_synthetic(SMALL, seed=7)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.captions == b.captions and a.ids == b.ids and a.fingerprint() == b.fingerprint()
    c = make_synthetic(SMALL, seed=8)
    assert c.ids == a.ids
    assert not np.array_equal(c.images, a.images)
    assert c.fingerprint() != a.fingerprint()
    # the images of one combination differ from each other (jitter is per image)
    assert not np.array_equal(a.images[0], a.images[1])
    assert a.images.shape == (3 * 2 * 2 * 2, 32, 32, 3) and a.images.dtype == np.float32
    assert a.images.min() >= -1 and a.images.max() <= 1


def test_withholding_leaves_out_exactly_the_withheld_combinations():
    withhold = [{"color": "red", "shape": "circle"}, {"background": "white", "shape": "star"}]
    train = make_synthetic(SMALL, seed=1, withhold=withhold)
    held = make_withheld(SMALL, seed=1, withhold=withhold)
    full = make_synthetic(SMALL, seed=1)

    def hit(ds, i):
        s, c, b = (ds.label_strings(k)[i] for k in ("shape", "color", "background"))
        return (c == "red" and s == "circle") or (b == "white" and s == "star")

    assert not any(hit(train, i) for i in range(len(train)))
    assert all(hit(held, i) for i in range(len(held)))
    # red circle: 2 backgrounds; white star: 2 colors; 2 images each.
    assert len(held) == (2 + 2) * 2 and len(train) + len(held) == len(full)
    assert set(train.ids) | set(held.ids) == set(full.ids)
    # images are the same ones the full set has under the same id
    pos = {i: k for k, i in enumerate(full.ids)}
    for part in (train, held):
        np.testing.assert_array_equal(part.images, full.images[[pos[i] for i in part.ids]])
    with pytest.raises(ValueError, match="purple"):
        make_synthetic(SMALL, seed=1, withhold=[{"color": "purple"}])
    with pytest.raises(ValueError, match="unknown concept"):
        make_synthetic(SMALL, seed=1, withhold=[{"hue": "red"}])


def test_captions_match_labels_including_textures():
    spec = SyntheticConceptSpec(shapes=("triangle",), colors=("yellow", "blue"),
                                backgrounds=("gray", "blue"), textures=("solid", "stripes"),
                                per_combination=1)
    ds = make_synthetic(spec, seed=0)
    assert len(ds) == 1 * 2 * 2 * 2 - 2  # blue on blue is skipped
    for i in range(len(ds)):
        s, c, b, t = (ds.label_strings(k)[i] for k in ("shape", "color", "background", "texture"))
        assert ds.captions[i] == caption(s, c, b, t)
        assert parse_caption(ds.captions[i]) == dict(shape=s, color=c, background=b, texture=t)
        assert c != b
    assert "a yellow triangle on a gray background with stripes" in ds.captions
    assert "a blue triangle on a gray background" in ds.captions
    with pytest.raises(ValueError, match="not a synthetic"):
        parse_caption("a photo of a dog")


def test_render_antialiased_area_matches_geometry():
    """Coverage of a rendered circle/square equals the analytic area (box-filter AA)."""
    size, r = 64, 17.3
    for shape, area, perimeter in (("circle", np.pi * r * r, 2 * np.pi * r),
                                   ("square", (2 * 0.85 * r) ** 2, 8 * 0.85 * r)):
        img = syn.rasterize(shape, "red", "black", "solid", size, (31.7, 33.2), r, supersample=8)
        fg, bg = syn.SHAPE_COLORS["red"][0], syn.BACKGROUND_COLORS["black"][0]
        alpha = ((img[..., 0].astype(np.float64) + 1) * 127.5 - bg) / (fg - bg)
        # point sampling misplaces an edge by at most half a sub-sample spacing
        assert abs(alpha.sum() - area) < perimeter / (2 * 8)
        assert 0.0 < alpha[alpha < 0.99].max()  # there are partially covered edge pixels
    centered = render("star", "green", "white", size=32)
    np.testing.assert_array_equal(centered, render("star", "green", "white", size=32))


def test_classify_concepts_recovers_all_labels_on_clean_renders():
    """All 6 shapes x 8 colors x 4 backgrounds x 3 textures (558 images, jittered): 100%."""
    ds = make_synthetic(FULL, seed=0)
    acc = concept_accuracy(ds)
    assert acc == {"shape": 1.0, "color": 1.0, "background": 1.0, "texture": 1.0}
    pred = classify_concepts(ds.images, FULL)
    assert pred["shape_score"].min() > 0.6
    # with Gaussian pixel noise (sigma 0.1 in [-1, 1] units) it is still exact
    noisy = np.clip(ds.images + 0.1 * np.random.default_rng(0).standard_normal(
        ds.images.shape), -1, 1)
    assert concept_accuracy(ds, images=noisy) == acc
    # vocabularies come from label_names, so a concatenation with another order still scores
    other = make_synthetic(SyntheticConceptSpec(shapes=("star", "circle"), colors=("pink", "red"),
                                                backgrounds=("cyan",), per_combination=1), 0)
    both = concat([other, ds.subset(np.arange(0, len(ds), 7))])
    assert concept_accuracy(both) == acc
    # a wrong image set scores low: every image replaced by a fixed one
    wrong = np.broadcast_to(ds.images[0], ds.images.shape)
    assert concept_accuracy(ds, images=wrong)["shape"] < 0.3
    # a blank image has no shape
    blank = classify_concepts(np.full((1, 32, 32, 3), -0.9), FULL)
    assert blank["foreground_fraction"][0] == 0.0 and blank["shape_score"][0] == 0.0


def test_classify_concepts_at_64px_and_spec_order():
    spec = SyntheticConceptSpec(shapes=("cross", "diamond", "triangle"), colors=("pink", "cyan"),
                                backgrounds=("white", "black"), textures=("dots", "solid"),
                                size=64, per_combination=2)
    ds = make_synthetic(spec, seed=3)
    pred = classify_concepts(ds.images, spec)
    for k in ("shape", "color", "background", "texture"):
        np.testing.assert_array_equal(pred[k], ds.labels[k])
    # a single [H, W, 3] image works too
    one = classify_concepts(ds.images[0], spec)
    assert one["shape"].shape == (1,) and one["shape"][0] == ds.labels["shape"][0]


# ----------------------------------------------------------------------------- folder

def _save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array), mode).save(path)


def _solid(h, w, rgb):
    return np.broadcast_to(np.asarray(rgb, np.uint8), (h, w, 3)).copy()


def _expected(rgb):
    return np.asarray(rgb, np.float32) / 127.5 - 1.0


def _make_folder(root):
    _save(root / "red_ball" / "a.png", _solid(40, 60, (200, 10, 10)))
    _save(root / "red_ball" / "b.jpg", _solid(50, 50, (200, 10, 10)))
    (root / "red_ball" / "prompt.txt").write_text("a photo of sks ball\n")
    _save(root / "blue_box" / "x.png", _solid(30, 24, (10, 10, 200)))
    _save(root / "blue_box" / "y.png", _solid(24, 30, (10, 10, 200)))
    _save(root / "blue_box" / "z.png", _solid(24, 24, (10, 10, 200)))
    (root / "blue_box" / "captions.jsonl").write_text(
        json.dumps({"file_name": "x.png", "text": "box x"}) + "\n\n"
        + json.dumps({"file_name": "y.png", "caption": "box y"}) + "\n")
    _save(root / "green_cup" / "01.png", _solid(32, 32, (10, 200, 10)))
    (root / "captions.jsonl").write_text(
        json.dumps({"file_name": "blue_box/y.png", "caption": "root wins"}) + "\n")
    (root / "notes.md").write_text("not an image")


def test_folder_captions_from_every_source(tmp_path):
    _make_folder(tmp_path)
    ds = load_folder(tmp_path, 16)
    assert ds.ids == ("blue_box/x.png", "blue_box/y.png", "blue_box/z.png", "green_cup/01.png",
                      "red_ball/a.png", "red_ball/b.jpg")
    assert ds.captions == ("box x", "root wins", "a photo of a blue box", "a photo of a green cup",
                           "a photo of sks ball", "a photo of sks ball")
    assert ds.label_names == {"subject": ("blue_box", "green_cup", "red_ball")}
    np.testing.assert_array_equal(ds.labels["subject"], [0, 0, 0, 1, 2, 2])
    assert ds.images.shape == (6, 16, 16, 3)
    for i, rgb in ((0, (10, 10, 200)), (3, (10, 200, 10)), (4, (200, 10, 10))):
        np.testing.assert_allclose(ds.images[i], np.broadcast_to(_expected(rgb), (16, 16, 3)),
                                   atol=1.01 / 127.5)
    # JPEG is lossy: close, not exact
    np.testing.assert_allclose(ds.images[5].mean((0, 1)), _expected((200, 10, 10)), atol=0.05)
    # subjects select and order; the template has subject/class/token fields
    ds2 = load_folder(tmp_path, 8, subjects=["red_ball", "green_cup"], max_per_subject=1,
                      caption_template="{token} {subject}", instance_token="zwx")
    assert ds2.ids == ("red_ball/a.png", "green_cup/01.png")
    assert ds2.captions == ("a photo of sks ball", "zwx green cup")
    assert ds2.label_names["subject"] == ("red_ball", "green_cup")


def test_folder_class_names_and_center_crop(tmp_path):
    # 60 wide x 40 high: green | red (center 40 columns) | blue
    img = _solid(40, 60, (10, 200, 10))
    img[:, 10:50] = (200, 10, 10)
    img[:, 50:] = (10, 10, 200)
    _save(tmp_path / "dog7" / "0.png", img)
    img_t = np.ascontiguousarray(np.transpose(img, (1, 0, 2)))  # 40 wide x 60 high
    _save(tmp_path / "dog7" / "1.png", img_t)
    _save(tmp_path / "my_cat" / "0.png", _solid(20, 20, (90, 90, 90)))
    (tmp_path / "prompts_and_classes.txt").write_text(
        "Classes\n\nsubject_name,class\ndog7,dog\n\nprompt_list = [\n"
        "'a {0} {1} in the jungle'.format(unique_token, class_token),\n]\n")
    ds = load_folder(tmp_path, 20)
    assert ds.captions == ("a photo of a dog", "a photo of a dog", "a photo of a my cat")
    assert ds.label_names["class"] == ("dog", "my cat")
    np.testing.assert_array_equal(ds.labels["class"], [0, 0, 1])
    red = np.broadcast_to(_expected((200, 10, 10)), (20, 16, 3))
    # 40 -> 20 px (factor 2): the cubic filter reaches 4 source px, i.e. 2 output px
    np.testing.assert_allclose(ds.images[0][:, 2:-2], red, atol=1.01 / 127.5)
    np.testing.assert_allclose(ds.images[1][2:-2, :], np.transpose(red, (1, 0, 2)),
                               atol=1.01 / 127.5)


def test_folder_modes_are_converted(tmp_path):
    _save(tmp_path / "s" / "gray.png", np.full((20, 20), 77, np.uint8), "L")
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 0  # fully transparent red -> white background
    _save(tmp_path / "s" / "rgba.png", rgba, "RGBA")
    ds = load_folder(tmp_path, 10)
    np.testing.assert_allclose(ds.images[0], _expected((77, 77, 77)) + np.zeros((10, 10, 3)),
                               atol=1e-6)
    np.testing.assert_allclose(ds.images[1], np.ones((10, 10, 3)), atol=1e-6)


def test_folder_bad_images_raise_naming_the_path_or_are_skipped(tmp_path):
    good = tmp_path / "subj" / "good.png"
    _save(good, _solid(32, 32, (1, 2, 3)))
    corrupt = tmp_path / "subj" / "corrupt.jpg"
    corrupt.write_bytes(b"this is not a jpeg at all" * 10)
    with pytest.raises(DataError, match="corrupt.jpg"):
        load_folder(tmp_path, 16)
    corrupt.unlink()

    small = tmp_path / "subj" / "small.png"
    _save(small, _solid(10, 12, (1, 2, 3)))
    with pytest.raises(DataError, match=r"small\.png.*min_size=16"):
        load_folder(tmp_path, 16)
    assert len(load_folder(tmp_path, 16, min_size=8)) == 2
    small.unlink()

    deep = tmp_path / "subj" / "deep.png"
    _save(deep, np.full((32, 32), 40000, np.uint16))
    with pytest.raises(DataError, match=r"deep\.png.*mode"):
        load_folder(tmp_path, 16)

    full = io.BytesIO()
    Image.fromarray(_solid(64, 64, (9, 9, 9))).save(full, format="JPEG")
    (tmp_path / "subj" / "trunc.jpg").write_bytes(full.getvalue()[:200])
    deep.rename(tmp_path / "deep.png.bak")
    with pytest.raises(DataError, match="trunc.jpg"):
        load_folder(tmp_path, 16)
    (tmp_path / "deep.png.bak").rename(deep)

    with pytest.warns(UserWarning, match="skipped 2"):
        ds = load_folder(tmp_path, 16, on_error="skip")
    assert ds.ids == ("subj/good.png",)
    assert len(ds.meta["skipped"]) == 2
    assert any("deep.png" in s for s in ds.meta["skipped"])
    assert any("trunc.jpg" in s for s in ds.meta["skipped"])


def test_folder_empty_and_malformed_layouts(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="empty.*no images"):
        load_folder(empty, 16)
    with pytest.raises(DataError, match="not a folder"):
        load_folder(tmp_path / "missing", 16)
    flat = tmp_path / "flat_subject"
    _save(flat / "0.png", _solid(16, 16, (5, 5, 5)))
    ds = load_folder(flat, 16)
    assert ds.ids == ("0.png",) and ds.captions == ("a photo of a flat subject",)
    _save(flat / "sub" / "1.png", _solid(16, 16, (5, 5, 5)))
    with pytest.raises(DataError, match="both"):
        load_folder(flat, 16)
    with pytest.raises(DataError, match="nope"):
        load_folder(flat / "sub", 16, subjects=["nope"])
    bad = tmp_path / "badcap"
    _save(bad / "s" / "0.png", _solid(16, 16, (5, 5, 5)))
    (bad / "captions.jsonl").write_text('{"file_name": "s/0.png"}\n')
    with pytest.raises(DataError, match=r"captions\.jsonl:1"):
        load_folder(bad, 16)


@pytest.mark.needs_data
def test_folder_reads_real_dreambooth(shared_data):
    root = shared_data / "dreambooth"
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    subjects = ["dog", "cat", "backpack_dog"]
    ds = load_folder(root, 32, subjects=subjects)
    n_files = [len(list((root / s).glob("*.jpg"))) for s in subjects]
    assert len(ds) == sum(n_files) and ds.images.shape[1:] == (32, 32, 3)
    assert ds.label_names["subject"] == tuple(subjects)
    np.testing.assert_array_equal(np.bincount(ds.labels["subject"]), n_files)
    assert ds.ids[0] == "dog/00.jpg"
    assert set(ds.captions) == {"a photo of a dog", "a photo of a cat", "a photo of a backpack"}
    assert ds.images.std() > 0.1 and ds.images.min() >= -1 and ds.images.max() <= 1
    # photos of different subjects differ more than the pixel noise
    means = np.stack([ds.images[ds.labels["subject"] == k].mean(0) for k in range(3)])
    assert np.abs(means[0] - means[1]).mean() > 0.05


# ----------------------------------------------------------------------------- digits

def test_digits_shape_labels_and_nearest_upsampling():
    from sklearn.datasets import load_digits as sk_digits

    raw = sk_digits()
    ds = load_digits(32)
    assert ds.images.shape == (1797, 32, 32, 3) and len(ds) == 1797
    np.testing.assert_array_equal(ds.labels["digit"], raw.target)
    assert ds.captions[5] == f"a handwritten digit {raw.target[5]}"
    assert ds.ids[5] == "digits/0005"
    np.testing.assert_array_equal(ds.images[..., 0], ds.images[..., 2])
    # nearest at 4x: every 4x4 block is the original pixel, mapped 0..16 -> [-1, 1]
    orig = raw.images / 8.0 - 1.0
    np.testing.assert_allclose(ds.images[:, ::4, ::4, 0], orig, atol=1e-6)
    np.testing.assert_array_equal(ds.images[:, 3::4, 3::4, 0], ds.images[:, ::4, ::4, 0])
    sub = load_digits(8, digits=(3, 7), max_per_digit=5)
    assert len(sub) == 10 and set(sub.label_strings("digit")) == {"3", "7"}
    first5 = sorted(np.nonzero(raw.target == 3)[0][:5].tolist()
                    + np.nonzero(raw.target == 7)[0][:5].tolist())
    assert sub.ids == tuple(f"digits/{i:04d}" for i in first5)
    np.testing.assert_allclose(sub.images[..., 0], orig[first5], atol=1e-6)


@pytest.mark.parametrize("method", ["nearest", "bilinear"])
@pytest.mark.parametrize("size", [12, 32])
def test_digits_resampling_matches_jax_image_resize(method, size):
    from sklearn.datasets import load_digits as sk_digits

    x = sk_digits().images[:50] / 16.0
    ref = jax.image.resize(jnp.asarray(x, jnp.float32), (50, size, size), method,
                           antialias=False)
    np.testing.assert_allclose(upsample(x, size, method), np.asarray(ref), atol=1e-6)
    ds = load_digits(size, resample=method, max_per_digit=5)
    idx = [int(i.split("/")[1]) for i in ds.ids]
    expect = upsample(sk_digits().images[idx] / 16.0, size, method) * 2 - 1
    np.testing.assert_allclose(ds.images[..., 1], np.clip(expect, -1, 1), atol=1e-6)


# ----------------------------------------------------------------------------- tfds

TFDS_SKIP = ("tensorflow-datasets is not installed: it is in the test extra "
             "(`pip install -e '.[test]'`, what scripts/bootstrap.sh and CI install)")


def test_tfds_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r"jaxattrib\[tfds\]"):
        load_tfds("mnist", "train", "/nonexistent", 16)


def _build_tiny_tfds(tfds, data_dir):
    colors = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (120, 120, 120)]

    class JaxattribTinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                # Image features are PNG-encoded (PIL, no TensorFlow) like real tfds sets
                "image": tfds.features.Image(shape=(None, None, 3)),
                "gray": tfds.features.Image(shape=(None, None, 1)),
                "raw": tfds.features.Tensor(shape=(12, 18, 3), dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=["red_thing", "green", "blue", "gray"]),
                "text": tfds.features.Text(),
            }))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, c in enumerate(colors):
                yield i, {"image": Image.fromarray(_solid(12, 18, c)),
                          "gray": Image.fromarray(np.full((16, 10), 40 * i, np.uint8), "L"),
                          "raw": _solid(12, 18, c), "label": i, "text": f"color {i}"}

    builder = JaxattribTinyImages(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return colors


def test_tfds_loads_a_locally_prepared_array_record_dataset(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets", reason=TFDS_SKIP)
    colors = _build_tiny_tfds(tfds, tmp_path)
    ds = load_tfds("jaxattrib_tiny_images", "train", tmp_path, 8, caption_key="text")
    assert len(ds) == 4 and ds.images.shape == (4, 8, 8, 3)
    assert ds.label_names["label"] == ("red_thing", "green", "blue", "gray")
    for i in range(4):  # example order is the stored order; content identifies the example
        k = int(ds.labels["label"][i])
        assert ds.captions[i] == f"color {k}"
        np.testing.assert_allclose(ds.images[i], np.broadcast_to(_expected(colors[k]),
                                                                 (8, 8, 3)), atol=1.01 / 127.5)
    assert ds.ids == tuple(f"jaxattrib_tiny_images/train/{i:06d}" for i in range(4))
    raw = load_tfds("jaxattrib_tiny_images", "train", tmp_path, 8, image_key="raw")
    np.testing.assert_array_equal(raw.images, ds.images)
    gray = load_tfds("jaxattrib_tiny_images", "train", tmp_path, 8, image_key="gray")
    for i in range(4):
        level = 40 * int(gray.labels["label"][i])
        np.testing.assert_allclose(gray.images[i], np.full((8, 8, 3), level / 127.5 - 1),
                                   atol=1.01 / 127.5)
    named = load_tfds("jaxattrib_tiny_images", "train", tmp_path, 8, limit=2)
    assert len(named) == 2
    assert named.captions[0] == "a photo of a " + named.label_strings("label")[0].replace("_", " ")
    with pytest.raises(DataError, match="no feature 'photo'"):
        load_tfds("jaxattrib_tiny_images", "train", tmp_path, 8, image_key="photo")
    with pytest.raises(DataError, match="tfds build mnist"):
        load_tfds("mnist", "train", tmp_path / "empty", 8)


def test_tfds_image_folder_needs_tensorflow(tmp_path):
    # `make test` installs neither tensorflow-datasets nor TensorFlow: this test skips there
    pytest.importorskip("tensorflow_datasets", reason=TFDS_SKIP)
    pytest.importorskip("tensorflow", reason="tfds.ImageFolder reads images with TensorFlow, "
                                             "which CI does not install (pip install tensorflow)")
    from jaxattrib.data import load_tfds_image_folder

    for label, rgb in (("cat", (200, 10, 10)), ("dog", (10, 10, 200))):
        _save(tmp_path / "train" / label / "0.png", _solid(20, 20, rgb))
    ds = load_tfds_image_folder(tmp_path, "train", 8)
    assert len(ds) == 2 and set(ds.label_strings("label")) == {"cat", "dog"}
