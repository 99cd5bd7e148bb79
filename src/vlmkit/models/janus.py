"""Janus (Wu et al. 2024; Janus-Pro, Chen et al. 2025): one decoder LM with decoupled visual paths. Understanding
reads images as a LLaVA does (a tower -> an aligner MLP -> features spliced at the image placeholders); generation
writes VQ codes: each code enters the LM through the generation embeddings and their aligner MLP, and the next
code is predicted by a generation head of its own, not the LM head. The VQ tokenizer (models/vq.py) turns an image
into codes for training and codes back into pixels.

Ids: the LM's vocabulary is the text's, ``[0, V)``; code ``k`` is the model id ``V + k`` (:meth:`code_ids`), which
:meth:`embed` sends through the generation path. ``forward(batch, head="image")`` gives the generation head's
logits, one column per code (``image_vocab``: ``V + arange(K)``). With labels the loss is the text head's
cross-entropy on text targets and the generation head's on code targets, reported apart (``ModelOutput.parts``)
so that an objective can weight them (objectives/unified.py).

Module names follow transformers' ``JanusModel`` where its parts are Janus' own (``generation_embeddings``,
``generation_aligner.fc1`` / ``hidden_layers``, ``generation_head.proj_out`` / ``vision_head``), so that an import
maps them by prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.batch import Batch, ModelOutput
from vlmkit.config import VLMConfig
from vlmkit.connectors import build_connector
from vlmkit.errors import ConfigError
from vlmkit.lm.decoder import DecoderLM
from vlmkit.models.init import build_tower, check_head_init, init_from_scratch
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.models.vq import VQConfig, VQModel, build_vq
from vlmkit.nn import KVCache, activation, init_linear_

HEADS = ("text", "image")
POS_EMBEDS = ("none", "grid")


@dataclass
class JanusGenConfig:
    """Janus' generation path: the VQ tokenizer, the code embeddings and their aligner, the generation head."""

    vq: VQConfig = field(default_factory=VQConfig)
    # a vlmkit VQ checkpoint (``vlmkit train tiny-vq``'s final folder) whose config and weights a from-scratch model
    # takes for its tokenizer (the generation embeddings start at its codebook); "": the ``vq`` config, untrained
    vq_from: str = ""
    embed_dim: int = 0  # the generation embeddings' width (transformers: vq_config.embed_dim); 0 = the VQ's code_dim
    aligner_depth: int = 2  # Linear layers of the generation aligner (vq_config.num_hidden_layers)
    projection_dim: int = 0  # the aligner's and the head's hidden width (vq_config.projection_dim); 0 = the LM's
    act: str = "gelu"  # vq_config.hidden_act
    # "grid": learned row and column embeddings added to each code's input, at its place in the image (DALL-E's
    # row and column embeddings), so that a small LM knows where in the image it writes; "none": Janus' own (the
    # LM's RoPE positions only)
    pos_embed: str = "none"


@dataclass
class JanusConfig(VLMConfig):
    """A Janus model: VLMConfig's understanding parts (tower, connector = the aligner, LM) and the generation path."""

    family: str = "janus"
    gen: JanusGenConfig = field(default_factory=JanusGenConfig)

    def __post_init__(self):
        if self.gen.pos_embed not in POS_EMBEDS:
            raise ConfigError(f"model.gen.pos_embed must be one of {', '.join(POS_EMBEDS)}, got {self.gen.pos_embed!r}")
        if self.gen.aligner_depth < 1:
            raise ConfigError(f"model.gen.aligner_depth must be >= 1, got {self.gen.aligner_depth}")


