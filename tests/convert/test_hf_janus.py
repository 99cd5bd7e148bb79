"""Janus specifics the conformance table (row "janus") does not check: pixels equal JanusImageProcessor's for wide,
tall, square, small and very thin images; image-generation prompts (and Janus' unconditional ones) equal
JanusProcessor's in generation_mode="image"; the image path against transformers: the generation head's
log-probabilities of a code grid under teacher forcing, the VQ's codes and decoded pixels, greedy image generation
with classifier-free guidance, sampled generation for a seed; the export keeps the generation path and processor;
tie_word_embeddings read as transformers 5 reads it; refusals by name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hf_fixtures import real_images
from safetensors.torch import load_file, save_file

import vlmkit
from vlmkit.batch import Batch
from vlmkit.convert.hf import convert_from_hf, convert_to_hf
from vlmkit.errors import ConfigError, DataError
from vlmkit.image_generation import ImageGenerationConfig, generate_codes, to_images

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")
import hf_janus_folders  # noqa: E402,F401  (registers the "janus" folder)

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["a red circle left of a blue square", "<s>two green triangles"]


@pytest.fixture(scope="module")
def janus(hf_folder):
    folder, model, processor = hf_folder("janus")
    return folder, model, processor, vlmkit.load(folder)


def codes_of(pipe, seed: int) -> torch.Tensor:
    h, w = pipe.model.image_grid
    return torch.randint(0, pipe.model.codebook_size, (h, w), generator=torch.Generator().manual_seed(seed))


def test_pixels_equal_janus_image_processor(janus):
    folder, _, hf_proc, pipe = janus
    imgs = real_images()
    imgs += [imgs[0].resize((24, 20)), imgs[1].resize((90, 5)), imgs[2].resize((3, 70))]  # min_size floors them
    ours = pipe.processor.prepare_images(imgs).pixel_values
    theirs = hf_proc.image_processor(imgs, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert pipe.processor.cfg.background == (102, 127, 153)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_image_prompts_equal_janus_processor_in_image_mode(janus, prompt):
    _, ref, hf_proc, pipe = janus
    grid = pipe.model.image_grid
    bos = hf_proc.tokenizer.bos_token
    kwargs = {"add_special_tokens": False} if prompt.startswith(bos) else {}
    theirs = hf_proc(text=prompt, generation_mode="image", return_tensors="pt", **kwargs)["input_ids"][0]
    ours = pipe.processor.image_prompt(prompt, grid)
    assert ours == theirs.tolist() and ours.count(hf_proc.tokenizer.bos_token_id) == 1
    gen = ref.generation_config
    uncond = theirs.clone()
    uncond[(uncond != gen.bos_token_id) & (uncond != gen.generation_kwargs["boi_token_id"])] = gen.pad_token_id
    assert pipe.processor.image_prompt(prompt, grid, unconditional=True) == uncond.tolist()


def reference_code_logprobs(ref, hf_proc, prompt: str, codes: torch.Tensor) -> torch.Tensor:
    """transformers' teacher forcing: the prompt's embeddings, the codes' generation embeddings (all but the last)
    through the LM, the generation head's log-probabilities of each next code."""
    ids = hf_proc(text=prompt, generation_mode="image", return_tensors="pt")["input_ids"]
    flat = codes.reshape(1, -1)
    with torch.no_grad():
        embeds = torch.cat([ref.get_input_embeddings()(ids), ref.prepare_embeddings_for_image_generation(flat)], 1)
        hidden = ref.model.language_model(inputs_embeds=embeds[:, :-1]).last_hidden_state
        logits = ref.model.generation_head(hidden[:, ids.shape[1] - 1:])
    return torch.log_softmax(logits.float(), -1)[0].gather(-1, flat[0, :, None])[:, 0]


def test_image_code_logprobs_equal_transformers(janus):
    _, ref, hf_proc, pipe = janus
    for seed, prompt in enumerate(PROMPTS[:1] + ["the quick brown fox"]):
        codes = codes_of(pipe, seed)
        ours = torch.tensor(pipe.image_code_logprobs(prompt, codes))
        theirs = reference_code_logprobs(ref, hf_proc, prompt, codes)
        assert ours.shape == theirs.shape == (codes.numel(),)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
        assert theirs.std() > 0.05  # the head is no constant


