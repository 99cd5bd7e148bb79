"""LoRA (Hu et al. 2021): low-rank adapters on chosen ``nn.Linear`` modules of a frozen model.

Each chosen Linear becomes a :class:`LoRALinear`, ``y = base(x) + scaling * B(A(dropout(x)))`` with
``scaling = alpha / rank``, A Kaiming-uniform and B zero, so a fresh adapter changes nothing. The wrapped
Linear is frozen and A and B train; :func:`merge_lora` folds them into the base weights for inference and
:func:`remove_lora` gives back a plain model.

Why not peft: peft 0.21 requires accelerate, huggingface_hub, numpy, packaging, psutil, pyyaml, safetensors,
torch, tqdm and transformers at run time. vlmkit's core would gain transformers, accelerate and psutil from it
(transformers is only the test oracle; huggingface_hub already comes in with tokenizers, though vlmkit never
imports it). vlmkit's adapters must also be saved inside vlmkit checkpoints and survive an exact resume, as
plain state-dict tensors next to the model's. The parity test (tests/unit/test_lora.py) checks that a
LoRALinear gives peft's LoraLayer output from the same weights, merged and unmerged.

Adapters are saved as safetensors + JSON (never pickled): ``adapter.safetensors`` and ``adapter_config.json``.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import nn

from vlmkit.config import from_dict, to_dict
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.utils import atomic_write_bytes, atomic_write_json

ADAPTER_FORMAT = "vlmkit-lora"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class LoRAConfig:
    """Which Linears get adapters and how large. ``targets``: patterns on dotted module names, fnmatch
    globs (``"lm.layers.*.attn.q_proj"``, ``"*.v_proj"``, ``"connector.*"``) or, after ``"re:"``, a regular
    expression that must match the whole name; [] = LoRA off."""

    targets: list[str] = field(default_factory=list)
    rank: int = 8
    alpha: float = 16.0  # scaling = alpha / rank
    dropout: float = 0.0  # on the adapter's input only; the base path never drops

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> None:
        if any(not isinstance(t, str) or not t for t in self.targets):
            raise ConfigError(f"lora.targets must be non-empty name patterns, got {self.targets!r}")
        if self.rank < 1:
            raise ConfigError(f"lora.rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        for t in self.targets:
            if t.startswith("re:"):
                try:
                    re.compile(t[3:])
                except re.error as e:
                    raise ConfigError(f"lora.targets: {t!r} is not a valid regular expression: {e}") from e


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` (``self.base``) plus a rank-``r`` update ``scaling * B @ A``.

    Parameters are ``base.weight`` (``base.bias``), ``lora_A.weight`` [r, in] and ``lora_B.weight`` [out, r]:
    A is Kaiming-uniform with a = sqrt(5), as nn.Linear's default and peft's; B is zero. ``merge()`` adds
    ``scaling * B @ A`` into ``base.weight`` in place and the forward is then ``base(x)`` alone; ``unmerge()``
    subtracts it again. Both are no-ops when already done.

    The state dict of a merged module holds the merged base weight: save unmerged (or save the adapter alone
    with :func:`lora_state_dict`) when the adapter is to be trained further."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        w = base.weight
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=w.device, dtype=w.dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        # what remove_lora restores: the base parameters' requires_grad before they were frozen
        self._base_requires_grad = {n: p.requires_grad for n, p in base.named_parameters()}
        base.requires_grad_(False)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    # the wrapped Linear's attributes, for code that reads them (dtype checks, shapes)
    @property
    def weight(self) -> nn.Parameter:
        return self.base.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` [out, in] in the base weight's dtype (in float32 for 16-bit weights)."""
        a, b = self.lora_A.weight, self.lora_B.weight
        dtype = self.base.weight.dtype
        if dtype in (torch.float16, torch.bfloat16):
            a, b = a.float(), b.float()
        return ((b @ a) * self.scaling).to(dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight.add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight.sub_(self.delta_weight())
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.merged:
            return result
        # the order of operations of peft's LoraLayer, so that the outputs agree to the last bit
        x = x.to(self.lora_A.weight.dtype)
        return (result + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling).to(result.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


# ------------------------------------------------------------------------------------------------ applying


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _linears(model: nn.Module) -> tuple[dict[str, nn.Linear], dict[str, str]]:
    """Every nn.Linear that can take an adapter, by qualified name, and the ones that cannot, with why."""
    ok: dict[str, nn.Linear] = {}
    refused: dict[str, str] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            for child, sub in mod.named_modules():
                if isinstance(sub, nn.Linear):
                    refused[_join(name, child)] = ("it belongs to an nn.MultiheadAttention, which reads its "
                                                   "weight directly instead of calling it")
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and type(mod).forward is not nn.Linear.forward:
            refused[name] = ("its forward is more than a linear map (a soft-capped LM head): an adapter added "
                             "after it would not pass through the rest")
        elif isinstance(mod, nn.Linear) and name not in refused:
            ok[name] = mod
    # a Linear whose weight another module also holds (a head tied to the token embedding): merging would
    # change the other module too
    owners: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(_join(name, pname))
    for name, mod in list(ok.items()):
        others = [o for o in owners.get(id(mod.weight), []) if o != _join(name, "weight")]
        if others:
            refused[name] = f"its weight is shared with {others[0]} (tied), which merging would change too"
            del ok[name]
    return ok, refused


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _no_match_message(pattern: str, names: list[str], refused: dict[str, str]) -> str:
    hit = [n for n in refused if _matches(pattern, n)]
    if hit:
        return (f"lora.targets: {pattern!r} matches only {hit[0]}, which cannot take an adapter: "
                f"{refused[hit[0]]}")
    close = difflib.get_close_matches(pattern.removeprefix("re:"), names, n=5, cutoff=0.4)
    if close:
        return (f"lora.targets: {pattern!r} matches no nn.Linear of this model; did you mean "
                f"{', '.join(close)}?")
    # nothing close: an overview, with layer indices folded ("lm.layers.*.attn.q_proj")
    shapes = list(dict.fromkeys(re.sub(r"(?<=\.)\d+(?=\.)", "*", n) for n in names))
    more = ", ..." if len(shapes) > 12 else ""
    return (f"lora.targets: {pattern!r} matches no nn.Linear of this model; its {len(names)} Linears are "
            f"{', '.join(shapes[:12]) or 'none'}{more}")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _wrap(model: nn.Module, names: list[str], cfg: LoRAConfig) -> None:
    for name in names:
        _set_submodule(model, name, LoRALinear(model.get_submodule(name), cfg.rank, cfg.alpha, cfg.dropout))


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Replace every nn.Linear whose qualified name matches one of ``cfg.targets`` by a :class:`LoRALinear`
    and freeze its base weight and bias; return the wrapped names, sorted. Parameters outside the wrapped
    Linears are left as they are (freeze them, or not, as the stage says).

    A pattern that matches nothing is refused with the names that come closest, and so is a second
    application: adapters do not stack. Linears that cannot take an adapter are never matched: one whose
    weight another module shares (an LM head tied to the token embedding, which merging would change too)
    and the output projection inside an ``nn.MultiheadAttention`` (which reads its weight without calling
    it); a pattern that matches only such Linears is refused with the reason."""
    cfg.validate()
    if not cfg.targets:
        return []
    if _lora_modules(model):
        raise ConfigError(f"LoRA is already applied to this model ({_lora_modules(model)[0][0]}, ...); call "
                          f"remove_lora first to apply a new set of adapters")
    linears, refused = _linears(model)
    names = list(linears)
    chosen: set[str] = set()
    for pattern in cfg.targets:
        hit = [n for n in names if _matches(pattern, n)]
        if not hit:
            raise ConfigError(_no_match_message(pattern, names, refused))
        chosen.update(hit)
    wrapped = sorted(chosen)
    _wrap(model, wrapped, cfg)
    return wrapped


def lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The adapters' A and B weights, named as in ``model.named_parameters()``."""
    return [(_join(name, f"{ab}.weight"), getattr(m, ab).weight) for name, m in _lora_modules(model)
            for ab in ("lora_A", "lora_B")]


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (forward = base alone); already merged ones are left alone."""
    for _, m in _lora_modules(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo :func:`merge_lora`; adapters that are not merged are left alone."""
    for _, m in _lora_modules(model):
        m.unmerge()


def remove_lora(model: nn.Module) -> None:
    """Merge every adapter and put its base Linear back, with the requires_grad it had before
    :func:`apply_lora`: the model is then a plain model with the adapted weights."""
    for name, m in _lora_modules(model):
        m.merge()
        for pname, p in m.base.named_parameters():
            p.requires_grad_(m._base_requires_grad.get(pname, True))
        _set_submodule(model, name, m.base)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors alone (detached, not copied), keyed as in ``model.state_dict()``."""
    return {n: p.detach() for n, p in lora_parameters(model)}


# ------------------------------------------------------------------------------------------------ files


def save_adapter(folder, model: nn.Module, cfg: LoRAConfig) -> None:
    """Write ``folder/adapter.safetensors`` and ``folder/adapter_config.json`` (format, targets, rank, alpha,
    dropout and the wrapped module names), each atomically. The weights also carry the JSON in their metadata,
    so that a pair from two different saves is detected on load."""
    folder = Path(folder)
    modules = [n for n, _ in _lora_modules(model)]
    if not modules:
        raise ConfigError("save_adapter: the model has no LoRA adapters (apply_lora first)")
    for name, m in _lora_modules(model):
        if (m.rank, m.alpha) != (cfg.rank, cfg.alpha):
            raise ConfigError(f"save_adapter: {name} has rank {m.rank}, alpha {m.alpha}; the config given "
                              f"says rank {cfg.rank}, alpha {cfg.alpha}")
    meta = {"format": ADAPTER_FORMAT, **to_dict(cfg), "modules": sorted(modules)}
    tensors = {k: v.cpu().contiguous() for k, v in lora_state_dict(model).items()}
    atomic_write_bytes(folder / ADAPTER_WEIGHTS, save(tensors, metadata={"adapter_config": json.dumps(meta)}))
    atomic_write_json(folder / ADAPTER_CONFIG, meta)


def read_adapter_config(folder) -> tuple[LoRAConfig, list[str]]:
    """The LoRAConfig and the adapted module names saved in ``folder/adapter_config.json``."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"LoRA adapter config not found: {path}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else meta
        raise CheckpointError(f"{path} is not a vlmkit LoRA adapter config (format must be "
                              f"{ADAPTER_FORMAT!r}, got {got!r})")
    modules = meta.get("modules")
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
        raise CheckpointError(f"{path}: 'modules' must be the non-empty list of adapted module names")
    try:
        cfg = from_dict(LoRAConfig, {k: v for k, v in meta.items() if k not in ("format", "modules")})
        cfg.validate()
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from e
    return cfg, modules


def _read_adapter_weights(weights_path: Path, cfg_path: Path, cfg: LoRAConfig,
                          modules: list[str]) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter.safetensors``. CheckpointError if the file is missing or unreadable, or if the
    config its metadata carries (written by :func:`save_adapter`) is not the config file's: the two files
    would come from different saves."""
    if not weights_path.is_file():
        raise CheckpointError(f"LoRA adapter weights not found: {weights_path}")
    try:
        tensors = load_file(str(weights_path))
        with safe_open(str(weights_path), "pt") as f:
            stored = (f.metadata() or {}).get("adapter_config")
        stored = json.loads(stored) if stored is not None else None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file: {e}") from e
    if stored is not None:  # written by save_adapter: must be the same save as the config file
        key = (sorted(stored.get("modules") or []), stored.get("rank"), stored.get("alpha"))
        if key != (sorted(modules), cfg.rank, cfg.alpha):
            raise CheckpointError(f"{weights_path} and {cfg_path} disagree on the modules, rank or alpha: "
                                  f"they come from different saves (an interrupted save?)")
    return tensors


def _adapter_shapes(model: nn.Module, present: dict[str, LoRALinear], cfg: LoRAConfig, modules: list[str],
                    cfg_path: Path) -> dict[str, tuple[int, int]]:
    """(fan_in, fan_out) of each module the adapter goes on. A model with adapters (``present``) must have them
    on exactly ``modules`` with the config's rank and alpha; in a model without, each module must be an
    nn.Linear that can take one (else the reason it cannot). CheckpointError naming the config file if not."""
    if present:
        if sorted(present) != sorted(modules):
            extra = sorted(set(modules) - set(present)) or sorted(set(present) - set(modules))
            raise CheckpointError(f"{cfg_path}: the adapter's modules differ from the model's adapters at "
                                  f"{extra[0]!r}")
        for name, m in present.items():
            if (m.rank, m.alpha) != (cfg.rank, cfg.alpha):
                raise CheckpointError(f"{cfg_path}: rank {cfg.rank}, alpha {cfg.alpha} but the model's "
                                      f"{name} has rank {m.rank}, alpha {m.alpha}")
        return {name: (m.in_features, m.out_features) for name, m in present.items()}
    linears, refused = _linears(model)
    for name in modules:
        if name not in linears:
            why = f" ({refused[name]})" if name in refused else ""
            raise CheckpointError(f"{cfg_path}: module {name!r} is not an nn.Linear of this model{why}")
    return {name: (linears[name].in_features, linears[name].out_features) for name in modules}


def _check_adapter_tensors(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], rank: int,
                           weights_path: Path) -> None:
    """Every key of the file a LoRA parameter of those modules with its shape, and none of them missing;
    CheckpointError naming the file and the first key that is not."""
    expected = {}
    for name, (fan_in, fan_out) in shapes.items():
        expected[_join(name, "lora_A.weight")] = (rank, fan_in)
        expected[_join(name, "lora_B.weight")] = (fan_out, rank)
    for key, value in tensors.items():
        if key not in expected:
            raise CheckpointError(f"{weights_path}: key {key!r} is not a LoRA parameter of this model")
        if tuple(value.shape) != expected[key]:
            raise CheckpointError(f"{weights_path}: key {key!r} has shape {tuple(value.shape)}, the model's "
                                  f"is {expected[key]}")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"{weights_path}: missing key {missing[0]!r}")


def _copy_adapter_tensors(model: nn.Module, present: dict[str, LoRALinear], modules: list[str], cfg: LoRAConfig,
                          tensors: dict[str, torch.Tensor]) -> None:
    """Put checked tensors into the model: adapters first on ``modules`` if it has none, merged ones unmerged
    for the copy and merged again after it."""
    if not present:
        _wrap(model, sorted(modules), cfg)
        present = dict(_lora_modules(model))
    own = dict(lora_parameters(model))
    merged = [m for m in present.values() if m.merged]
    for m in merged:
        m.unmerge()
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value)
    for m in merged:
        m.merge()


def load_adapter(model: nn.Module, folder) -> LoRAConfig:
    """Load an adapter written by :func:`save_adapter` into ``model`` and return its config.

    A model without adapters gets them first, on exactly the saved modules; a model that has them must have
    the same modules, rank and alpha. A missing file, a module the model lacks, a key or shape that does not
    match raises CheckpointError naming the file and the key, before the model is changed. Merged adapters
    are unmerged, loaded and merged again."""
    folder = Path(folder)
    cfg, modules = read_adapter_config(folder)
    cfg_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    tensors = _read_adapter_weights(weights_path, cfg_path, cfg, modules)
    present = dict(_lora_modules(model))
    shapes = _adapter_shapes(model, present, cfg, modules, cfg_path)
    # check every key and shape before the model is touched, so that a bad adapter leaves it as it was
    _check_adapter_tensors(tensors, shapes, cfg.rank, weights_path)
    _copy_adapter_tensors(model, present, modules, cfg, tensors)
    return cfg


__all__ = [
    "LoRAConfig",
    "LoRALinear",
    "apply_lora",
    "load_adapter",
    "lora_parameters",
    "lora_state_dict",
    "merge_lora",
    "read_adapter_config",
    "remove_lora",
    "save_adapter",
    "unmerge_lora",
]
