"""The KL-VAE (models/vae.py, families/vae.py): forward and encode -> decode shapes through models/vq.py's encoder
and decoder, the KL against a hand computation, the loss as its parts, the log-variance clamp, the scaling factor
(encode multiplies by it, decode divides; the running estimate of 1 / std against a hand computation; a configured
factor overrides it), seeded posterior samples, vae_config_from's and the config's refusals, the Pipeline's
encode_latents / decode_latents and the refusals of text for a model that reads none. Training it is
tests/recipes/test_vae_recipe.py."""

from __future__ import annotations

import math

import pytest
import torch

from vlmkit.checkpoint import write_model_files
from vlmkit.errors import ConfigError, DataError
from vlmkit.families.vae import load_vae_weights, vae_config_from
from vlmkit.family import get_family
from vlmkit.models.vae import VAEConfig, build_vae, kl_divergence
from vlmkit.models.vq import VQConfig
from vlmkit.pipeline import Pipeline
from vlmkit.processing.vq import VQProcessorConfig, empty_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")


def small(**kw) -> VAEConfig:
    base = {"image_size": (32, 32), "channels": 8, "channel_mult": (1, 2, 2), "norm_groups": 4, "z_channels": 8,
            "latent_channels": 4}
    return VAEConfig(**{**base, **kw})


@pytest.mark.parametrize("encoder, mult, size", [("conv", (1, 2, 2), (32, 32)), ("patch", (1, 2, 2, 2), (32, 48)),
                                                 ("conv", (1, 2), (16, 32))])
