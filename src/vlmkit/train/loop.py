"""The training loop: stages of (freeze, optimizer, schedule, steps), validation, atomic checkpoints, resume.

Data order is a pure function of (seed, position), weights and optimizer state are saved exactly, and the
learning rate is a function of the step, so ``resume=True`` continues exactly where the last checkpoint
stopped.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model
from tqdm.auto import tqdm

from vlmkit.checkpoint import check_folder, load_checkpoint, write_model_files
from vlmkit.config import ProcessorConfig, apply_overrides, to_dict
from vlmkit.data.conversations import (
    ConversationDataset,
    ReadReport,
    collate,
    group_by_image,
    read_conversations,
)
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models import build_model, count_parameters
from vlmkit.presets import get_preset
from vlmkit.processing import Processor, TextTokenizer, train_bpe
from vlmkit.train.cell_labels import run_cell_label_stage
from vlmkit.train.frozen_features import FrozenVisionFeatures
from vlmkit.train.optim import (
    freeze_for_stage,
    load_optimizer,
    lr_factor,
    make_optimizer,
    save_optimizer,
    set_lr,
    set_train_mode,
    trained_groups,
)
from vlmkit.train.recipe import Recipe
from vlmkit.train.stream import BatchStream
from vlmkit.utils import atomic_directory, atomic_write_json, seed_everything


@dataclass
class TrainResult:
    checkpoint: Path
    steps: int
    train_seconds: float
    samples_per_second: float
    tokens_per_second: float
    final_loss: float
    val_loss: float | None


class MetricsLog:
    """Append-only JSONL; on resume, lines past the resumed step are dropped."""

    def __init__(self, path: Path, keep_until_step: int | None):
        self.path = path
        lines = []
        if keep_until_step is not None and path.exists():
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                if rec.get("step", 0) <= keep_until_step:
                    lines.append(line)
        path.write_text("".join(x + "\n" for x in lines))

    def write(self, **rec) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")


def _training_texts(samples) -> list[str]:
    texts = []
    for s in samples:
        for turn in s.conversations:
            texts.append(str(turn.get("value", turn.get("content", ""))).replace("<image>", " "))
    return texts


def prepare_tokenizer(recipe: Recipe, samples, resume_dir: Path | None) -> TextTokenizer:
    if resume_dir is not None:
        return TextTokenizer.from_file(resume_dir / "tokenizer.json")
    if recipe.tokenizer.path:
        return TextTokenizer.from_file(recipe.tokenizer.path)
    return TextTokenizer(train_bpe(_training_texts(samples), recipe.tokenizer.vocab_size))


def build_for_recipe(recipe: Recipe, tokenizer: TextTokenizer):
    """Preset + overrides -> (model config, model, processor)."""
    preset = get_preset(recipe.preset)
    cfg = apply_overrides(preset.model, recipe.model, root="model")
    cfg = apply_overrides(cfg, {"lm.vocab_size": tokenizer.vocab_size})
    pcfg: ProcessorConfig = apply_overrides(preset.processor, recipe.processor, root="processor")
    pcfg = apply_overrides(pcfg, {"image_size": list(cfg.vision.image_size)})
    model = build_model(cfg, tokenizer.token_id(pcfg.image_token))
    processor = Processor(apply_overrides(pcfg, {"image_seq_len": model.image_seq_len}), tokenizer)
    return cfg, model, processor


def start_from(recipe: Recipe):
    """(model config, model, processor) of ``recipe.init_from``, a Hugging Face folder (converted in memory) or a
    vlmkit checkpoint, with the recipe's processor overrides applied."""
    from vlmkit.convert.hf import is_hf_folder, load_hf

    model, processor, cfg, _ = (load_hf if is_hf_folder(recipe.init_from) else load_checkpoint)(recipe.init_from)
    if recipe.processor:
        pcfg = apply_overrides(processor.cfg, recipe.processor, root="processor")
        processor = Processor(pcfg, processor.tokenizer)
    return cfg, model, processor


