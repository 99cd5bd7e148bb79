"""The training loop: stages of (freeze, optimizer, schedule, steps), validation, atomic checkpoints, resume.

Data order is a pure function of (seed, position), weights and optimizer state are saved exactly, and the
learning rate is a function of the step, so ``resume=True`` continues exactly where the last checkpoint
stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model
from tqdm.auto import tqdm

from vlmkit.batch import IGNORE, Batch, MediaInputs
from vlmkit.checkpoint import check_folder, load_checkpoint, write_model_files
from vlmkit.config import apply_overrides, to_dict
from vlmkit.data.collate import PaddingStats, collate, collate_packed
from vlmkit.data.conversations import ConversationDataset, ReadReport, group_by_image, read_conversations
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.family import family_of
from vlmkit.models import build_model, count_parameters
from vlmkit.presets import get_preset
from vlmkit.processing import Processor, TextTokenizer
from vlmkit.train.cell_labels import run_cell_label_stage
from vlmkit.train.qformer_stage import run_qformer_stage
from vlmkit.train.distributed import (DistInfo, batchnorm_note, full_state_dict, grad_norm_value, init_distributed,
                                      load_sharded, save_sharded, shard_of, transformer_blocks, unwrap, wrap_model)
from vlmkit.train.frozen_features import FrozenVisionFeatures
from vlmkit.nn.lora import apply_lora, save_adapter
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
from vlmkit.train.report import write_report
from vlmkit.train.stream import BatchStream
from vlmkit.utils import atomic_write_json, seed_everything


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
    """Append-only JSONL (and TensorBoard scalars when asked); on resume, lines past the resumed step are dropped.
    Only rank 0 of a multi-process run writes (``enabled``)."""

    def __init__(self, path: Path, keep_until_step: int | None, enabled: bool = True,
                 tensorboard: Path | None = None):
        self.path, self.enabled = path, enabled
        self.tb = None
        if not enabled:
            return
        lines = []
        if keep_until_step is not None and path.exists():
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                if rec.get("step", 0) <= keep_until_step:
                    lines.append(line)
        path.write_text("".join(x + "\n" for x in lines))
        if tensorboard is not None:
            from vlmkit.train.report import TensorBoardWriter

            self.tb = TensorBoardWriter(tensorboard)

    def write(self, **rec) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            self.tb.write(rec)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _training_texts(samples) -> list[str]:
    texts = []
    for s in samples:
        for turn in s.conversations:
            texts.append(str(turn.get("value", turn.get("content", ""))).replace("<image>", " "))
    return texts


def prepare_tokenizer(recipe: Recipe, samples, resume_dir: Path | None) -> TextTokenizer:
    preset = get_preset(recipe.preset)
    pcfg = preset.processor
    if resume_dir is not None:
        return Processor.from_pretrained(resume_dir).tokenizer
    if recipe.tokenizer.path:  # special tokens named as the preset's processor names them
        return TextTokenizer.from_file(recipe.tokenizer.path, pad_token=pcfg.pad_token, eos_token=pcfg.eos_token,
                                       bos_token=pcfg.bos_token or None)
    return family_of(preset.model).new_tokenizer(_training_texts(samples), recipe.tokenizer.vocab_size)


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


def forward_batch(model, batch: Batch, features: FrozenVisionFeatures | None = None, labels: bool = True):
    """The model on a collated batch: its images, or the frozen tower's precomputed ``features`` looked up by path
    (``MediaInputs.tower``); packed or grouped batches carry their documents, segments and positions (the model
    builds their mask). Right padding + causal attention needs no padding mask: real tokens never see padding."""
    if features is not None:
        tower = features.lookup(batch.image_paths)
        batch = dataclasses.replace(batch, media=MediaInputs(tower[:, :0, :0], [0] * len(tower), tower=tower))
    if not labels:
        batch = dataclasses.replace(batch, labels=None)
    return model(batch)


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


# fault injection for the crash tests: the process kills itself (SIGKILL) in the middle of writing the checkpoint
# of this global step, after the model files are written and before the folder is swapped in
KILL_IN_CHECKPOINT_ENV = "VLMKIT_TEST_KILL_IN_CHECKPOINT"


def save_training_checkpoint(folder: Path, model, cfg, processor, opt, state: dict, recipe: Recipe,
                             info: DistInfo | None = None, final: bool = False) -> None:
    """model files + optimizer state + trainer_state.json, swapped in with one rename (a crash at any point
    leaves the previous checkpoint whole). Under FSDP every rank writes its shards into ``dcp/`` and the final
    checkpoint also gets the consolidated model.safetensors; otherwise rank 0 writes everything."""
    info = info or DistInfo()
    tmp = folder.with_name(f".{folder.name}.tmp-step{state['global_step']}")
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    info.barrier()
    extra = {"recipe": to_dict(recipe)}
    if recipe.lora.targets:
        extra["lora"] = to_dict(recipe.lora)
    plain = unwrap(model)
    if info.strategy == "fsdp":
        save_sharded(tmp / "dcp", model, opt)
        full = full_state_dict(model, info) if final else None
        plain = _plain_copy(full, cfg, processor, recipe) if final and info.is_main else None
        if info.is_main:
            write_model_files(tmp, plain, cfg, processor, extra=extra)
    elif info.is_main:
        write_model_files(tmp, plain, cfg, processor, extra=extra)
        if opt is not None:
            save_optimizer(opt, tmp / "optimizer.safetensors")
    if info.is_main:
        state = dict(state, torch_rng=torch.get_rng_state().tolist(), python_rng=list(random.getstate()[1]),
                     world_size=info.world, strategy=info.strategy)
        atomic_write_json(tmp / "trainer_state.json", state, indent=None)
        if os.environ.get(KILL_IN_CHECKPOINT_ENV) == str(state["global_step"]):
            os.kill(os.getpid(), signal.SIGKILL)
        if recipe.lora.targets and final:  # the adapters alone, for the base model
            save_adapter(tmp / "adapter", plain, recipe.lora)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-step{state['global_step']}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    info.barrier()


def _plain_copy(state_dict: dict, cfg, processor, recipe: Recipe):
    """A one-process model holding ``state_dict`` (gathered from FSDP shards), to be written as safetensors."""
    model = build_model(cfg, processor.image_token_id, init=False)
    if recipe.lora.targets:
        apply_lora(model, recipe.lora)
    model.load_state_dict(state_dict)
    return model


def _clean_stale(folder: Path) -> None:
    """Remove what a killed run left beside the checkpoint: a half-written ``.tmp-*`` folder (never read), or, when
    the kill came between the two renames that swap a checkpoint in, put the previous one (``.old-*``) back."""
    for p in folder.parent.glob(f".{folder.name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in folder.parent.glob(f".{folder.name}.old-*"):
        if folder.exists():
            shutil.rmtree(p, ignore_errors=True)
        else:  # killed between the two renames: the old checkpoint is the one to resume
            os.replace(p, folder)


class LocalBatches:
    """This rank's micro-batches of a global batch drawn from a reproducible sample order.

    ``batch_tokens`` = 0: ``batch_size`` samples per micro-batch (a :class:`BatchStream` position counts batches).
    Otherwise a token budget: an optimizer step takes samples in stream order until the next would exceed
    ``batch_tokens`` (at least one per rank), split into ``grad_accum`` micro-batches; the position counts samples.
    Every rank draws the same global batch and keeps its share (:func:`shard_of`)."""

    def __init__(self, ds: ConversationDataset, recipe: Recipe, info: DistInfo, state: dict | None):
        t = recipe.train
        self.ds, self.info, self.grad_accum = ds, info, t.grad_accum
        self.budget = t.batch_tokens
        self.lengths = [len(e) for e in ds.encoded]
        if self.budget:
            self.stream = BatchStream(len(ds), 1, t.seed, state.get("sample_position", 0) if state else 0)
            self.carry: int | None = None
        else:
            if t.batch_size < info.world:
                raise ConfigError(f"train.batch_size {t.batch_size} < {info.world} processes: every rank needs a "
                                  f"sample (the batch is split across ranks)")
            self.stream = BatchStream(len(ds), t.batch_size, t.seed, state["stream_position"] if state else 0)

    def state(self) -> dict:
        if self.budget:
            return {"sample_position": self.stream.position - (self.carry is not None)}
        return {"stream_position": self.stream.position}

    def step(self) -> list[list[int]]:
        """Global sample indices of the next optimizer step, one list per micro-batch."""
        if not self.budget:
            return [self.stream.next() for _ in range(self.grad_accum)]
        chosen, tokens = [], 0
        need = self.info.world * self.grad_accum
        while True:
            i = self.carry if self.carry is not None else self.stream.next()[0]
            self.carry = None
            if len(chosen) >= need and tokens + self.lengths[i] > self.budget:
                self.carry = i  # first of the next step (its position is not consumed yet)
                break
            chosen.append(i)
            tokens += self.lengths[i]
        # deal the samples out longest first so that micro-batches and ranks get similar token counts
        order = sorted(chosen, key=lambda k: -self.lengths[k])
        return [order[m::self.grad_accum] for m in range(self.grad_accum)]

    def next_step(self) -> list[list[dict]]:
        """This rank's samples of each micro-batch of the next optimizer step."""
        return [self.local(ix) for ix in self.step()]

    def local(self, indices: list[int]) -> list[dict]:
        if self.budget:
            order = sorted(indices, key=lambda k: -self.lengths[k])
            return [self.ds[i] for i in order[self.info.rank::self.info.world]]
        return [self.ds[i] for i in shard_of(indices, self.info)]


