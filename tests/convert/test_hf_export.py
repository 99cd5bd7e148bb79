"""Export to Hugging Face: vlmkit models written as transformers folders load with transformers' own classes
and give the same logits (text LMs of the three families, LLaVA from an import and from scratch); the
processor files give the same input_ids; what a family cannot express is refused by name, writing nothing."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import vlmkit
from vlmkit.checkpoint import write_model_files
from vlmkit.cli import main
from vlmkit.data.shapes import generate_shapes
from vlmkit.config import ConnectorConfig, LanguageConfig, ProcessorConfig, VisionConfig, VLMConfig
from vlmkit.convert.hf import export_hf_lm, load_hf_lm
from vlmkit.errors import ConfigError
from vlmkit.lm.decoder import DecoderLM
from vlmkit.models import build_model
from vlmkit.presets import get_preset
from vlmkit.processing import Processor
from vlmkit.train.loop import train
from vlmkit.train.recipe import load_recipe

from helpers import forward
from hf_fixtures import real_images

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

pytestmark = pytest.mark.usefixtures("single_thread")


def randomize_(module: torch.nn.Module, seed: int = 0) -> None:
    """Weights of a trained-looking scale, norms around 1, biases non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


LM_KINDS = {
    "llama": dict(),
    "qwen2": dict(qkv_bias=True),
    "gemma": dict(norm_offset=True, embed_scale=True, act="gelu_tanh", tie_embeddings=True),
}