def load_data(recipe: Recipe, processor: Processor | None = None, log=print):
    root = Path(recipe.data.path) if recipe.data.path else Path(".")
    image_root = recipe.data.image_root or None
    report = ReadReport()
    train = [s for f in recipe.data.train
             for s in read_conversations(root / f, image_root, recipe.data.skip_bad_samples, report=report)]
    val_path = root / recipe.data.val
    val = read_conversations(val_path, image_root, recipe.data.skip_bad_samples, report=report) \
        if recipe.data.val and val_path.exists() else []
    if report.skipped:
        log(f"skipped {report.skipped} of {report.rows} rows (--skip-bad-samples); first: {report.reasons[0]}")
    if not train:
        raise ConfigError(f"no training samples in {root}: {recipe.data.train}")
    return train, val[: recipe.data.val_samples], report


def forward_batch(model, batch: dict, features: FrozenVisionFeatures | None = None, labels: bool = True):
    """The model on a collated batch: images through the tower, or the tower's precomputed ``features``
    looked up by path; grouped questions (group_by_image) with their positions and mask. Right padding +
    causal attention needs no padding mask: real tokens never see padding."""
    image_features = None
    if features is not None:
        image_features = model.connector(features.lookup(batch["image_paths"]), model.encoder.grid)
    return model(batch["input_ids"], None if features is not None else batch["pixel_values"],
                 labels=batch["labels"] if labels else None, image_features=image_features,
                 position_ids=batch["position_ids"], mask=batch["mask"])


@torch.no_grad()
def evaluate_loss(model, ds: ConversationDataset, pad_id: int, batch_size: int = 64) -> float:
    modes = {m: m.training for m in model.modules()}  # restored after: frozen modules stay in eval mode
    model.eval()
    total, n = 0.0, 0
    for start in range(0, len(ds), batch_size):
        batch = collate([ds[i] for i in range(start, min(len(ds), start + batch_size))], pad_id)
        out = forward_batch(model, batch)
        total += float(out.loss) * out.n_tokens
        n += out.n_tokens
    for m, training in modes.items():
        m.train(training)
    return total / max(n, 1)


def save_training_checkpoint(folder: Path, model, cfg, processor, opt, state: dict, recipe: Recipe) -> None:
    """model files + optimizer.safetensors + trainer_state.json, swapped in with one rename."""
    with atomic_directory(folder, overwrite=True) as tmp:
        write_model_files(tmp, model, cfg, processor, extra={"recipe": to_dict(recipe)})
        if opt is not None:
            save_optimizer(opt, tmp / "optimizer.safetensors")
        state = dict(state, torch_rng=torch.get_rng_state().tolist(), python_rng=list(random.getstate()[1]))
        atomic_write_json(tmp / "trainer_state.json", state, indent=None)


