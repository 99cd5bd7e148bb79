"""Llama 3.2 Vision (Mllama) end to end from a Hugging Face folder: ``vlmkit.load(folder)`` gives the same
input_ids, tiles, aspect-ratio ids and masks as transformers' MllamaProcessor (BOS after the leading images; images
of 1, 3 and 4 tiles, non-square), computes its cross_attention_mask from the ids, and gives the same logits, loss
and greedy tokens as MllamaForConditionalGeneration with 1 and 2 images, text before the first image, consecutive
and interleaved images, in left-padded batches too; the score() contract, the folder's chat template, ``vlmkit
convert --from hf`` and named refusals.

The tiny checkpoint has the released one's layout: the <|image|> token is the id right after the text vocabulary
(the embedding has 8 rows more than the head), cross-attention layers among the decoder layers (two of them
consecutive, one last), local and gated global vision layers with unsorted intermediate layers, every gate open."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

import vlmkit
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models.mllama import cross_attention_mask, image_token_mask

from helpers import forward
from hf_fixtures import real_images
from test_hf_finetune import CONVERSATION, fine_tune, shapes, structured  # noqa: F401  (shapes: a fixture)

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

pytestmark = pytest.mark.usefixtures("single_thread")

# (prompt, indices into images()): 4 tiles; text before the image and 3 tiles; two consecutive images (4 tiles and 1);
# images interleaved with text, text first
PROMPTS = [("<|image|>What colour is the small circle?", [0]), ("Look: <|image|>How many squares?", [3]),
           ("<|image|><|image|>Compare them.", [0, 4]), ("a <|image|> b <|image|> c", [1, 2])]


def images():
    """72x48, 40x60, 64x64 (2 x 2 tiles of 28 px), 96x32 (1 x 3) and 24x20 (1 x 1) ShapesWorld scenes."""
    from vlmkit.data.shapes import render_scene, sample_scene

    rng = random.Random(1)
    wide = render_scene(sample_scene(rng, 96, 32, min_objects=1, max_objects=2))
    small = render_scene(sample_scene(rng, 48, 40, min_objects=1, max_objects=2)).resize((24, 20))
    return real_images() + [wide, small]


def special(prompt: str) -> dict:
    """MllamaProcessor writes BOS in front of a prompt that does not begin with an image, and its tokenizer adds
    another unless asked not to (``add_special_tokens=False``, transformers' call for a text beginning with BOS):
    vlmkit never writes BOS twice."""
    return {} if prompt.startswith("<|image|>") else {"add_special_tokens": False}


def vocab(ref) -> int:
    return ref.config.text_config.vocab_size


@pytest.mark.parametrize("prompt, which", PROMPTS)
def test_inputs_and_logits_equal_transformers(mllama_folder, prompt, which):
    folder, ref, hf_proc = mllama_folder
    pipe = vlmkit.load(folder)
    assert pipe.config.family == "mllama" and pipe.config.mllama.xattn_positions == [1, 1, 2]
    imgs = [images()[i] for i in which]
    theirs = hf_proc(text=prompt, images=imgs, return_tensors="pt", **special(prompt))
    inputs = pipe.processor.prepare_images(imgs)
    ids = pipe.processor.prompt(prompt, inputs).ids
    assert ids == theirs["input_ids"][0].tolist()
    torch.testing.assert_close(inputs.pixel_values, theirs["pixel_values"].flatten(0, 2), rtol=0, atol=1e-5)
    assert inputs.extra["aspect_ratio_ids"].tolist() == theirs["aspect_ratio_ids"][0].tolist()
    assert inputs.extra["aspect_ratio_mask"].tolist() == theirs["aspect_ratio_mask"][0].tolist()
    mask = cross_attention_mask(torch.tensor([ids]), pipe.model.image_token_id,
                                [inputs.extra["num_tiles"].tolist()], 4)
    assert torch.equal(mask, theirs["cross_attention_mask"])
    with torch.no_grad():
        ours = forward(pipe.model, ids, inputs).logits
        ref_logits = ref(**theirs).logits
        other = forward(pipe.model, ids, pipe.processor.prepare_images([im.rotate(90) for im in imgs])).logits
    torch.testing.assert_close(ours[..., :vocab(ref)], ref_logits, rtol=0, atol=1e-4)
    assert ours.shape[-1] == vocab(ref) + 8 and torch.isneginf(ours[..., vocab(ref):]).all()
    # the images matter at every position: those that see an image, and (transformers' rule) those that see none
    assert (other - ours)[..., :vocab(ref)].abs().amax(-1).min() > 1e-4


def test_the_images_a_token_sees_follow_mllama_processor():
    """The model's rule is transformers' get_cross_attention_token_mask on hand-made rows (consecutive images seen
    together, each image until the next group, none before the first), per sample in a packed row."""
    from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                               get_cross_attention_token_mask)

    I, t = 9, 3
    rows = [[t, I, t, t, I, I, t, t, I, t], [I, I, I, t, t, t, I, t, t, t], [t, t, t, I, t, t, t, t, t, t]]
    tiles = [[2, 1, 3, 4], [1, 1, 1, 2], [3]]
    sparse = [get_cross_attention_token_mask(r, I) for r in rows]
    want = convert_sparse_cross_attention_mask_to_dense(sparse, tiles, 4, len(rows[0]))
    assert torch.equal(cross_attention_mask(torch.tensor(rows), I, tiles, 4), torch.from_numpy(want))
    # two samples packed in one row see what each sees alone, and never the other's images
    docs = torch.tensor([[0] * 5 + [1] * 5])
    packed = image_token_mask(torch.tensor([rows[1][:5] + rows[2][:5]]), I, docs)  # [1, 10, 4]
    alone = [image_token_mask(torch.tensor([rows[1][:5]]), I), image_token_mask(torch.tensor([rows[2][:5]]), I)]
    assert torch.equal(packed[0, :5, :3], alone[0][0]) and not packed[0, :5, 3:].any()
    assert torch.equal(packed[0, 5:, 3:], alone[1][0]) and not packed[0, 5:, :3].any()


def test_loss_with_labels_equals_transformers(mllama_folder):
    folder, ref, hf_proc = mllama_folder
    pipe = vlmkit.load(folder)
    imgs = [images()[i] for i in PROMPTS[3][1]]
    inputs = hf_proc(text=PROMPTS[3][0] + " It is red.", images=imgs, return_tensors="pt")
    labels = inputs["input_ids"].clone()
    labels[:, :8] = -100  # the prompt (with the image tokens, which the head does not predict)
    with torch.no_grad():
        theirs = ref(**inputs, labels=labels).loss
        ours = forward(pipe.model, inputs["input_ids"], pipe.processor.prepare_images(imgs), labels=labels).loss
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_chat_uses_the_folders_template(mllama_folder):
    """As MllamaProcessor.apply_chat_template: the template's text (which starts with BOS) is not given a second
    one, and chat() answers as generate() on that text."""
    folder, _, hf_proc = mllama_folder
    pipe = vlmkit.load(folder)
    imgs = images()[:1]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = hf_proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<s><|start_header_id|>user")
    theirs = hf_proc(text=text, images=imgs, add_special_tokens=False)["input_ids"][0]
    inputs = pipe.processor.prepare_images(imgs)
    assert pipe.processor.chat("What is it?", inputs).ids == list(theirs)
    assert pipe.chat(imgs, "What is it?", max_new_tokens=4) == pipe.generate(imgs, text, max_new_tokens=4)


def test_a_prompt_rendered_by_the_chat_template_is_scored_and_generated_with_one_bos(mllama_folder):
    """score(), generate() and the engine's prompts on text that already begins with BOS (the chat template's):
    the log-probabilities are transformers' for ``add_special_tokens=False``, its documented call for such text
    (its default call would put BOS twice in front)."""
    folder, ref, hf_proc = mllama_folder
    pipe = vlmkit.load(folder)
    imgs = images()[:1]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = hf_proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    n = len(hf_proc(text=text, images=imgs, add_special_tokens=False)["input_ids"][0])
    full = hf_proc(text=text + " It is red.", images=imgs, add_special_tokens=False, return_tensors="pt")
    assert full["input_ids"][0, :2].tolist() != [pipe.processor.tokenizer.bos_id] * 2
    with torch.no_grad():
        logp = torch.log_softmax(ref(**full).logits[0, n - 1:-1].float(), -1)
    theirs = logp.gather(-1, full["input_ids"][0, n:, None]).squeeze(-1)
    ours = pipe.score(imgs, text, " It is red.")
    torch.testing.assert_close(torch.tensor(ours), theirs, rtol=0, atol=1e-4)
    with torch.no_grad():
        greedy = ref.generate(**hf_proc(text=text, images=imgs, add_special_tokens=False, return_tensors="pt"),
                              max_new_tokens=4, do_sample=False)[0, n:].tolist()
    assert pipe.generate(imgs, text, max_new_tokens=4) == pipe.processor.tokenizer.decode(greedy)


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("file, edit, error, message", [
    ("config.json", lambda c: c["text_config"].update(rope_parameters={"rope_type": "yarn", "factor": 8.0,
                                                                       "rope_theta": 5e5}), ConfigError,
     r"config\.json \(text_config\): rope_type 'yarn' \(RoPE scaling\) is not implemented"),
    ("config.json", lambda c: c["text_config"].update(cross_attention_layers=[1, 2, 5]), ConfigError,
     r"text_config\.cross_attention_layers \[1, 2, 5\] must be increasing layer indices in 0\.\.4"),
    ("config.json", lambda c: c["text_config"].update(model_type="llama"), ConfigError,
     r"text_config\.model_type 'llama' is not implemented for Mllama; supported: mllama_text_model"),
    ("config.json", lambda c: c.update(tie_word_embeddings=True), ConfigError, r"tie_word_embeddings: true"),
    ("config.json", lambda c: c["vision_config"].update(vision_output_dim=64), ConfigError,
     r"vision_config\.vision_output_dim 64 must be hidden_size x \(1 \+ 2 intermediate layers\) = 96"),
    ("config.json", lambda c: c["vision_config"].update(supported_aspect_ratios=[[1, 1], [2, 2]]), ConfigError,
     r"vision_config\.supported_aspect_ratios \[\[1, 1\], \[2, 2\]\]"),
    ("config.json", lambda c: c["text_config"].update(intermediate_size=64), CheckpointError,
     r"language_model\.model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight has shape"),
    ("config.json", lambda c: c["vision_config"].update(num_global_layers=3), CheckpointError,
     r"missing \['vision_model\.global_transformer\.layers\.2\."),
    ("preprocessor_config.json", lambda c: c.update(max_image_tiles=2), ConfigError,
     r"preprocessor_config\.json: max_image_tiles 2 must equal vision_config\.max_num_tiles 4"),
    ("preprocessor_config.json", lambda c: c.update(size={"height": 32, "width": 32}), ConfigError,
     r"preprocessor_config\.json: size .* must be the tower's tile, height = width = vision_config\.image_size 28"),
    ("tokenizer_config.json", lambda c: c.pop("bos_token"), CheckpointError, r"Mllama's prompts need a bos_token"),
])
def test_bad_folders_are_refused_by_name(mllama_folder, tmp_path, file, edit, error, message):
    folder = tmp_path / "copy"
    shutil.copytree(mllama_folder[0], folder)
    if file == "preprocessor_config.json" and not (folder / file).is_file():  # transformers 5 nests it
        file = "processor_config.json"
        edit = (lambda inner: lambda c: inner(c["image_processor"]))(edit)
        message = message.replace("preprocessor_config", "processor_config")
    _edit_json(folder / file, edit)
    with pytest.raises(error, match=message):
        vlmkit.load(folder)


def test_conversation_ids_labels_and_loss_equal_transformers(mllama_folder):
    """Training data is tokenised as MllamaProcessor tokenises the template's text (its BOS kept single), only
    the replies are supervised, and the loss on those labels is transformers'."""
    folder, ref, hf_proc = mllama_folder
    pipe = vlmkit.load(folder)
    imgs = images()[3:4]
    inputs = pipe.processor.prepare_images(imgs)
    enc = pipe.processor.supervised(CONVERSATION, inputs)
    ids, labels = enc.ids, enc.labels
    text = hf_proc.apply_chat_template(structured(CONVERSATION), tokenize=False)
    theirs = hf_proc(text=text, images=imgs, return_tensors="pt", add_special_tokens=False)
    assert theirs["input_ids"][0].tolist() == ids
    tok = pipe.processor.tokenizer
    supervised = tok.decode([t for t in labels if t != -100], skip_special_tokens=False)
    assert "It is red." in supervised and "Two squares." in supervised and "colour" not in supervised
    y = torch.tensor([labels])
    with torch.no_grad():
        torch.testing.assert_close(forward(pipe.model, ids, inputs, labels=y).loss,
                                   ref(**theirs, labels=y).loss, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_recipe_fine_tunes_it(mllama_folder, shapes, tmp_path):  # noqa: F811
    losses, res = fine_tune(mllama_folder[0], shapes, tmp_path / "run")
    assert len(losses) == 20 and sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    tuned = vlmkit.load(res.checkpoint)
    assert tuned.config.family == "mllama" and tuned.processor.cfg.text_mode == "whole"
    assert isinstance(tuned.chat(shapes / "images" / "000000.png", "What shape is it?", max_new_tokens=4), str)


@pytest.mark.slow
def test_a_from_scratch_mllama_with_a_cnn_on_every_tile_trains():
    """vision.arch "cnn": vlmkit's CNN on each tile (segment-mode text, one image token per image); the gradient
    reaches every parameter once the gates are open, and the closed gates of a fresh model leave it a plain LM."""
    from vlmkit.config import ConnectorConfig, LanguageConfig, VisionConfig
    from vlmkit.models import build_model
    from vlmkit.models.mllama import MllamaConfig, MllamaFusionConfig
    from vlmkit.processing import Processor, TextTokenizer, train_bpe
    from vlmkit.processing.mllama import MllamaProcessorConfig

    tok = TextTokenizer(train_bpe(["what colour is the small circle? it is red."] * 4, 300))
    cfg = MllamaConfig(family="mllama", vision=VisionConfig(arch="cnn", image_size=(32, 32), patch_size=8, width=32,
                                                            pos_embed="sincos2d"),
                       lm=LanguageConfig(vocab_size=tok.vocab_size, width=32, depth=2, heads=4, kv_heads=2,
                                         mlp_dim=64, max_seq_len=128, tie_embeddings=False),
                       connector=ConnectorConfig(kind="mlp"),
                       mllama=MllamaFusionConfig(xattn_positions=[0, 2], max_tiles=4, extra_embeddings=0))
    torch.manual_seed(0)
    model = build_model(cfg, tok.token_id("<image>"))
    proc = Processor(MllamaProcessorConfig(family="mllama", image_size=(32, 32), max_image_tiles=4,
                                           image_seq_len=model.image_seq_len), tok)
    inputs = proc.prepare_images(images()[:2])
    conversation = [{"from": "human", "value": "<image>\n<image>\nwhat colour is it?"}, {"from": "gpt", "value": "red"}]
    enc = proc.supervised(conversation, inputs)
    ids, labels = enc.ids, enc.labels
    assert ids.count(tok.token_id("<image>")) == 2 and len(inputs.pixel_values) == 8
    ids, labels = torch.tensor([ids]), torch.tensor([labels])
    with torch.no_grad():
        blind = forward(model, ids, proc.prepare_images([im.rotate(90) for im in images()[:2]])).logits
        torch.testing.assert_close(forward(model, ids, inputs).logits, blind, rtol=0, atol=0)
        for block in model.lm.xattn:
            block.alpha_cross_attn.fill_(0.5)
            block.alpha_dense.fill_(0.5)
    model.train()
    forward(model, ids, inputs, labels=labels).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()), \
        [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]


def test_llama3_rope_scaling_of_the_released_checkpoints_matches_transformers(mllama_folder, tmp_path):
    """Llama 3.2 Vision's LM scales its RoPE frequencies (rope_type "llama3"); the tiny checkpoint with that
    scaling (an original context of 16: every band of the formula is used) gives transformers' logits."""
    folder, _, hf_proc = mllama_folder
    scaled = tmp_path / "llama3"
    shutil.copytree(folder, scaled)
    _edit_json(scaled / "config.json", lambda c: c["text_config"].update(rope_parameters={
        "rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}))
    ref = transformers.MllamaForConditionalGeneration.from_pretrained(scaled).eval()
    pipe = vlmkit.load(scaled)
    prompt, which = PROMPTS[0]
    imgs = [images()[i] for i in which]
    inputs = hf_proc(text=prompt, images=imgs, return_tensors="pt")
    with torch.no_grad():
        theirs = ref(**inputs).logits
        ours = forward(pipe.model, inputs["input_ids"], pipe.processor.prepare_images(imgs)).logits
    torch.testing.assert_close(ours[..., :theirs.shape[-1]], theirs, rtol=0, atol=1e-4)
