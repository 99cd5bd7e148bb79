"""Export of Idefics3 / SmolVLM to Hugging Face: the tiny checkpoints of test_hf_idefics3.py go
transformers -> ``vlmkit convert --from hf`` -> ``vlmkit convert --to hf`` and come back in the Hub's tensor layout
(the same tensors under the same names), load with Idefics3ForConditionalGeneration and AutoProcessor
(Idefics3Processor), and give the original processor's input_ids and pixels and the original model's logits; a
model vlmkit builds from scratch exports the same way; what Idefics3 cannot express is refused by field, writing
nothing.

SmolVLM: vlmkit's config does not record whether an imported folder was idefics3 or smolvlm, so the CLI writes
idefics3 (the same architecture, tensor names and image processor; checked against the original SmolVLM model and
processor). ``export_idefics3(..., model_type="smolvlm")`` writes a SmolVLM folder: SmolVLMForConditionalGeneration
and SmolVLMImageProcessor load it and agree; SmolVLMProcessor itself (what AutoProcessor builds for it) needs
torchvision for its video processor, so its ids are checked with the images-only stand-in of test_hf_idefics3.py
built from the exported tokenizer, image processor and image_seq_len."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vlmkit
from vlmkit.checkpoint import load_checkpoint, write_model_files
from vlmkit.cli import main
from vlmkit.config import ConnectorConfig, LanguageConfig, VisionConfig, VLMConfig
from vlmkit.convert.hf import convert_to_hf, read_chat_template, read_image_processor
from vlmkit.convert.hf.idefics3 import export_idefics3
from vlmkit.errors import ConfigError
from vlmkit.family import get_family
from vlmkit.models import build_model
from vlmkit.processing import Processor, TextTokenizer, train_bpe
from vlmkit.processing.idefics3 import Idefics3ProcessorConfig, ImageSplitConfig
from vlmkit.processing.tokenizer import SPECIAL_TOKENS

from helpers import forward
from hf_fixtures import real_images
from test_hf_export import randomize_
from hf_folders import IDEFICS3_SPECIAL as SPECIAL
from hf_folders import IDEFICS3_TEMPLATE as TEMPLATE
from hf_folders import smolvlm_processor
from test_hf_idefics3 import FOLDERS, PROMPTS, folders, images_for  # noqa: F401  (folders: a fixture)

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

pytestmark = pytest.mark.usefixtures("single_thread")

IMAGE_KEYS = ("size", "max_image_size", "do_image_splitting", "resample", "image_mean", "image_std")


@pytest.fixture(scope="module")
def exported(folders, tmp_path_factory):  # noqa: F811  (folders is test_hf_idefics3's fixture)
    """name -> (original folder, vlmkit checkpoint, exported folder), through the CLI both ways."""
    out = {}
    for name in FOLDERS:
        root = tmp_path_factory.mktemp(f"{name}_export")
        src = folders[name][0]
        assert main(["convert", "--from", "hf", str(src), "--out", str(root / "ours")]) == 0
        assert main(["convert", "--to", "hf", str(root / "ours"), "--out", str(root / "back")]) == 0
        out[name] = (src, root / "ours", root / "back")
    return out


@pytest.fixture(scope="module")
def reloaded(exported):
    """name -> (Idefics3ForConditionalGeneration, AutoProcessor) of the exported folder."""
    return {name: (transformers.Idefics3ForConditionalGeneration.from_pretrained(back).eval(),
                   transformers.AutoProcessor.from_pretrained(back)) for name, (_, _, back) in exported.items()}


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------ the files


@pytest.mark.parametrize("name", FOLDERS)
def test_export_writes_the_original_tensors_under_the_hubs_names(exported, name):
    """The Hub layout (model.vision_model., model.connector.modality_projection.proj, model.text_model., lm_head):
    the exported safetensors hold exactly the original's tensors (a tied head is not saved, as transformers)."""
    src, _, back = exported[name]
    original, ours = load_file(str(src / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert sorted(ours) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(ours[key], tensor), key


@pytest.mark.parametrize("name", FOLDERS)
def test_export_config_and_processor_files_carry_the_originals_settings(exported, name):
    src, _, back = exported[name]
    theirs, ours = _json(src / "config.json"), _json(back / "config.json")
    assert (ours["model_type"], ours["architectures"]) == ("idefics3", ["Idefics3ForConditionalGeneration"])
    assert ours["vision_config"]["model_type"] == "idefics3_vision"
    for key in ("image_token_id", "scale_factor", "tie_word_embeddings"):
        assert ours[key] == theirs[key], key
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                "patch_size", "hidden_act", "layer_norm_eps"):
        assert ours["vision_config"][key] == theirs["vision_config"][key], key
    for key in ("vocab_size", "hidden_size", "num_key_value_heads", "head_dim", "rms_norm_eps", "eos_token_id",
                "bos_token_id"):
        assert ours["text_config"][key] == theirs["text_config"][key], key
    generation = _json(back / "generation_config.json")
    assert (generation["eos_token_id"], generation["bos_token_id"]) == (
        theirs["text_config"]["eos_token_id"], theirs["text_config"]["bos_token_id"])
    original_images = read_image_processor(src)[0]
    images = _json(back / "preprocessor_config.json")
    assert images["image_processor_type"] == "Idefics3ImageProcessor"
    assert {k: images[k] for k in IMAGE_KEYS} == {k: original_images[k] for k in IMAGE_KEYS}
    assert _json(back / "processor_config.json") == {"processor_class": "Idefics3Processor", "image_seq_len": 4}


# ------------------------------------------------------------------------------------------------ transformers


@pytest.mark.parametrize("name", FOLDERS)
@pytest.mark.parametrize("prompt", PROMPTS)
def test_transformers_loads_the_export_and_gives_the_originals_ids_pixels_and_logits(folders, exported, reloaded,
                                                                                     name, prompt):
    _, ref, hf_proc = folders[name]
    again, again_proc = reloaded[name]
    assert type(again_proc).__name__ == "Idefics3Processor"
    images = images_for(prompt)
    theirs = hf_proc(text=prompt, images=images, return_tensors="pt")
    back = again_proc(text=prompt, images=images, return_tensors="pt")
    assert back["input_ids"].tolist() == theirs["input_ids"].tolist()
    torch.testing.assert_close(back["pixel_values"], theirs["pixel_values"], rtol=0, atol=1e-6)
    assert torch.equal(back["pixel_attention_mask"], theirs["pixel_attention_mask"])
    with torch.no_grad():
        torch.testing.assert_close(again(**back).logits, ref(**theirs).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", FOLDERS)
def test_the_chat_template_is_preserved(folders, exported, reloaded, name):
    src, _, back = exported[name]
    assert read_chat_template(back) == read_chat_template(src)
    if name == "smolvlm":  # the SmolVLM fixture's folder has no template
        return
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    assert (reloaded[name][1].apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            == folders[name][2].apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            == "<s>User:<image>What is it?<end_of_utterance>\nAssistant:")


@pytest.mark.parametrize("name", FOLDERS)
def test_vlmkit_load_of_the_export_equals_the_original(exported, name):
    src, _, back = exported[name]
    original, again = vlmkit.load(src), vlmkit.load(back)
    assert again.processor.cfg == original.processor.cfg
    images = images_for(PROMPTS[2])
    assert again.score(images, PROMPTS[2], " Two squares.") == pytest.approx(
        original.score(images, PROMPTS[2], " Two squares."), abs=1e-5)


def test_a_smolvlm_folder_is_written_with_model_type_smolvlm(smolvlm, exported, tmp_path):
    """What can be checked without SmolVLMProcessor (torchvision): SmolVLMForConditionalGeneration loads the
    folder and gives the original logits; SmolVLMImageProcessor gives the original pixels and tiles; the
    images-only SmolVLMProcessor built from the exported tokenizer and image_seq_len gives the original ids."""
    _, ref, hf_proc = smolvlm
    model, processor, cfg, _ = load_checkpoint(exported["smolvlm"][1])
    export_idefics3(model, cfg, processor, tmp_path, model_type="smolvlm")
    config = _json(tmp_path / "config.json")
    assert (config["model_type"], config["vision_config"]["model_type"]) == ("smolvlm", "smolvlm_vision")
    again = transformers.SmolVLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    image_processor = transformers.SmolVLMImageProcessorPil.from_pretrained(tmp_path)
    settings = _json(tmp_path / "processor_config.json")
    assert settings == {"processor_class": "SmolVLMProcessor", "image_seq_len": 4}
    assert _json(tmp_path / "preprocessor_config.json")["image_processor_type"] == "SmolVLMImageProcessor"
    again_proc = smolvlm_processor(image_processor, transformers.AutoTokenizer.from_pretrained(tmp_path))
    assert again_proc.image_seq_len == settings["image_seq_len"]
    for prompt in PROMPTS:
        images = images_for(prompt)
        theirs = hf_proc(text=prompt, images=images, return_tensors="pt")
        back = again_proc(text=prompt, images=images, return_tensors="pt")
        assert back["input_ids"].tolist() == theirs["input_ids"].tolist()
        torch.testing.assert_close(back["pixel_values"], theirs["pixel_values"], rtol=0, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(again(**back).logits, ref(**theirs).logits, rtol=0, atol=1e-4)
    images = images_for(PROMPTS[0])
    assert vlmkit.load(tmp_path).score(images, PROMPTS[0], " It is red.") == pytest.approx(
        vlmkit.load(smolvlm[0]).score(images, PROMPTS[0], " It is red."), abs=1e-5)


# ------------------------------------------------------------------------------------------------ from scratch


def scratch_tokenizer() -> TextTokenizer:
    """vlmkit's byte-level BPE with Idefics3's image markers and end of utterance as special tokens."""
    sentences = ["what shape is in the image?", "a red circle and a blue square.", "how many triangles? two."]
    special = SPECIAL_TOKENS + [t for t in SPECIAL if t not in SPECIAL_TOKENS]
    tok = train_bpe(sentences * 5, vocab_size=320, special_tokens=special)
    return TextTokenizer(tok, pad_token="<pad>", eos_token="<end_of_utterance>")


def scratch_model(vision: dict | None = None, connector: dict | None = None, processor: dict | None = None,
                  tokenizer: TextTokenizer | None = None):
    """(model, config, processor) of an Idefics3-shaped model built by vlmkit: SigLIP-style tower (no class token,
    patch bias, final norm) on 32-pixel tiles, pixel shuffle x2 and one linear without bias, a Llama LM; the
    keyword dicts override config fields (``processor``'s ``family`` builds that family's processor config from the
    fields it has)."""
    tok = tokenizer or scratch_tokenizer()
    v = VisionConfig(image_size=(32, 32), patch_size=8, width=32, depth=2, heads=4, mlp_dim=48, act="gelu_tanh",
                     norm_eps=1e-6, class_token=False, pre_norm=False, post_norm=True, patch_bias=True)
    c = ConnectorConfig(kind="pixel_shuffle", scale_factor=2, layers=1, bias=False)
    lm = LanguageConfig(vocab_size=tok.vocab_size, width=48, depth=2, heads=4, kv_heads=2, mlp_dim=80,
                        rope_theta=20000.0, max_seq_len=512, tie_embeddings=True)
    cfg = VLMConfig(family="idefics3", vision=VisionConfig(**{**v.__dict__, **(vision or {})}),
                    connector=ConnectorConfig(**{**c.__dict__, **(connector or {})}), lm=lm)
    pcfg = Idefics3ProcessorConfig(family="idefics3", image_size=(32, 32), mean=(0.4, 0.5, 0.6),
                                   std=(0.2, 0.3, 0.25), resample="bicubic", text_mode="whole",
                                   split=ImageSplitConfig(80, True), chat_template_jinja=TEMPLATE, pad_token="<pad>",
                                   eos_token="<end_of_utterance>", max_length=512)
    fields = {**pcfg.__dict__, "image_seq_len": 4, **(processor or {})}
    cls = get_family(fields["family"]).ProcessorConfig
    pcfg = cls(**{k: v for k, v in fields.items() if k in {f.name for f in dataclasses.fields(cls)}})
    proc = Processor(pcfg, tok)
    model = build_model(cfg, proc.image_token_id)
    randomize_(model)
    return model.eval(), cfg, proc


def test_an_idefics3_model_built_by_vlmkit_exports_and_transformers_gives_the_same_logits(tmp_path):
    model, cfg, processor = scratch_model()
    (tmp_path / "ours").mkdir()
    write_model_files(tmp_path / "ours", model, cfg, processor)
    assert main(["convert", "--to", "hf", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")]) == 0
    ref = transformers.Idefics3ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    hf_proc = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    for prompt in PROMPTS:
        images = images_for(prompt)
        theirs = hf_proc(text=prompt, images=images, return_tensors="pt")
        inputs = processor.prepare_images(images)
        assert theirs["input_ids"][0].tolist() == processor.prompt(prompt, inputs).ids
        torch.testing.assert_close(theirs["pixel_values"][0], inputs.pixel_values, rtol=0, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(ref(**theirs).logits, forward(model, theirs["input_ids"], inputs).logits,
                                       rtol=0, atol=1e-4)
    pipe = vlmkit.load(tmp_path / "ours")
    images = real_images()[:1]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is it?"}]}]
    text = hf_proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    theirs = hf_proc(text=text, images=images, return_tensors="pt")
    inputs = processor.prepare_images(images)
    assert theirs["input_ids"][0].tolist() == processor.chat("What shape is it?", inputs).ids
    out = ref.generate(**theirs, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    expected = hf_proc.tokenizer.decode(out[0, theirs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert pipe.chat(images[0], "What shape is it?", max_new_tokens=6) == expected


# ------------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("vision, connector, processor, match", [
    (dict(arch="cnn"), {}, {}, r"vision: not a SigLIP tower transformers can load: arch 'cnn'"),
    (dict(act="silu"), {}, {}, r"vision: not a SigLIP tower transformers can load: act 'silu'"),
    (dict(class_token=True), {}, {}, r"vision.class_token: true: Idefics3's tower has no class token"),
    (dict(post_norm=False), {}, {}, r"vision.post_norm: false: Idefics3 feeds the connector"),
    (dict(image_size=(38, 38), patch_size=2), dict(scale_factor=1), dict(image_size=(38, 38)),
     r"vision.image_size 38 / patch_size 2: on a 19x19 patch grid Idefics3's bucketed position ids are not"),
    ({}, dict(layers=2), {}, r"connector kind 'pixel_shuffle', layers 2, bias False: Idefics3's connector is"),
    ({}, dict(bias=True), {}, r"connector kind 'pixel_shuffle', layers 1, bias True"),
    ({}, {}, dict(family="llava", text_mode="segments"),
     r"processor family 'llava': an Idefics3 checkpoint's processor splits images"),
    ({}, {}, dict(text_mode="segments"), r"processor text_mode 'segments': Idefics3Processor tokenises the whole"),
])
def test_what_idefics3_cannot_express_is_refused_and_nothing_is_written(tmp_path, vision, connector, processor,
                                                                         match):
    model, cfg, proc = scratch_model(vision, connector, processor)
    (tmp_path / "ours").mkdir()
    write_model_files(tmp_path / "ours", model, cfg, proc)
    with pytest.raises(ConfigError, match=match):
        convert_to_hf(tmp_path / "ours", tmp_path / "hf")
    assert [p.name for p in tmp_path.iterdir()] == ["ours"]


def test_a_tokenizer_without_idefics3s_special_tokens_is_refused(tmp_path, tokenizer):
    """vlmkit's default tokenizer has <image> but not <fake_token_around_image> / <end_of_utterance>, which
    Idefics3Processor would add with ids beyond the embeddings."""
    model, cfg, proc = scratch_model(processor=dict(eos_token="<|end|>"), tokenizer=tokenizer)
    (tmp_path / "ours").mkdir()
    write_model_files(tmp_path / "ours", model, cfg, proc)
    with pytest.raises(ConfigError, match=r"tokenizer: special tokens \['<fake_token_around_image>', "
                                          r"'<end_of_utterance>'\] are missing"):
        convert_to_hf(tmp_path / "ours", tmp_path / "hf")
    assert [p.name for p in tmp_path.iterdir()] == ["ours"]