class StreamedBatches:
    """This rank's micro-batches streamed from WebDataset shards (``data.shards``, data/shards.py): each rank reads
    its own shards through ``data.workers`` worker processes (which also tokenise and preprocess the images) and
    takes ``batch_size / world`` samples per micro-batch. The position (samples taken per rank) is saved with
    every checkpoint, so a resumed run streams on from exactly there."""

    def __init__(self, recipe: Recipe, processor: Processor, info: DistInfo, state: dict | None, log):
        from vlmkit.data.shards import ShardStream, read_index

        t, d = recipe.train, recipe.data
        if t.batch_size % info.world:
            raise ConfigError(f"train.batch_size {t.batch_size} is not a multiple of the {info.world} processes")
        self.per_rank, self.grad_accum = t.batch_size // info.world, t.grad_accum
        self.position = state.get("shard_position", 0) if state else 0
        index = read_index(d.shards)
        if index.kind != "conversations":
            raise ConfigError(f"data.shards {d.shards}: {index.kind} shards are for dual encoders; a vision-language "
                              f"model trains on conversation shards (vlmkit data shard DATA.json)")
        self.n_samples = index.samples
        encoder = ConversationDataset([], processor, cache_images=False)

        class Encoded(ShardStream):
            def __iter__(self):
                for rec in super().__iter__():
                    yield encoder.encode(rec["sample"])

        self.stream = Encoded(d.shards, seed=t.seed, shuffle_buffer=d.shuffle_buffer, rank=info.rank,
                              world_size=info.world, num_workers=d.workers, start=self.position,
                              on_error="skip" if d.skip_bad_samples else "fail", log=log)
        self._it = iter(self.stream.loader())

    def state(self) -> dict:
        return {"shard_position": self.position}

    def next_step(self) -> list[list[dict]]:
        out = []
        for _ in range(self.grad_accum):
            out.append([next(self._it) for _ in range(self.per_rank)])
            self.position += self.per_rank
        return out


