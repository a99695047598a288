"""SD-1.5 LoRA customization (DreamBooth layout) with a trajectory record, then D-TRAK on the
cross-attention (``attn2``) parameters.

Nothing is downloaded: ``model`` must be a local diffusers Stable Diffusion 1.5 folder
(``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``;
safetensors), e.g. a ``save_pretrained`` copy of ``stable-diffusion-v1-5``. ``data.path`` is a
DreamBooth-layout folder (one sub-folder per subject; captions from ``captions.jsonl`` /
``prompt.txt`` / the template; see :mod:`jaxattrib.data.folder`)::

    jaxattrib train sd15_lora --run-dir runs/sd15 --set model=/models/stable-diffusion-v1-5 \\
        --set data.path=/data/dreambooth --set "data.subjects=('dog',)"
    jaxattrib generate --model /models/stable-diffusion-v1-5 --record runs/sd15/record \\
        -p "a photo of sks dog on the beach" --num 4 --steps 50 --guidance 7.5 --out runs/sd15/q
    jaxattrib attribute runs/sd15 --queries runs/sd15/q     # k, params, timesteps from below

On a pod slice / SLURM cluster the same config fine-tunes on every global device (the global
batch is split over the processes; each loads only its rows; the record lives in ``out_dir``):

    TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh train sd15_lora \\
        --set model=/models/sd15 --set data.path=/data/dreambooth --set out_dir=/shared/sd15
    python -m jaxattrib.launch train sd15_lora --set model=... --dry-run   # check + plan only

Fields (validated by :func:`jaxattrib.runs.config_check.check_train_config`; errors name the field):

* ``model``: the pipeline folder (required). ``model_prediction_type``: the scheduler's
  ``prediction_type`` this config is written for ('epsilon' for SD-1.5); a folder whose
  ``scheduler/scheduler_config.json`` says otherwise is refused.
* ``seed``: data subset and training seed. ``out_dir``: run directory of ``python -m
  jaxattrib.launch train`` (``jaxattrib train`` uses ``--run-dir``). ``num_devices``: devices of
  the data mesh (0 = every global device; the global batch must divide by it).
* ``data.source``: 'folder', 'tfds' (``data.name`` prepared as array_record in the data_dir
  ``data.path``, ``data.split``, captions from ``data.caption_key`` or the class name; see
  docs/data.md) (or 'synthetic' / 'digits' for smoke tests); ``data.path``: the
  folder; ``data.subjects``: sub-folders to use (empty = all); ``data.size``: image side, must
  equal the UNet sample size × the VAE factor (512 for SD-1.5; another size is refused naming
  both shapes); ``data.max_examples``: random subset (0 = all). The images are VAE-encoded to the
  posterior mean for fine-tuning and for attribution alike (docs/latents.md).
* ``finetune.*``: optimizer updates (``steps``), *global* ``batch_size``, ``learning_rate``,
  ``schedule`` ('constant' | 'cosine' | 'linear') after ``warmup_steps``, ``checkpoint_every``
  (the record's checkpoints: D-TRAK scores the last ``attribution.checkpoints`` of them,
  TracIn all), ``mode`` ('lora' | 'full'), ``lora_rank``, ``lora_alpha``, ``lora_target``
  (regex over '/'-joined parameter paths; the default is the UNet attention projections
  ``to_q/to_k/to_v/to_out``), ``train_text_encoder``.
* ``finetune.precision``: 'float32' | 'bfloat16' (the UNet computes in bfloat16 from float32
  master weights; AdamW state float32). ``finetune.remat``: 'none' | 'full' | a
  ``jax.checkpoint_policies`` name ('dots_saveable', 'nothing_saveable', ...): activation
  checkpointing per UNet block. ``finetune.matmul_precision``: 'default' (TF32 on
  Ampere/Hopper GPUs) | 'tensorfloat32' | 'highest'. See docs/precision.md.
* ``attribution.*``: the defaults of ``jaxattrib attribute`` on this run: ``method``,
  ``params`` (regex over UNet parameter paths; 'attn2' = cross-attention, as Concept-TRAK and
  the D-TRAK customization experiments), projection dimension ``k``, ``projection`` ('sjlt'
  needs no dense p×k block), timesteps ``num_timesteps`` of the output function, ``lam_ratio``
  (λ = ratio · mean diag ΦᵀΦ), ``microbatch`` (examples per jitted gradient call) and ``topk``;
  ``precision`` / ``remat`` / ``matmul_precision`` as for ``finetune`` (bfloat16 forward and
  backward; gradients, projection and features float32). ``noise``: 'per_position' (D-TRAK's
  code: each batch position its own noise, period 52) | 'per_example' | 'shared' (every example
  the same; runs made before the field keep it). ``checkpoints``: the last M checkpoints
  (int) or a tuple of steps whose scores are averaged (D-TRAK's protocol: 1). See
  docs/faithful.md.
  [design] With LoRA the gradients are taken w.r.t. the *merged* attn2 weights of the
  checkpoint (what the record stores), not the LoRA factors.
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.model = ""                          # local diffusers SD-1.5 folder (required)
    c.model_prediction_type = "epsilon"
    c.seed = 0
    c.out_dir = "runs/sd15_lora"
    c.num_devices = 0

    c.data = ml_collections.ConfigDict()
    c.data.source = "folder"
    c.data.path = ""
    c.data.subjects = ()
    c.data.size = 512
    c.data.max_examples = 0
    c.data.name = ""                  # data.source='tfds': tfds name (data.path = its data_dir)
    c.data.split = "train"            # data.source='tfds': split
    c.data.caption_key = ""           # data.source='tfds': text feature ('' = class name)

    c.finetune = ml_collections.ConfigDict()
    c.finetune.steps = 400
    c.finetune.batch_size = 8
    c.finetune.learning_rate = 1e-4
    c.finetune.schedule = "constant"
    c.finetune.warmup_steps = 0
    c.finetune.checkpoint_every = 100
    c.finetune.mode = "lora"
    c.finetune.lora_rank = 4
    c.finetune.lora_alpha = 4.0
    c.finetune.lora_target = r"(^|/)attn[12]/(to_q|to_k|to_v|to_out(_0|/0)?)/kernel$"
    c.finetune.train_text_encoder = False
    c.finetune.precision = "float32"      # 'float32' | 'bfloat16'
    c.finetune.remat = "none"             # 'none' | 'full' | 'dots_saveable' | ...
    c.finetune.matmul_precision = "default"  # 'default' | 'tensorfloat32' | 'highest'

    c.attribution = ml_collections.ConfigDict()
    c.attribution.method = "dtrak"
    c.attribution.params = "attn2"
    c.attribution.k = 4096
    c.attribution.projection = "sjlt"
    c.attribution.num_timesteps = 10
    c.attribution.lam_ratio = 1.0
    c.attribution.microbatch = 4
    c.attribution.topk = 10
    c.attribution.precision = "float32"
    c.attribution.remat = "none"
    c.attribution.matmul_precision = "default"
    c.attribution.noise = "per_position"  # D-TRAK's code [code]; measurement pending
    c.attribution.checkpoints = 1         # D-TRAK: one checkpoint [code]
    if arg not in (None, ""):
        raise ValueError(f"sd15_lora: unknown variant {arg!r} (the config takes no argument)")
    return c
