"""CLIP (``CLIPModel``, model_type ``clip``) and SigLIP (``SiglipModel``, model_type ``siglip``) <-> vlmkit's
:class:`~vlmkit.models.dual_encoder.DualEncoder` (families ``clip`` and ``siglip``), with their processors.

=========================  ==============================================  =====================================
transformers               CLIP                                            SigLIP
=========================  ==============================================  =====================================
image tower                ``vision_model.*`` -> ``vision.encoder.*``      the same (no class token, patch bias)
image pooling              ``post_layernorm`` on the class token           ``vision_model.head.*`` -> ``vision.head.*``
image projection           ``visual_projection`` -> ``vision.proj``        none
text tower                 ``text_model.*`` -> ``text.*`` (causal)         the same, attending both ways
text pooling               first ``eos_token_id``; the highest id when     the last position (texts padded to the
                           eos_token_id is the legacy 2 (``argmax``)       context, ``padding="max_length"``)
text projection            ``text_projection`` -> ``text.proj``            ``text_model.head`` -> ``text.proj``
logits                     ``logit_scale`` -> ``logits.scale``             and ``logit_bias`` -> ``logits.bias``
tokenizer                  tokenizer.json (CLIPTokenizer)                  spiece.model (SiglipTokenizer),
                                                                           converted at import
=========================  ==============================================  =====================================

Tower-only folders (``clip_vision_model``, ``siglip_vision_model``) are not dual encoders: they load as towers
with :func:`~vlmkit.convert.hf.vision.load_hf_vision`, which also reads the tower out of a dual encoder's folder.

Export writes what ``CLIPModel`` / ``SiglipModel`` and their processors load. A CLIP text config whose
``eos_token_id`` is 2 makes transformers pool the highest token id instead of the end-of-text token (configs
from before transformers PR #24773); a vlmkit tokenizer whose end-of-text token has id 2 is therefore exported
with ids 2 and the tokenizer's last id exchanged, in the tokenizer and the token embedding alike: the model
computes the same function of the text, its end-of-text id is not 2, and it is the highest id, so both pooling
rules (transformers' first end-of-text and open_clip's argmax) read the same position.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from vlmkit.convert.hf.io import export_table, load_state, read_checkpoint, write_hf_weights, write_json
from vlmkit.convert.hf.processor import (export_text_tokenizer, image_processor_from_hf, image_processor_to_hf,
                                         load_hf_text_tokenizer, read_image_processor)
from vlmkit.convert.hf.vision import (HF_VISION_ACTS, VISION_ACTS, block_key_map, export_vision_tensors,
                                      vision_config_from_hf, vision_config_to_hf, vision_key_map)
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models import build_model
from vlmkit.models.dual_encoder import ContrastiveConfig, DualEncoderConfig, TextConfig, DualEncoder
from vlmkit.processing.text import TextProcessorConfig
from vlmkit.processing import Processor

KINDS = {"clip": "CLIPModel", "siglip": "SiglipModel"}
LEGACY_CLIP_EOS = 2  # transformers' CLIPTextModel pools argmax(input_ids) when text_config.eos_token_id == 2

# transformers' defaults for keys a config.json may leave out
TEXT_DEFAULTS = {
    "clip": dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                 eos_token_id=49407),
    "siglip": dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
                   layer_norm_eps=1e-6),
}
VISION_DEFAULTS = {
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                   vision_use_head=True),
}


def _sub_config(cfg: dict, name: str, defaults: dict) -> dict:
    """``text_config`` / ``vision_config`` over transformers' defaults. Old CLIP configs may also carry a
    ``text_config_dict`` / ``vision_config_dict``, which transformers reads instead (over the defaults)."""
    legacy = cfg.get(f"{name}_dict")
    return {**defaults, **(cfg.get(name) or {}), **({**defaults, **legacy} if legacy else {})}


def dual_encoder_config_from_hf(cfg: dict, where: str = "config.json") -> DualEncoderConfig:
    """A CLIPModel or SiglipModel config -> DualEncoderConfig (family ``clip`` / ``siglip``). What vlmkit's
    DualEncoder cannot compute is refused by key."""
    kind = cfg.get("model_type")
    if kind not in KINDS:
        raise ConfigError(f"{where}: model_type {kind!r} is not a dual encoder vlmkit imports; supported: "
                          f"{', '.join(KINDS)} (tower-only folders load with load_hf_vision)")
    text = _sub_config(cfg, "text_config", TEXT_DEFAULTS[kind])
    vision_cfg = _sub_config(cfg, "vision_config", VISION_DEFAULTS[kind])
    if kind == "siglip" and not vision_cfg.get("vision_use_head", True):
        raise ConfigError(f"{where}: vision_config.vision_use_head false: this SigLIP has no attention-pooling head "
                          f"and no pooled image embedding; vlmkit pools with the head only (vision_use_head: true)")
    vision_cfg["model_type"] = f"{kind}_vision_model"
    vision = vision_config_from_hf(vision_cfg, -1, f"{where} (vision_config)")
    # the dual encoder pools the last layer after the final norm (CLIP: post_layernorm on the class token)
    vision = dataclasses.replace(vision, feature_layer=-1, post_norm=True, drop_class_token=False)
    act = text["hidden_act"]
    if act not in VISION_ACTS:
        raise ConfigError(f"{where}: text_config.hidden_act {act!r} is not implemented; supported: "
                          f"{', '.join(VISION_ACTS)}")
    try:
        width = int(text["hidden_size"])
        tcfg = dict(vocab_size=int(text["vocab_size"]), width=width, depth=int(text["num_hidden_layers"]),
                    heads=int(text["num_attention_heads"]), mlp_dim=int(text["intermediate_size"]),
                    act=VISION_ACTS[act], norm_eps=float(text["layer_norm_eps"]),
                    context_length=int(text["max_position_embeddings"]))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: text_config: {e}") from e
    if kind == "clip":
        eos = text.get("eos_token_id")
        if isinstance(eos, list):
            if len(eos) != 1:
                raise ConfigError(f"{where}: text_config.eos_token_id {eos}: CLIP pools the first end-of-text token; "
                                  f"give one id")
            eos = eos[0]
        if not isinstance(eos, int):
            raise ConfigError(f"{where}: text_config.eos_token_id {eos!r}: expected the end-of-text token id")
        pool = "argmax" if eos == LEGACY_CLIP_EOS else "eos"
        text_config = TextConfig(**tcfg, causal=True, pool=pool, eos_token_id=eos)
        embed = int(cfg.get("projection_dim", 512))
        contrastive = ContrastiveConfig(embed_dim=embed, image_pool="class_token", projection="clip", loss="clip",
                                        logit_scale_init=float(cfg.get("logit_scale_init_value", 2.6592)))
    else:
        embed = int(text.get("projection_size") or width)
        if embed != vision.width:
            raise ConfigError(f"{where}: text_config.projection_size {embed} must equal vision_config.hidden_size "
                              f"{vision.width}: SigLIP compares the text projection with the pooled image features")
        # SigLIP reads the last position; the end-of-text id is the tokenizer's (set on loading the folder)
        text_config = TextConfig(**tcfg, causal=False, pool="last", eos_token_id=1)
        contrastive = ContrastiveConfig(embed_dim=embed, image_pool="map", projection="siglip", loss="siglip",
                                        logit_scale_init=math.log(10.0), logit_bias_init=-10.0, max_logit_scale=0.0)
    return DualEncoderConfig(family=kind, vision=vision, text=text_config, contrastive=contrastive, image_token="")


def dual_encoder_key_map(cfg: DualEncoderConfig) -> dict[str, str]:
    """vlmkit DualEncoder parameter name -> transformers CLIPModel / SiglipModel tensor name."""
    table = {f"vision.encoder.{k}": v for k, v in vision_key_map(cfg.vision, "vision_model.").items()}
    t = "text_model."
    table["text.token_embed.weight"] = f"{t}embeddings.token_embedding.weight"
    table["text.pos_embed"] = f"{t}embeddings.position_embedding.weight"
    for i in range(cfg.text.depth):
        table |= block_key_map(f"text.blocks.{i}.", f"{t}encoder.layers.{i}.")
    table |= {f"text.norm.{w}": f"{t}final_layer_norm.{w}" for w in ("weight", "bias")}
    table["logits.scale"] = "logit_scale"
    if cfg.family == "clip":
        table["vision.proj.weight"] = "visual_projection.weight"
        table["text.proj.weight"] = "text_projection.weight"
        return table
    h = "vision_model.head."
    table["vision.head.probe"] = f"{h}probe"
    for w in ("weight", "bias"):
        table[f"vision.head.attention.in_proj_{w}"] = f"{h}attention.in_proj_{w}"
        table[f"vision.head.attention.out_proj.{w}"] = f"{h}attention.out_proj.{w}"
        table[f"vision.head.norm.{w}"] = f"{h}layernorm.{w}"
        table[f"vision.head.mlp.fc1.{w}"] = f"{h}mlp.fc1.{w}"
        table[f"vision.head.mlp.fc2.{w}"] = f"{h}mlp.fc2.{w}"
        table[f"text.proj.{w}"] = f"{t}head.{w}"
    table["logits.bias"] = "logit_bias"
    return table


def load_dual_encoder_weights(model: DualEncoder, tensors: dict, cfg: DualEncoderConfig, where: str) -> None:
    """Copy a CLIPModel / SiglipModel state into ``model``: the class token ([D]), image positions ([N, D]) and
    SigLIP's logit scale and bias ([1]) reshaped to vlmkit's, saved position ids dropped."""
    table = dual_encoder_key_map(cfg)
    t = {k: v for k, v in tensors.items() if not k.endswith("embeddings.position_ids")}
    reshape = {"vision.encoder.class_token": (1, (1, 1, -1)),
               "vision.encoder.pos_embed": (2, (1, -1, cfg.vision.width)),
               "logits.scale": (1, ()), "logits.bias": (1, ())}
    for ours, (ndim, shape) in reshape.items():
        theirs = table.get(ours)
        if theirs in t and t[theirs].ndim == ndim and (shape or t[theirs].numel() == 1):
            t[theirs] = t[theirs].reshape(shape)  # anything else fails load_state's shape check by name
    load_state(model, t, table, where)


def load_dual_encoder_processor(folder: Path, cfg: DualEncoderConfig) -> Processor:
    """The folder's tokenizer and image processor as a dual encoder's Processor: texts cut to the text tower's
    context; CLIP pads a batch to its longest text (CLIPProcessor with ``padding=True``), SigLIP every text to
    the context (``padding="max_length"``, as it was trained)."""
    tok = load_hf_text_tokenizer(folder)
    if tok.vocab_size > cfg.text.vocab_size:
        raise CheckpointError(f"{folder}: the tokenizer has {tok.vocab_size} tokens, the text tower embeds "
                              f"{cfg.text.vocab_size} (text_config.vocab_size)")
    if cfg.text.pool == "eos" and tok.eos_id != cfg.text.eos_token_id:
        raise CheckpointError(f"{folder}: config.json text_config.eos_token_id {cfg.text.eos_token_id} is not the "
                              f"tokenizer's end-of-text token {tok.eos_token!r} (id {tok.eos_id}), where CLIP reads "
                              f"each text; transformers would pool another position")
    settings, path = read_image_processor(folder)
    images = image_processor_from_hf(settings, str(path))
    if tuple(images["image_size"]) != tuple(cfg.vision.image_size):
        raise ConfigError(f"{path}: the image processor gives {tuple(images['image_size'])} images, the vision tower "
                          f"takes {tuple(cfg.vision.image_size)} (vision_config.image_size)")
    pcfg = TextProcessorConfig(family=cfg.family, image_token="", image_seq_len=0, max_length=cfg.text.context_length, text_mode="whole",
                           text_padding="max_length" if cfg.family == "siglip" else "longest",
                           pad_token=tok.pad_token, eos_token=tok.eos_token, bos_token=tok.bos_token or "", **images)
    return Processor(pcfg, tok)


def load_dual_encoder_folder(folder: Path):
    """(DualEncoder in eval mode, DualEncoderConfig, Processor) of a CLIPModel / SiglipModel folder."""
    ckpt = read_checkpoint(folder)
    where = str(ckpt.folder / "config.json")
    cfg = dual_encoder_config_from_hf(ckpt.config, where)
    processor = load_dual_encoder_processor(ckpt.folder, cfg)
    if cfg.text.pool != "eos":  # the text tower does not read it (a legacy CLIP's 2 is not it): the tokenizer's
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, eos_token_id=processor.tokenizer.eos_id))
    model = build_model(cfg, None, init=False)
    load_dual_encoder_weights(model, ckpt.tensors, cfg, str(ckpt.folder))
    return model.eval(), cfg, processor


def load_hf_dual_encoder(folder: str | Path) -> DualEncoder:
    """A transformers CLIPModel / SiglipModel folder -> DualEncoder (eval mode)."""
    return load_dual_encoder_folder(Path(folder))[0]


# ---------------------------------------------------------------------------------------------- export


def _check_exportable(cfg: DualEncoderConfig) -> None:
    kind, c, text, vision = cfg.family, cfg.contrastive, cfg.text, cfg.vision
    if kind not in KINDS:
        raise ConfigError(f"family {kind!r} is not a dual encoder; exportable as CLIPModel / SiglipModel: clip, "
                          f"siglip")
    cls = KINDS[kind]
    clip = kind == "clip"
    want = {"contrastive.image_pool": (c.image_pool, "class_token" if clip else "map"),
            "contrastive.projection": (c.projection, kind),
            "vision.class_token": (vision.class_token, clip),
            "text.causal": (text.causal, clip)}
    problems = [f"{k} {v!r} ({cls} has {ok!r})" for k, (v, ok) in want.items() if v != ok]
    if clip and text.pool not in ("eos", "argmax"):
        problems.append(f"text.pool {text.pool!r} (CLIPModel reads the end-of-text token: 'eos', or 'argmax')")
    if not clip and text.pool != "last":
        problems.append(f"text.pool {text.pool!r} (SiglipModel reads the last position: 'last')")
    if clip and c.loss == "siglip":
        problems.append("contrastive.loss 'siglip', which gives the model a learned logit bias (CLIPModel has none: "
                        "'clip')")
    if not clip and c.embed_dim != vision.width:
        problems.append(f"contrastive.embed_dim {c.embed_dim} (SiglipModel's text projection_size is the vision "
                        f"width {vision.width})")
    if text.act not in HF_VISION_ACTS:
        problems.append(f"text.act {text.act!r} (exportable: {', '.join(HF_VISION_ACTS)})")
    if problems:
        raise ConfigError(f"not expressible as a transformers {cls}: {'; '.join(problems)}")


def dual_encoder_config_to_hf(cfg: DualEncoderConfig, special_ids: dict | None = None) -> dict:
    """DualEncoderConfig -> CLIPConfig / SiglipConfig's config.json. ``special_ids`` (``eos_token_id``,
    ``bos_token_id``, ``pad_token_id``: the exported tokenizer's) go into the text config; by default the text
    tower's ``eos_token_id``. A CLIP text tower pooling ``argmax`` is written with the legacy eos_token_id 2,
    which is what makes transformers pool that way; one pooling ``eos`` must not have end-of-text id 2 (see
    :func:`clip_eos_swap`)."""
    _check_exportable(cfg)
    kind, text = cfg.family, cfg.text
    ids = {"eos_token_id": text.eos_token_id, **(special_ids or {})}
    if kind == "clip":
        if text.pool == "argmax":
            ids["eos_token_id"] = LEGACY_CLIP_EOS
        elif ids["eos_token_id"] == LEGACY_CLIP_EOS:
            raise ConfigError("text.eos_token_id 2 with text.pool 'eos': transformers reads a CLIP text config whose "
                              "eos_token_id is 2 as a legacy one and pools the highest token id instead; export "
                              "renumbers the tokenizer (clip_eos_swap)")
    vision = vision_config_to_hf(cfg.vision, "vision")
    out_text = {"model_type": f"{kind}_text_model", "vocab_size": text.vocab_size, "hidden_size": text.width,
                "intermediate_size": text.mlp_dim, "num_hidden_layers": text.depth, "num_attention_heads": text.heads,
                "max_position_embeddings": text.context_length, "hidden_act": HF_VISION_ACTS[text.act],
                "layer_norm_eps": text.norm_eps, **ids}
    if kind == "clip":
        e = cfg.contrastive.embed_dim
        return {"model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": e,
                "logit_scale_init_value": cfg.contrastive.logit_scale_init,
                "text_config": {**out_text, "projection_dim": e}, "vision_config": {**vision, "projection_dim": e},
                "torch_dtype": "float32"}
    return {"model_type": "siglip", "architectures": ["SiglipModel"],
            "text_config": {**out_text, "projection_size": cfg.contrastive.embed_dim},
            "vision_config": {**vision, "vision_use_head": True}, "torch_dtype": "float32"}


def clip_eos_swap(cfg: DualEncoderConfig, processor: Processor) -> tuple[int, int] | None:
    """The token ids to exchange when exporting a CLIP whose end-of-text id is 2 (vlmkit's BPE tokenizers put
    ``</s>`` there): 2 and the tokenizer's last id, so that the exported end-of-text id is not the legacy 2 and
    is the highest id. None when no renumbering is needed."""
    if cfg.family != "clip" or cfg.text.pool != "eos" or cfg.text.eos_token_id != LEGACY_CLIP_EOS:
        return None
    last = processor.tokenizer.vocab_size - 1
    if last <= LEGACY_CLIP_EOS or last >= cfg.text.vocab_size:
        raise ConfigError(f"text.eos_token_id 2: exporting renumbers the end-of-text token to the tokenizer's last id "
                          f"{last}, which the text tower's {cfg.text.vocab_size} embeddings must hold")
    return LEGACY_CLIP_EOS, last


def export_dual_encoder_tensors(model: DualEncoder, cfg: DualEncoderConfig, swap: tuple[int, int] | None = None) -> dict:
    """The model's tensors under CLIPModel / SiglipModel's names and shapes (token embedding rows exchanged by
    ``swap``)."""
    table = dual_encoder_key_map(cfg)
    vision = {k: v for k, v in table.items() if k.startswith("vision.encoder.")}
    tensors = export_table(model, {k: v for k, v in table.items() if k not in vision})
    tensors |= export_vision_tensors(model.vision.encoder, cfg.vision, "vision_model.")
    if cfg.family == "siglip":
        tensors["logit_scale"] = tensors["logit_scale"].reshape(1)
        tensors["logit_bias"] = tensors["logit_bias"].reshape(1)
    if swap is not None:
        name = table["text.token_embed.weight"]
        emb = tensors[name].detach().clone()
        emb[[swap[0], swap[1]]] = emb[[swap[1], swap[0]]]
        tensors[name] = emb
    return tensors


def export_dual_encoder(model: DualEncoder, cfg: DualEncoderConfig, processor: Processor, folder: Path) -> None:
    """A DualEncoder -> a folder that transformers' CLIPModel / SiglipModel and AutoProcessor (CLIPProcessor /
    SiglipProcessor) load: config.json, model.safetensors, tokenizer files, preprocessor_config.json."""
    _check_exportable(cfg)
    if processor.cfg.image_token:
        raise ConfigError(f"processor image_token {processor.cfg.image_token!r}: a dual encoder's processor has "
                          f"none (image_token: \"\")")
    swap = clip_eos_swap(cfg, processor)
    tok = processor.tokenizer

    def renumber(i):
        return None if i is None else swap[1] if swap and i == swap[0] else swap[0] if swap and i == swap[1] else i

    ids = {"eos_token_id": renumber(cfg.text.eos_token_id), "bos_token_id": renumber(tok.bos_id),
           "pad_token_id": renumber(tok.pad_id)}
    config = dual_encoder_config_to_hf(cfg, ids)
    write_hf_weights(folder, export_dual_encoder_tensors(model, cfg, swap))
    write_json(folder / "config.json", config)
    clip = cfg.family == "clip"
    proc_class = "CLIPProcessor" if clip else "SiglipProcessor"
    images = image_processor_to_hf(processor.cfg, "CLIPImageProcessor" if clip else "SiglipImageProcessor")
    write_json(folder / "preprocessor_config.json", {**images, "processor_class": proc_class})
    if clip:
        export_text_tokenizer(processor, folder, _clip_tokenizer_class(tok), swap, processor_class=proc_class)
    else:  # SigLIP's text tower attends over its padding: the tokenizer returns no attention mask
        export_text_tokenizer(processor, folder, "PreTrainedTokenizerFast", None, processor_class=proc_class,
                              model_input_names=["input_ids"])


def _clip_tokenizer_class(tok) -> str:
    """CLIPTokenizer for CLIP's own tokenizer (its BPE marks word ends with "</w>", which its decode removes), the
    generic fast tokenizer for any other (a vlmkit byte-level BPE, which CLIPTokenizer would rebuild as CLIP's)."""
    model = json.loads(tok.tok.to_str()).get("model") or {}
    clip_like = (model.get("type") == "BPE" and model.get("end_of_word_suffix") == "</w>"
                 and (tok.bos_token, tok.eos_token) == ("<|startoftext|>", "<|endoftext|>"))
    return "CLIPTokenizer" if clip_like else "PreTrainedTokenizerFast"


