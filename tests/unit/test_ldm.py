"""The latent-diffusion family's parts without training (models/ldm.py, families/ldm.py, objectives/diffusion.py):
the training forward's loss against a hand computation from the DiT's output, the unconditional input as the DiT's
"no text", the objective's per-step draws (timesteps, noise, condition dropout) as a function of (seed, step) alone,
the prompt layout, and the config's and sampler's refusals naming the option."""

from __future__ import annotations

import pytest
import torch

from vlmkit.errors import ConfigError, DataError
from vlmkit.image_generation import ImageGenerationConfig
from vlmkit.models.dual_encoder import TextConfig
from vlmkit.models.ldm import LDMConfig, build_ldm
from vlmkit.models.vae import VAEConfig
from vlmkit.objectives.diffusion import draws

pytestmark = pytest.mark.usefixtures("single_thread")

TEXT = dict(vocab_size=50, width=16, depth=1, heads=2, mlp_dim=32, context_length=12, eos_token_id=1)


def tiny_cfg(**kw) -> LDMConfig:
    vae = VAEConfig(image_size=(16, 16), channels=8, channel_mult=(1, 2), res_blocks=1, norm_groups=0, z_channels=8,
                    latent_channels=4, encoder="patch", scaling_factor=1.0)
    base = dict(vae=vae, latent_size=(8, 8), latent_channels=4, patch_size=2, width=32, depth=2, heads=2,
                text=TextConfig(**TEXT), text_embed_dim=8, cross_attention_dim=16, pooled_dim=8, pad_token_id=0)
    return LDMConfig(**{**base, **kw})


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = build_ldm(tiny_cfg()).eval()
    with torch.no_grad():  # a fresh DiT outputs exactly zero (adaLN-Zero): give every weight a value
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def test_the_loss_is_the_flow_mse_of_the_dit_output(model):
    """forward(latents, t, noise, text) == mean((dit((1 - t) x0 + t noise, t, text) - (noise - x0))^2), per sample
    and averaged, computed here from the DiT's own output."""
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0.1, 0.5, 0.9])
    ids = torch.tensor([[2, 5, 7, 1], [2, 9, 1, 0], [0, 0, 0, 0]])
    states, mask, pooled = model.encode_text(ids)
    out = model(x0, t, noise, states, mask, pooled)
    x_t = (1 - t.view(3, 1, 1, 1)) * x0 + t.view(3, 1, 1, 1) * noise
    v = model.dit(x_t, t, states, mask, pooled)
    want = ((v - (noise - x0)) ** 2).flatten(1).mean(1)
    assert v.abs().mean() > 0.01  # not the trivial zero output
    torch.testing.assert_close(out.per_sample, want)
    torch.testing.assert_close(out.loss, want.mean())


def test_no_text_is_the_dits_unconditional_input(model):
    """A row of padding alone: an all-False mask and a zero pooled vector, and the DiT's velocity for it is the one
    with no text states at all; a real text changes it."""
    ids = torch.tensor([[2, 5, 7, 1], [0, 0, 0, 0]])
    states, mask, pooled = model.encode_text(ids)
    assert mask.tolist() == [[True] * 4, [False] * 4]
    assert pooled[1].abs().sum() == 0 and pooled[0].abs().sum() > 0
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.3])
    v = model.velocity(x, t, states, mask, pooled)
    bare = model.dit(x[1:], t[1:], None, None, torch.zeros(1, 8))
    torch.testing.assert_close(v[1:], bare)
    assert not torch.allclose(v[:1], model.dit(x[:1], t[:1], None, None, torch.zeros(1, 8)))