def _shard_texts(recipe: Recipe, limit: int = 100_000) -> list:
    """Conversations of up to ``limit`` samples of the shards (their JSON members only), to train a tokenizer on."""
    import tarfile

    from vlmkit.data.conversations import Sample
    from vlmkit.data.shards import read_index

    out = []
    for path in read_index(recipe.data.shards).paths:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".json") and len(out) < limit:
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        rec = json.loads(tar.extractfile(member).read())
                        out.append(Sample(id=member.name, images=[], conversations=rec["conversations"]))
        if len(out) >= limit:
            break
    return out


def _streamed_val(recipe: Recipe, log) -> tuple[list, ReadReport]:
    """Validation samples beside streamed training data: ``data.path/data.val`` when it exists."""
    root = Path(recipe.data.path) if recipe.data.path else Path(".")
    report = ReadReport()
    path = root / recipe.data.val
    val = read_conversations(path, recipe.data.image_root or None, recipe.data.skip_bad_samples, report=report) \
        if recipe.data.val and path.is_file() else []
    return val[: recipe.data.val_samples], report


def _summarise(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _autocast(precision: str):
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_available()):
        return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def checkpoint_activations(model) -> int:
    """Recompute every transformer block's activations in the backward pass instead of storing them
    (torch.utils.checkpoint, non-reentrant); returns the number of blocks."""
    import torch.utils.checkpoint as ckpt

    blocks = transformer_blocks(model)
    for block in blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return ckpt.checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
    return len(blocks)


