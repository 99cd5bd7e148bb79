"""The training loop: one loop for every stage of every recipe.

A run (train/run.py) builds its model (train/build.py), then runs each stage with the stage's objective
(vlmkit.objectives: ``lm``, ``contrastive``, ``cell_labels``, ``qformer``): freeze what the stage does not train,
make its optimizer, and for each step let the objective draw its batch and accumulate its gradients, clip, step,
log, validate and checkpoint. Data order is a pure function of (seed, position), weights and optimizer state are
saved exactly, and the learning rate is a function of the step, so ``resume=True`` continues exactly where the last
checkpoint stopped (an objective that is not ``resumable`` reruns its interrupted stage whole).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from vlmkit.config import to_dict
from vlmkit.family import family_of
from vlmkit.models import count_parameters
from vlmkit.objectives import Objective, StepResult, objective_class
from vlmkit.train.build import build_model_for, check_recipe
from vlmkit.train.distributed import (batchnorm_note, grad_norm_value, load_sharded, transformer_blocks, unwrap,
                                      wrap_model)
from vlmkit.train.optim import (freeze_for_stage, load_optimizer, lr_factor, make_optimizer, set_lr,
                                set_train_mode)
from vlmkit.train.recipe import Recipe
from vlmkit.train.run import Run, TrainResult
from vlmkit.utils import seed_everything


def train(recipe: Recipe, out: str | Path, resume: bool = False, progress: bool = True, log=None,
          stop_at_step: int | None = None, overwrite: bool = False) -> TrainResult:
    """Run every stage of ``recipe``; the last checkpoint is ``out/checkpoint``.

    Under torchrun (``WORLD_SIZE`` > 1) every process runs this with its share of each batch (train/distributed.py).
    ``stop_at_step`` ends the run abruptly after that global step, without a final save, as an interruption would
    (the run can be continued with ``resume=True`` from the last checkpoint). A folder that already holds a run is
    refused unless ``resume`` or ``overwrite`` says what to do with it."""
    check_recipe(recipe)
    run = Run(recipe, out, resume, overwrite, progress, log, stop_at_step)
    seed_everything(recipe.train.seed)
    objectives = {name: objective_class(name)(run) for name in dict.fromkeys(s.objective for s in recipe.stages)}
    build_model_for(run, lambda: _texts(objectives))
    for objective in objectives.values():
        objective.bind(run.model, run.processor)
    _start(run, objectives)
    for si, stage in enumerate(recipe.stages):
        if run.state and si < run.state["stage"]:
            continue
        if run_stage(run, objectives[stage.objective], si, list(objectives.values())):
            break
    return run.finish()


def _texts(objectives: dict[str, Objective]) -> list[str]:
    """What a from-scratch tokenizer learns from: the texts of the first objective that reads any."""
    for objective in objectives.values():
        if texts := objective.texts():
            return texts
    return []


def _start(run: Run, objectives: dict[str, Objective]) -> None:
    """Log what runs (model, data, threads), speed-up settings, and the run's first rows."""
    recipe, info, model = run.recipe, run.info, run.model
    n = torch.get_num_threads()  # numerics depend on it: compare runs at equal threads (docs/training.md)
    threads = f"{n} thread{'s' * (n != 1)}" + (f" per process, {info.world} processes ({info.strategy})"
                                               if info.active else "")
    data = "; ".join(d for o in objectives.values() if (d := o.describe()))
    run.log(f"model {recipe.init_from or recipe.preset}: {count_parameters(model):,} parameters, "
            f"{family_of(run.cfg).image_tokens(model)} tokens per image; {data}; {threads}")
    if recipe.train.activation_checkpointing:
        run.log(f"activation checkpointing on {checkpoint_activations(model)} blocks")
    if recipe.train.compile:
        run.log(f"torch.compile on {compile_blocks(model)} blocks")
    if recipe.train.precision == "bf16" and not torch.cuda.is_available():
        run.log("warning: train.precision bf16 on the CPU: bf16 matmuls are far slower than fp32 on most CPUs")
    run.open_log()
    if not run.resumed:
        run.metrics.write(event="run", step=0, world_size=info.world, strategy=info.strategy,
                          packing=recipe.train.packing, parameters=count_parameters(model), recipe=recipe.name,
                          preset=recipe.init_from or recipe.preset, threads=torch.get_num_threads(),
                          lora=to_dict(recipe.lora) if recipe.lora.targets else None)
        for o in objectives.values():
            for row in o.first_rows():
                run.metrics.write(**row)


