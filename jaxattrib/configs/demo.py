"""The embedded default demo (``jaxattrib demo``): CPU, a few minutes, no network.

The shipped base model (``jaxattrib/assets/base_model``: a tiny latent diffusion model, 32-px
images through a KL VAE to 16×16×4 latents, pretrained on the synthetic concept set with four
(shape, color) concepts withheld) is fine-tuned on a small set = exemplars of the
withheld concepts + a pool of distractor images it already knows. Generated images of each new
concept must then be attributed to that concept's exemplars (ground truth by construction, as in
the AbC benchmark); CGI-DM must tell fine-tuning members from hold-out images of the same
concepts. Override any field with ``--set key=value`` (e.g. ``--set finetune.steps=100``).
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.base_model = ""                 # '' = the embedded base model; else a pipeline folder

    c.data = ml_collections.ConfigDict()
    c.data.exemplars_per_concept = 5  # fine-tuning members per withheld concept
    c.data.holdouts_per_concept = 5   # same concept, not trained on (CGI-DM negatives)
    c.data.distractors = 40           # known concepts mixed into the fine-tuning set
    c.data.per_combination = 6        # renders per (shape, color, background) to draw from

    c.finetune = ml_collections.ConfigDict()
    c.finetune.steps = 400
    c.finetune.batch_size = 16
    c.finetune.learning_rate = 3e-4
    c.finetune.checkpoint_every = 100
    c.finetune.mode = "full"          # 'full' | 'lora'

    c.generate = ml_collections.ConfigDict()
    c.generate.per_concept = 6        # queries per withheld concept (half validate λ)
    c.generate.num_inference_steps = 25
    c.generate.guidance_scale = 3.0

    c.attribution = ml_collections.ConfigDict()
    c.attribution.methods = ("dtrak", "trak", "concept-trak", "montrage", "montrage-final",
                             "pixel", "random")
    c.attribution.k = 2048
    c.attribution.num_timesteps = 10
    c.attribution.params = "attn"     # regex over UNet parameter paths
    c.attribution.projection = "sjlt"  # sparse JL: no dense p×k blocks to generate on CPU
    c.attribution.microbatch = 32
    c.attribution.lambda_ratios = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
    c.attribution.topk = 10
    c.attribution.concept_inversion_steps = 50
    c.attribution.concept_inversion_guidance = 1.0  # Concept-TRAK inversion CFG vs '' (ref.: 7.5)
    c.attribution.concept_query_pairs = "invert"    # or 'trajectory': regenerated from the seed
    c.attribution.concept_query_eta = 0.1           # η of that regeneration (the reference's)
    c.attribution.noise = "shared"        # TRAK / D-TRAK / TracIn noise [design] (docs/faithful.md)
    c.attribution.checkpoints = 1         # TRAK / D-TRAK: last M checkpoints or steps, averaged

    c.cgi_dm = ml_collections.ConfigDict()
    c.cgi_dm.enabled = True
    c.cgi_dm.num_steps = 60           # PGD steps (published: 1000 on SD; radius/step scaled)
    c.cgi_dm.batch_size = 16
    c.cgi_dm.t_min = 1
    c.cgi_dm.t_max = 999
    c.cgi_dm.calibration_fpr = 0.1

    c.report = ml_collections.ConfigDict()
    c.report.show_queries = 8
    return c
