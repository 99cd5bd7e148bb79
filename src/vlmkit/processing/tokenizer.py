"""Tokenizers on the ``tokenizers`` library: load tokenizer.json, or train a small byte-level BPE.

vlmkit's special tokens: ``<pad>``, ``<s>``, ``</s>``, the image placeholder ``<image>`` and the chat-turn
markers of the vlmkit template (``<|user|>``, ``<|assistant|>``, ``<|end|>``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from vlmkit.errors import CheckpointError
from vlmkit.utils import atomic_write_text

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<image>", "<|user|>", "<|assistant|>", "<|end|>"]


def train_bpe(texts: Iterable[str], vocab_size: int = 1024, special_tokens: list[str] | None = None) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style) on ``texts``; deterministic for the same texts."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens or SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


class TextTokenizer:
    """A thin wrapper: encode/decode plus named special-token ids."""

    def __init__(self, tokenizer: Tokenizer, pad_token: str = "<pad>", eos_token: str = "<|end|>",
                 bos_token: str | None = None):
        self.tok = tokenizer
        self.pad_token, self.eos_token, self.bos_token = pad_token, eos_token, bos_token
        self.pad_id = self.token_id(pad_token)
        self.eos_id = self.token_id(eos_token)
        self.bos_id = self.token_id(bos_token) if bos_token else None

    @classmethod
    def from_file(cls, path: str | Path, **kwargs) -> TextTokenizer:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"tokenizer file not found: {path}")
        return cls(Tokenizer.from_file(str(path)), **kwargs)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.tok.to_str(pretty=False))

    def token_id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise CheckpointError(f"special token {token!r} is not in the tokenizer's vocabulary")
        return i

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, special: bool = False) -> list[int]:
        """Token ids of ``text``; ``special`` adds what the tokenizer's post-processor adds (e.g. Llama's BOS),
        as transformers' ``add_special_tokens=True``."""
        if not text and not special:
            return []
        return self.tok.encode(text, add_special_tokens=special).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