@pytest.mark.parametrize("kind", sorted(LM_KINDS))
def test_text_lm_exports_to_its_transformers_family(tmp_path, kind):
    cfg = LanguageConfig(vocab_size=101, width=48, depth=2, heads=4, kv_heads=2, head_dim=16, mlp_dim=80,
                         norm_eps=1e-6, rope_theta=30000.0, max_seq_len=64, **LM_KINDS[kind])
    lm = DecoderLM(cfg)
    randomize_(lm)
    if cfg.tie_embeddings:
        lm.lm_head.weight = lm.embed_tokens.weight
    export_hf_lm(lm, tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(ref).__name__.lower().startswith(kind)
    ids = torch.tensor([[3, 17, 42, 99, 5, 0, 64]])
    with torch.no_grad():
        ours = lm.lm_head(lm(lm.embed_tokens(ids)))
        torch.testing.assert_close(ref(input_ids=ids).logits, ours, rtol=0, atol=1e-4)
    back = load_hf_lm(tmp_path)  # and the import of the export is the same model
    for (name, a), b in zip(lm.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


def tiny_vit_llava() -> tuple[VLMConfig, ProcessorConfig]:
    """A LLaVA-1.5-shaped model built by vlmkit: CLIP-style tower read at layer -2, MLP, Qwen2-style LM."""
    vision = VisionConfig(image_size=(32, 32), patch_size=8, width=32, depth=3, heads=4, mlp_dim=48,
                          act="quick_gelu", class_token=True, pre_norm=True, post_norm=False, patch_bias=False,
                          feature_layer=-2, drop_class_token=True)
    lm = LanguageConfig(vocab_size=320, width=48, depth=2, heads=4, kv_heads=2, mlp_dim=80, qkv_bias=True,
                        rope_theta=20000.0, max_seq_len=128)
    model = VLMConfig(family="llava", vision=vision, connector=ConnectorConfig(kind="mlp"), lm=lm)
    return model, ProcessorConfig(family="llava", image_size=(32, 32), shortest_edge=36, mean=(0.4, 0.5, 0.6),
                                  std=(0.2, 0.3, 0.25))


def save_vlmkit(folder, model, cfg, processor):
    folder.mkdir()
    write_model_files(folder, model, cfg, processor)


def test_llava_built_by_vlmkit_exports_and_transformers_gives_the_same_logits(tmp_path, tokenizer):
    cfg, pcfg = tiny_vit_llava()
    processor_cfg = ProcessorConfig(**{**pcfg.__dict__, "image_seq_len": 16})
    processor = Processor(processor_cfg, tokenizer)
    model = build_model(cfg, processor.image_token_id)
    randomize_(model)
    save_vlmkit(tmp_path / "ours", model, cfg, processor)
    assert main(["convert", "--to", "hf", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")]) == 0
    ref = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    hf_proc = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    images = real_images()[:1]
    prompt = "<image> what shape is in the image?"
    theirs = hf_proc(text=prompt, images=images, return_tensors="pt")
    inputs = processor.prepare_images(images)
    torch.testing.assert_close(theirs["pixel_values"], inputs.pixel_values, rtol=0, atol=1e-5)
    # a byte-level BPE tokenises the same whole or in pieces: the ids are the same too
    assert theirs["input_ids"][0].tolist() == processor.prompt(prompt, inputs).ids
    with torch.no_grad():
        torch.testing.assert_close(ref(**theirs).logits, forward(model, theirs["input_ids"], inputs).logits, rtol=0,
                                   atol=1e-4)


def test_imported_llava_round_trips_through_vlmkit(tmp_path, llava_folder):
    src, ref, hf_proc = llava_folder
    assert main(["convert", "--from", "hf", str(src), "--out", str(tmp_path / "ours")]) == 0
    assert main(["convert", "--to", "hf", str(tmp_path / "ours"), "--out", str(tmp_path / "back")]) == 0
    again = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    again_proc = transformers.AutoProcessor.from_pretrained(tmp_path / "back")
    images = real_images()[:2]
    prompt = "USER: <image>\nand <image>\nhow many squares? ASSISTANT:"
    theirs = hf_proc(text=prompt, images=images, return_tensors="pt")
    back = again_proc(text=prompt, images=images, return_tensors="pt")
    assert back["input_ids"].tolist() == theirs["input_ids"].tolist()
    torch.testing.assert_close(back["pixel_values"], theirs["pixel_values"], rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(again(**back).logits, ref(**theirs).logits, rtol=0, atol=1e-4)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    assert (again_proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            == hf_proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    assert vlmkit.load(tmp_path / "back").score(images[:1], "<image> caption en", " a red circle") == pytest.approx(
        vlmkit.load(src).score(images[:1], "<image> caption en", " a red circle"), abs=1e-5)


def test_a_model_llava_cannot_express_is_refused_and_nothing_is_written(tmp_path, tokenizer):
    preset = get_preset("tiny-llava")  # a CNN tower and a pixel-shuffle connector
    processor = Processor(ProcessorConfig(**{**preset.processor.__dict__, "image_seq_len": 16}), tokenizer)
    cfg = preset.model
    cfg.lm.vocab_size = tokenizer.vocab_size
    save_vlmkit(tmp_path / "ours", build_model(cfg, processor.image_token_id), cfg, processor)
    with pytest.raises(ConfigError, match=r"not a SigLIP tower transformers can load: arch 'cnn'"):
        vlmkit.convert.hf.convert_to_hf(tmp_path / "ours", tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and [p.name for p in tmp_path.iterdir()] == ["ours"]


def test_a_demo_trained_vit_model_exports_as_llava_that_transformers_runs(tmp_path):
    """The demo's recipe with its LLaVA-layout sibling preset, trained a few steps, exported: transformers
    loads it with LlavaForConditionalGeneration and AutoProcessor, the chat template gives vlmkit's prompt ids,
    and greedy generation gives vlmkit's tokens."""
    data = tmp_path / "shapes"
    generate_shapes(data, n=40, seed=3, size=64, progress=False)
    recipe = load_recipe("tiny-llava", [f"data.path={data}", "preset=tiny-llava-vit", "model.vision.width=32",
                                        "model.vision.mlp_dim=64", "model.vision.heads=2", "model.lm.width=64",
                                        "train.batch_size=8", "data.val_samples=8", "stages.0.steps=2",
                                        "stages.0.batch_size=8", "stages.1.steps=3"])
    res = train(recipe, tmp_path / "run", progress=False, log=lambda m: None)
    assert main(["convert", "--to", "hf", str(res.checkpoint), "--out", str(tmp_path / "hf")]) == 0
    ref = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    hf_proc = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    pipe = vlmkit.load(res.checkpoint)
    image = data / "images" / "000000.png"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is it?"}]}]
    text = hf_proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    theirs = hf_proc(text=text, images=[Image.open(image)], return_tensors="pt")
    inputs = pipe.processor.prepare_images([image])
    assert theirs["input_ids"][0].tolist() == pipe.processor.chat("What shape is it?", inputs).ids
    with torch.no_grad():
        torch.testing.assert_close(ref(**theirs).logits, forward(pipe.model, theirs["input_ids"], inputs).logits,
                                   rtol=0, atol=1e-4)
    out = ref.generate(**theirs, max_new_tokens=8, do_sample=False)  # both stop at the same end token
    expected = hf_proc.tokenizer.decode(out[0, theirs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert pipe.chat(image, "What shape is it?", max_new_tokens=8) == expected
