"""Chat templates as code: a conversation becomes text segments, each marked trainable or not.

Tokenising segment by segment gives an exact label mask (only assistant replies and their end marker are
trained) and the same token boundaries in training, evaluation and serving.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
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

    def to_jinja(self, image_token: str) -> str:
        """The same template in transformers' Jinja format, for exported checkpoints: string contents render
        as they are; a list of parts renders each image as ``image_token`` and a newline (as vlmkit's chat()
        puts images before a question) and each text as it is."""
        def q(text: str) -> str:
            return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"

        content = ("{% if message['content'] is string %}{{ message['content'] }}{% else %}"
                   "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ " + q(image_token + "\n")
                   + " }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}")
        roles = []
        for i, (role, (open_, close)) in enumerate((("user", self.user), ("assistant", self.assistant),
                                                    ("system", self.system))):
            roles.append(("{% if " if i == 0 else "{% elif ") + f"message['role'] == '{role}' %}}"
                         f"{{{{ {q(open_)} }}}}{content}{{{{ {q(close)} }}}}")
        return ("{% for message in messages %}" + "".join(roles) + "{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ " + q(self.generation_prompt) + " }}{% endif %}")


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


DATA_PLACEHOLDER = "<image>"  # where an image goes in LLaVA-format conversations and vlmkit questions


class JinjaTemplate:
    """A chat template in transformers' Jinja format (an imported folder's), rendered as transformers does.

    Messages are given with string contents in which image placeholders (``<image>``, and the family's own
    image token) mark the images; they reach the template as transformers' processors pass them, lists of
    parts: ``{"type": "image"}`` at each placeholder, ``{"type": "text", "text": ...}`` between. A newline right
    after a placeholder goes with it: LLaVA-format data writes ``"<image>\nquestion"`` for an image on its own
    line, and templates write their own separators after an image. Rendered in a sandbox with the options and
    helpers transformers uses (trim_blocks, lstrip_blocks, ``raise_exception``, ``tojson``, ``strftime_now``,
    ``{% generation %}``)."""

    def __init__(self, source: str, image_token: str, bos_token: str | None, eos_token: str):
        import jinja2
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        tracked: list = []  # while render_with_spans runs: [chunks rendered so far, spans found]

        class Generation(Extension):  # {% generation %}...{% endgeneration %} marks assistant text
            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
                return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

            def _body(self, caller):
                text = caller()
                if tracked:  # the text before this block has been yielded (generate() renders lazily)
                    start = len("".join(tracked[0]))
                    tracked[1].append((start, start + len(text)))
                return text

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[Generation, "jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        self._error = jinja2.exceptions.TemplateError
        try:
            self.template = env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise DataError(f"the chat template is not valid Jinja: {e}") from e
        self._tracked = tracked
        self.marks_generation = "generation" in source and "endgeneration" in source
        self.placeholders = sorted({DATA_PLACEHOLDER, image_token}, key=len, reverse=True)
        self.bos_token, self.eos_token = bos_token or "", eos_token

    def parts(self, content: str, images_first: int = 0) -> list[dict]:
        """A message's text -> transformers' content parts; ``images_first`` images go before a text that has no
        placeholder (vlmkit's chat() puts them there)."""
        pattern = "|".join(re.escape(p) + "\n?" for p in self.placeholders)
        pieces = re.split(pattern, content)
        out: list[dict] = [{"type": "image"}] * (images_first if len(pieces) == 1 else 0)
        for i, piece in enumerate(pieces):
            if i:
                out.append({"type": "image"})
            if piece:
                out.append({"type": "text", "text": piece})
        return out

    def render(self, messages: list[dict], add_generation_prompt: bool = False, images_first: int = 0) -> str:
        """messages [{"role", "content": str}] -> the template's text."""
        return "".join(self._generate(messages, add_generation_prompt, images_first))

    def _generate(self, messages: list[dict], add_generation_prompt: bool = False, images_first: int = 0):
        msgs = [{"role": m["role"], "content": self.parts(m["content"], images_first if m["role"] == "user" else 0)}
                for m in messages]
        try:
            yield from self.template.generate(messages=msgs, add_generation_prompt=add_generation_prompt,
                                              bos_token=self.bos_token, eos_token=self.eos_token)
        except self._error as e:
            raise DataError(f"the chat template failed on this conversation: {e}") from e

    def render_with_spans(self, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
        """The whole conversation's text and the character spans of the assistant replies. A template that
        marks them with ``{% generation %}`` says where they are (transformers' assistant mask); otherwise each
        reply is what the template adds to the conversation before it (with the generation prompt) to write
        the reply and its end-of-turn markup, and a template whose earlier text changes when a turn is added
        cannot be split that way and is refused. An EOS a template writes only after a conversation's last turn
        (Phi-3's, without a generation prompt) belongs to the last reply alone."""
        if self.marks_generation:
            chunks: list[str] = []
            self._tracked[:] = [chunks, []]
            try:
                for chunk in self._generate(messages):
                    chunks.append(chunk)
                return "".join(chunks), self._tracked[1]
            finally:
                self._tracked.clear()
        text = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[:i + 1])
            end = len(upto)
            eos = self.eos_token
            if eos and not text.startswith(upto) and upto.endswith(eos) and text.endswith(eos):
                end -= len(eos)  # the EOS after a conversation's last turn only: not part of an earlier reply
            if not (upto.startswith(before) and text.startswith(upto[:end]) and end > len(before)):
                raise DataError(f"{where}: the chat template renders earlier turns differently once turn {i} is "
                                f"added, so the assistant replies cannot be located for the label mask")
            spans.append((len(before), end))
        return text, spans


@functools.lru_cache(maxsize=16)
def jinja_template(source: str, image_token: str, bos_token: str | None, eos_token: str) -> JinjaTemplate:
    """A compiled template, kept: compiling costs more than rendering a prompt (evaluation renders thousands)."""
    return JinjaTemplate(source, image_token, bos_token, eos_token)


def render_jinja(template: str, question: str, n_images: int, image_token: str, tokenizer) -> str:
    """One user turn through a transformers-format Jinja chat template, with the generation prompt; without
    placeholders in the question its ``n_images`` images go first (see :class:`JinjaTemplate`)."""
    t = jinja_template(template, image_token, tokenizer.bos_token, tokenizer.eos_token)
    return t.render([{"role": "user", "content": question}], add_generation_prompt=True, images_first=n_images)


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
