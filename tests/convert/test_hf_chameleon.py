"""Chameleon beyond the conformance row (tests/families/cases.py): ChameleonImageProcessor's pixels for images of
every shape; chameleon-30b's swin_norm block against transformers; the image-generation interface (codes, their
vocabulary tokens, the image head's logits, the image prompt, teacher-forced image log-probabilities) against
ChameleonForConditionalGeneration; the missing VQ decoder and unreadable folders refused by name."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

import vlmkit
from vlmkit.batch import Batch
from vlmkit.data.shapes import render_scene, sample_scene
from vlmkit.errors import ConfigError

from hf_fixtures import real_images

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")
import hf_chameleon_folders  # noqa: E402,F401  (adds the chameleon folders to hf_folders.BUILDERS)

pytestmark = pytest.mark.usefixtures("single_thread")

CONTINUATION = " It is red."


def sized_images() -> list:
    """Wide, tall, square, smaller than the crop (enlarged), odd sides."""
    rng = random.Random(5)
    sizes = [(200, 90), (30, 150), (16, 16), (13, 7), (47, 35), (301, 300)]
    scenes = [render_scene(sample_scene(rng, max(w, 32), max(h, 32), min_objects=1, max_objects=3)) for w, h in sizes]
    return real_images() + [im.resize((w, h)) for im, (w, h) in zip(scenes, sizes)]


@pytest.fixture(scope="module")
def chameleon(hf_folder):
    folder, model, processor = hf_folder("chameleon")
    return folder, model, processor, vlmkit.load(folder)


def test_pixels_equal_chameleon_image_processor(chameleon):
    _, _, hf_proc, pipe = chameleon
    for im in sized_images():
        ours = pipe.processor.prepare_images([im]).pixel_values
        theirs = hf_proc.image_processor(im, return_tensors="pt")["pixel_values"]
        assert ours.shape == theirs.shape == (1, 3, 16, 16), im.size
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6, msg=str(im.size))


def test_swin_norm_scores_and_greedy_tokens_equal_transformers(hf_folder):
    folder, ref, hf_proc = hf_folder("chameleon_swin")
    pipe = vlmkit.load(folder)
    assert pipe.config.lm.swin_norm and ref.config.swin_norm
    imgs = [real_images()[0], real_images()[1]]
    prompt = "Compare <image> and <image>: how many squares?"
    inputs = hf_proc(text=prompt, images=imgs, return_tensors="pt", return_for_text_completion=True)
    full = hf_proc(text=prompt + CONTINUATION, images=imgs, return_tensors="pt", return_for_text_completion=True)
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        logits = ref(**full).logits[0]
        out = ref.generate(**inputs, max_new_tokens=8, do_sample=False)
    theirs = torch.log_softmax(logits[n - 1:-1].float(), -1).gather(-1, full["input_ids"][0, n:, None])[:, 0]
    ours = torch.tensor(pipe.score(imgs, prompt, CONTINUATION))
    assert (ours - theirs).abs().max() <= 1e-4
    enc = pipe.processor.prompt(prompt, pipe.processor.prepare_images(imgs))
    assert enc.ids == inputs["input_ids"][0].tolist()
    from vlmkit.generation import GenerationConfig, generate

    tok = pipe.processor.tokenizer
    greedy = generate(pipe.model, [enc.ids], enc.media, tok.eos_id, tok.pad_id, GenerationConfig(max_new_tokens=8))[0]
    assert greedy == out[0, n:].tolist()[:len(greedy)] and greedy


def test_image_codes_and_their_tokens_equal_transformers(chameleon):
    _, ref, hf_proc, pipe = chameleon
    model = pipe.model
    # it writes codes (image_code_logprobs) but draws nothing: its VQ has no decoder
    assert not pipe.can_generate_images and model.image_grid == (4, 4) and model.codebook_size == 48
    pixels = hf_proc.image_processor(real_images(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        theirs = ref.model.vqmodel.encode(pixels).image_tokens.view(len(pixels), 4, 4)
    codes = pipe.encode_codes(real_images())
    assert torch.equal(codes, theirs) and len(codes.unique()) > 8
    mapping = ref.model.vocabulary_mapping
    assert model.code_ids(torch.arange(48)).tolist() == [mapping.img2bpe[c] for c in range(48)]
    assert torch.equal(model.code_ids(codes), ref.model.get_image_tokens(pixels).view(len(pixels), 4, 4).long())
    eoss = pipe.processor.tokenizer.token_id("<eoss>")
    assert model.image_plan(4, 4) == [None] * 16 + [eoss]
    assert torch.equal(model.image_vocab, torch.arange(ref.config.vocab_size))


def test_image_head_is_the_unsuppressed_lm_head(chameleon):
    _, ref, hf_proc, pipe = chameleon
    ids = hf_proc(text="a red circle", return_tensors="pt", return_for_text_completion=True)["input_ids"]
    with torch.no_grad():
        theirs = ref.lm_head(ref.model(input_ids=ids).last_hidden_state)  # before ChameleonForCG's suppression
        text = pipe.model(Batch(ids)).logits
        image = pipe.model(Batch(ids), head="image").logits
    assert (image - theirs).abs().max() <= 1e-4
    suppressed = torch.tensor(sorted(ref.model.vocabulary_mapping.image_tokens))
    assert (text[..., suppressed] == torch.finfo(text.dtype).min).all()
    keep = torch.ones(text.shape[-1], dtype=torch.bool)
    keep[suppressed] = False
    assert (text[..., keep] - theirs[..., keep]).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="head must be"):
        pipe.model(Batch(ids), head="codes")


def test_image_prompt_and_code_logprobs(chameleon):
    _, ref, hf_proc, pipe = chameleon
    tok = hf_proc.tokenizer
    boi = tok.convert_tokens_to_ids("<racm3:break>")
    prompt = pipe.processor.image_prompt("a red circle", (4, 4))
    assert prompt == tok("a red circle")["input_ids"] + [boi] and prompt[0] == tok.bos_token_id
    assert pipe.processor.image_prompt("a red circle", (4, 4), unconditional=True) == [tok.bos_token_id, boi]
    held = tok("<s>a red circle", add_special_tokens=False)["input_ids"]  # BOS already there: not twice
    assert pipe.processor.image_prompt("<s>a red circle", (4, 4)) == held + [boi] and held.count(tok.bos_token_id) == 1
    codes = torch.tensor([[c * 3 % 48 for c in range(r * 4, r * 4 + 4)] for r in range(4)])
    ours = torch.tensor(pipe.image_code_logprobs("a red circle", codes.tolist()))
    image = ref.model.vocabulary_mapping.convert_img2bpe(codes.reshape(-1)).tolist()
    ids = torch.tensor([prompt + image + [tok.convert_tokens_to_ids("<eoss>")]])
    with torch.no_grad():
        logits = ref.lm_head(ref.model(input_ids=ids).last_hidden_state)[0, len(prompt) - 1:-1]
    theirs = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt):, None])[:, 0]
    assert len(ours) == 17 and (ours - theirs).abs().max() <= 1e-4


def test_decoding_codes_is_refused_by_name(chameleon):
    _, _, _, pipe = chameleon
    with pytest.raises(ConfigError, match="no decoder"):
        pipe.model.decode_codes(torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ConfigError, match="no decoder"):
        pipe.decode_codes(torch.zeros(4, 4, dtype=torch.long))
    with pytest.raises(ConfigError, match="no decoder"):  # refused before any code is sampled
        pipe.generate_image("a red circle", seed=0)


def _edited(folder, tmp_path, name: str, edit) -> object:
    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    data = json.loads((out / name).read_text())
    edit(data)
    (out / name).write_text(json.dumps(data))
    return out


def test_unreadable_folders_are_refused_by_name(chameleon, tmp_path):
    folder = chameleon[0]

    def seq(d):
        d["image_seq_length"] = 1024

    with pytest.raises(ConfigError, match="image_seq_length 1024"):
        vlmkit.load(_edited(folder, tmp_path / "a", "processor_config.json", seq))

    def no_codes(d):
        d["vocabulary_map"] = {k: v for k, v in d["vocabulary_map"].items() if k != "IMGIMGDAZ"}

    with pytest.raises(ConfigError, match=r"no IMGIMG token for codes \[30\]"):
        vlmkit.load(_edited(folder, tmp_path / "b", "config.json", no_codes))

    def bias(d):
        d["attention_bias"] = True

    with pytest.raises(ConfigError, match="attention_bias"):
        vlmkit.load(_edited(folder, tmp_path / "c", "config.json", bias))


def test_greedy_image_codes_equal_transformers_and_sampling_is_seeded(chameleon):
    """Guidance off, temperature 0: each code is the argmax of transformers' (unsuppressed) LM head over the code
    tokens, fed back as its token; with guidance and sampling the same seed gives the same grids."""
    from vlmkit.image_generation import ImageGenerationConfig, generate_codes

    _, ref, _, pipe = chameleon
    cond = pipe.processor.image_prompt("a red circle", (4, 4))
    uncond = pipe.processor.image_prompt("a red circle", (4, 4), unconditional=True)
    ours = generate_codes(pipe.model, cond, [], ImageGenerationConfig(cfg_scale=1.0, temperature=0.0))
    tokens = torch.tensor(ref.model.vocabulary_mapping.img2bpe_mapping_tensor[:48].tolist())
    ids, theirs = list(cond), []
    with torch.no_grad():
        for _ in range(16):
            logits = ref.lm_head(ref.model(input_ids=torch.tensor([ids])).last_hidden_state)[0, -1]
            k = int(logits[tokens].argmax())
            theirs.append(k)
            ids.append(int(tokens[k]))
    assert ours.shape == (1, 4, 4) and ours.flatten().tolist() == theirs and len(set(theirs)) > 2
    gen = ImageGenerationConfig(n=2, cfg_scale=3.0, temperature=1.0, top_k=10, seed=7)
    a, b = generate_codes(pipe.model, cond, uncond, gen), generate_codes(pipe.model, cond, uncond, gen)
    assert torch.equal(a, b) and a.shape == (2, 4, 4) and int(a.max()) < 48


def test_export_loads_in_chameleon_processor_with_the_same_inputs(chameleon, tmp_path):
    """convert --to hf writes ChameleonProcessor's files: its input_ids (with images, in both text modes), pixels and
    chat template are the original folder's (the model's logits: the conformance row's conversion check)."""
    from vlmkit.convert.hf import convert_from_hf, convert_to_hf

    folder, _, hf_proc, _ = chameleon
    convert_from_hf(folder, tmp_path / "vlmkit")
    convert_to_hf(tmp_path / "vlmkit", tmp_path / "hf")
    back = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    assert type(back).__name__ == "ChameleonProcessor"
    imgs = real_images()[:2]
    prompt = "Compare <image> and <image>: how many squares?"
    for completion in (True, False):
        a = back(text=prompt, images=imgs, return_tensors="pt", return_for_text_completion=completion)
        b = hf_proc(text=prompt, images=imgs, return_tensors="pt", return_for_text_completion=completion)
        assert a["input_ids"].tolist() == b["input_ids"].tolist()
        torch.testing.assert_close(a["pixel_values"], b["pixel_values"], rtol=0, atol=0)
    assert back.chat_template == hf_proc.chat_template


