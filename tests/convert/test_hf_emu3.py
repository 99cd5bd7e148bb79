"""Emu3 beyond the conformance row (tests/families/cases.py): its VQ-VAE's codes and decoded images against
Emu3VQVAE, its pixels against Emu3ImageProcessor for images of several sizes and shapes, each image's tokens against
transformers' for the image alone (transformers pads a call's images to the largest; vlmkit does not), the
image-generation interface (prompts against Emu3Processor's ``return_for_image_generation``, the plan of an image's
tokens, teacher-forced log-probabilities of every image token against Emu3ForConditionalGeneration), and what cannot
be represented, refused by name."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

import vlmkit
from vlmkit.batch import Batch
from vlmkit.data.shapes import render_scene, sample_scene
from vlmkit.errors import ConfigError, DataError
from vlmkit.image_generation import ImageGenerationConfig, generate_codes

from hf_fixtures import real_images

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")
import hf_emu3_folders  # noqa: E402,F401  (registers the "emu3" folder)

pytestmark = pytest.mark.usefixtures("single_thread")


def sized_images() -> list:
    """Images larger than max_pixels (scaled down), smaller than min_pixels (scaled up), wide, tall, odd sides."""
    rng = random.Random(5)
    sizes = [(200, 90), (30, 150), (13, 7), (96, 32), (61, 41), (300, 301)]
    scenes = [render_scene(sample_scene(rng, max(w, 32), max(h, 32), min_objects=1, max_objects=3)) for w, h in sizes]
    return real_images() + [im.resize((w, h)) if im.size != (w, h) else im for im, (w, h) in zip(scenes, sizes)]


@pytest.fixture(scope="module")
def emu3(hf_folder):
    folder, model, processor = hf_folder("emu3")
    return folder, model, processor, vlmkit.load(folder)


def one_image(media, k: int = 0) -> torch.Tensor:
    """Image k of vlmkit's MediaInputs as [1, 3, H, W]."""
    h, w = media.extra["image_sizes"][k].tolist()
    start = sum(a * b for a, b in media.extra["image_sizes"][:k].tolist())
    return media.pixel_values[start:start + h * w].t().reshape(1, 3, h, w)


