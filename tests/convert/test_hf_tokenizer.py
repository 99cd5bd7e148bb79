"""Tokenizers: tokenizer.json read with its special tokens gives transformers' ids and text back."""

from __future__ import annotations

import json

import pytest

from vlmkit.errors import CheckpointError
from vlmkit.convert.hf import load_hf_tokenizer
from vlmkit.processing import train_bpe

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

TEXTS = ["What colour is the small circle?", "USER: <image>\nDescribe it. ASSISTANT: a red star</s>",
         "naïve café — 3 objects, 2 circles", "  leading spaces and\ttabs\n\nnewlines"]


def make_tokenizer(folder, pad: bool = True):
    tok = train_bpe(TEXTS * 20, vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<image>", "<pad>"])
    kw = {"pad_token": "<pad>"} if pad else {}
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                              unk_token="<unk>", additional_special_tokens=["<image>"], **kw)
    hf.save_pretrained(folder)
    return hf


@pytest.mark.parametrize("pad", [True, False])
def test_ids_and_special_tokens_match_transformers(tmp_path, pad):
    hf = make_tokenizer(tmp_path, pad)
    ours = load_hf_tokenizer(tmp_path)
    for text in TEXTS:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text) == ids
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)
    assert (ours.bos_id, ours.eos_id) == (hf.bos_token_id, hf.eos_token_id)
    assert ours.pad_id == (hf.pad_token_id if pad else hf.eos_token_id)  # no pad token: EOS pads
    assert ours.token_id("<image>") == hf.convert_tokens_to_ids("<image>")


def test_missing_tokenizer_json_is_refused_with_a_hint(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no tokenizer.json \(found tokenizer.model: re-save"):
        load_hf_tokenizer(tmp_path)


def test_missing_eos_is_named(tmp_path):
    make_tokenizer(tmp_path)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        p = tmp_path / name
        if p.is_file():
            p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "eos_token"}))
    with pytest.raises(CheckpointError, match="no eos_token in tokenizer_config.json"):
        load_hf_tokenizer(tmp_path)