def train(recipe: Recipe, out: str | Path, resume: bool = False, progress: bool = True, log=None,
          stop_at_step: int | None = None) -> TrainResult:
    """Run every stage of ``recipe``; the last checkpoint is ``out/checkpoint``.

    ``stop_at_step`` ends the run abruptly after that global step, without a final save, as an interruption
    would (the run can be continued with ``resume=True`` from the last periodic checkpoint).
    """
    from vlmkit.train.contrastive import is_dual_encoder_recipe, train_contrastive

    if is_dual_encoder_recipe(recipe):  # CLIP / SigLIP: image-caption pairs and a contrastive loss
        return train_contrastive(recipe, out, resume, progress, log, stop_at_step)
    log = log or (lambda msg: tqdm.write(msg))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint"
    state = _read_state(ckpt) if resume else None
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    seed_everything(recipe.train.seed)

    samples, val_samples, _ = load_data(recipe, log=log)
    if recipe.init_from:  # fine-tuning: the model, tokenizer and processor come with the weights
        cfg, model, processor = start_from(recipe) if not state else _resumed(ckpt)
        tokenizer = processor.tokenizer
    else:
        tokenizer = prepare_tokenizer(recipe, samples, ckpt if state else None)
        cfg, model, processor = build_for_recipe(recipe, tokenizer)
    if state:
        load_model(model, str(ckpt / "model.safetensors"))
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    if recipe.data.group_turns:
        if cfg.lm.mrope_section or getattr(model, "prefix_lm", False):
            raise ConfigError(f"data.group_turns {recipe.data.group_turns}: grouped questions get plain positions "
                              f"and a causal segment mask, and the {cfg.family} family attends its own way "
                              f"({'M-RoPE positions' if cfg.lm.mrope_section else 'prefix-LM attention'}); "
                              f"set data.group_turns: 0")
        samples = group_by_image(samples, recipe.data.group_turns, recipe.train.seed)
    train_ds = ConversationDataset(samples, processor)
    val_ds = ConversationDataset(val_samples, processor) if val_samples else None
    try:
        per_image = f"{model.image_seq_len} tokens per image"
    except NotImplementedError:  # native resolution (Qwen2-VL): as many as each image's size gives
        per_image = "tokens per image by size"
    log(f"model {recipe.init_from or recipe.preset}: {count_parameters(model):,} parameters, {per_image}; "
        f"{len(train_ds)} training sequences, {len(val_ds) if val_ds else 0} validation samples")

    step = state["global_step"] if state else 0
    stream = BatchStream(len(train_ds), recipe.train.batch_size, recipe.train.seed,
                         state["stream_position"] if state else 0)
    metrics = MetricsLog(out / "metrics.jsonl", keep_until_step=step if state else -1)
    elapsed = state["train_seconds"] if state else 0.0
    n_samples = state["samples_seen"] if state else 0
    n_tokens = state["tokens_seen"] if state else 0
    pbar = tqdm(total=recipe.total_steps, initial=step, disable=not progress, desc="train", unit="step",
                dynamic_ncols=True)
    loss_ema, val_loss = None, None
    model.train()
    for si, stage in enumerate(recipe.stages):
        if state and si < state["stage"]:
            continue
        table = freeze_for_stage(model, stage)
        set_train_mode(model, stage)
        _log_stage(log, si, stage, table, model)
        metrics.write(event="stage", step=step, stage=stage.name, modules=table)
        if stage.objective == "cell_labels":
            step, seconds, stop = cell_label_stage(
                model, model.encoder, cfg, processor, recipe, si, metrics, pbar, step, log, stop_at_step, ckpt,
                {"stream_position": stream.position, "train_seconds": elapsed, "samples_seen": n_samples,
                 "tokens_seen": n_tokens})
            elapsed += seconds
            if stop:
                break
            continue
        opt = make_optimizer(model, stage)
        features = None
        train_ds.load_images = True
        if recipe.train.precompute_frozen_vision and "vision" not in trained_groups(model, stage):
            if processor.cfg.image_processor != "fixed":
                raise ConfigError(f"train.precompute_frozen_vision: images of processor "
                                  f"{processor.cfg.image_processor!r} are tiled or resized per image; only "
                                  f"fixed-size images are precomputed (set it to false)")
            t0 = time.perf_counter()
            features = FrozenVisionFeatures(model.encoder, processor, [p for x in samples for p in x.images],
                                            progress=progress)
            train_ds.load_images = False
            elapsed += time.perf_counter() - t0
            log(f"  vision features of {len(features):,} images precomputed in {time.perf_counter() - t0:.1f} s "
                f"({features.nbytes / 2**20:,.0f} MiB)")
        first = 0
        if state and si == state["stage"]:
            first = state["step_in_stage"]
            if first and (ckpt / "optimizer.safetensors").exists():
                load_optimizer(opt, ckpt / "optimizer.safetensors")
        for s in range(first, stage.steps):
            t0 = time.perf_counter()
            set_lr(opt, lr_factor(s, stage))
            loss_sum = 0.0
            for _ in range(recipe.train.grad_accum):
                batch = collate([train_ds[i] for i in stream.next()], tokenizer.pad_id)
                res = forward_batch(model, batch, features)
                (res.loss / recipe.train.grad_accum).backward()
                loss_sum += float(res.loss.detach()) / recipe.train.grad_accum
                n_samples += batch["input_ids"].shape[0]
                n_tokens += int(batch["attention_mask"].sum())
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                       recipe.train.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            elapsed += time.perf_counter() - t0
            step += 1
            loss_ema = loss_sum if loss_ema is None else 0.9 * loss_ema + 0.1 * loss_sum
            pbar.update(1)
            pbar.set_postfix(stage=stage.name, loss=f"{loss_ema:.3f}", samples_s=f"{n_samples / elapsed:.1f}")
            if step % recipe.train.log_every == 0 or s == stage.steps - 1:
                metrics.write(step=step, stage=stage.name, loss=loss_sum, lr=opt.param_groups[0]["lr"],
                              grad_norm=float(grad_norm), samples_per_second=n_samples / elapsed,
                              tokens_per_second=n_tokens / elapsed, elapsed=elapsed)
            if val_ds and (step % recipe.train.eval_every == 0 or s == stage.steps - 1):
                val_loss = evaluate_loss(model, val_ds, tokenizer.pad_id)
                metrics.write(step=step, stage=stage.name, val_loss=val_loss)
                log(f"step {step}: val_loss {val_loss:.4f}")
            last_of_stage = s == stage.steps - 1
            if last_of_stage or step % recipe.train.save_every == 0:
                st = {"global_step": step, "stage": si + 1 if last_of_stage else si,
                      "step_in_stage": 0 if last_of_stage else s + 1, "stream_position": stream.position,
                      "train_seconds": elapsed, "samples_seen": n_samples, "tokens_seen": n_tokens}
                save_training_checkpoint(ckpt, model, cfg, processor, None if last_of_stage else opt, st, recipe)
            if stop_at_step is not None and step >= stop_at_step:
                break
        if stop_at_step is not None and step >= stop_at_step:
            break
    pbar.close()
    model.eval()
    return TrainResult(ckpt, step, elapsed, n_samples / max(elapsed, 1e-9), n_tokens / max(elapsed, 1e-9),
                       loss_ema if loss_ema is not None else float("nan"), val_loss)