def test_decode_and_encode_codes_equal_the_vq(janus):
    _, ref, hf_proc, pipe = janus
    codes = torch.stack([codes_of(pipe, 3), codes_of(pipe, 4)])
    with torch.no_grad():
        theirs = ref.model.vqmodel.decode(codes.reshape(2, -1))
    ours = pipe.decode_codes(codes)
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    pixels = hf_proc.image_processor(real_images(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hf_codes = ref.model.vqmodel.encode(pixels).image_tokens.reshape(len(pixels), 4, 4)
    assert torch.equal(pipe.model.encode_codes(pixels), hf_codes)


def test_greedy_image_generation_equals_transformers(janus):
    """Greedy codes with classifier-free guidance equal JanusForConditionalGeneration.generate's in image mode at
    two guidance scales (which write different grids: the guidance is not vacuous), and generate_image's pictures
    are transformers' codes decoded."""
    _, ref, hf_proc, pipe = janus
    prompt, grid, grids = "two green triangles", pipe.model.image_grid, []
    for cfg_scale in (3.0, 1.5):
        inputs = hf_proc(text=prompt, generation_mode="image", return_tensors="pt")
        with torch.no_grad():
            theirs = ref.generate(**inputs, generation_mode="image", do_sample=False, guidance_scale=cfg_scale)
        cond = pipe.processor.image_prompt(prompt, grid)
        uncond = pipe.processor.image_prompt(prompt, grid, unconditional=True)
        ours = generate_codes(pipe.model, cond, uncond, ImageGenerationConfig(cfg_scale=cfg_scale, temperature=0))
        assert ours.reshape(1, -1).tolist() == theirs.tolist()
        assert len(set(theirs[0].tolist())) > 2  # not one code over and over
        grids.append(theirs[0].tolist())
        images = pipe.generate_image(prompt, cfg_scale=cfg_scale, temperature=0)
        with torch.no_grad():
            expected = to_images(ref.model.vqmodel.decode(theirs))
        assert [im.tobytes() for im in images] == [im.tobytes() for im in expected]
    assert grids[0] != grids[1]


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.8, 8)])
def test_sampled_image_generation_equals_transformers_for_a_seed(janus, temperature, top_k):
    """Sampling with guidance, temperature and top-k: transformers' generate seeded through torch.manual_seed and
    vlmkit's seeded generator draw from the same CPU generator stream (one multinomial per code), so equal logits
    give equal codes."""
    _, ref, hf_proc, pipe = janus
    prompt, grid = "two green triangles", pipe.model.image_grid
    inputs = hf_proc(text=prompt, generation_mode="image", return_tensors="pt")
    cond = pipe.processor.image_prompt(prompt, grid)
    uncond = pipe.processor.image_prompt(prompt, grid, unconditional=True)
    grids = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        with torch.no_grad():
            theirs = ref.generate(**inputs, generation_mode="image", do_sample=True, temperature=temperature,
                                  top_k=top_k, guidance_scale=2.0)
        gen = ImageGenerationConfig(cfg_scale=2.0, temperature=temperature, top_k=top_k, seed=seed)
        assert generate_codes(pipe.model, cond, uncond, gen).reshape(1, -1).tolist() == theirs.tolist()
        grids.append(theirs.tolist())
    assert grids[0] != grids[1]


