"""Contrastive training of dual encoders (CLIP, SigLIP) on image-caption pairs, with the loop's guarantees:
stages that freeze and unfreeze towers (LiT's locked image tower is ``train: [text, logits]``), a data order that
is a pure function of (seed, batch position), atomic checkpoints and exact resume.

Each step draws a batch of *images* (one caption each, see :class:`~vlmkit.data.pairs.PairDataset`), computes the
model's contrastive loss over the batch and clamps CLIP's temperature after the optimizer step, as open_clip does.
Validation reports the loss on fixed batches of held-out pairs and retrieval recall over the held-out set.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_model
from tqdm.auto import tqdm

from vlmkit.config import apply_overrides
from vlmkit.data.conversations import ReadReport
from vlmkit.data.pairs import PairDataset, read_pairs
from vlmkit.errors import ConfigError
from vlmkit.eval.metrics.retrieval import retrieval_metrics
from vlmkit.models import build_model, count_parameters
from vlmkit.presets import get_preset
from vlmkit.family import family_of
from vlmkit.processing import Processor, TextTokenizer
from vlmkit.train.distributed import batchnorm_note, wrap_model
from vlmkit.nn.lora import apply_lora
from vlmkit.train.optim import (freeze_for_stage, load_optimizer, lr_factor, make_optimizer, set_lr,
                                set_train_mode)
from vlmkit.train.recipe import Recipe
from vlmkit.train.stream import BatchStream
from vlmkit.utils import seed_everything

def build_dual_for_recipe(recipe: Recipe, tokenizer: TextTokenizer):
    """Preset + overrides -> (model config, dual encoder, processor), built from scratch by the preset's family."""
    preset = get_preset(recipe.preset)
    cfg = apply_overrides(preset.model, recipe.model, root="model")
    pcfg = apply_overrides(preset.processor, recipe.processor, root="processor")
    return family_of(cfg).new_model(cfg, pcfg, tokenizer)


def load_pairs(recipe: Recipe, log=print):
    """(training pairs, validation pairs, read report) of the recipe's data section."""
    d = recipe.data
    root = Path(d.path) if d.path else Path(".")
    report = ReadReport()
    kw = dict(image_key=d.csv_image_key, caption_key=d.csv_caption_key, separator=d.csv_separator,
              image_root=d.image_root or None, skip_bad=d.skip_bad_samples, report=report)
    train = [p for f in d.train for p in read_pairs(root / f, **kw)]
    val_path = root / d.val
    val = read_pairs(val_path, **kw) if d.val and val_path.exists() else []
    if report.skipped:
        log(f"skipped {report.skipped} of {report.rows} rows (--skip-bad-samples); first: {report.reasons[0]}")
    if not train:
        raise ConfigError(f"no training pairs in {root}: {d.train}")
    return train, val, report


