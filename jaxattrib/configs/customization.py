"""The customization benchmark (``benchmarks/customization.py``;
:mod:`jaxattrib.eval.benchmarks`): between- and within-concept attribution with ground truth by
construction, on the embedded base model.

It runs the demo's stages with the demo's settings (``configs/demo.py``: same base model, data
generator, fine-tuning, generation and attribution settings), except for the fields set below:
the base model is fine-tuned on exemplars of its four withheld (shape, color) concepts +
distractors it already knows, with a trajectory record; queries are generated per
(concept, background) and attributed by every method. Here each concept's exemplars cycle
through the backgrounds (``exemplars_per_concept / #backgrounds`` per background: 6 backgrounds
on the embedded model, 3 on the 16-px pixel one), so "which exemplar" has a known answer
(within-concept). The demo's CGI-DM and report fields do not apply.
``get_config()`` is the full setting (60 min on the loaded 2-core CPU with the former 16-px
pixel default, BENCHMARKS.md); ``get_config('smoke')`` a reduced one (11 min there, mostly
compilation). Override any field with ``--set key=value``.
"""

from jaxattrib.configs import demo


def get_config(arg=None):
    c = demo.get_config()
    del c["cgi_dm"], c["report"], c.generate["per_concept"], c.attribution["topk"]
    c.variation = "background"        # what distinguishes a concept's exemplars (within-concept)
    c.data.exemplars_per_concept = 6  # multiple of #backgrounds (6 embedded: 1 per background)
    c.data.holdouts_per_concept = 0   # unused here (the demo's CGI-DM negatives)
    c.generate.per_variation = 4      # queries per (concept, background); half validate λ
    c.attribution.methods = ("dtrak", "trak", "journey-trak", "tracin", "concept-trak",
                             "montrage", "montrage-final", "pixel", "random")
    # Journey-TRAK's sampling steps (fractions of the trajectory, 1 = last), chosen on validation
    # with their mean; its queries are the generations' trajectories (generate_stage keeps them)
    c.attribution.journey_steps = (0.25, 0.5, 0.75, 1.0)
    c.attribution.journey_resamples = 8   # R re-noisings of each query's x̂0 (docs/faithful.md)
    c.attribution.tune_sign = True    # also try negated TRAK / D-TRAK / TracIn scores on val
    c.eval = {"topk": 10,             # Recall@K
              "n_bootstrap": 1000}    # resamples of the test queries for the 95% CIs

    if arg == "smoke":
        c.data.exemplars_per_concept = 6  # 1 per background of the embedded model
        c.data.distractors = 12
        c.data.per_combination = 2
        c.finetune.steps = 20
        c.finetune.checkpoint_every = 10
        c.generate.per_variation = 2
        c.generate.num_inference_steps = 5
        c.attribution.k = 256
        c.attribution.num_timesteps = 2
        c.attribution.lambda_ratios = (1e-2, 1.0)
        c.attribution.concept_inversion_steps = 10  # >= keep_every (5): 2 inverted states
        c.eval.n_bootstrap = 100
    elif arg not in (None, ""):
        raise ValueError(f"customization config: unknown argument {arg!r}; expected '' or "
                         f"'smoke'")
    return c
