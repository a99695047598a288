"""Fine-tune a pipeline on an image folder (DreamBooth layout) or a built-in data set.

``jaxattrib train finetune_folder --run-dir runs/ft --set data.source=folder
--set data.path=../shared/data/dreambooth --set data.subjects="['dog','cat']"``

data.source: 'synthetic' (the model's synthetic concept set: the embedded model's for
'embedded', rendered at data.size = 32), 'folder' (one sub-folder per subject, captions
from captions.jsonl / prompt.txt / a template), 'digits' (scikit-learn's digits),
'tfds' (data.name prepared as array_record in data_dir data.path; see docs/data.md).
model: 'embedded' (the shipped base model) or a diffusers pipeline folder (safetensors).
The run directory receives data/source.json (a fingerprinted reference to the data, no pixel
copy), the trajectory record and config.json; attribute
with ``jaxattrib attribute RUN_DIR --queries ...``.
finetune.precision: 'float32' | 'bfloat16' (UNet compute dtype; float32 master weights and
AdamW state either way); finetune.remat: 'none' | 'full' | 'dots_saveable' |
'nothing_saveable' | ... (activation checkpointing per UNet block); finetune.matmul_precision:
'default' (TF32 on Ampere/Hopper GPUs) | 'tensorfloat32' | 'highest'. See docs/precision.md.
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.model = "embedded"
    c.seed = 0
    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"
    c.data.path = ""
    c.data.subjects = ()
    c.data.size = 32                  # must equal the UNet's sample size (x VAE factor): 32
    #                                   for the embedded model (16x16x4 latents, VAE f=2)
    c.data.max_examples = 64
    c.data.name = ""                  # data.source='tfds': tfds name (data.path = its data_dir)
    c.data.split = "train"            # data.source='tfds': split
    c.data.caption_key = ""           # data.source='tfds': text feature ('' = class name)
    c.finetune = ml_collections.ConfigDict()
    c.finetune.steps = 200
    c.finetune.batch_size = 16
    c.finetune.learning_rate = 3e-4
    c.finetune.schedule = "constant"
    c.finetune.checkpoint_every = 50
    c.finetune.mode = "full"          # 'full' | 'lora'
    c.finetune.lora_rank = 4
    c.finetune.train_text_encoder = False
    c.finetune.precision = "float32"  # 'float32' | 'bfloat16' (docs/precision.md)
    c.finetune.remat = "none"         # 'none' | 'full' | a jax.checkpoint_policies name
    c.finetune.matmul_precision = "default"  # 'default' | 'tensorfloat32' | 'highest'
    return c
