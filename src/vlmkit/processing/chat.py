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


def render_jinja(template: str, question: str, n_images: int, image_token: str, tokenizer) -> str:
    """One user turn through a transformers-format Jinja chat template, with the generation prompt.

    The content is a list of parts as transformers' processors pass it: ``{"type": "image"}`` where the
    question has an image placeholder (all images first when it has none), ``{"type": "text"}`` between.
    Rendered in a sandbox with the options and helpers transformers uses (trim_blocks, lstrip_blocks,
    ``raise_exception``, ``tojson``), so a template renders the same text here as there."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    class Generation(Extension):  # {% generation %}...{% endgeneration %} marks assistant text: render it
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    pieces = question.split(image_token)
    content: list[dict] = []
    if len(pieces) == 1:
        content += [{"type": "image"}] * n_images
    for i, piece in enumerate(pieces):
        if i:
            content.append({"type": "image"})
        if piece:
            content.append({"type": "text", "text": piece})
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **kw: __import__("json").dumps(x, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: __import__("datetime").datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(
            messages=[{"role": "user", "content": content}], add_generation_prompt=True,
            bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token)
    except jinja2.exceptions.TemplateError as e:
        raise DataError(f"the chat template failed on this prompt: {e}") from e


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
