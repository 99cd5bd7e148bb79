"""SigLIP (transformers' SiglipModel) <-> vlmkit's DualEncoder: SiglipTokenizer's SentencePiece model converted at
import gives its ids exactly (lowercasing, punctuation removal and whitespace as its canonicalize_text), pixels,
embeddings and logits equal transformers' on a tiny random checkpoint; exports load in SiglipModel and
SiglipProcessor (a tokenizer.json that needs no sentencepiece) with the same numbers; what SiglipModel or vlmkit
cannot express is refused by name."""

from __future__ import annotations

import dataclasses
import io
import json
import random
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import processors

import vlmkit
from vlmkit.batch import Batch
from vlmkit.checkpoint import write_model_files
from vlmkit.cli import main
from vlmkit.convert.hf.dual_encoder import dual_encoder_config_to_hf
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models import build_model, count_parameters
from vlmkit.presets import get_preset
from vlmkit.processing import Processor, TextTokenizer, train_bpe

from helpers import pairs
from hf_fixtures import CORPUS, perturb_, real_images
from hf_folders import SIGLIP_CONTEXT as CONTEXT
from hf_folders import SIGLIP_EXTRA as EXTRA

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")
spm = pytest.importorskip("sentencepiece", reason="SiglipTokenizer and its conversion need sentencepiece")
pytest.importorskip("google.protobuf", reason="reading a SentencePiece model needs protobuf")

pytestmark = pytest.mark.usefixtures("single_thread")

TEXTS = ["A photo of a CAT!", "two dogs, three Squares.", "  What's this?\tIt's a red-circle...", "naïve café, ＡＢＣ ﬁne",
         "the quick brown fox jumps over the lazy dog, then the small circle is red and the squares are blue"]


