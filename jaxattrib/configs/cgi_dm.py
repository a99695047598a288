"""CGI-DM copyright authentication (``jaxattrib cgi-dm``): was each candidate image used to
fine-tune the fine-tuned model from the pretrained one? (methods.md §6,
:mod:`jaxattrib.authentication.cgi_dm`.)

    jaxattrib cgi-dm cgi_dm --run-dir runs/cgi --set model.finetuned=runs/ft \\
        --set data.candidates=my_images --set data.reference=holdout_images
    jaxattrib report runs/cgi

Each candidate's latent is masked, recovered by PGD on the contrastive objective
``L_pretrained − L_finetuned`` and compared with the original; a high similarity means
"used in fine-tuning". The decision threshold and the p-values come from the **reference**
images (known non-members, e.g. images of the same subject that were not trained on), never
from the candidates. The report shows original / masked / recovered images, scores, p-values,
decisions, and ROC curves when the candidates' labels are known. Recoveries are cached per
batch in ``RUN_DIR/cgi_dm/``, so a killed run resumes.

Fields (validated by :func:`jaxattrib.runs.cgi_dm.check_config`; errors name the field):

* ``seed``: PRNG seed (masks for 'random_block', PGD noise draws).
* ``model.pipeline``: 'embedded' or a diffusers pipeline folder: text encoder, VAE, tokenizer,
  scheduler and the UNet architecture.
* ``model.pretrained`` / ``model.finetuned``: the two UNets, as a model spec — 'pipeline'
  (model.pipeline's UNet), 'embedded', a pipeline folder, or a trajectory record / ``jaxattrib
  train`` run directory with ``@STEP`` (``RUN@0`` = the weights the run started from, ``RUN`` or
  ``RUN@last`` = its last checkpoint). ``finetuned`` is required.
* ``data.candidates``: folder of images to authenticate. Images in it are unlabelled; images
  in its ``member/`` and ``non_member/`` sub-folders are labelled (then AUC / TPR@FPR and the
  ROC are reported). ``data.reference``: folder of known non-members for calibration
  (required). Captions: ``prompts.txt`` / ``captions.jsonl`` in the folder, else
  ``data.caption`` for every image. ``data.size``: image side (0 = the model's; otherwise it
  must equal the UNet's sample size × the VAE factor, else a one-line error gives both shapes).
* ``data.vae_posterior`` (latent pipelines): 'sample' (default) encodes each image with one VAE
  posterior sample from a recorded per-image key, as the authors' code (``latent_dist.
  sample()``) and fine-tuning do; 'mean' uses the posterior mean (what run directories made
  before this field did). PGD runs on the VAE latent [code]; the report's masked and recovered
  images are decoded to pixels.
* ``cgi.*``: :class:`~jaxattrib.authentication.cgi_dm.CGIDMConfig` (mask_kind, block, keep_rate,
  blur_sigma, eps_radius, step_size, num_steps, clamp, t_min, t_max, n_noise, scale; the
  defaults are the authors' for SD's 4×64×64 latent, scaled to smaller latents by
  ``scale='sqrt_numel'``).
* ``cgi.project_t`` / ``cgi.project_model`` / ``cgi.project_every``: manifold projection of the
  PGD iterates [design], off by default (``project_t = 0``, the paper). With ``project_t > 0``
  the unknown half is replaced, after every ``project_every``-th PGD step (an integer >= 1), by
  the one-step estimate x̂0 of ``project_model``'s denoiser ('finetuned' or 'pretrained') from
  the iterate noised to timestep ``project_t`` (below the schedule's length). Meant for
  pixel-space models with no VAE decoder to pull the iterate back to an image: on the 16-px
  CGI-DM benchmark (clamp 1, 4 draws per step) ``project_t=100`` with the fine-tuned denoiser
  after every step lifted test AUC from 0.68 to 0.75 (loss-gap baseline: 0.87); a step-0
  control showed the gain comes from the fine-tuned model's inpainting, not the contrastive
  gradient (BENCHMARKS.md, CGI-DM). Example: ``--set cgi.project_t=100``.
* ``similarity``: 'ssim' | 'psnr' (original vs recovered, data range 2).
* ``calibration.target``: 'fpr' (threshold at ``calibration.fpr`` false positives on the
  reference set) or 'accuracy' (needs labelled ``member/`` candidates: uses them as known members,
  so they are then not a fair test set).
* ``batch_size``: images per PGD batch (the unit of resumption); ``report_images``: candidates
  shown in the original / masked / recovered grid.
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.pipeline = "embedded"
    c.model.pretrained = "pipeline"
    c.model.finetuned = ""

    c.data = ml_collections.ConfigDict()
    c.data.candidates = ""
    c.data.reference = ""
    c.data.caption = ""
    c.data.size = 0
    c.data.vae_posterior = "sample"   # latent pipelines: 'sample' (the authors' code) or 'mean'

    c.cgi = ml_collections.ConfigDict()
    c.cgi.mask_kind = "checkerboard"
    c.cgi.block = 4
    c.cgi.keep_rate = 0.5
    c.cgi.blur_sigma = 2.0
    c.cgi.eps_radius = 70.0
    c.cgi.step_size = 2.0
    c.cgi.num_steps = 1000
    c.cgi.clamp = 100.0
    c.cgi.t_min = 1
    c.cgi.t_max = 999
    c.cgi.n_noise = 1
    c.cgi.scale = "sqrt_numel"
    c.cgi.project_t = 0               # manifold projection [design]: 0 = off (the paper)
    c.cgi.project_model = "finetuned"
    c.cgi.project_every = 1

    c.similarity = "ssim"
    c.calibration = ml_collections.ConfigDict()
    c.calibration.target = "fpr"
    c.calibration.fpr = 0.05
    c.batch_size = 8
    c.report_images = 8
    if arg == "demo":       # the embedded model's scale: 16 px, short PGD (as `jaxattrib demo`)
        c.cgi.num_steps = 60
        c.batch_size = 16
        c.calibration.fpr = 0.1
    elif arg not in (None, ""):
        raise ValueError(f"cgi_dm: unknown variant {arg!r} (expected 'demo' or none)")
    return c
