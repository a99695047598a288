"""jaxattrib.fingerprint: each recipe hashes exactly the byte stream its stored kind always used
(the formulas below are the ones the call sites held before the recipes were unified), so
fingerprints stored in existing run directories still match."""

import hashlib
import json

import jax.numpy as jnp
import numpy as np

from jaxattrib import fingerprint as F


def _arrays():
    rng = np.random.default_rng(0)
    img = rng.standard_normal((3, 4, 4, 3)).astype(np.float32)
    return img, img[:, ::2], np.array(["a red circle", "b"]), jnp.arange(5, dtype=jnp.int32)


def test_raw_arrays_is_the_demo_and_cgi_dm_recipe():
    img, strided, caps, j = _arrays()
    h = hashlib.sha256()
    for a in (img, strided, caps, j):
        h.update(np.ascontiguousarray(a).tobytes())
    assert F.raw_arrays(img, strided, caps, j) == h.hexdigest()
    # demo_attribute._fingerprint_of / attribute's query key: one array, C-order bytes
    assert F.raw_arrays(strided) == hashlib.sha256(strided.tobytes()).hexdigest()
    # CGI-DM hashes the captions as given (a list of str)
    assert F.raw_arrays(["x", "yy"]) == hashlib.sha256(
        np.ascontiguousarray(["x", "yy"]).tobytes()).hexdigest()
    assert F.raw_arrays(img) != F.raw_arrays(img.astype(np.float64))


def test_typed_arrays_and_tree_are_the_feature_store_and_montrage_recipe():
    img, strided, caps, j = _arrays()
    h = hashlib.sha256()
    for a in (img, strided, j):
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{a.shape}|{a.dtype.str}|".encode())
        h.update(a.tobytes())
    assert F.typed_arrays(img, strided, j) == h.hexdigest()
    assert F.tree([img, strided, j]) == h.hexdigest()
    # a dict is hashed in key order (tree_leaves), whatever the insertion order
    assert F.tree({"x0": img, "ctx": j}) == F.typed_arrays(j, img)
    # the shape is part of the key: same bytes, other shape -> other fingerprint
    assert F.typed_arrays(img) != F.typed_arrays(img.reshape(-1))
    assert F.raw_arrays(img) == F.raw_arrays(img.reshape(-1))


def test_text_and_json_object_recipes():
    assert F.text("abc", "vae=1") == hashlib.sha256(b"abc|vae=1").hexdigest()
    assert F.text("abc|latents=r|v") == hashlib.sha256(
        np.frombuffer(b"abc|latents=r|v", np.uint8).tobytes()).hexdigest()
    obj = {"b": [1, 2], "a": "x"}
    assert F.json_object(obj) == hashlib.sha256(
        json.dumps(obj, sort_keys=True).encode()).hexdigest()
    assert F.json_object(obj) == F.json_object({"a": "x", "b": [1, 2]})


def test_call_sites_use_the_recipes():
    """The stored kinds are keyed by these recipes (same function objects, not copies)."""
    from jaxattrib.attribution import montrage, store
    from jaxattrib.runs import attribute, cgi_dm, demo_attribute, source_model
    img = _arrays()[0]
    assert store.dataset_fingerprint({"x0": img}) == F.typed_arrays(img)
    assert montrage._fingerprint is F.typed_arrays
    assert cgi_dm._fingerprint is F.raw_arrays
    assert demo_attribute._fingerprint_of is F.raw_arrays
    assert attribute._sha is F.text
    assert source_model._sha is F.json_object
