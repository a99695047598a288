"""Fine-tune a pipeline on an image folder (DreamBooth layout) or a built-in data set.

``jaxattrib train finetune_folder --run-dir runs/ft --set data.source=folder
--set data.path=../shared/data/dreambooth --set data.subjects="['dog','cat']"``

data.source: 'synthetic' (the package's concept set), 'folder' (one sub-folder per subject,
captions from captions.jsonl / prompt.txt / a template), 'digits' (scikit-learn's digits),
'tfds' (data.name prepared as array_record in data_dir data.path; see docs/data.md).
model: 'embedded' (the shipped base model) or a diffusers pipeline folder (safetensors).
The run directory receives data/source.json (a fingerprinted reference to the data, no pixel
copy), the trajectory record and config.json; attribute
with ``jaxattrib attribute RUN_DIR --queries ...``.
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
    c.data.size = 16                  # must equal the UNet's sample size (x VAE factor)
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
    return c