def run_stage(run: Run, objective: Objective, si: int, all_objectives: list[Objective]) -> bool:
    """Stage ``si`` of the recipe with its ``objective``; returns whether the run stops (``stop_at_step``)."""
    stage, model = run.recipe.stages[si], run.model
    table = freeze_for_stage(model, stage)
    set_train_mode(model, stage)
    _log_stage(run, si, stage, table)
    objective.start(stage, si, model)
    run.net = wrap_model(model, run.info, objective.unused_parameters) if objective.distributed else model
    if objective.distributed and (note := batchnorm_note(model, run.info)):
        run.log(note)
    opt = make_optimizer(model, stage, objective.parameters())
    for s in range(_resume_position(run, si, opt, objective), stage.steps):
        last = s == stage.steps - 1
        _one_step(run, objective, stage, s, opt)
        if objective.validation_due(run.step, last) and (vals := objective.validate(unwrap(run.net), last)):
            _log_validation(run, stage, vals)
        if last or (objective.resumable and run.step % run.recipe.train.save_every == 0):
            run.save(si, s + 1, last, opt, {k: v for o in all_objectives for k, v in o.state().items()})
        if run.should_stop():
            return True
    return False


def _resume_position(run: Run, si: int, opt, objective: Objective) -> int:
    """The step of stage ``si`` the run resumes at, with the optimizer state saved there (0: a new stage)."""
    if not (run.state and si == run.state["stage"]) or not objective.resumable:
        return 0
    first = run.state["step_in_stage"]
    if run.info.strategy == "fsdp":
        load_sharded(run.ckpt / "dcp", run.net, opt if first else None)
    elif first and (run.ckpt / "optimizer.safetensors").exists():
        load_optimizer(opt, run.ckpt / "optimizer.safetensors")
    return first


def _one_step(run: Run, objective: Objective, stage, s: int, opt) -> StepResult:
    """One optimizer step: the objective's forward and backward, clipping, the update, the counters and the log."""
    t0 = time.perf_counter()
    set_lr(opt, lr_factor(s, stage))
    result = objective.step(run.net, run.model)
    params = [p for p in run.net.parameters() if p.requires_grad] + objective.parameters()
    grad_norm = grad_norm_value(torch.nn.utils.clip_grad_norm_(params, run.recipe.train.max_grad_norm))
    opt.step()
    opt.zero_grad(set_to_none=True)
    objective.after_step(run.model)
    run.elapsed += time.perf_counter() - t0
    run.step += 1
    run.samples, run.tokens = run.samples + result.samples, run.tokens + result.tokens
    run.padding.slots, run.padding.tokens = run.padding.slots + result.slots, run.padding.tokens + result.tokens
    run.loss_ema = result.loss if run.loss_ema is None else 0.9 * run.loss_ema + 0.1 * result.loss
    run.pbar.update(1)
    run.pbar.set_postfix(stage=stage.name, loss=f"{run.loss_ema:.3f}", **objective.postfix(result))
    last = s == stage.steps - 1
    if objective.log_every:  # every N steps of the stage (its own window)
        due = (s + 1) % objective.log_every == 0 or last
    else:  # every train.log_every global steps
        due = run.step % run.recipe.train.log_every == 0 or last
    if due:
        row = {"loss": result.loss, "lr": opt.param_groups[0]["lr"], "grad_norm": grad_norm}
        run.metrics.write(step=run.step, stage=stage.name, **{**row, **objective.row(result)})
    return result


def _log_validation(run: Run, stage, vals: dict[str, float]) -> None:
    run.metrics.write(step=run.step, stage=stage.name, elapsed=run.elapsed, **vals)
    if "val_loss" in vals:
        run.val_loss = vals["val_loss"]
    run.log(f"step {run.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in vals.items()))


def _log_stage(run: Run, si: int, stage, table: list[dict]) -> None:
    """The stage's modules (trained or frozen), to the console and, once, to the log."""
    run.log(f"stage {si} '{stage.name}': {stage.steps} steps, lr {stage.lr:g}")
    for row in table:
        what = f"trains (lr {row['lr']:g})" if row["trainable"] else "frozen"
        run.log(f"  {row['module']:<10} {row['params']:>12,} params  {what}")
    run.log(f"  trainable: {count_parameters(run.model, trainable_only=True):,} of {count_parameters(run.model):,}")
    if run.metrics.count(event="stage") <= si:  # a resumed stage logged its event before the cut
        run.metrics.write(event="stage", step=run.step, stage=stage.name, modules=table)


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


__all__ = ["TrainResult", "checkpoint_activations", "compile_blocks", "run_stage", "train"]