def cell_label_stage(model, encoder, cfg, processor, recipe: Recipe, si: int, metrics, pbar, step: int, log,
                     stop_at_step: int | None, ckpt: Path, counters: dict) -> tuple[int, float, bool]:
    """Stage ``si`` of ``recipe``, a cell_labels stage on ``encoder`` (the image tower alone), and the checkpoint
    after it -> (global step, seconds spent, whether the run stops here). The stage is never checkpointed midway:
    an interrupted one reruns whole. ``counters``: the stream position and running totals saved with it."""
    stage = recipe.stages[si]
    first = step
    step, seconds = run_cell_label_stage(
        encoder, processor, stage, stage.batch_size or recipe.train.batch_size,
        Path(recipe.data.path or "."), recipe.train.seed + si, metrics, pbar, step, recipe.train.max_grad_norm, log,
        stop_at_step)
    if step < first + stage.steps:
        return step, seconds, True  # stopped inside the stage (stop_at_step): nothing of it is saved
    st = {**counters, "global_step": step, "stage": si + 1, "step_in_stage": 0,
          "train_seconds": counters["train_seconds"] + seconds}
    save_training_checkpoint(ckpt, model, cfg, processor, None, st, recipe)
    return step, seconds, stop_at_step is not None and step >= stop_at_step


def _resumed(ckpt: Path):
    """(model config, model, processor) of a fine-tuning run's own checkpoint."""
    model, processor, cfg, _ = load_checkpoint(ckpt)
    return cfg, model, processor


def _read_state(ckpt: Path) -> dict | None:
    if not ckpt.exists():
        return None
    check_folder(ckpt)
    path = ckpt / "trainer_state.json"
    if not path.is_file():
        raise CheckpointError(f"{ckpt} has no trainer_state.json, so it cannot be resumed")
    return json.loads(path.read_text())


def _log_stage(log, si: int, stage, table: list[dict], model) -> None:
    log(f"stage {si} '{stage.name}': {stage.steps} steps, lr {stage.lr:g}")
    for row in table:
        what = f"trains (lr {row['lr']:g})" if row["trainable"] else "frozen"
        log(f"  {row['module']:<10} {row['params']:>12,} params  {what}")
    log(f"  trainable: {count_parameters(model, trainable_only=True):,} of {count_parameters(model):,}")


