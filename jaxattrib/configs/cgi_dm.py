"""CGI-DM (``jaxattrib cgi-dm``; methods.md §6, :mod:`jaxattrib.authentication.cgi_dm`): was
each candidate image used to fine-tune the fine-tuned model from the pretrained one?

    jaxattrib cgi-dm cgi_dm --run-dir runs/cgi --set model.finetuned=runs/ft \\
        --set data.candidates=my_images --set data.reference=holdout_images
    jaxattrib report runs/cgi

Each candidate's latent is masked, recovered by PGD on ``L_pretrained − L_finetuned`` and compared
with the original; high similarity means "used in fine-tuning". Threshold and p-values come from
the **reference** images (known non-members), never from the candidates. The report shows original
/ masked / recovered images, scores, p-values, decisions, and ROC curves when labels are known.
Recoveries are cached per batch in ``RUN_DIR/cgi_dm/`` (resumes). Fields (validated by
:func:`jaxattrib.runs.cgi_dm.check_config`; errors name the field):

* ``seed``: PRNG seed (masks for 'random_block', PGD noise draws). ``model.pipeline``:
  'embedded' or a diffusers pipeline folder (text encoder, VAE, tokenizer, scheduler, UNet
  architecture). ``model.pretrained`` / ``model.finetuned`` (required): model
  specs — 'pipeline', 'embedded', a pipeline folder, or a record / ``jaxattrib train`` run
  directory with ``@STEP`` (``RUN@0`` = the start weights, ``RUN`` / ``RUN@last`` = last).
* ``data.candidates``: folder to authenticate (unlabelled; its ``member/`` and ``non_member/``
  sub-folders labelled: AUC / TPR@FPR and ROC reported). ``data.reference``: known
  non-members (required). Captions: ``prompts.txt`` / ``captions.jsonl``, else
  ``data.caption``. ``data.size``: image side (0 = the model's; otherwise UNet sample size ×
  VAE factor, else a one-line error with both shapes).
* ``data.vae_posterior`` (latent pipelines): 'sample' (default; one posterior sample from a
  recorded per-image key, as the authors' ``latent_dist.sample()`` and fine-tuning) or 'mean'
  (run directories made before the field). PGD runs on the VAE latent [code]; the report's
  masked / recovered images are decoded to pixels.
* ``cgi.*``: :class:`~jaxattrib.authentication.cgi_dm.CGIDMConfig` (mask_kind, block,
  keep_rate, blur_sigma, eps_radius, step_size, num_steps, clamp, t_min, t_max, n_noise, scale;
  the authors' defaults for SD's 4×64×64 latent, scaled by ``scale='sqrt_numel'``).
* ``cgi.project_t`` / ``project_model`` / ``project_every``: manifold projection [design], off
  (``project_t = 0``, the paper); else after every ``project_every``-th (>= 1) PGD step the
  unknown half becomes ``project_model``'s ('finetuned' | 'pretrained') one-step x̂0 from the
  iterate noised to ``project_t`` (< the schedule's length); for pixel models without a VAE
  decoder. Measured effect (and that it is the fine-tuned model's inpainting):
  docs/benchmarks/cgi_dm.md. Example: ``--set cgi.project_t=100``.
* ``similarity``: 'ssim' | 'psnr' (data range 2). ``calibration.target``: 'fpr' (threshold at
  ``calibration.fpr`` on the reference set) or 'accuracy' (labelled ``member/`` candidates as
  known members: then not a fair test). ``batch_size``: images per PGD batch (unit of
  resumption); ``report_images``: candidates in the original / masked / recovered grid.
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