def compile_blocks(model) -> int:
    """torch.compile every transformer block (regional compilation: the block is compiled once and reused)."""
    blocks = transformer_blocks(model)
    for block in blocks:
        block.compile()
    return len(blocks)


def train(recipe: Recipe, out: str | Path, resume: bool = False, progress: bool = True, log=None,
          stop_at_step: int | None = None) -> TrainResult:
    """Run every stage of ``recipe``; the last checkpoint is ``out/checkpoint``.

    Under torchrun (``WORLD_SIZE`` > 1) every process runs this with its share of each batch (train/distributed.py).
    ``stop_at_step`` ends the run abruptly after that global step, without a final save, as an interruption
    would (the run can be continued with ``resume=True`` from the last periodic checkpoint).
    """
    from vlmkit.train.contrastive import is_dual_encoder_recipe, train_contrastive

    if is_dual_encoder_recipe(recipe):  # CLIP / SigLIP: image-caption pairs and a contrastive loss
        return train_contrastive(recipe, out, resume, progress, log, stop_at_step)
    info, out, ckpt, state, log, progress = start_run(recipe, out, resume, progress, log)
    seed_everything(recipe.train.seed)
    t = recipe.train

    streamed = bool(recipe.data.shards)
    samples, val_samples, _ = load_data(recipe, log=log) if not streamed else ([], *_streamed_val(recipe, log))
    if recipe.init_from:  # fine-tuning: the model, tokenizer and processor come with the weights
        cfg, model, processor = start_from(recipe) if not state else _resumed(ckpt)
        tokenizer = processor.tokenizer
    else:
        texts = samples if not streamed else _shard_texts(recipe)
        tokenizer = prepare_tokenizer(recipe, texts, ckpt if state else None)
        cfg, model, processor = build_for_recipe(recipe, tokenizer)
    if recipe.lora.targets and not (state and recipe.init_from):  # a resumed fine-tune's checkpoint has them
        wrapped = apply_lora(model, recipe.lora)
        log(f"LoRA rank {recipe.lora.rank} (alpha {recipe.lora.alpha:g}) on {len(wrapped)} Linear modules: "
            f"{_summarise(wrapped)}")
    if state and info.strategy != "fsdp":
        load_model(model, str(ckpt / "model.safetensors"))
    if state:
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        if state.get("world_size", 1) != info.world and info.strategy != "fsdp":
            log(f"resuming a run of {state.get('world_size', 1)} processes with {info.world}")
    if recipe.data.group_turns and not streamed:
        if not family_of(cfg).capabilities.shared_prefix:
            raise ConfigError(f"data.group_turns {recipe.data.group_turns}: grouped questions share one prompt prefix "
                              f"at plain positions with a causal segment mask, and the {cfg.family} family reads "
                              f"each question its own way (its positions, its attention or what its image encoder "
                              f"reads); set data.group_turns: 0")
        samples = group_by_image(samples, recipe.data.group_turns, recipe.train.seed)
    val_ds = ConversationDataset(val_samples, processor) if val_samples else None
    if streamed:
        batches = StreamedBatches(recipe, processor, info, state, log)
        train_ds, n_train = None, batches.n_samples
    else:
        train_ds = ConversationDataset(samples, processor)
        batches, n_train = LocalBatches(train_ds, recipe, info, state), len(train_ds)
    pack_length = t.pack_length or (max(batches.lengths) if t.packing and not streamed else 0)
    if t.packing and streamed and not t.pack_length:
        raise ConfigError("train.packing with data.shards needs train.pack_length (the stream's longest sample "
                          "is not known in advance)")
    collate_fn = (lambda items: collate_packed(items, tokenizer.pad_id, pack_length)) if t.packing else \
        (lambda items: collate(items, tokenizer.pad_id))
    per_image = f"{family_of(cfg).image_tokens(model)} tokens per image"
    log(f"model {recipe.init_from or recipe.preset}: {count_parameters(model):,} parameters, {per_image}; "
        f"{n_train} training sequences, {len(val_ds) if val_ds else 0} validation samples"
        + (f"; {info.world} processes ({info.strategy})" if info.active else "")
        + (f"; packed into rows of {pack_length} tokens" if t.packing else ""))
    if t.activation_checkpointing:
        log(f"activation checkpointing on {checkpoint_activations(model)} blocks")
    if t.compile:
        log(f"torch.compile on {compile_blocks(model)} blocks")
    if t.precision == "bf16" and not torch.cuda.is_available():
        log("warning: train.precision bf16 on the CPU: bf16 matmuls are far slower than fp32 on most CPUs")

    step = state["global_step"] if state else 0
    metrics = MetricsLog(out / "metrics.jsonl", keep_until_step=step if state else -1, enabled=info.is_main,
                         tensorboard=out / "tensorboard" if t.tensorboard else None)
    if not state:
        metrics.write(event="run", step=0, world_size=info.world, strategy=info.strategy, packing=t.packing,
                      pack_length=pack_length, parameters=count_parameters(model), recipe=recipe.name,
                      preset=recipe.init_from or recipe.preset,
                      lora=to_dict(recipe.lora) if recipe.lora.targets else None)
    elapsed = state["train_seconds"] if state else 0.0
    n_samples = state["samples_seen"] if state else 0
    n_tokens = state["tokens_seen"] if state else 0
    padding = PaddingStats(state.get("slots_seen", 0), state.get("real_slots_seen", 0)) if state else PaddingStats()
    pbar = tqdm(total=recipe.total_steps, initial=step, disable=not progress, desc="train", unit="step",
                dynamic_ncols=True)
    loss_ema, val_loss = None, None
    model.train()
    autocast = _autocast(t.precision)

    def counters() -> dict:
        return {**batches.state(), "train_seconds": elapsed, "samples_seen": n_samples, "tokens_seen": n_tokens,
                "slots_seen": padding.slots, "real_slots_seen": padding.tokens}

    for si, stage in enumerate(recipe.stages):
        if state and si < state["stage"]:
            continue
        table = freeze_for_stage(model, stage)
        set_train_mode(model, stage)
        _log_stage(log, si, stage, table, model)
        metrics.write(event="stage", step=step, stage=stage.name, modules=table)
        if stage.objective in ("cell_labels", "qformer"):
            _check_replicated_stage(model, info)
            step, seconds, stop = whole_stage(model, model.image_tower(), cfg, processor, recipe, si, metrics, pbar, step,
                                              log, stop_at_step, ckpt, counters(), info)
            elapsed += seconds
            if stop:
                break
            continue
        features = None
        if train_ds is not None:
            train_ds.load_images = True
        if t.precompute_frozen_vision and "vision" not in trained_groups(model, stage) and not streamed:
            if not family_of(cfg).capabilities.tower_cache:
                raise ConfigError(f"train.precompute_frozen_vision: the {cfg.family} family's image features are not "
                                  f"the tower's output of each image alone at one size (tiled or resized images, or "
                                  f"a question read with the image); set it to false")
            if info.strategy == "fsdp":
                raise ConfigError("train.precompute_frozen_vision with train.distributed fsdp: the sharded tower "
                                  "cannot run outside the model's forward; set it to false")
            t0 = time.perf_counter()
            features = FrozenVisionFeatures(model.image_tower(), processor, [p for x in samples for p in x.images],
                                            progress=progress)
            train_ds.load_images = False
            elapsed += time.perf_counter() - t0
            log(f"  vision features of {len(features):,} images precomputed in {time.perf_counter() - t0:.1f} s "
                f"({features.nbytes / 2**20:,.0f} MiB)")
        note = batchnorm_note(model, info)
        if note:
            log(note)
        net = wrap_model(model, info)
        opt = make_optimizer(model, stage)
        first = 0
        if state and si == state["stage"]:
            first = state["step_in_stage"]
            if info.strategy == "fsdp":
                load_sharded(ckpt / "dcp", net, opt if first else None)
            elif first and (ckpt / "optimizer.safetensors").exists():
                load_optimizer(opt, ckpt / "optimizer.safetensors")
        for s in range(first, stage.steps):
            t0 = time.perf_counter()
            set_lr(opt, lr_factor(s, stage))
            micro = [collate_fn(items) for items in batches.next_step()]
            sums = [float(sum(int((b.labels[:, 1:] != IGNORE).sum()) for b in micro)),
                    float(sum(b.n_samples for b in micro)), float(sum(b.real_tokens for b in micro)),
                    float(sum(b.input_ids.numel() for b in micro))]
            n_sup, step_samples, step_tokens, step_slots = info.all_sum(sums)
            loss_sum = 0.0
            for batch in micro:
                with autocast:
                    res = forward_batch(net, batch, features)
                # the mean over every supervised token of the global batch (all micro-batches, all ranks): DDP and
                # FSDP average gradients over ranks, hence the factor world
                # (a micro-batch without supervised tokens has a NaN mean: it contributes zero, gradients included)
                (res.loss.nan_to_num(0.0) * (res.n_tokens * info.world / max(n_sup, 1))).backward()
                loss_sum += float(res.loss.detach().nan_to_num(0.0)) * res.n_tokens
            loss_value = info.all_sum([loss_sum])[0] / max(n_sup, 1)
            grad_norm = grad_norm_value(torch.nn.utils.clip_grad_norm_(
                [p for p in net.parameters() if p.requires_grad], t.max_grad_norm))
            opt.step()
            opt.zero_grad(set_to_none=True)
            elapsed += time.perf_counter() - t0
            step += 1
            n_samples += int(step_samples)
            n_tokens += int(step_tokens)
            padding.slots += int(step_slots)
            padding.tokens += int(step_tokens)
            loss_ema = loss_value if loss_ema is None else 0.9 * loss_ema + 0.1 * loss_value
            pbar.update(1)
            pbar.set_postfix(stage=stage.name, loss=f"{loss_ema:.3f}", samples_s=f"{n_samples / elapsed:.1f}")
            if step % t.log_every == 0 or s == stage.steps - 1:
                metrics.write(step=step, stage=stage.name, loss=loss_value, lr=opt.param_groups[0]["lr"],
                              grad_norm=grad_norm, samples_per_second=n_samples / elapsed,
                              tokens_per_second=n_tokens / elapsed, padding_fraction=padding.fraction,
                              samples=int(step_samples), elapsed=elapsed)
            if val_ds and (step % t.eval_every == 0 or s == stage.steps - 1):
                val_loss = evaluate_loss(unwrap(net), val_ds, tokenizer.pad_id)
                metrics.write(step=step, stage=stage.name, val_loss=val_loss)
                log(f"step {step}: val_loss {val_loss:.4f}")
            last_of_stage = s == stage.steps - 1
            if last_of_stage or step % t.save_every == 0:
                st = {**counters(), "global_step": step, "stage": si + 1 if last_of_stage else si,
                      "step_in_stage": 0 if last_of_stage else s + 1}
                final = last_of_stage and si == len(recipe.stages) - 1
                save_training_checkpoint(ckpt, net, cfg, processor, None if last_of_stage else opt, st, recipe,
                                         info, final=final)
            if stop_at_step is not None and step >= stop_at_step:
                break
        if stop_at_step is not None and step >= stop_at_step:
            break
    pbar.close()
    metrics.close()
    model.eval()
    finish_run(out, info, log)
    return TrainResult(ckpt, step, elapsed, n_samples / max(elapsed, 1e-9), n_tokens / max(elapsed, 1e-9),
                       loss_ema if loss_ema is not None else float("nan"), val_loss)


