"""Chat templates as code: a conversation becomes text segments, each marked trainable or not.

Tokenising segment by segment gives an exact label mask (only assistant replies and their end marker are
trained) and the same token boundaries in training, evaluation and serving.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmkit.errors import DataError
from vlmkit.registry import Registry

ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Segment:
    text: str
    train: bool = False


@dataclass(frozen=True)
class ChatTemplate:
    """Markers around each role's message; ``generation_prompt`` opens an assistant reply."""

    name: str
    user: tuple[str, str]
    assistant: tuple[str, str]
    system: tuple[str, str] = ("", "")
    generation_prompt: str = ""

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> list[Segment]:
        """messages: [{"role": "user"|"assistant"|"system", "content": str}, ...] -> segments."""
        segs: list[Segment] = []
        for m in messages:
            role = m["role"]
            if role == "assistant":
                open_, close = self.assistant
                segs.append(Segment(open_))
                segs.append(Segment(m["content"] + close.rstrip("\n"), train=True))
                if close.endswith("\n"):
                    segs.append(Segment("\n"))
            else:
                open_, close = self.user if role == "user" else self.system
                segs.append(Segment(open_ + m["content"] + close))
        if add_generation_prompt:
            segs.append(Segment(self.generation_prompt))
        return segs


TEMPLATES: Registry[ChatTemplate] = Registry("chat template")


def _add(t: ChatTemplate, doc: str) -> None:
    TEMPLATES.register(t.name, doc)(lambda: t)


_add(ChatTemplate("vlmkit", user=("<|user|>\n", "<|end|>\n"), assistant=("<|assistant|>\n", "<|end|>\n"),
                  system=("<|system|>\n", "<|end|>\n"), generation_prompt="<|assistant|>\n"),
     "vlmkit's own template, used by models trained from scratch")
_add(ChatTemplate("llava-1.5", user=("USER: ", " "), assistant=("ASSISTANT: ", "</s>"), system=("", " "),
                  generation_prompt="ASSISTANT:"),
     "LLaVA-1.5 (Vicuna v1) as in llava-hf checkpoints")
_add(ChatTemplate("idefics3", user=("User:", "<end_of_utterance>\n"), assistant=("Assistant:", "<end_of_utterance>\n"),
                  system=("System:", "<end_of_utterance>\n"), generation_prompt="Assistant:"),
     "Idefics3 / SmolVLM")


def normalize_messages(conversations: list, where: str) -> list[dict]:
    """Accept LLaVA turns ({"from", "value"}) or OpenAI-style ({"role", "content"}); check they are usable."""
    if not isinstance(conversations, list) or not conversations:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of turns")
    out = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: turn {i} must be an object with 'from' and 'value'")
        role = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        if role not in ROLE_ALIASES:
            raise DataError(f"{where}: turn {i} has role {role!r}; valid: human, gpt, user, assistant, system")
        if not isinstance(content, str):
            raise DataError(f"{where}: turn {i} needs a text 'value', got {type(content).__name__}")
        out.append({"role": ROLE_ALIASES[role], "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: the conversation has no assistant ('gpt') turn to learn from")
    return out