class GenerationAligner(nn.Module):
    """fc1, then (activation, Linear) x (depth - 1): code embeddings -> the LM's width."""

    def __init__(self, cin: int, width: int, depth: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(cin, width)
        self.hidden_layers = nn.ModuleList([nn.Linear(width, width) for _ in range(depth - 1)])
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        for layer in self.hidden_layers:
            x = layer(self.act(x))
        return x


class GenerationHead(nn.Module):
    """proj_out, activation, vision_head: LM states -> logits over the codebook."""

    def __init__(self, width: int, hidden: int, codes: int, act: str):
        super().__init__()
        self.proj_out = nn.Linear(width, hidden)
        self.act = activation(act)
        self.vision_head = nn.Linear(hidden, codes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vision_head(self.act(self.proj_out(x)))


class JanusModel(VisionLanguageModel):
    """Understanding as VisionLanguageModel; generation through its own embeddings and head (module docstring)."""

    def __init__(self, encoder, connector, lm, image_token_id: int, cfg: JanusConfig, vq: VQModel):
        super().__init__(encoder, connector, lm, image_token_id)
        g, width = cfg.gen, cfg.lm.width
        hidden = g.projection_dim or width
        self.vocab_size = cfg.lm.vocab_size
        self.vqmodel = vq
        self.generation_embeddings = nn.Embedding(vq.codebook_size, g.embed_dim or vq.cfg.code_dim)
        self.generation_aligner = GenerationAligner(g.embed_dim or vq.cfg.code_dim, hidden, g.aligner_depth, g.act)
        self.generation_head = GenerationHead(width, hidden, vq.codebook_size, g.act)
        if g.pos_embed == "grid":
            h, w = vq.grid
            self.generation_rows, self.generation_cols = nn.Embedding(h, width), nn.Embedding(w, width)

    # ------------------------------------------------------------------------------ the image-generation interface
    @property
    def image_grid(self) -> tuple[int, int]:
        return self.vqmodel.grid

    def image_plan(self, h: int, w: int) -> list[int | None]:
        """Janus writes the codes alone, row by row (no row or image end)."""
        return [None] * (h * w)

    @property
    def codebook_size(self) -> int:
        return self.vqmodel.codebook_size

    def code_ids(self, codes: torch.Tensor) -> torch.Tensor:
        return codes + self.vocab_size

    @property
    def image_vocab(self) -> torch.Tensor:
        return torch.arange(self.vqmodel.codebook_size) + self.vocab_size

    def encode_codes(self, pixels) -> torch.Tensor:
        """Images [n, 3, H, W], or the processor's MediaInputs of them -> code ids [n, h, w]."""
        return self.vqmodel.encode_codes(pixels)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.vqmodel.decode_codes(codes)

    @property
    def reserved_token_ids(self) -> tuple[int, ...]:
        """The image placeholder; codes are outside the text head's columns, so text generation never writes one."""
        return (self.image_token_id,)

    def module_groups(self) -> dict[str, nn.Module]:
        """Understanding's groups, the generation path (``generation``: embeddings, aligner, head) and the VQ
        tokenizer (``vq``, frozen by the recipes: it is a separate pretrained model, as Janus' LlamaGen VQ)."""
        gen = nn.ModuleList([self.generation_embeddings, self.generation_aligner, self.generation_head,
                             *([self.generation_rows, self.generation_cols] if self._grid_pos else [])])
        return {**super().module_groups(), "generation": gen, "vq": self.vqmodel}

    # ------------------------------------------------------------------------------------------------ the model
    @property
    def _grid_pos(self) -> bool:
        return "generation_rows" in self._modules

    def embed(self, input_ids: torch.Tensor, features, cache: KVCache | None = None) -> torch.Tensor:
        """Text ids and image placeholders as VisionLanguageModel embeds them; ids >= V (codes) through the
        generation embeddings and aligner (plus their row and column embeddings with ``gen.pos_embed`` "grid": a
        code's place is its index in its run of consecutive codes, continued across ``cache``'s decoding steps)."""
        is_code = input_ids >= self.vocab_size
        embeds = super().embed(input_ids.masked_fill(is_code, 0), features)
        # run on an empty selection too (no host sync to ask whether there are codes)
        codes = self.generation_aligner(self.generation_embeddings(input_ids[is_code] - self.vocab_size))
        if self._grid_pos:
            carried = cache.extra.get("code_run") if cache is not None and cache.length else None
            index, run = code_runs(is_code, carried)
            if cache is not None:
                cache.extra["code_run"] = run
            h, w = self.image_grid
            index = index[is_code]
            codes = codes + self.generation_rows((index // w).clamp_max(h - 1)) + self.generation_cols(index % w)
        return embeds.masked_scatter(is_code[..., None], codes.to(embeds.dtype))

    def forward(self, batch: Batch, cache: KVCache | None = None, logits_to_keep: int = 0,
                head: str = "text") -> ModelOutput:
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        features = self.media_features(batch)
        embeds = self.embed(batch.input_ids, features, cache)
        hidden = self.lm(embeds, position_ids=self.positions(batch, features, cache),
                         attention_mask=batch.attention_mask, mask=self.attention(batch, cache), cache=cache)
        if batch.labels is not None:
            return two_head_loss(hidden, batch.labels, self.vocab_size, self.lm.lm_head, self.generation_head)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return ModelOutput(logits=(self.lm.lm_head if head == "text" else self.generation_head)(hidden))


def code_runs(is_code: torch.Tensor, carried: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's index in its run of consecutive codes ([B, T], 0 for other tokens), a run at the start
    continuing the ``carried`` [B] codes of the previous call (a cached decoding step), and the length of the run
    each row ends in [B] (0 when it ends in another token). Packed samples and padding break runs."""
    counted = is_code.long().cumsum(1)
    before = torch.where(is_code, torch.zeros_like(counted), counted).cummax(1).values  # codes before the run
    index = counted - before - 1
    if carried is not None:
        index = index + torch.where((~is_code).long().cumsum(1) == 0, carried[:, None], 0)
    index = index.clamp_min(0) * is_code
    return index, torch.where(is_code[:, -1], index[:, -1] + 1, 0)


def two_head_loss(hidden: torch.Tensor, labels: torch.Tensor, vocab: int, text_head: nn.Module,
                  image_head: nn.Module) -> ModelOutput:
    """Next-token cross-entropy with text targets (< ``vocab``) through ``text_head`` and code targets (>= ``vocab``,
    code = target - vocab) through ``image_head``: the mean over all supervised tokens, and each modality's sum and
    count in ``parts``."""
    targets = labels[:, 1:]
    keep = targets != -100
    h, t = hidden[:, :-1][keep], targets[keep]
    is_code = t >= vocab
    parts = {}
    for name, sel, head, offset in (("text", ~is_code, text_head, 0), ("image", is_code, image_head, vocab)):
        n = int(sel.sum())
        logits = head(h[sel]).float()
        total = F.cross_entropy(logits, t[sel] - offset, reduction="sum") if n else logits.sum() * 0.0
        parts[name] = (total, n)
    n = int(keep.sum())
    loss = (parts["text"][0] + parts["image"][0]) / n if n else hidden.sum() * float("nan")
    return ModelOutput(loss=loss, n_tokens=n, parts=parts)


def build_janus(cfg: JanusConfig, image_token_id: int, init: bool = True) -> JanusModel:
    """The Janus model of ``cfg``: understanding parts as build_vlm's, the VQ tokenizer of ``cfg.gen.vq`` (its weights
    come from ``gen.vq_from`` or a checkpoint), the generation path initialised as the LM's linears."""
    check_head_init(cfg)
    encoder = build_tower(cfg, cfg.family)
    connector = build_connector(cfg.connector, cfg.vision.width, cfg.lm.width)
    model = JanusModel(encoder, connector, DecoderLM(cfg.lm), image_token_id, cfg, build_vq(cfg.gen.vq, init))
    if init and not any(p.is_meta for p in model.parameters()):
        init_from_scratch(model, cfg)
        init_linear_(nn.ModuleList([model.generation_aligner, model.generation_head]))
        nn.init.normal_(model.generation_embeddings.weight, std=1.0)
        if model._grid_pos:
            for table in (model.generation_rows, model.generation_cols):
                nn.init.normal_(table.weight, std=0.02)
    return model


__all__ = ["JanusConfig", "JanusGenConfig", "JanusModel", "build_janus", "code_runs", "two_head_loss"]