def test_loss_parts_text_through_the_text_head_image_through_the_full_head(chameleon):
    """A text-to-image sample (the image prompt, the codes' tokens, <eoss>) supervised on its prompt text and image:
    ModelOutput.parts holds the text targets' cross-entropy under transformers' suppressed logits and the image
    targets' under its full LM head, and the loss is their mean over every target."""
    import torch.nn.functional as F

    _, ref, hf_proc, pipe = chameleon
    tok = hf_proc.tokenizer
    prompt = pipe.processor.image_prompt("a red circle", (4, 4))
    codes = torch.tensor([c * 5 % 48 for c in range(16)])
    image = ref.model.vocabulary_mapping.convert_img2bpe(codes).tolist() + [tok.convert_tokens_to_ids("<eoss>")]
    ids = torch.tensor([prompt + image])
    labels = ids.clone()
    labels[0, 0] = -100
    out = pipe.model(Batch(ids, labels=labels))
    with torch.no_grad():
        full = ref.lm_head(ref.model(input_ids=ids).last_hidden_state)[0, :-1]
        suppressed = ref(input_ids=ids).logits[0, :-1]
    t = ids[0, 1:]
    n_text = len(prompt) - 1
    text = F.cross_entropy(suppressed[:n_text], t[:n_text], reduction="sum")
    img = F.cross_entropy(full[n_text:], t[n_text:], reduction="sum")
    assert out.parts["text"][1] == n_text and out.parts["image"][1] == 17 and out.n_tokens == n_text + 17
    assert abs(float(out.parts["text"][0]) - float(text)) <= 1e-3 and abs(float(out.parts["image"][0]) - float(img)) <= 1e-3
    assert abs(float(out.loss) - float(text + img) / (n_text + 17)) <= 1e-5
    assert "unified" in pipe.family.objectives


def test_a_patch_tokenizer_does_not_export(chameleon):
    """tiny-vq's patch encoder has no place in transformers' ChameleonVQVAE (taming's encoder): refused by name."""
    from vlmkit.convert.hf.chameleon import chameleon_config_to_hf, load_chameleon_folder

    _, cfg, processor = load_chameleon_folder(chameleon[0])
    cfg.vq.encoder = "patch"
    with pytest.raises(ConfigError, match="taming's conv encoder"):
        chameleon_config_to_hf(cfg, processor.tokenizer.tok.get_vocab(), {})
