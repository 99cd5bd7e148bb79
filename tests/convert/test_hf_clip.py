"""CLIP (transformers' CLIPModel) <-> vlmkit's DualEncoder: token ids, pixels, embeddings and logits equal
transformers' on tiny random checkpoints saved with their tokenizer and image processor, for both of
transformers' text pooling rules (the first end-of-text token; the highest id when a legacy config says
eos_token_id 2); exports load in CLIPModel and CLIPProcessor with the same numbers, including a vlmkit-trained
model whose end-of-text token has id 2; what CLIPModel cannot express is refused by name."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import processors

import vlmkit
from vlmkit.batch import Batch
from vlmkit.checkpoint import write_model_files
from vlmkit.cli import main
from vlmkit.convert.hf import convert_to_hf
from vlmkit.convert.hf.dual_encoder import dual_encoder_config_to_hf
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models import build_model, count_parameters
from vlmkit.presets import get_preset
from vlmkit.processing import Processor, TextTokenizer, train_bpe

from helpers import pairs
from hf_fixtures import CORPUS, perturb_, real_images
from hf_folders import CLIP_CONTEXT as CONTEXT

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

pytestmark = pytest.mark.usefixtures("single_thread")

TEXTS = ["A photo of a CAT!", "two dogs, three Squares.", "What's this?  It's a red circle...",
         "the quick brown fox jumps over the lazy dog, then the small circle is red and the squares are blue"]


def reference(model, inputs):
    """transformers' normalised embeddings and logits for a processor's inputs."""
    with torch.no_grad():
        img = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        txt = model.get_text_features(input_ids=inputs["input_ids"],
                                      attention_mask=inputs.get("attention_mask")).pooler_output
        return F.normalize(img, dim=-1), F.normalize(txt, dim=-1), model(**inputs).logits_per_image


def test_token_ids_truncation_and_pixels_match_clip_processor(clip_folders):
    folder, _, hf_proc = clip_folders["eos"]
    processor = vlmkit.load(folder).processor
    theirs = hf_proc(text=TEXTS, images=real_images(), padding=True, truncation=True, return_tensors="pt")
    ids, cut = processor.encode_texts(TEXTS)
    assert ids.tolist() == theirs["input_ids"].tolist()
    untruncated = hf_proc.tokenizer(TEXTS)["input_ids"]
    assert cut == sum(len(r) > CONTEXT for r in untruncated) == 1
    assert ids.shape[1] == CONTEXT and (ids[:, 0] == hf_proc.tokenizer.bos_token_id).all()
    pixels = processor.prepare_images(real_images()).pixel_values  # wide, tall and square scenes
    torch.testing.assert_close(pixels, theirs["pixel_values"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["eos", "legacy"])
def test_embeddings_and_logits_match_transformers(clip_folders, kind):
    folder, ref, hf_proc = clip_folders[kind]
    pipe = vlmkit.load(folder)
    assert pipe.config.text.pool == {"eos": "eos", "legacy": "argmax"}[kind]
    images = real_images()
    theirs = hf_proc(text=TEXTS, images=images, padding=True, truncation=True, return_tensors="pt")
    ids, _ = pipe.processor.encode_texts(TEXTS)
    eos = hf_proc.tokenizer.eos_token_id
    assert (ids.argmax(-1) != (ids == eos).int().argmax(-1)).all()  # the two rules read different tokens here
    img, txt, logits = reference(ref, theirs)
    with torch.no_grad():
        ours = pipe.model(Batch(ids, media=pipe.processor.prepare_images(images)), return_loss=False)
    torch.testing.assert_close(ours.image_embeds, img, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.text_embeds, txt, rtol=0, atol=1e-5)
    assert ours.logits_per_image.shape == (3, 4)
    torch.testing.assert_close(ours.logits_per_image, logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["eos", "legacy"])
def test_import_export_round_trip_is_exact(clip_folders, kind, tmp_path):
    src, ref, hf_proc = clip_folders[kind]
    assert main(["convert", "--from", "hf", str(src), "--out", str(tmp_path / "ours")]) == 0
    assert main(["convert", "--to", "hf", str(tmp_path / "ours"), "--out", str(tmp_path / "back")]) == 0
    before, after = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(before) == sorted(after)
    for name, t in before.items():
        assert torch.equal(t, after[name]), name
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["text_config"]["eos_token_id"] == ref.config.text_config.eos_token_id  # 2 stays 2 (argmax)
    again, info = transformers.CLIPModel.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    again_proc = transformers.AutoProcessor.from_pretrained(tmp_path / "back")
    assert type(again_proc.tokenizer).__name__ == "CLIPTokenizer"
    images = real_images()
    theirs = hf_proc(text=TEXTS, images=images, padding=True, truncation=True, return_tensors="pt")
    back = again_proc(text=TEXTS, images=images, padding=True, truncation=True, return_tensors="pt")
    assert back["input_ids"].tolist() == theirs["input_ids"].tolist()
    torch.testing.assert_close(back["pixel_values"], theirs["pixel_values"], rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(**back).logits_per_image, ref(**theirs).logits_per_image,
                                   rtol=0, atol=1e-5)


def vlmkit_clip(eos_id_2: bool = True):
    """A tiny-clip built by vlmkit with its own byte-level BPE, whose special tokens are <pad> <s> </s> (end of
    text at id 2 with vlmkit's default token order), and its processor."""
    tok = train_bpe(CORPUS * 4, vocab_size=300)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))])
    tokenizer = TextTokenizer(tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    assert (tokenizer.eos_id == 2) == eos_id_2
    preset = get_preset("tiny-clip-vit")
    cfg = preset.model
    cfg.vision = dataclasses.replace(cfg.vision, image_size=(32, 32), width=32, depth=2, heads=4, mlp_dim=48)
    cfg.text = dataclasses.replace(cfg.text, vocab_size=tokenizer.vocab_size, width=32, depth=2, heads=4, mlp_dim=48,
                                   context_length=CONTEXT, eos_token_id=tokenizer.eos_id)
    cfg.contrastive = dataclasses.replace(cfg.contrastive, embed_dim=24)
    pcfg = dataclasses.replace(preset.processor, image_size=(32, 32), max_length=CONTEXT)
    model = build_model(cfg, None).eval()
    perturb_(model, seed=3)
    return model, cfg, Processor(pcfg, tokenizer)


def save_vlmkit(folder, model, cfg, processor):
    folder.mkdir()
    write_model_files(folder, model, cfg, processor)
    return folder


def test_vlmkit_trained_clip_with_end_of_text_id_2_exports(tmp_path):
    """transformers would pool the highest id of a text config saying eos_token_id 2: the export exchanges ids 2
    and the last one in the tokenizer and the embedding, and CLIPModel then computes vlmkit's logits."""
    model, cfg, processor = vlmkit_clip()
    ours = save_vlmkit(tmp_path / "ours", model, cfg, processor)
    assert main(["convert", "--to", "hf", str(ours), "--out", str(tmp_path / "hf")]) == 0
    last = processor.tokenizer.vocab_size - 1
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["text_config"]["eos_token_id"] == last != 2
    ref, info = transformers.CLIPModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf_proc = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    images = real_images()
    theirs = hf_proc(text=TEXTS, images=images, padding=True, truncation=True, return_tensors="pt")
    ids, cut = processor.encode_texts(TEXTS)
    assert cut >= 1 and ids.shape[1] == CONTEXT  # cut as transformers cuts them: the ids below are equal
    renumbered = ids.clone()
    renumbered[ids == 2], renumbered[ids == last] = last, 2
    assert theirs["input_ids"].tolist() == renumbered.tolist()
    pixels = processor.prepare_images(images).pixel_values
    torch.testing.assert_close(theirs["pixel_values"], pixels, rtol=0, atol=1e-5)
    with torch.no_grad():
        expected = model(pairs(pixels, ids), return_loss=False).logits_per_image
        torch.testing.assert_close(ref.eval()(**theirs).logits_per_image, expected, rtol=0, atol=1e-4)
        # and vlmkit reads the export back as the same model
        again = vlmkit.load(tmp_path / "hf")
        assert again.config.text.pool == "eos" and again.config.text.eos_token_id == last
        again_logits = again.model(pairs(pixels, theirs["input_ids"]), return_loss=False).logits_per_image
        torch.testing.assert_close(again_logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("change, match", [
    ({"contrastive": {"loss": "siglip"}}, r"contrastive.loss 'siglip', which gives the model a learned logit bias "
                                          r"\(CLIPModel has none"),
    ({"contrastive": {"image_pool": "mean"}}, r"contrastive.image_pool 'mean' \(CLIPModel has 'class_token'\)"),
    ({"text": {"causal": False, "pool": "last"}}, r"text.causal False \(CLIPModel has True\); text.pool 'last'"),
    ({"vision": {"pre_norm": False}}, r"not a CLIP tower transformers can load: pre_norm False \(transformers has "
                                      r"True\)"),
    ({"vision": {"norm": "rmsnorm"}}, r"norm 'rmsnorm' \(transformers has 'layernorm'\)"),
])
def test_what_clipmodel_cannot_express_is_refused_by_field(change, match):
    cfg = get_preset("tiny-clip-vit").model
    for section, fields in change.items():
        setattr(cfg, section, dataclasses.replace(getattr(cfg, section), **fields))
    with pytest.raises(ConfigError, match=match):
        dual_encoder_config_to_hf(cfg)


def test_a_refused_export_writes_nothing(tmp_path):
    model, cfg, processor = vlmkit_clip()
    cfg.contrastive = dataclasses.replace(cfg.contrastive, image_pool="mean")
    ours = save_vlmkit(tmp_path / "ours", build_model(cfg, None), cfg, processor)
    with pytest.raises(ConfigError, match=r"not expressible as a transformers CLIPModel: contrastive.image_pool"):
        convert_to_hf(ours, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours"]


@pytest.mark.parametrize("edit, error, match", [
    (lambda c: c["text_config"].update(hidden_act="relu"), ConfigError,
     r"config.json: text_config.hidden_act 'relu' is not implemented; supported: quick_gelu"),
    (lambda c: c["text_config"].update(eos_token_id=[1, 5]), ConfigError,
     r"text_config.eos_token_id \[1, 5\]: CLIP pools the first end-of-text token; give one id"),
    (lambda c: c["text_config"].update(eos_token_id=5), CheckpointError,
     r"text_config.eos_token_id 5 is not the tokenizer's end-of-text token '<\|endoftext\|>' \(id 1\)"),
    (lambda c: c["text_config"].update(vocab_size=100), CheckpointError,
     r"the tokenizer has \d+ tokens, the text tower embeds 100 \(text_config.vocab_size\)"),
    (lambda c: c["vision_config"].update(image_size=40, patch_size=8), ConfigError,
     r"the image processor gives \(32, 32\) images, the vision tower takes \(40, 40\)"),
    (lambda c: c.update(model_type="clip_vision_model"), ConfigError,
     r"model_type 'clip_vision_model' is not a family vlmkit imports"),
])
def test_what_vlmkit_cannot_import_is_refused_by_key(clip_folders, tmp_path, edit, error, match):
    folder = tmp_path / "clip"
    shutil.copytree(clip_folders["eos"][0], folder)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(error, match=match):
        vlmkit.load(folder)


def test_clip_vit_b_16_preset_has_transformers_parameter_count():
    preset = get_preset("clip-vit-b-16")
    config = dual_encoder_config_to_hf(preset.model)
    assert config["text_config"]["eos_token_id"] == 49407
    with torch.device("meta"):
        ref = transformers.CLIPModel(transformers.CLIPConfig(**{k: v for k, v in config.items() if k != "model_type"}))
        ours = count_parameters(build_model(preset.model, None))
    assert sum(p.numel() for p in ref.parameters()) == ours == 149_620_737  # openai/clip-vit-base-patch16


@pytest.mark.slow
def test_fine_tuning_an_imported_clip_lowers_its_loss_and_exports(clip_folders, tmp_path):
    """A recipe with init_from a CLIPModel folder trains it contrastively on image-caption pairs (its own tokenizer
    and image processor), and the fine-tuned checkpoint exports as a CLIPModel with the same logits."""
    from vlmkit.data.shapes import generate_shapes
    from vlmkit.train.loop import train
    from vlmkit.train.recipe import load_recipe, only_stages, override_recipe

    folder, _, _ = clip_folders["eos"]
    generate_shapes(tmp_path / "shapes", n=60, seed=2, size=40, progress=False)
    recipe = override_recipe(only_stages(load_recipe("tiny-clip"), "contrastive"), [
        f"init_from={folder}", f"data.path={tmp_path / 'shapes'}", "data.val_samples=6", "train.batch_size=12",
        "train.log_every=1", "train.eval_every=1000", "train.save_every=1000", "stages.0.steps=60",
        "stages.0.lr=3e-3", "stages.0.warmup=0.1"])
    torch.manual_seed(0)
    res = train(recipe, tmp_path / "run", progress=False, log=lambda m: None)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    # from chance (log 12 = 2.48 for a batch of 12) to a mean of 2.22 over the last 10 steps in this setting
    assert len(losses) == 60 and sum(losses[-10:]) / 10 < sum(losses[:3]) / 3 - 0.15
    convert_to_hf(res.checkpoint, tmp_path / "hf")
    ours = vlmkit.load(res.checkpoint)
    theirs = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    texts = ["a red circle", "two shapes: a blue star and a green square."]
    images = real_images()[:2]
    ids, _ = ours.processor.encode_texts(texts)
    pixels = ours.processor.prepare_images(images).pixel_values
    with torch.no_grad():
        expected = ours.model(pairs(pixels, ids), return_loss=False).logits_per_image
        got = theirs(input_ids=ids, pixel_values=pixels).logits_per_image
    assert torch.allclose(got, expected, atol=1e-4)