def _check_replicated_stage(model, info: DistInfo) -> None:
    """A cell_labels stage runs whole on every rank (the same seeded computation, so the replicas stay equal: it
    is the small tower's pretraining); under FSDP only before the model is sharded."""
    if info.strategy == "fsdp":
        from torch.distributed.fsdp import FSDPModule

        if isinstance(model, FSDPModule):
            raise ConfigError("a cell_labels stage after a sharded (FSDP) stage: put it first, or use DDP")


def start_run(recipe: Recipe, out, resume: bool, progress: bool, log):
    """The start of a run (either loop) -> (dist info, out folder, checkpoint folder, resumed state or None, log,
    progress): join torchrun's group if any (only rank 0 logs and shows progress), clean what a killed run left
    beside the checkpoint, read the state to resume, set the thread count."""
    info = init_distributed(recipe.train.distributed)
    if not info.is_main:
        log, progress = (lambda msg: None), False
    log = log or (lambda msg: tqdm.write(msg))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint"
    if info.is_main:
        _clean_stale(ckpt)
    info.barrier()
    state = _read_state(ckpt) if resume else None
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    return info, out, ckpt, state, log, progress


def finish_run(out: Path, info: DistInfo, log) -> None:
    """The end of a run (either loop): the training report (rank 0), then leave the process group."""
    if info.is_main and (out / "metrics.jsonl").exists():
        try:
            write_report(out)
        except Exception as e:  # the run is done and saved; a report that fails must not fail it
            log(f"warning: the training report was not written: {e}")
    info.finish()


