"""SD-1.5 LoRA customization (DreamBooth layout) with a trajectory record, then D-TRAK on the
cross-attention (``attn2``) parameters.

Nothing is downloaded: ``model`` is a local diffusers SD-1.5 folder (safetensors);
``data.path`` a DreamBooth-layout folder (a sub-folder per subject; captions from
``captions.jsonl`` / ``prompt.txt`` / the template; :mod:`jaxattrib.data.folder`)::

    jaxattrib train sd15_lora --run-dir runs/sd15 --set model=/models/stable-diffusion-v1-5 \\
        --set data.path=/data/dreambooth --set "data.subjects=('dog',)"
    jaxattrib generate --model /models/stable-diffusion-v1-5 --record runs/sd15/record \\
        -p "a photo of sks dog on the beach" --num 4 --steps 50 --guidance 7.5 --out runs/sd15/q
    jaxattrib attribute runs/sd15 --queries runs/sd15/q     # k, params, timesteps from below

Pods / SLURM (every global device, each process loads its rows, record in ``out_dir``):
``launch/tpu_pod.sh train sd15_lora --set out_dir=...``; ``--dry-run`` checks and plans
(docs/scaling.md). Fields (:func:`jaxattrib.runs.config_check.check_train_config`):

* ``model`` (required); ``model_prediction_type`` ('epsilon'; another scheduler is refused);
  ``seed``; ``out_dir`` (``python -m jaxattrib.launch``'s run directory); ``num_devices`` (0 =
  all; divides the global batch).
* ``data.source``: 'folder', 'tfds' (``data.name`` as array_record in ``data.path``,
  ``data.split``, captions from ``data.caption_key`` or the class name; docs/data.md), or
  'synthetic' / 'digits' (smoke tests); ``data.subjects`` (empty = all); ``data.size`` = UNet
  sample size × VAE factor (512; else refused naming both shapes); ``data.max_examples``
  (random subset, 0 = all). Images are VAE-encoded to the posterior mean for fine-tuning and
  attribution alike (docs/latents.md).
* ``finetune.*``: ``steps`` (updates), *global* ``batch_size``, ``learning_rate``, ``schedule``
  ('constant' | 'cosine' | 'linear') after ``warmup_steps``, ``checkpoint_every`` (D-TRAK
  scores the last ``attribution.checkpoints``, TracIn all), ``mode`` ('lora' | 'full'),
  ``lora_rank``, ``lora_alpha``, ``lora_target`` (regex over '/'-joined paths; default the UNet
  attention ``to_q/to_k/to_v/to_out``), ``train_text_encoder``; ``precision`` ('float32' |
  'bfloat16' compute, float32 master weights and AdamW state), ``remat`` ('none' | 'full' | a
  ``jax.checkpoint_policies`` name, per UNet block), ``matmul_precision`` ('default' = TF32 on
  Ampere/Hopper | 'tensorfloat32' | 'highest'): docs/precision.md.
* ``attribution.*``: ``jaxattrib attribute``'s defaults on this run (its ``--help`` says each):
  ``method``, ``params`` ('attn2' = cross-attention, as Concept-TRAK and D-TRAK's customization
  experiments), ``k``, ``projection`` ('sjlt': no dense p×k block), ``num_timesteps``,
  ``lam_ratio``, ``microbatch``, ``topk``, ``precision`` / ``remat`` / ``matmul_precision``
  (gradients, projection, features stay float32), ``noise``, ``checkpoints`` (D-TRAK: 1);
  docs/faithful.md. [design] With LoRA the gradients are w.r.t. the checkpoint's *merged* attn2
  weights (what the record stores), not the LoRA factors.
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
    c.attribution.noise = "shared"        # [design] measured (docs/faithful.md); D-TRAK's: per_position
    c.attribution.checkpoints = 1         # D-TRAK: one checkpoint [code]
    if arg not in (None, ""):
        raise ValueError(f"sd15_lora: unknown variant {arg!r} (the config takes no argument)")
    return c