def test_pixels_equal_emu3_image_processor(emu3):
    _, _, hf_proc, pipe = emu3
    for im in sized_images():
        ours = pipe.processor.prepare_images([im])
        theirs = hf_proc.image_processor(im, return_tensors="pt")
        assert ours.extra["image_sizes"].tolist() == theirs["image_sizes"].tolist(), im.size
        torch.testing.assert_close(one_image(ours), theirs["pixel_values"].float(), rtol=0, atol=1e-5,
                                   msg=str(im.size))
        h, w = (s // 8 for s in theirs["image_sizes"][0].tolist())
        assert ours.tokens == [h * (w + 1)] and ours.texts[0].startswith(f"<|image start|>{h}*{w}<|image token|>")


def test_codes_and_decoded_images_equal_emu3_vqvae(emu3):
    _, ref, hf_proc, pipe = emu3
    vq = ref.model.vqmodel
    seen = set()
    for im in sized_images():
        pixels = hf_proc.image_processor(im, return_tensors="pt")
        with torch.no_grad():
            theirs = vq.encode(pixels["pixel_values"], pixels["image_sizes"]).image_tokens[0]
        ours = pipe.model.encode_codes(pixels["pixel_values"])[0]
        assert torch.equal(ours, theirs), im.size
        seen |= set(ours.flatten().tolist())
        with torch.no_grad():
            decoded = vq.decode(theirs[None])
        torch.testing.assert_close(pipe.model.decode_codes(ours[None]), decoded, rtol=0, atol=1e-4, msg=str(im.size))
    assert len(seen) > 3, "the tiny VQ-VAE maps every image to a few codes: the test would not see a wrong one"
    codes = torch.randint(0, 64, (2, 3, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = vq.decode(codes)
    diff = (pipe.model.decode_codes(codes) - theirs).abs().max()
    assert diff <= 1e-4, diff


def test_each_image_is_tokenised_alone_as_transformers_tokenises_it_alone(emu3):
    """Images of different sizes in one prompt: each image's tokens are transformers' for that image processed alone
    (transformers itself pads them to the largest and gets other codes for the smaller ones)."""
    _, ref, hf_proc, pipe = emu3
    ims = sized_images()[:4]
    media = pipe.processor.prepare_images(ims)
    features = pipe.model.encode_media(media)
    for im, part in zip(ims, features.split()):
        alone = hf_proc.image_processor(im, return_tensors="pt")
        with torch.no_grad():
            ids = ref.model.get_image_tokens(alone["pixel_values"], alone["image_sizes"])
            embeds = ref.model.get_input_embeddings()(ids)
        torch.testing.assert_close(part.values, embeds, rtol=0, atol=0, msg=str(im.size))
    assert features.rows == media.tokens


def generation_inputs(hf_proc, text: str, ratio: str, area: int) -> tuple[list[int], tuple[int, int]]:
    out = hf_proc(text=text, return_for_image_generation=True, ratio=ratio, image_area=area, return_tensors="pt")
    return out["input_ids"][0].tolist(), tuple(int(v) for v in out["image_sizes"][0])


def test_image_prompt_equals_emu3_processor_generation_mode(emu3):
    _, _, hf_proc, pipe = emu3
    layout = pipe.processor.layout
    for text, ratio, area in (("a red circle left of a blue square.", "1:1", 48 * 48),
                              ("three green triangles", "4:3", 2304), ("", "1:2", 1024)):
        theirs, grid = generation_inputs(hf_proc, text, ratio, area)
        assert layout.image_prompt(text, grid) == theirs, text
        assert layout.image_prompt("<|extra_203|>" + text, grid) == theirs  # BOS already there: not twice
        assert layout.image_prompt(text, grid, unconditional=True) == generation_inputs(hf_proc, "", ratio, area)[0]
    with pytest.raises(DataError, match="reads no images"):
        layout.image_prompt("a <image> b", (2, 2))
    with pytest.raises(DataError, match=">= 1"):
        layout.image_prompt("a", (0, 3))


def test_image_plan_code_ids_and_vocab(emu3):
    _, ref, hf_proc, pipe = emu3
    model, tok = pipe.model, hf_proc.tokenizer
    eol, eof, eoi = tok.convert_tokens_to_ids(["<|extra_200|>", "<|extra_201|>", "<|image end|>"])
    assert model.image_plan(2, 3) == [None] * 3 + [eol] + [None] * 3 + [eol] + [eof, eoi, tok.eos_token_id]
    codes = torch.tensor([[0, 5], [63, 7]])
    names = [f"<|visual token{c:06d}|>" for c in codes.flatten().tolist()]
    assert model.code_ids(codes).flatten().tolist() == tok.convert_tokens_to_ids(names)
    assert model.code_ids(codes).shape == codes.shape
    assert torch.equal(model.image_vocab, torch.arange(ref.config.text_config.vocab_size))
    assert model.image_grid == (90, 90)  # Emu3Processor's default: ratio 1:1 over 518400 pixels at factor 8
    # transformers' own mapping of codes to ids, rows closed by the row-end token
    assert model.image_tokens(codes).tolist() == ref.model.vocabulary_mapping.convert_img2bpe(codes).flatten().tolist()


def image_sequence(model, prompt: list[int], codes: torch.Tensor) -> list[int]:
    """The prompt followed by the image's tokens as the plan lays them out (codes row-major at its None)."""
    ids, flat = list(prompt), iter(model.code_ids(codes).flatten().tolist())
    for slot in model.image_plan(*codes.shape):
        ids.append(next(flat) if slot is None else slot)
    return ids


def test_teacher_forced_image_token_logprobs_equal_transformers(emu3):
    _, ref, hf_proc, pipe = emu3
    g = torch.Generator().manual_seed(1)
    for text, ratio, area in (("a red circle left of a blue square.", "4:3", 2304), ("two squares", "1:1", 1600)):
        prompt, grid = generation_inputs(hf_proc, text, ratio, area)
        assert pipe.processor.layout.image_prompt(text, grid) == prompt
        codes = torch.randint(0, 64, grid, generator=g)
        ids = image_sequence(pipe.model, prompt, codes)
        with torch.no_grad():
            logits = ref(input_ids=torch.tensor([ids])).logits[0]
        theirs = torch.log_softmax(logits[len(prompt) - 1:-1].float(), -1).gather(
            -1, torch.tensor(ids[len(prompt):])[:, None]).squeeze(-1)
        ours = torch.tensor(pipe.image_code_logprobs(text, codes))
        assert len(ours) == grid[0] * (grid[1] + 1) + 3
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
        # text head and image head are one head
        with torch.no_grad():
            batch = Batch(input_ids=torch.tensor([ids]))
            assert torch.equal(pipe.model(batch).logits, pipe.model(batch, head="image").logits)
    with pytest.raises(ValueError, match="head 'codes'"):
        pipe.model(Batch(input_ids=torch.tensor([[1, 2]])), head="codes")


def test_the_vq_vae_is_frozen_in_eval_mode(emu3):
    _, _, _, pipe = emu3
    model = pipe.model
    try:
        model.train()
        assert model.lm.training and not model.vq.training
        assert not any(m.training for m in model.vq.modules())  # its BatchNorms keep their running statistics
        assert not any(p.requires_grad for p in model.vq.parameters())
    finally:
        model.eval()
    with pytest.raises(DataError, match="codes must lie in"):
        model.decode_codes(torch.tensor([[[0, 64]]]))
    with pytest.raises(DataError, match="multiples of 8"):
        model.encode_codes(torch.zeros(1, 3, 12, 16))


def edited(folder, tmp_path, edit) -> str:
    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    cfg = json.loads((out / "config.json").read_text())
    edit(cfg)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_refusals_name_what_is_wrong(emu3, tmp_path):
    folder = emu3[0]

    def scatter(cfg):  # visual tokens at non-consecutive ids
        vm = cfg["vocabulary_map"]
        vm["<|visual token000001|>"], vm["<|visual token000002|>"] = vm["<|visual token000002|>"], vm[
            "<|visual token000001|>"]

    with pytest.raises(ConfigError, match="not one run of consecutive ids"):
        vlmkit.load(edited(folder, tmp_path / "a", scatter))
    with pytest.raises(ConfigError, match="double_latent"):
        vlmkit.load(edited(folder, tmp_path / "b", lambda c: c["vq_config"].update(double_latent=True)))
    with pytest.raises(ConfigError, match="has no '<|extra_200|>'"):
        vlmkit.load(edited(folder, tmp_path / "c", lambda c: c["vocabulary_map"].pop("<|extra_200|>")))

    out = tmp_path / "e"
    shutil.copytree(folder, out)
    path = out / "processor_config.json"
    raw = json.loads(path.read_text())
    raw["image_processor"]["spatial_factor"] = 4
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="spatial_factor 4 is not the VQ-VAE's 8"):
        vlmkit.load(out)


def hf_constraint(tok, height: int, width: int, visual: list[int]):
    """The prefix_allowed_tokens_fn of transformers' Emu3 image-generation example (docs/source/en/model_doc/emu3.md):
    visual tokens, the row end after each row, then <|extra_201|>, <|image end|>, EOS, padding."""
    wrapper, eol, eof, eoi = tok.convert_tokens_to_ids(["<|image token|>", "<|extra_200|>", "<|extra_201|>",
                                                        "<|image end|>"])

    def allowed(batch_id, input_ids):
        offset = input_ids.shape[0] - int(torch.nonzero(input_ids == wrapper)[0, 0])
        if offset % (width + 1) == 0:
            return [eol]
        if offset == (width + 1) * height + 1:
            return [eof]
        if offset == (width + 1) * height + 2:
            return [eoi]
        if offset == (width + 1) * height + 3:
            return [tok.eos_token_id]
        if offset > (width + 1) * height + 3:
            return [tok.pad_token_id]
        return visual

    return allowed


def test_greedy_image_following_the_plan_equals_transformers_constrained_generation(emu3):
    """Greedy decoding that writes a code (the best visual token) at each of the plan's None and the plan's token
    elsewhere gives transformers' greedy generate under Emu3's documented constraint, token for token; so does the
    shared sampler (image_generation.generate_codes, KV cache) at temperature 0 without guidance."""
    _, ref, hf_proc, pipe = emu3
    model = pipe.model
    prompt, (h, w) = generation_inputs(hf_proc, "a red circle left of a blue square.", "4:3", 2304)
    visual = model.code_ids(torch.arange(model.cfg.vq.codebook_size)).tolist()
    column = {int(v): j for j, v in enumerate(model.image_vocab.tolist())}
    columns = torch.tensor([column[v] for v in visual])  # the image head's columns of the visual tokens
    ids = list(prompt)
    for slot in model.image_plan(h, w):
        if slot is None:
            with torch.no_grad():
                logits = model(Batch(input_ids=torch.tensor([ids])), logits_to_keep=1, head="image").logits[0, -1]
            slot = visual[int(logits[columns].argmax())]
        ids.append(slot)
    with torch.no_grad():
        out = ref.generate(input_ids=torch.tensor([prompt]), max_new_tokens=len(ids) - len(prompt), do_sample=False,
                           prefix_allowed_tokens_fn=hf_constraint(hf_proc.tokenizer, h, w, visual))
    assert out[0].tolist() == ids
    assert len(set(ids[len(prompt):])) > 4  # not one code over and over
    codes = generate_codes(model, prompt, [], ImageGenerationConfig(cfg_scale=1.0, temperature=0), (h, w))
    assert image_sequence(model, prompt, codes[0]) == ids


def test_generate_image_and_codes_through_the_pipeline(emu3):
    """Pipeline.generate_image on a small grid (the tiny model's 90x90 default would outrun its positions): images of
    the grid times the VQ factor, the same for a seed; encode_codes of images of one size."""
    _, _, _, pipe = emu3
    model = pipe.model
    grid, model.cfg.image_grid = model.cfg.image_grid, (3, 4)
    try:
        a = pipe.generate_image("a red circle", n=2, cfg_scale=3.0, top_k=8, seed=1)
        b = pipe.generate_image("a red circle", n=2, cfg_scale=3.0, top_k=8, seed=1)
    finally:
        model.cfg.image_grid = grid
    assert [im.size for im in a] == [(32, 24)] * 2
    assert [im.tobytes() for im in a] == [im.tobytes() for im in b]
    ims = sized_images()
    media = pipe.processor.prepare_images([ims[0], ims[0]])
    codes = model.encode_codes(media)
    assert codes.shape == (2, 4, 7) and torch.equal(codes[0], model.encode_codes(one_image(media))[0])
    with pytest.raises(DataError, match="resized to different sizes"):
        model.encode_codes(pipe.processor.prepare_images(ims[:2]))