def whole_stage(model, encoder, cfg, processor, recipe: Recipe, si: int, metrics, pbar, step: int, log,
                stop_at_step: int | None, ckpt: Path, counters: dict,
                info: DistInfo | None = None) -> tuple[int, float, bool]:
    """Stage ``si`` of ``recipe``, a stage with its own small loop — cell_labels on ``encoder`` (the image tower
    alone, train/cell_labels.py) or qformer (BLIP-2's stage 1, train/qformer_stage.py) — and the checkpoint after
    it -> (global step, seconds spent, whether the run stops here). The stage is never checkpointed midway: an
    interrupted one reruns whole. ``counters``: the stream position and running totals saved with it. Under
    torchrun every rank runs it (see :func:`_check_replicated_stage`) and rank 0 saves."""
    stage = recipe.stages[si]
    first = step
    common = (stage.batch_size or recipe.train.batch_size, Path(recipe.data.path or "."), recipe.train.seed + si,
              metrics, pbar, step, recipe.train.max_grad_norm, log, stop_at_step)
    if stage.objective == "qformer":
        step, seconds = run_qformer_stage(model, processor.tokenizer, processor, stage, *common,
                                          progress=not pbar.disable)
    else:
        # a tiled tower (Mllama's CNN on every tile) pretrains its one-tile tower on whole images
        step, seconds = run_cell_label_stage(encoder, processor, stage, *common)
    if step < first + stage.steps:
        return step, seconds, True  # stopped inside the stage (stop_at_step): nothing of it is saved
    st = {**counters, "global_step": step, "stage": si + 1, "step_in_stage": 0,
          "train_seconds": counters["train_seconds"] + seconds}
    save_training_checkpoint(ckpt, model, cfg, processor, None, st, recipe, info)
    return step, seconds, stop_at_step is not None and step >= stop_at_step


def _resumed(ckpt: Path):
    """(model config, model, processor) of a fine-tuning run's own checkpoint."""
    model, processor, cfg, _ = load_checkpoint(ckpt, merge_lora=False)
    return cfg, model.train(), processor


def _read_state(ckpt: Path) -> dict | None:
    if not ckpt.exists():
        return None
    if not (ckpt / "dcp" / ".metadata").is_file():  # a sharded (FSDP) checkpoint resumes from its shards
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


