"""Idefics2 from Hugging Face folders, beyond the conformance table: the pixels and pixel masks transformers'
processor pads (with and without image splitting, several images of different sizes per prompt) are vlmkit's
crops, and vlmkit's patch lists are their whole patches; the NaViT position ids and the perceiver connector
(padded context masked) are transformers'; and what vlmkit does not implement is refused by name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from families.cases import images

import vlmkit
from vlmkit.batch import Batch
from vlmkit.config import ConnectorConfig, ResamplerConfig, VLMConfig
from vlmkit.connectors import build_connector
from vlmkit.connectors.perceiver import idefics2_connector_key_map
from vlmkit.convert.hf.idefics2 import idefics2_config_to_hf, load_idefics2_folder
from vlmkit.errors import ConfigError, DataError
from vlmkit.models.idefics2 import bucketed_positions

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = [("Compare <image><image> and <image>: how many squares?", (2, 3, 4)),
           ("User:<image>What colour is it?<end_of_utterance>\nAssistant:", (0,)), ("<image>a<image>", (1, 3))]


@pytest.mark.parametrize("fixture", ["idefics2", "idefics2_nosplit"])
@pytest.mark.parametrize("prompt, which", PROMPTS)
def test_pixels_and_masks_equal_transformers(request, fixture, prompt, which):
    folder, _, hf_proc = request.getfixturevalue(fixture)
    pipe = vlmkit.load(folder)
    imgs = [images()[i] for i in which]
    theirs = hf_proc(text=prompt, images=imgs, return_tensors="pt")
    pixels, pmask = theirs["pixel_values"][0], theirs["pixel_attention_mask"][0].bool()
    ip = pipe.processor.images
    crops = [c for im in imgs for c in ip.crops(im)]
    assert len(crops) == len(pixels) == len(imgs) * (5 if fixture == "idefics2" else 1)
    if len(crops) > 1:
        assert len({tuple(c.shape) for c in crops}) > 1  # crops of several sizes, padded by transformers
    for crop, pad, mask in zip(crops, pixels, pmask):
        _, h, w = crop.shape
        torch.testing.assert_close(pad[:, :h, :w], crop, rtol=0, atol=1e-6)
        assert not pad[:, h:].any() and not pad[:, :, w:].any()
        assert mask[:h, :w].all() and mask.sum() == h * w
    # vlmkit's patch lists are the crops' whole patches, the ones transformers' patch mask keeps
    media = pipe.processor.prepare_images(imgs)
    p = pipe.model.encoder.patch_size
    kept = []
    for pad, mask in zip(pixels, pmask):
        gh, gw = int(mask[:, 0].sum()) // p, int(mask[0].sum()) // p
        kept.append(pad[:, :gh * p, :gw * p].reshape(3, gh, p, gw, p).permute(1, 3, 0, 2, 4).reshape(-1, 3, p, p))
    torch.testing.assert_close(media.pixel_values, torch.cat(kept), rtol=0, atol=1e-6)
    assert media.tokens == [len(crops) // len(imgs) * 4] * len(imgs)


@pytest.mark.parametrize("prompt", ["<image>x", "<image><image><image>", "<image>\n<image> <image>", "a<image>b<image> c",
                                    "<image><end_of_utterance>", "<image>"])
def test_placeholder_text_equals_transformers(idefics2, idefics2_nosplit, prompt):
    """Adjacent images share one fake token; a closing fake token before a word gets a space, not before '<'."""
    n = prompt.count("<image>")
    imgs = [images()[i % 5] for i in range(n)]
    for folder, _, hf_proc in (idefics2, idefics2_nosplit):
        pipe = vlmkit.load(folder)
        ours = pipe.processor.prompt(prompt, pipe.processor.prepare_images(imgs)).ids
        assert ours == hf_proc(text=prompt, images=imgs)["input_ids"][0]


@pytest.mark.parametrize("side, grids", [(8, [(8, 8), (4, 5), (7, 3), (1, 8)]), (70, [(70, 70), (27, 70), (70, 53)]),
                                         (27, [(27, 27), (13, 19)])])
def test_navit_position_ids_are_transformers(side, grids):
    from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionEmbeddings

    p = 2
    emb = Idefics2VisionEmbeddings(transformers.Idefics2VisionConfig(hidden_size=1, image_size=side * p, patch_size=p))
    with torch.no_grad():
        emb.patch_embedding.weight.zero_()
        emb.patch_embedding.bias.zero_()
        emb.position_embedding.weight[:, 0] = torch.arange(side * side, dtype=torch.float32)
    for gh, gw in grids:
        mask = torch.zeros(1, side, side, dtype=torch.bool)
        mask[0, :gh, :gw] = True
        ids = emb(torch.zeros(1, 3, side * p, side * p), mask)[0, :, 0].reshape(side, side)[:gh, :gw]
        assert torch.equal(bucketed_positions(side, gh, gw), ids.reshape(-1).long()), (side, gh, gw)


def test_perceiver_connector_equals_idefics2_connector_with_padded_context():
    from transformers.models.idefics2.modeling_idefics2 import Idefics2Connector

    text = transformers.MistralConfig(hidden_size=24, intermediate_size=40, num_attention_heads=4, rms_norm_eps=1e-5)
    perceiver = transformers.Idefics2PerceiverConfig(hidden_size=24, rms_norm_eps=1e-5, resampler_n_latents=3,
                                                     resampler_depth=2, resampler_n_heads=4, resampler_head_dim=6,
                                                     num_key_value_heads=2)
    cfg = transformers.Idefics2Config(vision_config={"hidden_size": 16}, text_config=text.to_dict(),
                                      perceiver_config=perceiver.to_dict())
    torch.manual_seed(0)
    ref = Idefics2Connector(cfg).eval()
    with torch.no_grad():
        for prm in ref.parameters():
            prm.copy_(torch.randn_like(prm) * 0.3 + (1.0 if prm.ndim == 1 else 0.0))
    ours = build_connector(ConnectorConfig(kind="perceiver", act="silu", perceiver=ResamplerConfig(
        n_latents=3, depth=2, heads=4, head_dim=6, kv_heads=2, norm_eps=1e-5, proj_dim=40)), 16, 24)
    state = {k: v for k, v in ref.state_dict().items()}
    table = idefics2_connector_key_map(2, prefix="")
    ours.load_state_dict({k: state[v] for k, v in table.items()})
    x = torch.randn(3, 10, 16)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2, 2:] = False
    with torch.no_grad():
        torch.testing.assert_close(ours(x, mask=mask), ref(x, attention_mask=mask.long()), rtol=0, atol=1e-5)
        # the padded rows change nothing: the same image alone, unpadded
        torch.testing.assert_close(ours(x[1:2, :6])[0], ours(x, mask=mask)[1], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ refusals


def _copy(src, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(src, folder)
    return folder


def _edit(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_a_fixed_size_image_processor_is_refused(idefics2, tmp_path):
    folder = _copy(idefics2[0], tmp_path)
    _edit(folder / "processor_config.json", lambda d: d["image_processor"].update(size={"height": 56, "width": 56}))
    with pytest.raises(ConfigError, match=r"processor_config.json: size .*only \{'shortest_edge': N, 'longest_edge'"):
        vlmkit.load(folder)


def test_an_image_seq_len_other_than_the_latents_is_refused(idefics2, tmp_path):
    folder = _copy(idefics2[0], tmp_path)
    _edit(folder / "processor_config.json", lambda d: d.update(image_seq_len=8))
    with pytest.raises(ConfigError, match=r"image_seq_len 8 differs from the model's 4 .*resampler_n_latents"):
        vlmkit.load(folder)


def test_perceiver_heads_must_group_evenly(idefics2, tmp_path):
    folder = _copy(idefics2[0], tmp_path)
    _edit(folder / "config.json", lambda d: d["perceiver_config"].update(num_key_value_heads=3))
    with pytest.raises(ConfigError, match=r"resampler_n_heads 4 is not a multiple of num_key_value_heads 3"):
        vlmkit.load(folder)


def test_text_holding_the_fake_image_token_is_refused(idefics2):
    pipe = vlmkit.load(idefics2[0])
    media = pipe.processor.prepare_images(images()[:1])
    with pytest.raises(DataError, match=r"<fake_token_around_image>.*only the processor writes"):
        pipe.processor.prompt("<fake_token_around_image><image>hi", media)


def test_export_refuses_what_idefics2_cannot_compute(idefics2):
    _, cfg, _ = load_idefics2_folder(idefics2[0])
    assert idefics2_config_to_hf(cfg, 5)["perceiver_config"]["resampler_n_latents"] == 4
    mlp = VLMConfig(family="idefics2", vision=cfg.vision, connector=ConnectorConfig(kind="mlp"), lm=cfg.lm)
    with pytest.raises(ConfigError, match=r"connector.kind 'mlp': Idefics2's connector is the perceiver"):
        idefics2_config_to_hf(mlp, 5)
    other = VLMConfig(family="idefics2", vision=cfg.vision, lm=cfg.lm,
                      connector=ConnectorConfig(kind="perceiver", act="gelu", perceiver=cfg.connector.perceiver))
    with pytest.raises(ConfigError, match=r"connector: act 'gelu' .* must be the LM's act 'silu'"):
        idefics2_config_to_hf(other, 5)


def test_a_hub_style_perceiver_config_takes_the_texts_width_and_eps(idefics2, tmp_path):
    """The Hub's idefics2 configs name their sub-configs model_type "idefics2" and may leave the perceiver's
    hidden_size and rms_norm_eps out: transformers then takes both from the text config, and so does vlmkit."""
    folder = _copy(idefics2[0], tmp_path)

    def hub_style(d):
        for key in ("hidden_size", "rms_norm_eps"):
            d["perceiver_config"].pop(key)
        d["perceiver_config"]["model_type"] = d["vision_config"]["model_type"] = "idefics2"
    _edit(folder / "config.json", hub_style)
    ref = transformers.Idefics2ForConditionalGeneration.from_pretrained(folder).eval()
    assert ref.config.perceiver_config.rms_norm_eps == ref.config.text_config.rms_norm_eps == 1e-6
    pipe = vlmkit.load(folder)
    assert pipe.model.connector.layers[0].latents_norm.eps == 1e-6
    prompt, imgs = "Compare <image> and <image>: how many squares?", [images()[2], images()[3]]
    theirs = idefics2[2](text=prompt, images=imgs, return_tensors="pt")
    media = pipe.processor.prepare_images(imgs)
    with torch.no_grad():
        ours = pipe.model(Batch(theirs["input_ids"], media=media)).logits
        torch.testing.assert_close(ours, ref(**theirs).logits, rtol=0, atol=1e-4)