def test_export_keeps_the_generation_path(janus, tmp_path):
    folder, ref, hf_proc, pipe = janus
    convert_from_hf(folder, tmp_path / "vlmkit")
    convert_to_hf(tmp_path / "vlmkit", tmp_path / "hf")
    back = transformers.JanusForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    codes = codes_of(pipe, 7)
    torch.testing.assert_close(reference_code_logprobs(back, hf_proc, PROMPTS[0], codes),
                               reference_code_logprobs(ref, hf_proc, PROMPTS[0], codes), rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(back.model.vqmodel.decode(codes.reshape(1, -1)),
                                   ref.model.vqmodel.decode(codes.reshape(1, -1)), rtol=0, atol=1e-5)
    hf_back = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    imgs = real_images()
    torch.testing.assert_close(hf_back.image_processor(imgs, return_tensors="pt")["pixel_values"],
                               hf_proc.image_processor(imgs, return_tensors="pt")["pixel_values"], rtol=0, atol=0)
    prompt = "Compare <image_placeholder> and <image_placeholder>: how many squares?"
    assert torch.equal(hf_back(text=prompt, images=imgs[:2], return_tensors="pt")["input_ids"],
                       hf_proc(text=prompt, images=imgs[:2], return_tensors="pt")["input_ids"])
    assert torch.equal(hf_back(text=PROMPTS[0], generation_mode="image", return_tensors="pt")["input_ids"],
                       hf_proc(text=PROMPTS[0], generation_mode="image", return_tensors="pt")["input_ids"])
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["generation_kwargs"]["boi_token_id"] == ref.generation_config.generation_kwargs["boi_token_id"]


def test_an_image_prompt_with_an_image_placeholder_is_refused(janus):
    pipe = janus[3]
    with pytest.raises(DataError, match="reads no image"):
        pipe.processor.image_prompt("draw <image_placeholder> again", pipe.model.image_grid)


def edited(src, dst, **changes):
    shutil.copytree(src, dst)
    path = dst / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        part, _, name = key.rpartition(".")
        (cfg[part] if part else cfg)[name] = value
    path.write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("changes, match", [
    ({"vision_config.use_qk_norm": True}, "use_qk_norm"),
    ({"vision_config.depth": 3}, "vision_config.depth 3"),
    ({"vq_config.projection_dim": 32}, "vq_config.projection_dim 32 must equal text_config.hidden_size 64"),
    ({"vision_config.attention_bias": False}, "attention_bias false"),
    ({"vq_config.num_patches": 8}, "num_patches 8 is not the tower's patch grid 4"),
])
def test_unsupported_configs_are_refused_by_name(janus, tmp_path, changes, match):
    folder = edited(janus[0], tmp_path / "edited", **changes)
    with pytest.raises(ConfigError, match=match):
        vlmkit.load(folder)


@pytest.mark.parametrize("head", ["kept", "dropped"])
def test_tie_word_embeddings_is_read_as_transformers_reads_it(janus, tmp_path, head):
    """JanusConfig ties the LM head to the embeddings by default (top-level tie_word_embeddings); transformers 5 ties
    them only when the checkpoint holds no head of its own (else it keeps the stored one): vlmkit too."""
    folder = edited(janus[0], tmp_path / "tied", tie_word_embeddings=True)
    if head == "dropped":
        tensors = load_file(folder / "model.safetensors")
        del tensors["lm_head.weight"]
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    ref = transformers.JanusForConditionalGeneration.from_pretrained(folder).eval()
    tied = torch.equal(ref.lm_head.weight, ref.model.language_model.embed_tokens.weight)
    assert tied == (head == "dropped")
    pipe = vlmkit.load(folder)
    assert (pipe.model.lm.lm_head.weight is pipe.model.lm.embed_tokens.weight) == tied
    prompt, imgs = "Compare <image_placeholder> and <image_placeholder>: how many squares?", real_images()[:2]
    inputs = janus[2](text=prompt, images=imgs, return_tensors="pt")
    batch = pipe.processor.prompt(prompt, pipe.processor.prepare_images(imgs))
    assert batch.ids == inputs["input_ids"][0].tolist()
    with torch.no_grad():
        theirs = ref(**inputs).logits[0, -1]
        ours = pipe.model(Batch(torch.tensor([batch.ids]), media=batch.media)).logits[0, -1]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    convert_from_hf(folder, tmp_path / "vlmkit")
    convert_to_hf(tmp_path / "vlmkit", tmp_path / "hf")
    back = transformers.JanusForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert torch.equal(back.lm_head.weight, back.model.language_model.embed_tokens.weight) == tied
    with torch.no_grad():
        torch.testing.assert_close(back(**inputs).logits[0, -1], theirs, rtol=0, atol=1e-4)


def test_janus_processor_settings_are_checked_by_name():
    from vlmkit.processing.janus import JanusProcessorConfig

    with pytest.raises(ConfigError, match="pad_square"):
        JanusProcessorConfig(pad_square=True, image_size=(32, 48))
    with pytest.raises(ConfigError, match="background"):
        JanusProcessorConfig(background=(0, 300, 0))
    with pytest.raises(ConfigError, match="min_size 0"):
        JanusProcessorConfig(min_size=0)


@pytest.mark.parametrize("option, value", [("pos_embed", "grid"), ("vq.encoder", "patch")])
def test_vlmkit_only_generation_options_do_not_export(janus, option, value):
    """tiny-janus's code row/column embeddings and patch tokenizer have no place in transformers' Janus: refused."""
    from vlmkit.convert.hf.janus import janus_config_to_hf, load_janus

    _, cfg = load_janus(janus[0])
    owner, _, name = f"gen.{option}".rpartition(".")
    setattr(cfg.gen.vq if owner == "gen.vq" else cfg.gen, name, value)
    with pytest.raises(ConfigError, match=f"{option} {value!r}"):
        janus_config_to_hf(cfg, 5)
