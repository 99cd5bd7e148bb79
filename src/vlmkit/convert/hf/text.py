"""Text-only causal LM folders (``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``,
``GemmaForCausalLM``, ``OPTForCausalLM``, ``PersimmonForCausalLM``, ``PhiForCausalLM``, ``Phi3ForCausalLM``) <->
vlmkit's text family (models/text.py).

The model types are every text LM convert/hf/lm.py reads (``LM_TYPES``: a type added there is read here too) and
the Phi ones of convert/hf/phi.py. The config and key maps are theirs; the processor is the folder's tokenizer and
chat template (processing/text_lm.py). Export writes the model type the folder came from (a Mistral exports as
``MistralForCausalLM``; a model built in vlmkit as the class lm.py picks for its LM), with the tokenizer, its chat
template and a generation_config.json naming the special ids.
"""

from __future__ import annotations

from pathlib import Path

from vlmkit.convert.hf.io import export_table, load_state, read_checkpoint, write_hf_weights, write_json
from vlmkit.convert.hf.lm import (
    LM_TYPES,
    fuse_qkv,
    lm_config_from_hf,
    lm_config_to_hf,
    lm_key_map,
    lm_prefix,
    split_fused_qkv,
    untie_if_head_saved,
)
from vlmkit.convert.hf.phi import (
    PHI_TYPES,
    fuse_phi3,
    phi_config_from_hf,
    phi_config_to_hf,
    phi_key_map,
    split_phi3,
)
from vlmkit.convert.hf.processor import (
    export_tokenizer,
    generation_settings,
    load_hf_tokenizer,
    read_chat_template,
    read_stop_tokens,
)
from vlmkit.errors import ConfigError
from vlmkit.models import build_model
from vlmkit.models.text import TextLM, TextLMConfig
from vlmkit.processing import Processor
from vlmkit.processing.text_lm import TextLMProcessorConfig

TEXT_TYPES = tuple(LM_TYPES) + PHI_TYPES
HEAD = "lm_head.weight"
# model types whose config lm.py writes as another type's (the same function): exported under their own name
SAME_AS = {"mistral": ("llama", "MistralForCausalLM")}


def text_config_from_hf(cfg: dict, where: str = "config.json") -> TextLMConfig:
    kind = cfg.get("model_type")
    if kind not in TEXT_TYPES:
        raise ConfigError(f"{where}: model_type {kind!r} is not a text LM vlmkit imports; supported: "
                          f"{', '.join(TEXT_TYPES)}")
    lm = phi_config_from_hf(cfg, where) if kind in PHI_TYPES else lm_config_from_hf(cfg, where)
    return TextLMConfig(lm=lm, hf_model_type=kind)


def _key_map(cfg: TextLMConfig) -> dict[str, str]:
    prefix = lm_prefix(cfg.lm)
    if cfg.hf_model_type in PHI_TYPES or cfg.lm.parallel_block:
        return phi_key_map(cfg.lm, cfg.hf_model_type or "phi", prefix, HEAD)
    return lm_key_map(cfg.lm, prefix, HEAD)


def load_text_folder(folder: str | Path):
    """(model, config, processor) of a transformers ``*ForCausalLM`` folder."""
    ckpt = read_checkpoint(folder)
    where = str(ckpt.folder / "config.json")
    cfg = text_config_from_hf(ckpt.config, where)
    prefix = lm_prefix(cfg.lm)
    cfg = untie_if_head_saved(cfg, ckpt.tensors, HEAD, f"{prefix}embed_tokens.weight")
    split = split_phi3 if cfg.hf_model_type == "phi3" else split_fused_qkv
    tensors = split(cfg.lm, ckpt.tensors, prefix)
    model: TextLM = build_model(cfg, None, init=False)
    model.name = f"{ckpt.folder} ({cfg.hf_model_type})"
    table = {f"lm.{k}": v for k, v in _key_map(cfg).items()}
    load_state(model, tensors, table, str(ckpt.folder), ignore=(HEAD,) if cfg.lm.tie_embeddings else ())
    if cfg.lm.tie_embeddings:
        model.lm.lm_head.weight = model.lm.embed_tokens.weight
    tok = load_hf_tokenizer(ckpt.folder)
    pcfg = TextLMProcessorConfig(max_length=cfg.lm.max_seq_len, chat_template_jinja=read_chat_template(ckpt.folder),
                                 pad_token=tok.pad_token, eos_token=tok.eos_token, bos_token=tok.bos_token or "",
                                 stop_tokens=read_stop_tokens(ckpt.folder, tok), source=model.name)
    return model.eval(), cfg, Processor(pcfg, tok)


# ---------------------------------------------------------------------------------------------- export


def text_config_to_hf(cfg: TextLMConfig) -> dict:
    """The config.json of the transformers class that computes ``cfg``'s LM: its own model type's when it came
    from one, else the one lm.py picks; what that class cannot express is refused by field."""
    kind = cfg.hf_model_type or ("phi" if cfg.lm.parallel_block else "")
    if kind in PHI_TYPES:
        return phi_config_to_hf(cfg.lm, kind, "lm")
    out = lm_config_to_hf(cfg.lm, "lm")
    if kind in SAME_AS and out["model_type"] == SAME_AS[kind][0]:
        out |= {"model_type": kind, "architectures": [SAME_AS[kind][1]], "sliding_window": None}
    return out


def export_text(model: TextLM, cfg: TextLMConfig, processor: Processor, folder: Path) -> None:
    """A text LM -> a folder that transformers' AutoModelForCausalLM (the class of its config.json) and
    AutoTokenizer load with the same numbers and ids. The config is built first: an LM no class expresses leaves
    no weights behind."""
    config = text_config_to_hf(cfg)
    prefix = lm_prefix(cfg.lm)
    tensors = export_table(model.lm, _key_map(cfg))
    if cfg.hf_model_type == "phi3":
        tensors = fuse_phi3(cfg.lm, tensors, prefix)
    elif not (cfg.hf_model_type in PHI_TYPES or cfg.lm.parallel_block):
        tensors = fuse_qkv(cfg.lm, tensors, prefix)
    tok = processor.tokenizer
    special = {"eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id, "bos_token_id": tok.bos_id}
    write_hf_weights(folder, tensors)
    write_json(folder / "config.json", config | special)
    write_json(folder / "generation_config.json", generation_settings(special, processor))
    export_tokenizer(processor, folder)


def export_class(cfg: TextLMConfig) -> str:
    """The transformers class an export of ``cfg`` loads in ("" when none expresses it)."""
    try:
        return text_config_to_hf(cfg)["architectures"][0]
    except ConfigError:
        return ""


__all__ = ["TEXT_TYPES", "export_class", "export_text", "load_text_folder", "text_config_from_hf",
           "text_config_to_hf"]
