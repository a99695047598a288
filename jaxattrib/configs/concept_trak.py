"""The Concept-TRAK benchmark (``benchmarks/concept_trak.py``;
:mod:`jaxattrib.eval.concept_benchmark`): concept-level attribution with in-distribution and
out-of-distribution queries, ground truth by construction, on the embedded base model.

The shipped base model was pretrained on the synthetic set (color × shape × background) with
four (shape, color) combinations withheld. It is fine-tuned on a training set drawn from the same
generator with the *same* four combinations withheld; that fine-tuning set is what is attributed.
Queries are generations of the fine-tuned model, each queried with one concept phrase (its color
or its shape); a training image is relevant iff it carries that concept. In-distribution (ID)
queries are generated for ``generate.id_combos`` (combinations in the training set), out-of-
distribution (OOD) ones for the withheld combinations (the base model's ``held_out``).
``get_config()`` is the full setting, ``get_config('smoke')`` a reduced one (minutes; numbers
meaningless), ``get_config('reference')`` the full setting with the reference's inversion
(:func:`reference_inversion`; ours is the default, docs/benchmarks/concept_trak.md). Override any field with ``--set key=value``.
"""

import ml_collections

from jaxattrib.configs import demo


def reference_inversion(c):
    """The reference's (x_t, t) pairs [code: enkeejunior1/concept-trak, AbC scripts]: training
    images DDIM-inverted with CFG 7.5 against the empty prompt; each query's pairs from its own
    sampling trajectory, regenerated from its seed with DDIM η = 0.1."""
    c.attribution.concept_inversion_guidance = 7.5
    c.attribution.concept_query_pairs = "trajectory"
    c.attribution.concept_query_eta = 0.1
    return c


def get_config(arg=None):
    # the demo's base model, fine-tuning (except steps), generation (except guidance) and
    # projection settings
    c = demo.get_config()
    del c["cgi_dm"], c["report"], c.generate["per_concept"], c.attribution["topk"]
    del c.attribution["checkpoints"]   # scored on the final model only (no ensembles here)
    c.data = ml_collections.ConfigDict()
    c.data.per_combination = 2         # renders per seen (shape, color, background) combination
    # Fine-tuning steps and guidance are chosen on *generation fidelity* only, never on
    # attribution metrics. The embedded 32-px latent model (issue 21) draws the prompted shape /
    # color in 0.92 / 0.99 of its own ID and 0.875 / 0.875 of its withheld-combination
    # generations (DDIM 25, guidance 3; docs/latent_base.md), so the demo's fine-tuning (400
    # steps) and guidance 3 are kept. (The former 16-px pixel model needed 4000 steps at guidance
    # 1.5 to draw the shape in 0.70 ID / 0.29 OOD: docs/benchmarks/concept_trak.md, history;
    # pass --set finetune.steps=4000 --set generate.guidance_scale=1.5 to rerun that setting.)
    c.finetune.steps = 400
    c.finetune.checkpoint_every = 100   # 5 checkpoints

    # ID combinations '<color> <shape>' (must be in the training set); they reuse the colors and
    # shapes of the withheld (OOD) combinations, so both splits query the same concept phrases
    c.generate.id_combos = ("yellow star", "green cross", "red triangle", "purple square")
    c.generate.ood_combos = ()         # () = all of the base model's withheld combinations
    c.generate.per_combo = 6           # generations per combination (backgrounds cycle); half val
    c.generate.guidance_scale = 3.0    # the demo's (see finetune.steps)

    c.attribution.methods = ("concept-trak", "dtrak", "trak")
    c.attribution.ablation = True      # also the five-step ablation (TRAK → … → +normalization)
    c.attribution.microbatch = 16      # (k, D-TRAK/TRAK num_timesteps and params: the demo's)
    c.attribution.lambda_ratios = tuple(10.0 ** e for e in range(-4, 5))  # chosen on val by P@10
    c.attribution.concept_params = "attn2"   # Concept-TRAK: cross-attention (the paper's choice)
    c.attribution.concept_scale = 3.0        # λ_c
    c.attribution.concept_num_timesteps = 10  # K of Concept-TRAK's fixed-noise path

    c.eval = ml_collections.ConfigDict()
    c.eval.concepts = ("color", "shape")  # each generation is queried with each of these
    c.eval.topk = 10
    c.eval.n_bootstrap = 1000

    if arg == "smoke":
        c.data.per_combination = 1
        c.finetune.steps = 10
        c.finetune.checkpoint_every = 10
        c.generate.id_combos = ("yellow star", "green cross")
        c.generate.ood_combos = ("purple star", "yellow cross")
        c.generate.per_combo = 2
        c.generate.num_inference_steps = 5
        c.attribution.k = 256
        c.attribution.num_timesteps = 2
        c.attribution.lambda_ratios = (1e-2, 1.0)
        c.attribution.concept_inversion_steps = 10  # >= keep_every (5): 2 inverted states
        c.attribution.concept_num_timesteps = 2
        c.eval.n_bootstrap = 50
    elif arg == "reference":
        reference_inversion(c)
    elif arg not in (None, ""):
        raise ValueError(f"concept_trak config: unknown argument {arg!r}; expected '', 'smoke' "
                         f"or 'reference'")
    return c
