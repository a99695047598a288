"""The latent base model's pretraining (jaxattrib.train.latent_base), on its ``--smoke`` preset:
the written folder loads with our loader and with diffusers/transformers with numeric parity
(VAE encode/decode, UNet, text encoder), the latent scaling is 1/std of the posterior-mean
latents, and (slow) a run interrupted in stage 2 and rerun ends bit-identical to an uninterrupted
one (stage 1's resume is finetune's own, tested in test_finetune.py; here a finished stage 1 is
restored)."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from jaxattrib.train import latent_base as LB  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent_base")
    out = LB.main(["--out", str(root / "model"), "--smoke", "--no-progress"])
    return out


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def test_folder_loads_with_parity(smoke):
    from jaxattrib.train.base_model import spec_from_info
    from jaxattrib.data.synthetic import make_synthetic
    from jaxattrib.models.latent_io import encode_images
    from jaxattrib.models.pipeline import load_pipeline

    pipe = load_pipeline(smoke)
    info = json.loads((smoke / "jaxattrib_base.json").read_text())
    cfg = LB.LatentBaseConfig(**LB.SMOKE)
    assert pipe.is_latent and pipe.model_index["vae"] == ["diffusers", "AutoencoderKL"]
    assert pipe.unet_config.sample_size == cfg.size // 4 and pipe.unet_config.in_channels == 4
    assert info["held_out"] == list(LB.HELD_OUT) and info["steps"] == {"vae": 4, "unet": 4}
    assert [r["step"] for r in info["losses"]["unet"]] == [0, 2, 4]

    # SD's latent scaling: the scaled posterior means of the training images have unit std
    ds = make_synthetic(spec_from_info(info), seed=info["seed"], withhold=info["held_out"])
    lat = encode_images(pipe.vae_params, pipe.vae_config, ds.images)
    assert abs(float(lat.std()) - 1.0) < 1e-4
    assert pipe.vae_config.scaling_factor == pytest.approx(info["scaling_factor"])

    _check_parity(smoke, pipe, ds.images[:3], cfg.max_length)


def test_shipped_model_is_this_pipeline_and_loads_with_parity():
    """The embedded base model (jaxattrib/assets/base_model) is a latent pipeline made by this
    module with its default config, ≤ 30 MB, and diffusers/transformers read it with the same
    numbers as our ports (issue 21's acceptance)."""
    from jaxattrib.train.base_model import ASSET_DIR, base_model_info, spec_from_info
    from jaxattrib.data.synthetic import make_withheld
    from jaxattrib.models.pipeline import load_pipeline

    info = base_model_info()
    assert info["kind"] == "latent" and info["config"] == LB.LatentBaseConfig().to_dict()
    assert sum(f.stat().st_size for f in ASSET_DIR.rglob("*") if f.is_file()) <= 30e6
    pipe = load_pipeline(ASSET_DIR)
    assert pipe.is_latent and pipe.unet_config.sample_size == info["data_spec"]["size"] // 2
    images = make_withheld(spec_from_info(info, per_combination=1), 3, info["held_out"]).images
    _check_parity(ASSET_DIR, pipe, images[:2], info["config"]["max_length"])


def _check_parity(folder, pipe, x, max_length):
    """diffusers / transformers read every part of ``folder``; the VAE posterior mean and
    decode, the tokenizer ids, the text states and the UNet output equal our ports' (float32,
    1e-4 absolute) on the pixel images ``x`` and two prompts."""
    from jaxattrib.models import unet as U
    from jaxattrib.models import vae as V
    sd = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    assert sd.vae.config.scaling_factor == pytest.approx(pipe.vae_config.scaling_factor)
    with torch.no_grad():
        ref_mean = _nhwc(sd.vae.encode(_nchw(x)).latent_dist.mean)
        ref_dec = _nhwc(sd.vae.decode(_nchw(ref_mean)).sample)
    mean, _ = V.AutoencoderKL(pipe.vae_config).apply({"params": pipe.vae_params}, jnp.asarray(x),
                                                     method=V.AutoencoderKL.encode)
    dec = V.decode_latents(pipe.vae_params, pipe.vae_config,
                           jnp.asarray(ref_mean) * pipe.vae_config.scaling_factor)
    for ours, ref in ((mean, ref_mean), (dec, ref_dec)):
        assert np.std(ref) > 1e-3
        np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)

    prompts = ["a red circle on a black background", "a purple star on a white background"]
    ids = sd.tokenizer(prompts, padding="max_length", max_length=max_length,
                       truncation=True, return_tensors="np").input_ids
    np.testing.assert_array_equal(pipe.tokenizer(prompts, max_length=max_length), ids)
    te = transformers.CLIPTextModel.from_pretrained(str(folder / "text_encoder")).eval()
    with torch.no_grad():
        ref_ctx = te(torch.from_numpy(ids)).last_hidden_state.numpy()
    ctx = np.asarray(pipe.encode_prompts(prompts))
    np.testing.assert_allclose(ctx, ref_ctx, atol=1e-4, rtol=0)

    unet = diffusers.UNet2DConditionModel.from_pretrained(str(folder / "unet")).eval()
    hw = pipe.unet_config.sample_size
    z = np.random.default_rng(0).standard_normal((2, hw, hw, 4)).astype(np.float32)
    t = np.array([10, 700])
    with torch.no_grad():
        ref = _nhwc(unet(_nchw(z), torch.from_numpy(t), torch.from_numpy(ref_ctx)).sample)
    got = U.UNet2DConditionModel(pipe.unet_config).apply(
        {"params": pipe.unet_params}, jnp.asarray(z), jnp.asarray(t), jnp.asarray(ref_ctx))
    assert np.std(ref) > 1e-3
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4, rtol=0)


