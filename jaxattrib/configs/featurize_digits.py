"""A small launcher config: an MLP classifier on scikit-learn digits, trained and featurized.

Runs in seconds on CPU and exercises the whole multi-host path of ``python -m
jaxattrib.launch {train,featurize}`` (mesh over all global devices, per-process rows, one
writer). The model is UNet-free on purpose: the point is the launch plumbing, not the model.

[design] The output function for featurization is TRAK's classification margin
``f(z) = logit_y − logsumexp_{j≠y} logit_j`` (Park et al. 2023, §3 / MadryLab/trak); training
minimizes the cross-entropy. ``featurize.params`` = ``'init'`` featurizes the freshly
initialized model (no training needed), ``'record'`` the last checkpoint written by ``train``.

Relative paths are resolved against the current directory of the launching process (so on a
pod every host must run from the same folder, or give absolute/shared paths).

Usage: ``python -m jaxattrib.launch featurize featurize_digits [--set featurize.k=128]``;
``get_config('tiny')`` is the test size (40 examples).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "digits_mlp"
    c.out_dir = "runs/featurize_digits"
    c.num_devices = 0  # 0: every global device

    c.data = ml_collections.ConfigDict()
    c.data.size = 8  # image side (8 = the originals)
    c.data.digits = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)
    c.data.max_per_digit = 16  # 160 examples

    c.model = ml_collections.ConfigDict()
    c.model.hidden = (32,)
    c.model.seed = 0

    c.train = ml_collections.ConfigDict()
    c.train.steps = 20
    c.train.batch_size = 16
    c.train.learning_rate = 1e-2
    c.train.checkpoint_every = 10
    c.train.seed = 0

    c.featurize = ml_collections.ConfigDict()
    c.featurize.params = "init"  # 'init' | 'record'
    c.featurize.k = 64
    c.featurize.projection = "rademacher"
    c.featurize.proj_seed = 0
    c.featurize.chunk_size = 32
    c.featurize.microbatch = 8
    c.featurize.key = 0

    if arg == "tiny":
        c.data.max_per_digit = 4
        c.data.digits = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)
        c.model.hidden = (16,)
        c.featurize.k = 32
        c.featurize.chunk_size = 16
        c.train.steps = 4
        c.train.checkpoint_every = 2
        c.train.batch_size = 8
    elif arg:
        raise ValueError(f"featurize_digits: unknown variant {arg!r} (expected 'tiny' or none)")
    return c