def test_draws_depend_on_seed_and_step_alone():
    a, b = draws(0, 5, 64, (4, 8, 8), 0.3), draws(0, 5, 64, (4, 8, 8), 0.3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    for other in (draws(0, 6, 64, (4, 8, 8), 0.3), draws(1, 5, 64, (4, 8, 8), 0.3)):
        assert not torch.equal(a[0], other[0]) and not torch.equal(a[1], other[1])
    t, noise, drop = draws(0, 0, 4000, (1,), 0.5)
    assert ((t > 0) & (t < 1)).all() and noise.shape == (4000, 1)
    assert 0.45 < drop.float().mean() < 0.55
    assert 0.4 < t.median() < 0.6 and t.std() < 0.25  # logit-normal: centred, thinner than uniform's 0.29
    assert not draws(0, 0, 4000, (1,), 0.0)[2].any()


def test_config_refusals_name_the_option():
    with pytest.raises(ConfigError, match="model.cross_attention_dim must be the text tower's width"):
        tiny_cfg(cross_attention_dim=32)
    with pytest.raises(ConfigError, match=r"model.latent_size \[4, 4\] .* must be the VAE's latent grid"):
        tiny_cfg(latent_size=(4, 4))
    with pytest.raises(ConfigError, match="model.steps must be in 1..1000"):
        tiny_cfg(steps=0)
    with pytest.raises(ConfigError, match="model.pooled_dim must be 0"):
        tiny_cfg(pooled_dim=5)


def test_the_sampler_refuses_steps_out_of_range(model):
    from vlmkit.family import get_family

    fam = get_family("ldm")
    with pytest.raises(ConfigError, match=r"steps must be in 0..1000 \(0: this model's default 20"):
        fam.draw_images(model, [2, 5, 1], [], ImageGenerationConfig(n=1, steps=1001, cfg_scale=1.0))
    with pytest.raises(ConfigError, match="steps must be in 0..1000"):
        ImageGenerationConfig(steps=2000).validate()
    pixels = fam.draw_images(model, [2, 5, 1], [], ImageGenerationConfig(n=2, steps=2, cfg_scale=3.0, seed=0))
    assert pixels.shape == (2, 3, 16, 16)


def test_a_from_scratch_model_needs_its_checkpoints():
    from vlmkit.family import get_family
    from vlmkit.presets import get_preset

    preset = get_preset("tiny-dit")
    with pytest.raises(ConfigError, match="model.vae_from must point at a trained VAE"):
        get_family("ldm").configure(preset.model, preset.processor, None)


def test_the_layout_reads_captions_and_refuses_chat():
    from vlmkit.families.dual_encoder import train_caption_tokenizer
    from vlmkit.presets import get_preset
    from vlmkit.processing import Processor

    tok = train_caption_tokenizer(["a red circle", "a blue square left of a red circle"], 300)
    proc = Processor(get_preset("tiny-dit").processor, tok)
    ids = proc.image_prompt("a red circle", (16, 16))
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and len(ids) > 2
    assert proc.image_prompt("a red circle", (16, 16), unconditional=True) == []
    with pytest.raises(DataError, match="latent-diffusion text-to-image model .* draws images"):
        proc.chat([{"role": "user", "content": "hi"}], proc.prepare_images([], "x"))


@pytest.mark.parametrize("siglip", [False, True])
def test_a_texts_condition_does_not_depend_on_its_batch(siglip):
    """CLIP's causal tower: padding after a text changes none of its states; SigLIP's bidirectional one reads texts
    padded to its context (as trained), so a short text's states and pooled vector are the same alone or batched
    with a longer one."""
    text = TextConfig(**{**TEXT, "causal": not siglip, "pool": "last" if siglip else "eos"})
    torch.manual_seed(0)
    m = build_ldm(tiny_cfg(text=text, text_projection="siglip" if siglip else "clip")).eval()
    alone = m.encode_text(torch.tensor([[2, 5, 1]]))
    batched = m.encode_text(torch.tensor([[2, 5, 1, 0, 0, 0], [2, 5, 7, 8, 9, 1]]))
    torch.testing.assert_close(batched[2][:1], alone[2])
    torch.testing.assert_close(batched[0][:1, :3], alone[0][:, :3])
    assert batched[0].shape[1] == (12 if siglip else 6)