# slow: within a stage the resume is finetune's (test_finetune.py::
# test_sigkill_then_resume_is_bit_identical, fast); restoring finished stages from the records
# bit for bit is test_export_step_rebuilds_the_folder_from_the_records (fast)
@pytest.mark.slow
def test_resume_after_interruption_is_bit_identical(smoke, tmp_path):
    from safetensors.numpy import load_file

    class Stop(Exception):
        pass

    def stop_in_stage_2(stage, step, params):
        if stage == "unet" and step == 2:
            raise Stop

    cfg = LB.LatentBaseConfig(**LB.SMOKE)
    out, work = tmp_path / "model", tmp_path / "work"
    # stage 1 as the fixture finished it (a finished stage is only restored), so the test
    # spends its time on stage 2: interrupted after its checkpoint at step 2, then rerun
    work.mkdir()
    shutil.copytree(smoke.with_name("model.work") / "vae_record", work / "vae_record")
    with pytest.raises(Stop):
        LB.pretrain(out, cfg, work_dir=work, progress=False, log=lambda m: None,
                    on_checkpoint=stop_in_stage_2)
    assert not out.exists()
    LB.pretrain(out, cfg, work_dir=work, progress=False, log=lambda m: None)
    for part, name in (("vae", "diffusion_pytorch_model"), ("unet", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        a = load_file(str(smoke / part / f"{name}.safetensors"))
        b = load_file(str(out / part / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{part}/{k}")
    assert (json.loads((out / "vae" / "config.json").read_text())["scaling_factor"]
            == json.loads((smoke / "vae" / "config.json").read_text())["scaling_factor"])


def test_export_step_rebuilds_the_folder_from_the_records(smoke, tmp_path):
    """--export-step (evaluating a long run while it trains) writes what the run wrote at the
    end, from the records alone: same tensors, same scaling factor; earlier steps differ."""
    from safetensors.numpy import load_file
    work = str(smoke.with_name("model.work"))
    last = LB.main(["--smoke", "--out", str(tmp_path / "last"), "--work-dir", work,
                    "--export-step", "-1"])
    mid = LB.main(["--smoke", "--out", str(tmp_path / "mid"), "--work-dir", work,
                   "--export-step", "2"])
    for part, name in (("vae", "diffusion_pytorch_model"), ("unet", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        a = load_file(str(smoke / part / f"{name}.safetensors"))
        b = load_file(str(last / part / f"{name}.safetensors"))
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{part}/{k}")
    assert json.loads((last / "vae" / "config.json").read_text()) == \
        json.loads((smoke / "vae" / "config.json").read_text())
    info = json.loads((mid / "jaxattrib_base.json").read_text())
    assert info["partial"] and info["steps"]["unet"] == 2
    u_mid = load_file(str(mid / "unet" / "diffusion_pytorch_model.safetensors"))
    u_end = load_file(str(smoke / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not np.array_equal(u_mid[k], u_end[k]) for k in u_end)
