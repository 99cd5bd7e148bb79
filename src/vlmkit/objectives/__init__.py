"""Stage objectives: what a recipe stage optimises, as objects the one stage loop (train/loop.py) calls.

An objective brings its data (batches drawn reproducibly, resumable from a saved position), its loss (one optimizer
step's forward and backward, over micro-batches and ranks as it needs), what it logs, and its validation:

- ``lm`` (objectives/lm.py): next-token loss on the assistant replies of conversations;
- ``contrastive`` (objectives/contrastive.py): a dual encoder's CLIP / SigLIP loss on image-caption pairs;
- ``cell_labels`` (objectives/cell_labels.py): the image tower alone, on ShapesWorld's object annotations;
- ``qformer`` (objectives/qformer.py): BLIP-2's stage 1 on the Q-Former (ITC, ITM, ITG);
- ``unified`` (objectives/unified.py): text-to-image and image-to-text in one model (Janus, Chameleon, Emu3);
- ``diffusion`` (objectives/diffusion.py): a latent-diffusion model's flow-matching loss on text-to-image pairs.

A family names the objectives its models train with (``Family.objectives``).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from vlmkit.errors import ConfigError
from vlmkit.registry import Registry

# stage settings (train/recipe.py StageConfig) that only some objectives read: qformer's and unified's
# image-caption pairs, cell_labels' rows and columns, unified's loss weights and condition dropout
STAGE_OPTIONS = ("pairs", "where", "text_weight", "image_weight", "cond_dropout")


@dataclass
class StepResult:
    """One optimizer step of an objective: its loss (the whole global batch's), the samples, real tokens and token
    slots it read (for the run's throughput and padding counters), and what else it logs."""

    loss: float
    samples: int = 0
    tokens: int = 0
    slots: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


class Objective:
    """The interface of a stage objective (module docstring). One instance serves every stage of its kind in a run
    (its data stream runs on across them); :meth:`start` begins a stage."""

    name: ClassVar[str]
    # the stage is checkpointed every train.save_every steps and resumes mid-stage; False: only at its end (an
    # interrupted stage reruns whole)
    resumable: ClassVar[bool] = True
    # the model runs wrapped for several processes (DDP / FSDP); False: every rank runs the stage whole, the same
    # seeded computation, so the replicas stay equal
    distributed: ClassVar[bool] = True
    # a step may leave trained parameters out of one rank's graph (its samples hold no image to read, or none to
    # write): DDP looks for them before it reduces
    unused_parameters: ClassVar[bool] = False
    log_every: ClassVar[int | None] = None  # None: the recipe's train.log_every
    optimizers: ClassVar[tuple[str, ...]] = ("adamw", "muon")  # the stage optimizers it trains with
    # the modules a stage of it must train (None: any); a stage's own batch_size is read (False: train.batch_size)
    trains: ClassVar[list[str] | None] = None
    own_batch_size: ClassVar[bool] = False
    # the settings of STAGE_OPTIONS it reads; a stage of it that sets another is refused
    stage_options: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def check_recipe(cls, recipe) -> None:
        """Refuse, before a run starts (no process group joined, no data read), recipe settings it cannot run."""

    @classmethod
    def check_stage(cls, stage, i: int) -> None:
        """Refuse, when the recipe is read, a stage this objective cannot run (``i``: its index, for the message)."""
        if stage.optimizer not in cls.optimizers:
            raise ConfigError(f"stages[{i}].optimizer: {stage.optimizer} does not train {cls.name} stages; "
                              f"valid: {', '.join(cls.optimizers)}")
        if cls.trains is not None and stage.train != cls.trains:
            raise ConfigError(f"stages[{i}]: the {cls.name} objective trains {', '.join(cls.trains)} alone "
                              f"({cls.__doc__.strip().splitlines()[0].rstrip('.')}); set train: {cls.trains}, "
                              f"got {stage.train}")
        if stage.batch_size < 0 or (stage.batch_size and not cls.own_batch_size):
            raise ConfigError(f"stages[{i}].batch_size: {stage.batch_size}; {cls.name} stages use train.batch_size "
                              f"(only {', '.join(n for n in OBJECTIVES.names() if objective_class(n).own_batch_size)}"
                              f" stages take their own: >= 1, or 0 for train.batch_size)")
        defaults = {f.name: f.default for f in dataclasses.fields(stage)}
        for option in STAGE_OPTIONS:
            if getattr(stage, option) != defaults[option] and option not in cls.stage_options:
                readers = [n for n in OBJECTIVES.names() if option in objective_class(n).stage_options]
                raise ConfigError(f"stages[{i}].{option}: {cls.name} stages do not read it (only "
                                  f"{', '.join(readers)} stages do); drop it from this stage")

    def __init__(self, run):
        self.run = run

    def texts(self) -> list[str] | None:
        """The training texts a from-scratch tokenizer learns from (None: this objective reads none)."""
        return None

    def describe(self) -> str:
        """Its data, for the line a run logs at its start ("": nothing to say)."""
        return ""

    def first_rows(self) -> list[dict]:
        """Rows a new run logs after its run event (e.g. what the data holds)."""
        return []

    def bind(self, model, processor) -> None:
        """The model and its processor are built: prepare what needs them (datasets)."""

    def start(self, stage, si: int, model) -> None:
        """Begin stage ``si`` (modules already frozen and in train/eval mode as the stage says)."""

    def parameters(self) -> list[nn.Parameter]:
        """Parameters the objective trains besides the model's (heads dropped after the stage)."""
        return []

    def step(self, net, model) -> StepResult:
        """One optimizer step's forward and backward (gradients accumulated into the parameters)."""
        raise NotImplementedError

    def after_step(self, model) -> None:
        """After the optimizer step (e.g. clamp a temperature)."""

    def row(self, result: StepResult) -> dict:
        """What a logged step row holds besides step, stage, loss, lr and grad_norm (may override the loss)."""
        return {}

    def postfix(self, result: StepResult) -> dict:
        """What the progress bar shows beside the stage."""
        return {}

    def validation_due(self, step: int, last: bool) -> bool:
        return step % self.run.recipe.train.eval_every == 0 or last

    def validate(self, model, last: bool) -> dict[str, float]:
        """Held-out metrics, written to the log ({}: none)."""
        return {}

    def state(self) -> dict:
        """The data position a checkpoint saves, to resume the stream exactly."""
        return {}


OBJECTIVES: Registry[type[Objective]] = Registry("objective")


def register(cls: type[Objective]) -> type[Objective]:
    OBJECTIVES.register(cls.name, (cls.__doc__ or "").strip().splitlines()[0])(cls)
    return cls


def objective_class(name: str) -> type[Objective]:
    """The objective registered as ``name``; this package's modules register theirs, all imported on first use."""
    global _discovered
    if not _discovered:
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")
        _discovered = True
    return OBJECTIVES.get(name)


_discovered = False

__all__ = ["OBJECTIVES", "Objective", "StepResult", "objective_class", "register"]
