"""SD-2.1 (768 px, v-prediction) LoRA customization + D-TRAK on ``attn2``: the SD-1.5 config
(:mod:`sd15_lora`, every field documented there) with SD-2.1's sizes.

``model`` must be a local diffusers copy of ``stable-diffusion-2-1`` (768 px; its
``scheduler/scheduler_config.json`` has ``prediction_type: v_prediction``). v-prediction is
supported end to end: the schedule, the DDIM/DDPM samplers (checked against diffusers in
``tests/test_sampling.py``), the training loss (target ``v = √ᾱ ε − √(1−ᾱ) x0``), CGI-DM's
contrastive loss and D-TRAK's output function (computed on the model output, which is v here)
all read ``prediction_type`` from the scheduler. ``model_prediction_type = 'v_prediction'`` is
checked against the folder, so pointing this config at an epsilon model (SD-2.1-base, SD-1.5)
is refused instead of silently training with the wrong target. SD-2's text encoder is stored by
diffusers with 23 layers (the penultimate OpenCLIP layer), so the last hidden state is right.

    jaxattrib train sd21 --run-dir runs/sd21 --set model=/models/stable-diffusion-2-1 \\
        --set data.path=/data/dreambooth
"""

import importlib.util
from pathlib import Path


def get_config(arg=None):
    spec = importlib.util.spec_from_file_location(
        "_jaxattrib_config_sd15_lora", Path(__file__).with_name("sd15_lora.py"))
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    if arg not in (None, ""):
        raise ValueError(f"sd21: unknown variant {arg!r} (the config takes no argument)")
    c = base.get_config()
    c.model_prediction_type = "v_prediction"
    c.out_dir = "runs/sd21"
    c.data.size = 768
    c.finetune.batch_size = 4                # 768 px latents are 2.25x SD-1.5's
    c.attribution.microbatch = 2
    return c
