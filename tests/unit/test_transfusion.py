"""Transfusion (models/transfusion.py, families/transfusion.py, objectives/latent_pairs.py): the attention mask
through the model (text never sees a later image's noisy latents, every patch sees its whole image, packed equals
alone), the loss against a hand computation (the flow term at a fixed t and noise, the text term as the text
logits' cross-entropy), the sampler (seeds, steps, guidance, through Pipeline.generate_image), the latent pairs'
per-sample draws, and the refusals."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
import torch.nn.functional as F

from vlmkit.batch import IGNORE, Batch, MediaInputs
from vlmkit.checkpoint import write_model_files
from vlmkit.config import LanguageConfig
from vlmkit.data.collate import Item, collate, collate_packed
from vlmkit.diffusion.embed import patchify
from vlmkit.errors import ConfigError
from vlmkit.family import get_family
from vlmkit.models.transfusion import TransfusionConfig, TransfusionGenConfig
from vlmkit.models.vae import VAEConfig
from vlmkit.objectives.latent_pairs import LatentPairs, draw_t
from vlmkit.pipeline import Pipeline
from vlmkit.presets import get_preset
from vlmkit.processing.vq import empty_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

TEXTS = ["a red circle left of a blue square", "what colour is the circle", "two green triangles", "a star"] * 30


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory) -> str:
    """An untrained tiny-vae checkpoint (what gen.vae_from reads), its latent scale set as training would."""
    torch.manual_seed(0)
    p, fam = get_preset("tiny-vae"), get_family("vae")
    cfg, model, processor = fam.new_model(p.model, p.processor, empty_tokenizer())
    with torch.no_grad():
        model.latent_scale.fill_(2.0)
    folder = tmp_path_factory.mktemp("vae") / "checkpoint"
    folder.mkdir()
    write_model_files(folder, model, cfg, processor)
    return str(folder)


def new_pipe(vae_folder, **gen) -> Pipeline:
    p, fam = get_preset("tiny-transfusion"), get_family("transfusion")
    cfg = dataclasses.replace(p.model, gen=dataclasses.replace(p.model.gen, vae_from=vae_folder, **gen))
    cfg, model, processor = fam.new_model(cfg, p.processor, fam.new_tokenizer(TEXTS, 300))
    with torch.no_grad():  # patch_out starts at zero (velocity 0): give it weights so images matter to the output
        model.patch_out.weight.normal_(std=0.1)
    return Pipeline(model.eval(), processor, cfg)


@pytest.fixture(scope="module")
def pipe(vae_folder) -> Pipeline:
    torch.manual_seed(0)
    return new_pipe(vae_folder)


def image_item(pipe, prompt: list[int], seed: int, t: float, write: bool = True, tail: list[int] = (),
               eoi: bool = True) -> Item:
    """``prompt <image block> <|eoi|> tail`` with one random image noised at ``t`` with seeded noise (``eoi``
    False: the sample ends with its patches, as a truncated one would)."""
    model = pipe.model
    g = torch.Generator().manual_seed(seed)
    ids = prompt + [model.image_token_id] * model.image_seq_len + [model.eoi_token_id] * eoi + list(tail)
    media = MediaInputs(torch.rand(1, 3, 64, 64, generator=g) * 2 - 1, [model.image_seq_len],
                        {"t": torch.tensor([t]), "noise": torch.randn(1, *model.latent_shape, generator=g),
                         "write": torch.tensor([1.0 if write else 0.0])})
    n = len(ids)
    labels = torch.tensor(ids)
    labels[torch.tensor(ids) == model.image_token_id] = IGNORE
    return Item(torch.tensor(ids), labels, torch.arange(n), torch.zeros(n, dtype=torch.long), 0, media, [])


def hidden_of(model, batch: Batch) -> torch.Tensor:
    return model.hidden(batch, model.media_features(batch))


# ------------------------------------------------------------------------------------------------ the mask


def test_text_never_sees_a_later_images_noisy_latents(pipe):
    model = pipe.model
    a = image_item(pipe, [10, 11, 12], seed=1, t=0.0, write=False, tail=[13, 14])
    b = image_item(pipe, [10, 11, 12], seed=1, t=0.0, write=False, tail=[13, 14])
    # a second image after the text: only its noise differs between the two sequences
    second = [model.boi_token_id] + [model.image_token_id] * model.image_seq_len + [model.eoi_token_id]
    for item, seed in ((a, 5), (b, 6)):
        g = torch.Generator().manual_seed(seed)
        item.input_ids = torch.cat([item.input_ids, torch.tensor(second)])
        item.labels = torch.full_like(item.input_ids, IGNORE)
        n = len(item.input_ids)
        item.position_ids, item.segment_ids = torch.arange(n), torch.zeros(n, dtype=torch.long)
        extra = {"t": torch.tensor([0.0, 0.7]), "write": torch.tensor([0.0, 1.0]),
                 "noise": torch.cat([item.media.extra["noise"], torch.randn(1, *model.latent_shape, generator=g)])}
        item.media = MediaInputs(item.media.pixel_values.repeat(2, 1, 1, 1), [model.image_seq_len] * 2, extra)
    with torch.no_grad():
        ha, hb = (hidden_of(model, collate([i], 0))[0] for i in (a, b))
    start = len(a.input_ids) - len(second) + 1  # the second image's first patch
    assert torch.equal(ha[:start], hb[:start])  # every earlier position, text and first image alike
    assert (ha[start:] - hb[start:]).abs().max() > 1e-3  # the second image itself did change


def test_every_patch_sees_its_whole_image(pipe):
    model = pipe.model
    item = image_item(pipe, [10, 11], seed=2, t=0.5)
    batch = collate([item], 0)
    feats = model.media_features(batch)
    with torch.no_grad():
        base = model.image_outputs(model.hidden(batch, feats), batch.input_ids)
        changed = feats.values.clone()
        changed[0, -1] += 1.0  # the last patch of the image
        feats.values = changed
        out = model.image_outputs(model.hidden(batch, feats), batch.input_ids)
    per_patch = (out - base).abs().amax(-1)[0]
    assert bool((per_patch > 1e-6).all()), per_patch  # the first patch too: bidirectional
    start = 2  # the text before the image is untouched
    with torch.no_grad():
        assert torch.equal(model.hidden(batch, feats)[0, :start], hidden_of(model, batch)[0, :start])


def test_packed_equals_each_sample_alone(pipe):
    model = pipe.model
    # a ends with its patches and b starts with its own: two image blocks side by side in the packed row, which
    # must stay two blocks (nn.block_ids splits the run at b's start), each seeing only its own sample
    a = image_item(pipe, [10, 11, 12], seed=3, t=0.3, eoi=False)
    b = image_item(pipe, [], seed=4, t=0.8, tail=[14, 15])
    c = image_item(pipe, [16], seed=5, t=0.1)
    with torch.no_grad():
        packed = collate_packed([a, b, c], 0, pack_length=400)
        assert packed.input_ids.shape[0] == 1  # one row: a, b and c side by side, in that order
        out = model(packed)
        alone = [model(collate([x], 0)) for x in (a, b, c)]
        h_packed = hidden_of(model, packed)[0]
        t = 0
        for x in (a, b, c):
            h = hidden_of(model, collate([x], 0))[0]
            torch.testing.assert_close(h_packed[t:t + len(x)], h, atol=1e-5, rtol=1e-5)
            t += len(x)
    for k in ("text", "image"):
        assert out.parts[k][1] == sum(o.parts[k][1] for o in alone)
        torch.testing.assert_close(out.parts[k][0], sum(o.parts[k][0] for o in alone), atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ the loss


def test_loss_equals_a_hand_computation_at_fixed_t_and_noise(pipe):
    model = pipe.model
    item = image_item(pipe, [10, 11, 12], seed=7, t=0.37, tail=[13, 14, 15])
    batch = collate([item], 0)
    with torch.no_grad():
        out = model(batch)
        # by hand: the clean latents, noised at t = 0.37 with the given noise, through the model's own layers
        x0 = model.vae.encode_latents(item.media.pixel_values)
        noise = item.media.extra["noise"]
        x_t = 0.63 * x0 + 0.37 * noise
        feats = model.patch_in(patchify(x_t, 2)) + model.patch_pos + model.t_embed(torch.tensor([0.37]))[:, None]
        ids = batch.input_ids
        embeds = model.lm.embed_tokens(ids.masked_fill(ids == model.image_token_id, 0))
        embeds[ids == model.image_token_id] = feats.reshape(-1, feats.shape[-1])
        hidden = model.lm(embeds, mask=model.attention(batch))
        pred = model.patch_out(hidden[ids == model.image_token_id])  # [64, 16]
        target = patchify(noise - x0, 2)[0]
        mse = ((pred - target) ** 2).mean(-1)  # per patch
        logits = model.lm.lm_head(hidden)[0, :-1]
        labels = batch.labels[0, 1:]
        ce = F.cross_entropy(logits[labels != IGNORE], labels[labels != IGNORE], reduction="sum")
    i_sum, n_image = out.parts["image"]
    t_sum, n_text = out.parts["text"]
    # the 64 patches; text targets 11, 12, <|eoi|>, 13, 14, 15 (the first id is never a target, placeholders never)
    assert n_image == 64 and n_text == int((labels != IGNORE).sum()) == 6
    torch.testing.assert_close(i_sum, mse.sum(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t_sum, ce, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, (mse.sum() + ce) / (64 + n_text), atol=1e-6, rtol=1e-5)
    assert float(mse.sum()) > 1.0  # not a trivially zero comparison


def test_a_read_image_has_no_image_loss_and_patch_out_starts_at_zero(pipe, vae_folder):
    model = pipe.model
    out = model(collate([image_item(pipe, [10], seed=8, t=0.0, write=False, tail=[12])], 0))
    assert out.parts["image"][1] == 0 and float(out.parts["image"][0].detach()) == 0.0
    torch.manual_seed(1)
    p, fam = get_preset("tiny-transfusion"), get_family("transfusion")
    cfg = dataclasses.replace(p.model, gen=dataclasses.replace(p.model.gen, vae_from=vae_folder))
    _, fresh, _ = fam.new_model(cfg, p.processor, fam.new_tokenizer(TEXTS, 300))
    assert float(fresh.patch_out.weight.detach().abs().sum()) == 0.0  # the initial velocity is 0


# ------------------------------------------------------------------------------------------------ sampling


def test_sampling_is_seeded_and_reads_steps_and_guidance(pipe):
    cond = pipe.processor.image_prompt("a red circle", pipe.model.image_grid)
    uncond = pipe.processor.image_prompt("a red circle", pipe.model.image_grid, unconditional=True)
    fam = get_family("transfusion")
    from vlmkit.image_generation import ImageGenerationConfig

    def draw(**kw):
        gen = ImageGenerationConfig(**{"n": 2, "seed": 0, "steps": 3, "cfg_scale": 3.0, **kw})
        with torch.no_grad():
            return fam.draw_images(pipe.model, cond, uncond if gen.cfg_scale != 1 else [], gen)
    a = draw()
    assert a.shape == (2, 3, 64, 64) and float(a.abs().max()) <= 1.0
    assert torch.equal(a, draw())  # same seed, same images
    assert not torch.allclose(a, draw(seed=1))
    assert not torch.allclose(a, draw(steps=5))
    assert not torch.allclose(a, draw(cfg_scale=1.0))
    assert not torch.equal(a[0], a[1])  # two images of one call differ
    with pytest.raises(ConfigError, match="temperature and top_k do not apply to transfusion's sampler"):
        draw(temperature=0.5)


def test_generate_image_gives_pil_images(pipe):
    images = pipe.generate_image("a red circle", n=2, seed=0, steps=4)
    assert [im.size for im in images] == [(64, 64)] * 2
    again = pipe.generate_image("a red circle", n=2, seed=0, steps=4)
    assert [im.tobytes() for im in images] == [im.tobytes() for im in again]


def test_layout_prompts(pipe):
    proc, model = pipe.processor, pipe.model
    cond = proc.image_prompt("a red circle", model.image_grid)
    assert cond[-1] == model.boi_token_id and len(cond) > 1
    assert proc.image_prompt("a red circle", model.image_grid, unconditional=True) == [model.boi_token_id]
    from PIL import Image

    media = proc.prepare_images([Image.new("RGB", (64, 64))])
    assert media.texts[0].count(proc.cfg.image_token) == 64 and media.texts[0].startswith("<|boi|>")
    assert media.extra["noise"].shape == (1, 4, 16, 16) and float(media.extra["write"][0]) == 0.0


# ------------------------------------------------------------------------------------------------ latent pairs


def test_latent_pairs_draw_t_and_noise_per_sample_from_the_generator(pipe, tmp_path):
    from PIL import Image

    from vlmkit.data.pairs import Pair

    path = tmp_path / "a.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(path)
    pairs = LatentPairs([Pair(path, "a red square", "pairs.csv")], pipe.processor, pipe.model, "pairs.csv")
    a, b = pairs.item(0, False, random.Random("1:2:0")), pairs.item(0, False, random.Random("1:2:0"))
    c = pairs.item(0, True, random.Random("1:3:0"))
    assert torch.equal(a.media.extra["noise"], b.media.extra["noise"]) and torch.equal(a.media.extra["t"],
                                                                                       b.media.extra["t"])
    assert not torch.equal(a.media.extra["noise"], c.media.extra["noise"])
    rng = random.Random("1:2:0")
    assert float(a.media.extra["t"][0]) == pytest.approx(draw_t(rng, "logit_normal"))
    assert bool((a.labels == IGNORE).all()) and a.input_ids[-1] == pipe.model.eoi_token_id
    assert c.input_ids[0] == pipe.model.boi_token_id  # the unconditional prompt
    batch = collate([a, c], 0)
    assert pairs.counts(batch) == (0, 128)
    out = pipe.model(batch)
    assert out.parts["image"][1] == 128


# ------------------------------------------------------------------------------------------------ refusals


def transfusion_folder(vae_folder, tmp_path) -> str:
    """A saved transfusion checkpoint: a folder that is not a VAE's."""
    pipe = new_pipe(vae_folder)
    folder = tmp_path / "transfusion"
    folder.mkdir()
    write_model_files(folder, pipe.model, pipe.model.cfg, pipe.processor)
    return str(folder)


