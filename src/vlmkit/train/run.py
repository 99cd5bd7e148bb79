"""A training run's state while its stages run: the process group, the output folder, the resumed state, the
running counters, the metrics log, the progress bar and the checkpoint writes (:class:`Run`).

The output folder holds ``checkpoint/``, ``metrics.jsonl`` (one JSON object per line: a ``run`` event, a ``stage``
event per stage, step rows and validation rows) and the report written at the end. A folder that already holds a
run is refused unless the run is resumed (``resume``) or replaced (``overwrite``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vlmkit.data.collate import PaddingStats
from vlmkit.errors import ConfigError
from vlmkit.train.checkpointing import clean_stale, read_state, save_training_checkpoint
from vlmkit.train.distributed import DistInfo, init_distributed
from vlmkit.train.recipe import Recipe
from vlmkit.train.report import write_report

# what a run writes into its output folder (an --overwrite removes them first)
RUN_FILES = ("checkpoint", "metrics.jsonl", "tensorboard", "training_report.md", "training_report.png")


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
        self.kept: list[dict] = []  # the rows a resumed run keeps
        if not enabled:
            return
        if keep_until_step is not None and path.exists():
            self.kept = [r for r in map(json.loads, path.read_text().splitlines()) if r.get("step", 0) <= keep_until_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in self.kept))
        if tensorboard is not None:
            from vlmkit.train.report import TensorBoardWriter

            self.tb = TensorBoardWriter(tensorboard)

    def count(self, **fields) -> int:
        """How many kept rows have all of ``fields`` (a resumed run does not write a stage's event twice)."""
        return sum(all(r.get(k) == v for k, v in fields.items()) for r in self.kept)

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


class Run:
    """A run of ``recipe`` into ``out`` (module docstring). The model, its config and processor are set by the
    caller once built (:mod:`vlmkit.train.build`)."""

    def __init__(self, recipe: Recipe, out, resume: bool = False, overwrite: bool = False, progress: bool = True,
                 log=None, stop_at_step: int | None = None):
        self.recipe, self.stop_at_step = recipe, stop_at_step
        self.info: DistInfo = init_distributed(recipe.train.distributed)
        if not self.info.is_main:
            log, progress = (lambda msg: None), False
        self.log = log or (lambda msg: tqdm.write(msg))
        self.progress = progress
        self.out = Path(out)
        self.ckpt = self.out / "checkpoint"
        if self.info.is_main:
            _prepare_folder(self.out, resume, overwrite)
        self.info.barrier()
        self.state = read_state(self.ckpt) if resume else None
        if recipe.train.threads:
            torch.set_num_threads(recipe.train.threads)
        st = self.state or {}
        self.step = st.get("global_step", 0)
        self.elapsed, self.samples, self.tokens = st.get("train_seconds", 0.0), st.get("samples_seen", 0), \
            st.get("tokens_seen", 0)
        self.padding = PaddingStats(st.get("slots_seen", 0), st.get("real_slots_seen", 0))
        self.loss_ema: float | None = None
        self.val_loss: float | None = None
        self.model = self.cfg = self.processor = None
        self.net = None  # the model as the current stage runs it (wrapped under DDP / FSDP)
        self.metrics: MetricsLog | None = None
        self.pbar = None

    @property
    def resumed(self) -> bool:
        return self.state is not None

    def open_log(self) -> None:
        t = self.recipe.train
        self.metrics = MetricsLog(self.out / "metrics.jsonl", keep_until_step=self.step if self.state else -1,
                                  enabled=self.info.is_main,
                                  tensorboard=self.out / "tensorboard" if t.tensorboard else None)
        self.pbar = tqdm(total=self.recipe.total_steps, initial=self.step, disable=not self.progress, desc="train",
                         unit="step", dynamic_ncols=True)

    def counters(self) -> dict:
        return {"train_seconds": self.elapsed, "samples_seen": self.samples, "tokens_seen": self.tokens,
                "slots_seen": self.padding.slots, "real_slots_seen": self.padding.tokens}

    def should_stop(self) -> bool:
        return self.stop_at_step is not None and self.step >= self.stop_at_step

    def save(self, si: int, next_step: int, stage_done: bool, opt, data_state: dict) -> None:
        """Checkpoint after step ``next_step`` of stage ``si`` (``stage_done``: the stage's last step)."""
        st = {**self.counters(), **data_state, "global_step": self.step, "stage": si + 1 if stage_done else si,
              "step_in_stage": 0 if stage_done else next_step}
        final = stage_done and si == len(self.recipe.stages) - 1
        save_training_checkpoint(self.ckpt, self.net, self.cfg, self.processor, None if stage_done else opt, st,
                                 self.recipe, self.info, final=final)

    def finish(self) -> TrainResult:
        """The report (rank 0), then leave the process group."""
        self.pbar.close()
        self.metrics.close()
        self.model.eval()
        if self.info.is_main and (self.out / "metrics.jsonl").exists():
            try:
                write_report(self.out)
            except Exception as e:  # the run is done and saved; a report that fails must not fail it
                self.log(f"warning: the training report was not written: {e}")
        self.info.finish()
        seconds = max(self.elapsed, 1e-9)
        return TrainResult(self.ckpt, self.step, self.elapsed, self.samples / seconds, self.tokens / seconds,
                           self.loss_ema if self.loss_ema is not None else float("nan"), self.val_loss)


def _prepare_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """Create ``out``; refuse one that holds a run unless it is resumed or replaced; tidy what a kill left."""
    out.mkdir(parents=True, exist_ok=True)
    existing = [name for name in ("checkpoint", "metrics.jsonl") if (out / name).exists()]
    if existing and not resume and not overwrite:
        raise ConfigError(f"{out} already holds a run ({', '.join(existing)}): pass --resume to continue it, or "
                          f"--overwrite to start over and replace its checkpoint and logs")
    if overwrite and not resume:
        for name in RUN_FILES:
            path = out / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    clean_stale(out / "checkpoint")


__all__ = ["MetricsLog", "Run", "TrainResult"]