def test_forward_encode_and_decode_shapes(encoder, mult, size):
    torch.manual_seed(0)
    model = build_vae(small(encoder=encoder, channel_mult=mult, image_size=size, latent_channels=3)).eval()
    f = 2 ** (len(mult) - 1)
    x = torch.randn(2, 3, *size)
    z = model.encode_latents(x)
    assert z.shape == (2, 3, size[0] // f, size[1] // f) and model.latent_grid == (size[0] // f, size[1] // f)
    assert model.latent_channels == 3
    assert model.decode_latents(z).shape == (2, 3, *size)
    out = model(x)
    assert out.reconstruction.shape == x.shape and out.loss.dim() == 0
    assert torch.allclose(out.reconstruction, model.decode_latents(z), atol=1e-5)  # eval: the posterior mean
    assert set(out.metrics()) == {"recon_loss", "kl", "latent_std", "posterior_std", "latent_scale"}


def test_kl_equals_hand_computation():
    mean = torch.tensor([0.5, -1.0, 0.0, 2.0]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    logvar = torch.tensor([0.0, -2.0, 1.0, 0.5]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    mean[1] *= 2  # a second image with other means
    per = [sum(0.5 * (m * m + math.exp(v) - 1 - v) for m, v in zip(ms, [0.0, -2.0, 1.0, 0.5]))
           for ms in ([0.5, -1.0, 0.0, 2.0], [1.0, -2.0, 0.0, 4.0])]
    assert float(kl_divergence(mean, logvar)) == pytest.approx(sum(per) / 2, rel=1e-6)  # per-image sum, image mean
    assert float(kl_divergence(torch.zeros(3, 4, 2, 2), torch.zeros(3, 4, 2, 2))) == 0.0  # the prior itself


def test_loss_is_reconstruction_plus_weighted_kl_and_logvar_is_clamped():
    torch.manual_seed(0)
    model = build_vae(small(kl_weight=0.01, recon_loss="l1")).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        out = model(x)
        mean, logvar = model.posterior(x)
    expect = (out.reconstruction - x).abs().mean() + 0.01 * kl_divergence(mean, logvar)
    assert float(out.loss) == pytest.approx(float(expect), rel=1e-6)
    with torch.no_grad():
        model.quant_conv.bias[4:] = 1e3  # the log-variance half: far above 20
        assert float(model.posterior(x)[1].min()) == 20.0
        model.quant_conv.bias[4:] = -1e3
        assert float(model.posterior(x)[1].max()) == -30.0


def test_encode_multiplies_and_decode_divides_by_the_scaling_factor():
    torch.manual_seed(0)
    one = build_vae(small(scaling_factor=1.0)).eval()
    scaled = build_vae(small(scaling_factor=0.18215)).eval()
    scaled.load_state_dict(one.state_dict())
    x = torch.randn(2, 3, 32, 32)
    z1, zs = one.encode_latents(x), scaled.encode_latents(x)
    assert torch.allclose(zs, 0.18215 * z1, atol=1e-6)
    assert torch.allclose(scaled.decode_latents(zs), one.decode_latents(z1), atol=1e-5)
    # a configured factor overrides the estimated buffer
    with torch.no_grad():
        scaled.latent_scale.fill_(7.0)
    assert scaled.scale == 0.18215 and torch.allclose(scaled.encode_latents(x), zs)
    estimated = build_vae(small()).eval()
    estimated.load_state_dict(scaled.state_dict())
    assert torch.allclose(estimated.encode_latents(x), 7.0 * z1, atol=1e-5)


def test_the_running_scale_is_one_over_the_std_of_the_posterior_means():
    """A cumulative average of E[mu], E[mu^2] for the first 10 training forwards, then momentum 0.1."""
    model = build_vae(small())
    assert model.scale == 1.0  # untrained: no estimate yet
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 4, 8, 8, generator=g) * s + o for s, o in ((2.0, 0.5), (0.5, -1.0), (1.0, 0.0))]
    for b in batches:
        model._update_scale(b)
    pooled = torch.cat([b.flatten() for b in batches])  # equal sizes: the cumulative average is the pooled moments
    assert model.scale == pytest.approx(float(1 / pooled.std(unbiased=False)), rel=1e-5)
    for _ in range(7):
        model._update_scale(batches[0])
    ex, ex2 = model.latent_moments.tolist()
    model._update_scale(torch.full((4, 4, 8, 8), 3.0))  # the 11th forward: momentum 0.1
    ex, ex2 = 0.9 * ex + 0.1 * 3.0, 0.9 * ex2 + 0.1 * 9.0
    assert model.scale == pytest.approx(1 / math.sqrt(ex2 - ex * ex), rel=1e-5) and int(model.latent_count) == 11
    # only a training forward updates it
    x = torch.randn(2, 3, 32, 32)
    model.eval()(x)
    model.encode_latents(x)
    assert int(model.latent_count) == 11
    model.train()(x)
    assert int(model.latent_count) == 12


def test_a_posterior_sample_is_seeded_and_spread_by_the_posterior_std():
    torch.manual_seed(0)
    model = build_vae(small(scaling_factor=2.0)).eval()
    x = torch.randn(2, 3, 32, 32)
    a = model.encode_latents(x, sample=True, generator=torch.Generator().manual_seed(5))
    b = model.encode_latents(x, sample=True, generator=torch.Generator().manual_seed(5))
    c = model.encode_latents(x, sample=True, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with torch.no_grad():
        _, logvar = model.posterior(x)
    noise = (a - model.encode_latents(x)) / (2.0 * torch.exp(0.5 * logvar))  # back to the unit noise drawn
    assert float(noise.std()) == pytest.approx(1.0, abs=0.1)


def test_bad_inputs_are_refused():
    model = build_vae(small()).eval()
    with pytest.raises(DataError, match=r"a VAE takes images \[n, 3, H, W\] with H and W multiples of 4, got "
                                        r"\[1, 3, 30, 32\]"):
        model.encode_latents(torch.zeros(1, 3, 30, 32))
    with pytest.raises(DataError, match=r"latents must be a float tensor \[n, 4, h, w\], got torch.float32 "
                                        r"\[1, 3, 8, 8\]"):
        model.decode_latents(torch.zeros(1, 3, 8, 8))
    with pytest.raises(DataError, match="latents must be a float tensor"):
        model.decode_latents(torch.zeros(1, 4, 8, 8, dtype=torch.long))


def test_config_refusals():
    with pytest.raises(ConfigError, match="model.recon_loss must be one of l1, l2, got 'lpips'"):
        VAEConfig(recon_loss="lpips")
    with pytest.raises(ConfigError, match="model.encoder must be one of conv, patch"):
        VAEConfig(encoder="vit")
    with pytest.raises(ConfigError, match="not a multiple of the downsampling factor 4"):
        VAEConfig(image_size=(62, 64))
    with pytest.raises(ConfigError, match="model.latent_channels must be >= 1, got 0"):
        VAEConfig(latent_channels=0)
    with pytest.raises(ConfigError, match="model.kl_weight must be a finite number >= 0, got -1.0"):
        VAEConfig(kl_weight=-1.0)
    with pytest.raises(ConfigError, match=r"model.scaling_factor must be > 0 \(used as given.*or 0 \(estimated"):
        VAEConfig(scaling_factor=-0.18215)
    with pytest.raises(ConfigError, match="model.scaling_factor"):
        VAEConfig(scaling_factor=float("nan"))
    with pytest.raises(ConfigError, match="norm_groups 8 does not divide"):
        VAEConfig(channels=4, channel_mult=(1, 3))


def new_pipe(cfg) -> Pipeline:
    family = get_family(cfg.family)
    pcfg = VQProcessorConfig(family=cfg.family, image_size=cfg.image_size)
    _, model, processor = family.new_model(cfg, pcfg, empty_tokenizer())
    return Pipeline(model, processor)


def save(pipe: Pipeline, folder) -> str:
    folder.mkdir(parents=True)
    write_model_files(folder, pipe.model, pipe.model.cfg, pipe.processor)
    return str(folder)


def test_vae_config_from_and_load_vae_weights(tmp_path):
    torch.manual_seed(0)
    pipe = new_pipe(small())
    with torch.no_grad():
        pipe.model.latent_scale.fill_(3.5)  # an estimated factor: it travels with the weights
    folder = save(pipe, tmp_path / "vae")
    cfg = vae_config_from(folder, pipe.processor.cfg, "model.vae_from")
    assert cfg == pipe.model.cfg
    again = build_vae(cfg).eval()
    load_vae_weights(again, folder)
    x = torch.randn(1, 3, 32, 32)
    assert again.scale == 3.5 and torch.equal(again.encode_latents(x), pipe.model.encode_latents(x))


def test_vae_config_from_refusals(tmp_path):
    pcfg = VQProcessorConfig(family="vae", image_size=(32, 32))
    with pytest.raises(ConfigError, match=r"model.vae_from: '.*nowhere' is not a folder; point it at a trained "
                                          r"VAE's checkpoint \(vlmkit train tiny-vae"):
        vae_config_from(str(tmp_path / "nowhere"), pcfg, "model.vae_from")
    vq = VQConfig(image_size=(32, 32), channels=8, channel_mult=(1, 2), norm_groups=4, code_dim=4, z_channels=8,
                  codebook_size=16)
    folder = save(new_pipe(vq), tmp_path / "vq")
    with pytest.raises(ConfigError, match=r"model.vae_from '.*vq' is a vq model; give a VAE's checkpoint"):
        vae_config_from(folder, pcfg, "model.vae_from")
    folder = save(new_pipe(small()), tmp_path / "vae")
    with pytest.raises(ConfigError, match=r"reads images with image_size \[32, 32\], this model's processor with "
                                          r"\[64, 64\]; set processor.image_size to match"):
        vae_config_from(folder, VQProcessorConfig(family="vae", image_size=(64, 64)), "model.vae_from")


def test_pipeline_latents_round_trip_equals_the_model():
    from PIL import Image

    torch.manual_seed(0)
    pipe = new_pipe(small(scaling_factor=0.5))
    assert pipe.has_image_latents and not pipe.has_image_codes and not pipe.can_generate and not pipe.can_embed
    images = [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (32, 32), (0, 0, 255))]
    z = pipe.encode_latents(images)
    pixels = pipe.processor.prepare_images(images).pixel_values
    assert z.shape == (2, 4, 8, 8) and torch.equal(z, pipe.model.encode_latents(pixels))
    one = pipe.decode_latents(z[0])
    assert one.shape == (3, 32, 32) and torch.allclose(one, pipe.model.decode(z[:1] / 0.5)[0], atol=1e-6)
    assert torch.allclose(pipe.decode_latents(z)[1], pipe.decode_latents(z[1]), atol=1e-5)
    a, b = (pipe.encode_latents(images, sample=True, seed=3) for _ in range(2))
    assert torch.equal(a, b) and not torch.equal(a, z)  # seeded posterior samples


def test_a_vae_pipeline_refuses_text_and_bad_latents_naming_what_it_does():
    pipe = new_pipe(small())
    with pytest.raises(DataError, match="chat\\(\\) needs a generative model; this vae model does not generate text: "
                                        "it turns images into latents and back \\(encode_latents / decode_latents"):
        pipe.chat([], "what is this?")
    with pytest.raises(DataError, match="this is an image autoencoder \\(vae\\), which turns images into continuous "
                                        "latents and back \\(encode_latents / decode_latents\\)"):
        pipe.processor.prompt("hello", None)
    with pytest.raises(DataError, match="encode_codes\\(\\) needs a model with an image codebook .* this vae model"):
        pipe.encode_codes([torch.zeros(3, 32, 32)])
    with pytest.raises(DataError, match=r"decode_latents\(\): latents must be a float tensor \[C, h, w\] or "
                                        r"\[n, C, h, w\], got list"):
        pipe.decode_latents([[0.0]])
    with pytest.raises(DataError, match=r"latents must be a float tensor \[n, 4, h, w\], got torch.float32 \[1, 2, 8, 8\]"):
        pipe.decode_latents(torch.zeros(2, 8, 8))


def test_a_chat_model_is_refused_latents(tiny_config, make_processor, tokenizer):
    from vlmkit.models import build_model

    model = build_model(tiny_config(), tokenizer.token_id("<image>"))
    pipe = Pipeline(model, make_processor(image_seq_len=model.image_seq_len))
    with pytest.raises(DataError, match="encode_latents\\(\\) needs a model with continuous image latents \\(an image "
                                        "autoencoder, family vae\\); this llava model has none"):
        pipe.encode_latents([torch.zeros(3, 16, 16)])
    with pytest.raises(DataError, match="decode_latents\\(\\) needs a model with continuous image latents"):
        pipe.decode_latents(torch.zeros(4, 2, 2))
    assert not pipe.has_image_latents
