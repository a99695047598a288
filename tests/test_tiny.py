"""The shared tiny pipelines load with our loader and match diffusers on one UNet/VAE call."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxattrib.models.pipeline import load_pipeline  # noqa: E402
from tiny import LATENT_CHANNELS, LATENT_FACTOR  # noqa: E402


def test_tiny_latent_pipeline_loads_and_matches_diffusers(tiny_latent_pipeline):
    from jaxattrib.models import unet as U
    from jaxattrib.models import vae as V
    pipe = load_pipeline(tiny_latent_pipeline)
    assert pipe.is_latent and pipe.vae_config.latent_channels == LATENT_CHANNELS
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny_latent_pipeline))
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        mean_ref = ref.vae.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist.mean
    mean = V.AutoencoderKL(pipe.vae_config).apply({"params": pipe.vae_params}, x,
                                                  method=V.AutoencoderKL.encode)[0]
    assert mean.shape == (2, 16 // LATENT_FACTOR, 16 // LATENT_FACTOR, LATENT_CHANNELS)
    np.testing.assert_allclose(np.asarray(mean), mean_ref.permute(0, 2, 3, 1).numpy(),
                               atol=1e-4)
    z = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    cond = pipe.encode_prompts(["a red star on a white background", ""])
    t = np.array([10, 500])
    with torch.no_grad():
        eps_ref = ref.unet(torch.from_numpy(z).permute(0, 3, 1, 2), torch.from_numpy(t),
                           torch.from_numpy(np.array(cond))).sample
    eps = U.UNet2DConditionModel(pipe.unet_config).apply({"params": pipe.unet_params}, z, t,
                                                         cond)
    np.testing.assert_allclose(np.asarray(eps), eps_ref.permute(0, 2, 3, 1).numpy(), atol=1e-4)


def test_tiny_pixel_pipeline_loads(tiny_pixel_pipeline):
    pipe = load_pipeline(tiny_pixel_pipeline)
    assert not pipe.is_latent and pipe.unet_config.in_channels == 3