@torch.no_grad()
def validate(model, ds: PairDataset, batch_size: int) -> dict[str, float]:
    """Held-out loss (mean over fixed batches of ``batch_size`` images, each with its first caption; the loss of a
    contrastive model depends on the batch) and retrieval recall@1/5 over the whole set, every caption of every
    image a candidate."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    losses, images = [], []
    for start in range(0, len(ds), batch_size):
        idx = list(range(start, min(len(ds), start + batch_size)))
        out = model(ds.batch(idx), gather=False)
        if len(idx) == batch_size or start == 0:
            losses.append(float(out.loss))
        images.append(out.image_embeds)
    rows = [r for caps in ds.captions for r in caps]
    owner = [i for i, caps in enumerate(ds.captions) for _ in caps]
    texts = torch.cat([model.encode_texts(ds.processor.pad_texts(rows[s:s + 512])) for s in range(0, len(rows), 512)])
    sim = torch.cat(images) @ texts.t()
    rec = retrieval_metrics(sim, owner, ks=(1, 5))
    for m, training in modes.items():
        m.train(training)
    return {"val_loss": sum(losses) / len(losses), **{f"val_{k}": v for k, v in rec.items()}}


def train_contrastive(recipe: Recipe, out: str | Path, resume: bool = False, progress: bool = True, log=None,
                      stop_at_step: int | None = None, on_eval: Callable | None = None):
    """Run every stage of a dual-encoder recipe; the last checkpoint is ``out/checkpoint``. ``on_eval(model,
    processor, step, train_seconds)`` is called at each validation (its time is not training time)."""
    from vlmkit.train.loop import (MetricsLog, TrainResult, _autocast, _log_stage, _resumed, whole_stage,
                                   checkpoint_activations, compile_blocks, finish_run, save_training_checkpoint,
                                   start_from, start_run)

    if recipe.train.distributed == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("train.distributed fsdp: dual encoders train under DDP (train.distributed: ddp); they are "
                          "small enough to replicate, and their loss already gathers every rank's embeddings")
    info, out, ckpt, state, log, progress = start_run(recipe, out, resume, progress, log)
    if recipe.train.grad_accum != 1:
        raise ConfigError(f"train.grad_accum {recipe.train.grad_accum}: a contrastive loss compares every pair of a "
                          f"batch, so micro-batches accumulated are not the loss of their union; set grad_accum: 1 "
                          f"and the batch you want as train.batch_size")
    for i, st in enumerate(recipe.stages):
        if st.objective not in ("contrastive", "cell_labels"):
            raise ConfigError(f"stages[{i}].objective: {st.objective!r} is for vision-language models; "
                              f"{recipe.init_from or recipe.preset} is a dual encoder: set objective: contrastive "
                              f"(or cell_labels, to pretrain its image tower on ShapesWorld's object annotations)")
    seed_everything(recipe.train.seed)

    pairs, val_pairs, report = load_pairs(recipe, log)
    if recipe.init_from:
        cfg, model, processor = start_from(recipe) if not state else _resumed(ckpt)
    elif state:
        cfg, model, processor = build_dual_for_recipe(recipe, Processor.from_pretrained(ckpt).tokenizer)
    elif recipe.tokenizer.path:  # special tokens named as the preset's processor names them
        pcfg = get_preset(recipe.preset).processor
        tokenizer = TextTokenizer.from_file(recipe.tokenizer.path, pad_token=pcfg.pad_token, eos_token=pcfg.eos_token,
                                            bos_token=pcfg.bos_token or None)
        cfg, model, processor = build_dual_for_recipe(recipe, tokenizer)
    else:
        preset = get_preset(recipe.preset)
        tokenizer = family_of(preset.model).new_tokenizer([p.caption for p in pairs], recipe.tokenizer.vocab_size)
        cfg, model, processor = build_dual_for_recipe(recipe, tokenizer)
    if not family_of(cfg).capabilities.embed:
        raise ConfigError(f"{recipe.init_from or recipe.preset} is not a dual encoder (family {cfg.family})")
    if recipe.lora.targets and not (state and recipe.init_from):  # a resumed fine-tune's checkpoint has them
        wrapped = apply_lora(model, recipe.lora)
        log(f"LoRA rank {recipe.lora.rank} (alpha {recipe.lora.alpha:g}) on {len(wrapped)} Linear modules")
    if state:
        load_model(model, str(ckpt / "model.safetensors"))
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    if recipe.train.activation_checkpointing:
        log(f"activation checkpointing on {checkpoint_activations(model)} blocks")
    if recipe.train.compile:
        log(f"torch.compile on {compile_blocks(model)} blocks")
    autocast = _autocast(recipe.train.precision)
    train_ds = PairDataset(pairs, processor, seed=recipe.train.seed)
    val_ds = PairDataset(_first_images(val_pairs, recipe.data.val_samples), processor) if val_pairs else None
    n_trunc = train_ds.truncated + (val_ds.truncated if val_ds else 0)
    context = processor.cfg.max_length
    log(f"model {recipe.init_from or recipe.preset}: {count_parameters(model):,} parameters; {len(train_ds)} training "
        f"images with {train_ds.n_captions} captions, {len(val_ds) if val_ds else 0} validation images")
    if n_trunc:
        log(f"{n_trunc} captions are longer than the text context ({context} tokens) and were truncated")
    batch_size = recipe.train.batch_size
    if batch_size > len(train_ds):
        raise ConfigError(f"train.batch_size {batch_size} is larger than the {len(train_ds)} training images")
    if batch_size % info.world:
        raise ConfigError(f"train.batch_size {batch_size} is not a multiple of the {info.world} processes (the "
                          f"contrastive loss gathers equal shares from every rank)")

    step = state["global_step"] if state else 0
    stream = BatchStream(len(train_ds), batch_size, recipe.train.seed, state["stream_position"] if state else 0,
                         drop_last=True)  # one image never twice in a batch, even across an epoch's end
    metrics = MetricsLog(out / "metrics.jsonl", keep_until_step=step if state else -1, enabled=info.is_main,
                         tensorboard=out / "tensorboard" if recipe.train.tensorboard else None)
    if not state:
        metrics.write(event="run", step=0, world_size=info.world, strategy=info.strategy, packing=False,
                      parameters=count_parameters(model), recipe=recipe.name, preset=recipe.init_from or recipe.preset)
        metrics.write(event="data", step=0, images=len(train_ds), captions=train_ds.n_captions,
                      truncated_captions=n_trunc, context_length=context, skipped_rows=report.skipped)
    elapsed = state["train_seconds"] if state else 0.0
    n_samples = state["samples_seen"] if state else 0
    pbar = tqdm(total=recipe.total_steps, initial=step, disable=not progress, desc="train", unit="step",
                dynamic_ncols=True)
    loss_ema, val = None, {}
    model.train()
    for si, stage in enumerate(recipe.stages):
        if state and si < state["stage"]:
            continue
        table = freeze_for_stage(model, stage)
        set_train_mode(model, stage)
        _log_stage(log, si, stage, table, model)
        metrics.write(event="stage", step=step, stage=stage.name, modules=table)
        if stage.objective == "cell_labels":  # the image tower alone, as the demo's
            step, seconds, stop = whole_stage(
                model, model.image_tower(), cfg, processor, recipe, si, metrics, pbar, step, log, stop_at_step, ckpt,
                {"stream_position": stream.position, "train_seconds": elapsed, "samples_seen": n_samples,
                 "tokens_seen": 0}, info)
            elapsed += seconds
            if stop:
                break
            continue
        note = batchnorm_note(model, info)
        if note:
            log(note)
        net = wrap_model(model, info)
        opt = make_optimizer(model, stage)
        first = 0
        if state and si == state["stage"]:
            first = state["step_in_stage"]
            if first and (ckpt / "optimizer.safetensors").exists():
                load_optimizer(opt, ckpt / "optimizer.safetensors")
        for s in range(first, stage.steps):
            t0 = time.perf_counter()
            set_lr(opt, lr_factor(s, stage))
            position = stream.position
            batch = train_ds.batch(stream.next(), position, part=(info.rank, info.world))
            with autocast:
                res = net(batch)
            res.loss.backward()  # each rank's rows against every rank's columns; DDP averages the gradients
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                       recipe.train.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.clamp_logit_scale()
            elapsed += time.perf_counter() - t0
            step += 1
            n_samples += batch_size
            loss = info.all_sum([float(res.loss.detach())])[0] / info.world  # the whole batch's loss
            loss_ema = loss if loss_ema is None else 0.9 * loss_ema + 0.1 * loss
            pbar.update(1)
            pbar.set_postfix(stage=stage.name, loss=f"{loss_ema:.3f}", images_s=f"{n_samples / elapsed:.0f}")
            last_of_stage = s == stage.steps - 1
            if step % recipe.train.log_every == 0 or last_of_stage:
                metrics.write(step=step, stage=stage.name, loss=loss, lr=opt.param_groups[0]["lr"],
                              grad_norm=float(grad_norm), logit_scale=float(model.logits.scale.detach().exp()),
                              samples_per_second=n_samples / elapsed, elapsed=elapsed)
            if val_ds and (step % recipe.train.eval_every == 0 or last_of_stage):
                val = validate(model, val_ds, batch_size)
                metrics.write(step=step, stage=stage.name, elapsed=elapsed, **val)
                log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
                if on_eval is not None:
                    on_eval(model, processor, step, elapsed)
                    model.train()
                    set_train_mode(model, stage)
            if last_of_stage or step % recipe.train.save_every == 0:
                st = {"global_step": step, "stage": si + 1 if last_of_stage else si,
                      "step_in_stage": 0 if last_of_stage else s + 1, "stream_position": stream.position,
                      "train_seconds": elapsed, "samples_seen": n_samples, "tokens_seen": 0}
                save_training_checkpoint(ckpt, model, cfg, processor, None if last_of_stage else opt, st, recipe,
                                         info)
            if stop_at_step is not None and step >= stop_at_step:
                break
        if stop_at_step is not None and step >= stop_at_step:
            break
    pbar.close()
    metrics.close()
    model.eval()
    finish_run(out, info, log)
    return TrainResult(ckpt, step, elapsed, n_samples / max(elapsed, 1e-9), 0.0,
                       loss_ema if loss_ema is not None else float("nan"), val.get("val_loss"))


def _first_images(pairs, n: int):
    """The pairs of the first ``n`` distinct images (all their captions)."""
    keep, out = set(), []
    for p in pairs:
        if p.image not in keep:
            if len(keep) == n:
                continue
            keep.add(p.image)
        out.append(p)
    return out


def is_dual_encoder_recipe(recipe: Recipe) -> bool:
    """Whether the recipe trains a dual encoder: its preset's family, or the family of the folder it starts from."""
    if recipe.init_from:
        from vlmkit.checkpoint import read_config
        from vlmkit.convert.hf import is_hf_folder
        from vlmkit.family import hf_family_of

        if is_hf_folder(recipe.init_from):
            return hf_family_of(Path(recipe.init_from))[0].capabilities.embed
        return family_of(read_config(recipe.init_from)[0]).capabilities.embed
    return family_of(get_preset(recipe.preset).model).capabilities.embed


__all__ = ["build_dual_for_recipe", "is_dual_encoder_recipe", "load_pairs",
           "train_contrastive", "validate"]