def test_refusals(vae_folder, tmp_path):
    p, fam = get_preset("tiny-transfusion"), get_family("transfusion")
    tok = fam.new_tokenizer(TEXTS, 300)
    with pytest.raises(ConfigError, match=r"model.gen.vae_from '.*' is a transfusion model; give a VAE's checkpoint"):
        fam.new_model(dataclasses.replace(p.model, gen=dataclasses.replace(p.model.gen, vae_from=transfusion_folder(
            vae_folder, tmp_path))), p.processor, tok)
    with pytest.raises(ConfigError, match=r"model.gen.vae_from: '.*nowhere' is not a folder"):
        fam.new_model(dataclasses.replace(p.model, gen=dataclasses.replace(p.model.gen, vae_from=str(
            tmp_path / "nowhere"))), p.processor, tok)
    with pytest.raises(ConfigError, match=r"model.gen.patch_size 3 does not divide the VAE's 16x16 latent grid"):
        TransfusionConfig(gen=TransfusionGenConfig(vae=VAEConfig(), patch_size=3))
    with pytest.raises(ConfigError, match="model.gen.patch_size must be >= 1"):
        TransfusionConfig(gen=TransfusionGenConfig(patch_size=0))
    with pytest.raises(ConfigError, match="model.gen.steps must be in 1..1000"):
        TransfusionConfig(gen=TransfusionGenConfig(steps=0))
    with pytest.raises(ConfigError, match="model.gen.timesteps must be one of logit_normal, uniform"):
        TransfusionConfig(gen=TransfusionGenConfig(timesteps="cosine"))
    with pytest.raises(ConfigError, match="model.eoi_token_id must be a token id"):
        TransfusionConfig(eoi_token_id=10**6)
    with pytest.raises(ConfigError, match="model.lm.width must be a multiple of 4"):
        TransfusionConfig(lm=LanguageConfig(width=130, heads=2, kv_heads=2))