def random_texts(n: int = 400) -> list[str]:
    """Texts that exercise every step of SiglipTokenizer: capitals, ASCII punctuation, Python's whitespace
    (tabs, newlines, 0x1c, no-break and ideographic spaces), "▁", NFKC-normalised and unknown characters."""
    rng = random.Random(0)
    alphabet = "abcdefghij ABC,.!?'-_\t\n▁éïü日ﬁ¨ＡＢ！0123\xa0\x1c\u3000"
    words = [w for t in CORPUS + EXTRA for w in t.split()]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(n // 2)] + [
        " ".join(rng.choice(words) for _ in range(rng.randint(1, 8))) for _ in range(n // 2)]


def test_sentencepiece_conversion_gives_siglip_tokenizer_ids(siglip_folder):
    folder, _, hf_proc = siglip_folder
    assert not (folder / "tokenizer.json").exists()  # converted from spiece.model at import
    tok = vlmkit.load(folder).processor.tokenizer
    ref = hf_proc.tokenizer
    assert type(ref).__name__ == "SiglipTokenizer"
    for text in [*TEXTS, "", "!!!", "UPPER lower MiXeD", "x▁y", "tab\x1cchar", *random_texts()]:
        assert tok.encode(text, special=True) == ref(text)["input_ids"], repr(text)


def test_token_ids_truncation_and_pixels_match_siglip_processor(siglip_folder):
    folder, _, hf_proc = siglip_folder
    processor = vlmkit.load(folder).processor
    theirs = hf_proc(text=TEXTS, images=real_images(), padding="max_length", truncation=True, return_tensors="pt")
    assert "attention_mask" not in theirs
    ids, cut = processor.encode_texts(TEXTS)
    assert ids.shape == (5, CONTEXT) and ids.tolist() == theirs["input_ids"].tolist()
    untruncated = hf_proc.tokenizer(TEXTS)["input_ids"]
    assert cut == sum(len(r) > CONTEXT for r in untruncated) == 1
    pixels = processor.prepare_images(real_images()).pixel_values  # wide, tall and square scenes
    torch.testing.assert_close(pixels, theirs["pixel_values"], rtol=0, atol=1e-5)


def reference(model, inputs):
    with torch.no_grad():
        img = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        txt = model.get_text_features(input_ids=inputs["input_ids"]).pooler_output
        return F.normalize(img, dim=-1), F.normalize(txt, dim=-1), model(**inputs).logits_per_image


def test_embeddings_and_logits_match_transformers(siglip_folder):
    folder, ref, hf_proc = siglip_folder
    pipe = vlmkit.load(folder)
    cfg = pipe.config
    assert (cfg.text.pool, cfg.text.causal, cfg.contrastive.image_pool, cfg.contrastive.embed_dim) == (
        "last", False, "map", 32)
    images = real_images()
    theirs = hf_proc(text=TEXTS, images=images, padding="max_length", truncation=True, return_tensors="pt")
    img, txt, logits = reference(ref, theirs)
    ids, _ = pipe.processor.encode_texts(TEXTS)
    with torch.no_grad():
        ours = pipe.model(Batch(ids, media=pipe.processor.prepare_images(images)), return_loss=False)
    torch.testing.assert_close(ours.image_embeds, img, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.text_embeds, txt, rtol=0, atol=1e-5)
    assert ours.logits_per_image.shape == (3, 5)
    torch.testing.assert_close(ours.logits_per_image, logits, rtol=0, atol=1e-4)


def test_import_export_round_trip_is_exact(siglip_folder, tmp_path):
    src, ref, hf_proc = siglip_folder
    assert main(["convert", "--from", "hf", str(src), "--out", str(tmp_path / "ours")]) == 0
    assert main(["convert", "--to", "hf", str(tmp_path / "ours"), "--out", str(tmp_path / "back")]) == 0
    before, after = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(before) == sorted(after)
    for name, t in before.items():
        assert torch.equal(t, after[name]), name
    again, info = transformers.SiglipModel.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # the exported tokenizer is the converted tokenizer.json: transformers loads it without sentencepiece and
    # gives SiglipTokenizer's ids, with no attention mask
    again_proc = transformers.AutoProcessor.from_pretrained(tmp_path / "back")
    assert type(again_proc).__name__ == "SiglipProcessor" and type(again_proc.tokenizer).__name__ != "SiglipTokenizer"
    for text in random_texts(100):
        assert again_proc.tokenizer(text)["input_ids"] == hf_proc.tokenizer(text)["input_ids"], repr(text)
    images = real_images()
    theirs = hf_proc(text=TEXTS, images=images, padding="max_length", truncation=True, return_tensors="pt")
    back = again_proc(text=TEXTS, images=images, padding="max_length", truncation=True, return_tensors="pt")
    assert sorted(back) == ["input_ids", "pixel_values"]
    assert back["input_ids"].tolist() == theirs["input_ids"].tolist()
    torch.testing.assert_close(back["pixel_values"], theirs["pixel_values"], rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(**back).logits_per_image, ref(**theirs).logits_per_image,
                                   rtol=0, atol=1e-5)
    # and vlmkit reads its export (tokenizer.json, no spiece.model) as the same processor
    assert vlmkit.load(tmp_path / "back").processor.encode_texts(TEXTS)[0].tolist() == theirs["input_ids"].tolist()


def test_vlmkit_built_siglip_exports(tmp_path):
    """A from-scratch tiny-siglip with vlmkit's own BPE: SiglipModel and SiglipProcessor load the export and give
    vlmkit's ids and logits."""
    tok = train_bpe(CORPUS * 4, vocab_size=300)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    tokenizer = TextTokenizer(tok, pad_token="<pad>", eos_token="</s>", bos_token=None)
    preset = get_preset("tiny-siglip-vit")
    cfg = preset.model
    cfg.vision = dataclasses.replace(cfg.vision, image_size=(32, 32), width=32, depth=2, heads=4, mlp_dim=48)
    cfg.text = dataclasses.replace(cfg.text, vocab_size=tokenizer.vocab_size, width=24, depth=2, heads=4, mlp_dim=40,
                                   context_length=CONTEXT, eos_token_id=tokenizer.eos_id)
    cfg.contrastive = dataclasses.replace(cfg.contrastive, embed_dim=32)
    processor = Processor(dataclasses.replace(preset.processor, image_size=(32, 32), max_length=CONTEXT, bos_token=""),
                          tokenizer)
    model = build_model(cfg, None).eval()
    perturb_(model, seed=5)
    (tmp_path / "ours").mkdir()
    write_model_files(tmp_path / "ours", model, cfg, processor)
    assert main(["convert", "--to", "hf", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")]) == 0
    ref, info = transformers.SiglipModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf_proc = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    images = real_images()
    theirs = hf_proc(text=TEXTS, images=images, padding="max_length", truncation=True, return_tensors="pt")
    ids, cut = processor.encode_texts(TEXTS)
    assert cut >= 1 and theirs["input_ids"].tolist() == ids.tolist()
    pixels = processor.prepare_images(images).pixel_values
    torch.testing.assert_close(theirs["pixel_values"], pixels, rtol=0, atol=1e-5)
    with torch.no_grad():
        ours = model(pairs(pixels, ids), return_loss=False).logits_per_image
        torch.testing.assert_close(ref.eval()(**theirs).logits_per_image, ours, rtol=0, atol=1e-4)


@pytest.mark.parametrize("change, match", [
    ({"vision": {"pre_norm": True}}, r"not a SigLIP tower transformers can load: pre_norm True \(transformers has "
                                     r"False\)"),
    ({"contrastive": {"embed_dim": 64}}, r"contrastive.embed_dim 64 \(SiglipModel's text projection_size is the "
                                         r"vision width 128\)"),
    ({"text": {"causal": True, "pool": "eos"}}, r"text.causal True \(SiglipModel has False\); text.pool 'eos' "
                                                r"\(SiglipModel reads the last position: 'last'\)"),
    ({"contrastive": {"image_pool": "class_token"}, "vision": {"class_token": True}},
     r"contrastive.image_pool 'class_token' \(SiglipModel has 'map'\); .*vision.class_token True"),
    ({"text": {"act": "silu"}}, r"text.act 'silu' \(exportable: quick_gelu, gelu_tanh, gelu\)"),
])
def test_what_siglipmodel_cannot_express_is_refused_by_field(change, match):
    cfg = get_preset("tiny-siglip-vit").model
    for section, fields in change.items():
        setattr(cfg, section, dataclasses.replace(getattr(cfg, section), **fields))
    with pytest.raises(ConfigError, match=match):
        dual_encoder_config_to_hf(cfg)


@pytest.mark.parametrize("edit, match", [
    (lambda c: c["vision_config"].update(vision_use_head=False),
     r"vision_config.vision_use_head false: this SigLIP has no attention-pooling head"),
    (lambda c: c["text_config"].update(projection_size=24),
     r"text_config.projection_size 24 must equal vision_config.hidden_size 32"),
    (lambda c: c["vision_config"].update(hidden_act="relu"),
     r"\(vision_config\): hidden_act 'relu' is not implemented"),
])
def test_what_vlmkit_cannot_import_is_refused_by_key(siglip_folder, tmp_path, edit, match):
    folder = tmp_path / "siglip"
    shutil.copytree(siglip_folder[0], folder)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=match):
        vlmkit.load(folder)


def test_a_sentencepiece_model_siglip_tokenizer_does_not_use_is_refused(siglip_folder, tmp_path):
    folder = tmp_path / "siglip"
    shutil.copytree(siglip_folder[0], folder)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 20), model_writer=buf, vocab_size=80,
                                   model_type="bpe", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    (folder / "spiece.model").write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match=r"spiece.model: trainer_spec.model_type 2: only unigram SentencePiece "
                                              r"models \(1, SigLIP's\) are converted"):
        vlmkit.load(folder)


def test_missing_sentencepiece_is_named_with_the_install_command(siglip_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import sentencepiece now raises ImportError
    with pytest.raises(CheckpointError, match=r"spiece.model: reading a SentencePiece tokenizer .* needs the Python "
                                              r"package sentencepiece: pip install sentencepiece"):
        vlmkit.load(siglip_folder[0])


def test_siglip_b_16_preset_has_transformers_parameter_count():
    preset = get_preset("siglip-b-16")
    config = dual_encoder_config_to_hf(preset.model)
    with torch.device("meta"):
        ref = transformers.SiglipModel(transformers.SiglipConfig(**{k: v for k, v in config.items()
                                                                    if k != "model_type"}))
        ours = count_parameters(build_model(preset.model, None))
    assert sum(p.numel() for p in ref.parameters()) == ours
