"""The model a recipe trains: built from scratch by its preset's family (with a tokenizer trained on the recipe's
texts), or read from ``init_from`` (a Hugging Face folder or a vlmkit checkpoint), or the run's own checkpoint when
it resumes; then its LoRA adapters, and on resume its weights and random state."""

from __future__ import annotations

import torch
from safetensors.torch import load_model

from vlmkit.checkpoint import load_checkpoint
from vlmkit.config import apply_overrides
from vlmkit.errors import ConfigError
from vlmkit.family import family_of
from vlmkit.nn.lora import apply_lora
from vlmkit.objectives import objective_class
from vlmkit.presets import get_preset
from vlmkit.processing import Processor, TextTokenizer
from vlmkit.train.recipe import Recipe


def prepare_tokenizer(recipe: Recipe, texts: list[str], resume_dir=None) -> TextTokenizer:
    """The tokenizer of a from-scratch model: the resumed run's, the recipe's file (its special tokens named as the
    preset's processor names them), or one the preset's family trains on ``texts``."""
    preset = get_preset(recipe.preset)
    pcfg = preset.processor
    if resume_dir is not None:
        return Processor.from_pretrained(resume_dir).tokenizer
    if recipe.tokenizer.path:
        return TextTokenizer.from_file(recipe.tokenizer.path, pad_token=pcfg.pad_token, eos_token=pcfg.eos_token,
                                       bos_token=pcfg.bos_token or None)
    return family_of(preset.model).new_tokenizer(texts, recipe.tokenizer.vocab_size)


def build_for_recipe(recipe: Recipe, tokenizer: TextTokenizer):
    """Preset + overrides -> (model config, model, processor), built from scratch by the preset's family."""
    preset = get_preset(recipe.preset)
    cfg = apply_overrides(preset.model, recipe.model, root="model")
    pcfg = apply_overrides(preset.processor, recipe.processor, root="processor")
    return family_of(cfg).new_model(cfg, pcfg, tokenizer)


def start_from(recipe: Recipe):
    """(model config, model, processor) of ``recipe.init_from``, a Hugging Face folder (converted in memory) or a
    vlmkit checkpoint, with the recipe's processor overrides applied."""
    from vlmkit.convert.hf import is_hf_folder, load_hf

    model, processor, cfg, _ = (load_hf if is_hf_folder(recipe.init_from) else load_checkpoint)(recipe.init_from)
    if recipe.processor:
        pcfg = apply_overrides(processor.cfg, recipe.processor, root="processor")
        processor = Processor(pcfg, processor.tokenizer, processor.files)
    return cfg, model, processor


def build_model_for(run, texts) -> None:
    """Set ``run.cfg``, ``run.model`` and ``run.processor`` (module docstring). ``texts()`` gives the training texts
    a from-scratch tokenizer learns from."""
    recipe = run.recipe
    if recipe.init_from:  # fine-tuning: the model, tokenizer and processor come with the weights
        if run.resumed:  # a fine-tune's own checkpoint (its adapters unmerged: they keep training)
            model, processor, cfg, _ = load_checkpoint(run.ckpt, merge_lora=False)
        else:
            cfg, model, processor = start_from(recipe)
    else:
        tokenizer = prepare_tokenizer(recipe, [] if run.resumed else texts(), run.ckpt if run.resumed else None)
        cfg, model, processor = build_for_recipe(recipe, tokenizer)
    if recipe.lora.targets and not (run.resumed and recipe.init_from):  # a resumed fine-tune's checkpoint has them
        wrapped = apply_lora(model, recipe.lora)
        run.log(f"LoRA rank {recipe.lora.rank} (alpha {recipe.lora.alpha:g}) on {len(wrapped)} Linear modules: "
                f"{_summarise(wrapped)}")
    if run.resumed and run.info.strategy != "fsdp":
        load_model(model, str(run.ckpt / "model.safetensors"))
    if run.resumed:
        torch.set_rng_state(torch.tensor(run.state["torch_rng"], dtype=torch.uint8))
        if run.state.get("world_size", 1) != run.info.world and run.info.strategy != "fsdp":
            run.log(f"resuming a run of {run.state.get('world_size', 1)} processes with {run.info.world}")
    _check_objectives(recipe, cfg)
    run.cfg, run.model, run.processor = cfg, model.train(), processor


def check_recipe(recipe: Recipe) -> None:
    """What can be refused before a run starts (no process group joined, no data read): each stage objective's
    recipe checks, and for a model built from scratch whether its preset's family trains with those objectives."""
    for name in dict.fromkeys(st.objective for st in recipe.stages):
        objective_class(name).check_recipe(recipe)
    if not recipe.init_from:
        _check_objectives(recipe, get_preset(recipe.preset).model)


def _check_objectives(recipe: Recipe, cfg) -> None:
    """Every stage's objective is one the model's family (of config ``cfg``) trains with."""
    family = family_of(cfg)
    for i, st in enumerate(recipe.stages):
        if st.objective not in family.objectives:
            kind = " is a dual encoder:" if family.capabilities.embed else ""
            raise ConfigError(f"stages[{i}].objective: {st.objective!r} does not train a {family.name} model; "
                              f"{recipe.init_from or recipe.preset}{kind} set objective: "
                              f"{' or '.join(family.objectives)}")


def _summarise(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


__all__ = ["build_for_recipe", "build_model_for", "check_recipe", "prepare_tokenizer", "start_from"]
