"""transformers' VQ image tokenizers -> vlmkit's VQModel (convert/hf/vq.py): a tiny random JanusVQVAE (several
channel multipliers, attention in mid and at the lowest resolution, 2 residual blocks) gives the same codes and
the same decoded pixels as ``JanusVQVAE.encode`` / ``decode``; a tiny ChameleonVQVAE (encoder alone, attention at a
resolution of ``attn_resolutions``) the same codes and quantised latents as its ``encode``; the options that
keep older VQ models as they were; refusals by name."""

from __future__ import annotations

import pytest
import torch

from vlmkit.convert.hf.io import load_state
from vlmkit.convert.hf.vq import vq_config_from_hf, vq_key_map
from vlmkit.errors import ConfigError
from vlmkit.models.vq import VQConfig, build_vq

from hf_janus_folders import spread_

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

pytestmark = pytest.mark.usefixtures("single_thread")

randomise = spread_  # every parameter random, no block an identity (the Janus folder's own)


def fit_codebook(model, pixels: torch.Tensor, seed: int) -> None:
    """Codes near the encoder's outputs on other images (random encoder outputs and a unit-normal codebook would
    all pick one code)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z = model.quant_conv(model.encoder(pixels)).permute(0, 2, 3, 1).reshape(-1, model.quantize.embedding_dim)
        rows = torch.randint(0, z.shape[0], (model.quantize.num_embeddings,), generator=g)
        model.quantize.embedding.weight.copy_(z[rows] + 0.3 * z.std() * torch.randn(z[rows].shape, generator=g))


def janus_vq():
    cfg = transformers.JanusVQVAEConfig(
        embed_dim=8, num_embeddings=64, latent_channels=32, base_channels=32, channel_multiplier=[1, 2, 2],
        num_res_blocks=2, num_patches=4, projection_dim=16, image_token_embed_dim=16)
    torch.manual_seed(0)
    model = transformers.JanusVQVAE(cfg).eval()
    randomise(model, 1)
    fit_codebook(model, torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5)), 6)
    return cfg, model


def chameleon_vq():
    cfg = transformers.ChameleonVQVAEConfig(
        embed_dim=16, num_embeddings=48, latent_channels=32, resolution=32, base_channels=32,
        channel_multiplier=[1, 1, 2], num_res_blocks=2, attn_resolutions=[16])
    torch.manual_seed(0)
    model = transformers.ChameleonVQVAE(cfg).eval()
    randomise(model, 2)
    fit_codebook(model, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)), 6)
    return cfg, model


def ours(cfg, hf_model, kind):
    vcfg = vq_config_from_hf(cfg.to_dict(), kind)
    model = build_vq(vcfg).eval()
    load_state(model, hf_model.state_dict(), vq_key_map(model, vcfg), kind)
    return vcfg, model


def test_janus_vq_codes_and_decode_equal_transformers():
    cfg, theirs = janus_vq()
    vcfg, model = ours(cfg, theirs, "janus_vqgan")
    assert vcfg.mid_attn and vcfg.attn_levels == (2,) and vcfg.decode_l2_norm and vcfg.image_size == (16, 16)
    assert "encoder.down.2.attn.1.q.weight" in dict(model.named_parameters())
    assert "decoder.up.2.attn.2.proj_out.weight" in dict(model.named_parameters())  # taming's order: level 2
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = theirs.encode(pixels)
        codes = model.encode_codes(pixels)
        assert codes.shape == (3, 4, 4)
        assert torch.equal(codes.reshape(-1), out.image_tokens)
        assert len(codes.unique()) > 8  # a codebook actually searched
        torch.testing.assert_close(model.encode(pixels), theirs.quant_conv(out.last_hidden_state), rtol=0,
                                   atol=1e-5)
        ref = theirs.decode(codes.reshape(3, -1))
        got = model.decode_codes(codes)
    diff = (got - ref).abs().max().item()
    assert diff <= 1e-4, diff
    assert ref.abs().max() > 0.1


def test_chameleon_vq_codes_and_latents_equal_transformers():
    cfg, theirs = chameleon_vq()
    vcfg, model = ours(cfg, theirs, "chameleon_vqgan")
    assert vcfg.mid_attn and vcfg.attn_levels == (1,) and not vcfg.decoder and not vcfg.decode_l2_norm
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = theirs.encode(pixels)
        codes = model.encode_codes(pixels)
        assert torch.equal(codes.reshape(-1), out.image_tokens)
        assert len(codes.unique()) > 8
        z_q = model.quantize.lookup(codes)
    diff = (z_q - out.quantized_last_hidden_state).abs().max().item()
    assert diff <= 1e-4, diff
    with pytest.raises(ConfigError, match="no decoder"):
        model.decode_codes(codes)


def test_chameleon_without_attention():
    cfg, _ = chameleon_vq()
    d = cfg.to_dict() | {"attn_type": "none", "attn_resolutions": [16]}
    vcfg = vq_config_from_hf(d, "chameleon_vqgan")
    assert not vcfg.mid_attn and vcfg.attn_levels == ()
    assert not any(".attn" in n for n, _ in build_vq(vcfg).named_parameters())


def test_default_vq_keeps_its_modules():
    """The options' defaults add nothing: an older VQ model's parameter names and outputs are unchanged."""
    model = build_vq(VQConfig(image_size=(16, 16), channels=8, channel_mult=(1, 2), code_dim=4, z_channels=4,
                              codebook_size=8))
    assert not any("attn" in n for n, _ in model.named_parameters())
    assert model.decoder is not None


def test_refusals():
    with pytest.raises(ConfigError, match="double_latent"):
        vq_config_from_hf({"double_latent": True}, "janus_vqgan")
    with pytest.raises(ConfigError, match="model_type 'vqgan'"):
        vq_config_from_hf({}, "vqgan")
    with pytest.raises(ConfigError, match="attn_levels"):
        VQConfig(attn_levels=(7,))


def test_decode_l2_norm_training_forward_decodes_what_decode_codes_decodes():
    """With decode_l2_norm the training forward's reconstruction is decode_codes(its codes): the decoder reads the
    normalised codes either way."""
    cfg = VQConfig(image_size=(16, 16), channels=8, channel_mult=(1, 2), code_dim=4, z_channels=4, codebook_size=8,
                   quantizer="ste", restart_after=0, decode_l2_norm=True, mid_attn=True, attn_levels=(1,))
    torch.manual_seed(0)
    model = build_vq(cfg).eval()
    with torch.no_grad():
        model.quantize.embedding.weight.mul_(50)  # far from unit length: normalising matters
        pixels = torch.randn(2, 3, 16, 16)
        out = model(pixels)
        torch.testing.assert_close(out.reconstruction, model.decode_codes(out.codes), rtol=0, atol=1e-5)
