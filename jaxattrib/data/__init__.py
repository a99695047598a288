"""Data sources for jaxattrib, all returning an in-memory :class:`ImageDataset` (NHWC float32
images in [-1, 1], captions, integer concept labels, stable ids, a content fingerprint).

* :mod:`~jaxattrib.data.synthetic` — colored shapes with exact concept labels, withholdable
  combinations, and a pixel-statistics concept classifier.
* :mod:`~jaxattrib.data.folder` — image folders with captions (DreamBooth layout).
* :mod:`~jaxattrib.data.digits` — scikit-learn's bundled 8x8 digits, upsampled.
* :mod:`~jaxattrib.data.tfds_source` — locally prepared TensorFlow Datasets (optional extra).

For training sets that do not fit in memory, :mod:`~jaxattrib.data.source` has the same kinds as
:class:`~jaxattrib.data.source.DataSource` objects that read rows on demand (plus a content
fingerprint and a JSON reference), and :mod:`~jaxattrib.data.run_data` the run directory's
reference to them (``docs/data.md``).
"""

from jaxattrib.data.dataset import (DataError, ImageDataset, concat, epoch_permutation,
                                    model_to_uint8, resize_center_crop, uint8_to_model)
from jaxattrib.data.digits import load_digits
from jaxattrib.data.folder import load_folder, load_image
from jaxattrib.data.synthetic import (SyntheticConceptSpec, caption, classify_concepts,
                                      concept_accuracy, make_synthetic, make_withheld,
                                      parse_caption, render)
from jaxattrib.data.source import DataSource, iter_batches, open_source, shard_range
from jaxattrib.data.tfds_source import load_tfds, load_tfds_image_folder

__all__ = [
    "DataError", "DataSource", "ImageDataset", "SyntheticConceptSpec", "caption",
    "classify_concepts", "concat", "concept_accuracy", "epoch_permutation", "iter_batches",
    "load_digits", "load_folder", "load_image", "load_tfds", "load_tfds_image_folder",
    "make_synthetic", "make_withheld", "model_to_uint8", "open_source", "parse_caption",
    "render", "resize_center_crop", "shard_range", "uint8_to_model",
]
