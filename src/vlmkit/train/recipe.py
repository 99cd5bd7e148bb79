"""Recipes: what to train, on what data, in which stages. YAML files or built-in names, plus ``--set``.

A stage names the modules that train (``vision``, ``connector``, ``lm`` of a vision-language model; ``vision``,
``text``, ``logits`` of a dual encoder; ``all``: every module of the model); everything else is frozen, as in
LLaVA's stage 1 (connector only) and stage 2 (connector + LM), or LiT's locked image tower (``[text, logits]``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from vlmkit.config import apply_overrides, from_dict, parse_value
from vlmkit.errors import ConfigError
from vlmkit.nn.lora import LoRAConfig

# vision-language models: vision, connector, lm; dual encoders: vision, text, logits (temperature and bias); lora:
# the LoRA adapters of the recipe's lora section (wherever they sit; the weights they adapt stay frozen)
MODULE_GROUPS = ("vision", "connector", "lm", "text", "logits", "lora", "generation", "vq")


@dataclass
class StageConfig:
    name: str = "main"
    train: list[str] = field(default_factory=lambda: ["all"])
    steps: int = 100
    lr: float = 1e-3
    lr_scale: dict[str, float] = field(default_factory=dict)  # per-module multipliers, e.g. {vision: 0.5}
    warmup: float = 0.05  # fraction of the stage's steps
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    # lm: next-token loss on the assistant turns; cell_labels: the vision tower alone learns the colour and
    # shape under each cell of its grid from ShapesWorld's scenes.json (objectives/cell_labels.py); contrastive: a dual
    # encoder's loss (contrastive.loss of the model: CLIP's InfoNCE or SigLIP's sigmoid) on image-caption pairs;
    # qformer: BLIP-2's stage 1 (ITC + ITM + ITG of a Q-Former connector on a frozen tower, objectives/qformer.py)
    objective: str = "lm"
    batch_size: int = 0  # cell_labels and qformer stages only; 0 = train.batch_size
    pairs: str = "pairs_train.csv"  # qformer and unified stages: the image-caption pairs (CSV/TSV/COCO JSON) under data.path
    # cell_labels stages: also each cell's row and column, for a model whose image states do not carry where they
    # were computed (Fuyu: its LM reads the patches with 1-D rotary positions alone; recipes/tiny-fuyu.yaml)
    where: bool = False
    # unified stages (objectives/unified.py): the weights of the text and image-code losses (each the mean over its
    # tokens of the global batch), and how often a caption is replaced by the unconditional prompt (guidance)
    text_weight: float = 1.0
    image_weight: float = 1.0
    cond_dropout: float = 0.1
    optimizer: str = "adamw"  # adamw, or muon: Muon on the hidden weight matrices, AdamW on the rest


OPTIMIZERS = ("adamw", "muon")


@dataclass
class DataConfig:
    path: str = ""  # folder holding the split files (a ShapesWorld folder, say)
    train: list[str] = field(default_factory=lambda: ["train.json"])  # LLaVA JSON or COCO captions files
    val: str = ""  # validation file under path (LLaVA JSON or pairs); "": none. A file named that is missing is an error
    image_root: str = ""  # image paths are relative to the JSON file unless this is set
    group_turns: int = 8  # merge questions about one image into conversations of up to N turns; 0 = off
    val_samples: int = 256  # dual encoders: validation images (with all their captions)
    skip_bad_samples: bool = False
    # image-caption pairs (dual encoders) in CSV/TSV: the columns, open_clip's --csv-img-key / --csv-caption-key,
    # and the separator ("": tab for .tsv, comma otherwise). COCO captions JSON files are read as pairs too
    csv_image_key: str = "image"
    csv_caption_key: str = "caption"
    csv_separator: str = ""
    # WebDataset shards written by `vlmkit data shard` (a folder with index.json): training streams them instead
    # of reading data.train, through a shuffle buffer of this many samples and this many worker processes
    shards: str = ""
    shuffle_buffer: int = 1000
    workers: int = 0


@dataclass
class TokenizerConfig:
    path: str = ""  # an existing tokenizer.json; empty = train a byte-level BPE on the training text
    vocab_size: int = 1024


@dataclass
class TrainConfig:
    batch_size: int = 32
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    save_every: int = 500
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    # lm stages with the vision tower frozen: run the tower once over every training image at the stage's
    # start and look its features up afterwards (train/frozen_features.py); needs them to fit in RAM
    precompute_frozen_vision: bool = False
    # several samples per row up to pack_length tokens, attention isolated per sample (data/collate.py); the
    # loss and gradients are those of the same batch padded. pack_length 0 = the longest training sample
    packing: bool = False
    pack_length: int = 0
    # token-budget batching: each optimizer step takes samples until their tokens would exceed this many (summed
    # over ranks and gradient accumulation); 0 = batch_size samples per micro-batch
    batch_tokens: int = 0
    # under torchrun (WORLD_SIZE > 1): ddp, or fsdp (FSDP2 fully_shard per block, sharded checkpoints)
    distributed: str = "ddp"
    activation_checkpointing: bool = False  # recompute each transformer block's activations in the backward
    compile: bool = False  # torch.compile each transformer block (regional compilation)
    # auto: bf16 autocast on CUDA, fp32 on the CPU (bf16 matmuls are ~100x slower on these CPUs); fp32; bf16
    precision: str = "auto"
    tensorboard: bool = False  # also log metrics to OUT/tensorboard (pip install 'vlmkit[tensorboard]')


@dataclass
class Recipe:
    name: str = "custom"
    preset: str = "tiny-llava"
    # a Hugging Face folder or a vlmkit checkpoint to fine-tune: its model, tokenizer and processor replace the
    # preset's (model overrides and the tokenizer settings are then not used; processor overrides apply)
    init_from: str = ""
    model: dict[str, Any] = field(default_factory=dict)  # dotted overrides of the preset's ModelConfig
    processor: dict[str, Any] = field(default_factory=dict)  # dotted overrides of its ProcessorConfig
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # adapters; a stage trains them with train: [lora]

    def validate(self) -> None:
        from vlmkit.objectives import objective_class
        from vlmkit.presets import PRESETS

        PRESETS.get(self.preset)  # an unknown preset fails before any data is read
        if self.init_from and self.model:
            raise ConfigError(f"model overrides {sorted(self.model)} with init_from {self.init_from!r}: the weights "
                              f"fix the architecture; drop the model section (processor overrides are allowed)")
        if not self.stages:
            raise ConfigError("a recipe needs at least one stage")
        for i, st in enumerate(self.stages):
            bad = [m for m in st.train if m not in (*MODULE_GROUPS, "all")]
            if bad or not st.train:
                raise ConfigError(f"stages[{i}].train: {bad or '[]'} is not a list of modules; "
                                  f"valid: all, {', '.join(MODULE_GROUPS)}")
            bad = [m for m in st.lr_scale if m not in MODULE_GROUPS]
            if bad:
                raise ConfigError(f"stages[{i}].lr_scale: unknown module {bad[0]!r}; valid: {', '.join(MODULE_GROUPS)}")
            if st.steps < 1:
                raise ConfigError(f"stages[{i}].steps must be >= 1, got {st.steps}")
            if st.optimizer not in OPTIMIZERS:
                raise ConfigError(f"stages[{i}].optimizer: {st.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
            try:
                objective = objective_class(st.objective)
            except ConfigError as e:
                raise ConfigError(f"stages[{i}].objective: {e}") from None
            objective.check_stage(st, i)
        if self.train.batch_size < 1 or self.train.grad_accum < 1:
            raise ConfigError("train.batch_size and train.grad_accum must be >= 1")
        t = self.train
        if t.pack_length < 0 or t.batch_tokens < 0:
            raise ConfigError(f"train.pack_length ({t.pack_length}) and train.batch_tokens ({t.batch_tokens}) must "
                              f"be >= 0 (0: the longest sample; no token budget)")
        if t.distributed not in ("ddp", "fsdp"):
            raise ConfigError(f"train.distributed: {t.distributed!r}; valid: ddp, fsdp")
        if t.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"train.precision: {t.precision!r}; valid: auto, fp32, bf16")
        if self.data.shards and t.batch_tokens:
            raise ConfigError("train.batch_tokens with data.shards: a streamed batch is train.batch_size samples "
                              "(pack them with train.packing)")
        uses_lora = any("lora" in st.train for st in self.stages)
        if uses_lora and not self.lora.targets:
            raise ConfigError("a stage trains [lora] but lora.targets is empty: name the Linear modules to adapt, "
                              "e.g. lora: {targets: ['lm.layers.*.attn.*_proj']}")
        if self.lora.targets and (self.lora.rank < 1 or self.lora.alpha <= 0 or not 0 <= self.lora.dropout < 1):
            raise ConfigError(f"lora: rank {self.lora.rank} must be >= 1, alpha {self.lora.alpha} > 0, dropout "
                              f"{self.lora.dropout} in [0, 1)")

    def stage_index(self, objective: str = "lm") -> int:
        """Index of the first stage with this objective (the demo recipe starts with a vision stage)."""
        for i, st in enumerate(self.stages):
            if st.objective == objective:
                return i
        raise ConfigError(f"recipe {self.name!r} has no stage with objective {objective!r}")

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)


def builtin_recipes() -> list[str]:
    folder = resources.files("vlmkit") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe from a YAML path or a built-in name, then apply ``key=value`` overrides."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        text, name = path.read_text(), path.stem
    else:
        if name_or_path not in builtin_recipes():
            raise ConfigError(f"Unknown recipe {name_or_path!r}. Built-in recipes: {', '.join(builtin_recipes())}; "
                              f"or pass a path to a YAML file")
        text = (resources.files("vlmkit") / "recipes" / f"{name_or_path}.yaml").read_text()
        name = name_or_path
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {name_or_path} is not valid YAML: {e}") from e
    raw.setdefault("name", name)
    return override_recipe(from_dict(Recipe, raw, "recipe"), overrides or [])


def only_stages(recipe: Recipe, objective: str) -> Recipe:
    """The recipe with only its stages of ``objective`` (e.g. a dual-encoder recipe without its image-tower stage,
    so that ``stages.0`` addresses the contrastive one)."""
    stages = [s for s in recipe.stages if s.objective == objective]
    if not stages:
        raise ConfigError(f"recipe {recipe.name!r} has no stage with objective {objective!r}")
    return dataclasses.replace(recipe, stages=stages)


def override_recipe(recipe: Recipe, overrides: list[str]) -> Recipe:
    """``recipe`` with ``key=value`` overrides applied (``stages.N.field`` for a stage), validated."""
    recipe = _apply(recipe, parse_overrides(overrides))
    recipe.validate()
    return recipe


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r} (e.g. --set train.batch_size=16)")
        key, value = item.split("=", 1)
        key = key.strip()
        out[key] = parse_value(value)
    return out


def _apply(recipe: Recipe, overrides: dict[str, Any]) -> Recipe:
    """Apply dotted overrides; ``stages.N.field`` addresses one stage."""
    plain = {k: v for k, v in overrides.items() if not k.startswith("stages.")}
    recipe = apply_overrides(recipe, plain)
    recipe.stages = list(recipe.stages)
    for key, value in overrides.items():
        if not key.startswith("stages."):
            continue
        parts = key.split(".", 2)
        if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) >= len(recipe.stages):
            raise ConfigError(f"--set {key}: address a stage as stages.N.field with N in 0..{len(recipe.stages) - 1}")
        i = int(parts[1])
        recipe.stages[i] = apply_overrides(recipe.stages[i], {parts[2]: value}, root=f"stages.{i}")
    return recipe
