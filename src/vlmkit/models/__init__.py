"""Models: composed from the parts under encoders/, connectors/, fusion/ and lm/; a family's ``build`` turns its
config into one (vlmkit/families/). :func:`build_model` asks the config's family."""

from __future__ import annotations

import contextlib

import torch

from vlmkit.batch import ModelOutput
from vlmkit.config import ModelConfig
from vlmkit.models.init import init_from_scratch
from vlmkit.models.vlm import GenerativeModel, VisionLanguageModel


@contextlib.contextmanager
def skip_default_init():
    """Build modules without PyTorch's default random initialisation (Kaiming-uniform for every Linear, normal
    for embeddings), for models whose weights a checkpoint is about to overwrite: at 7B parameters that init
    costs minutes of CPU and its values are thrown away. The init functions are restored on exit."""
    names = ("kaiming_uniform_", "kaiming_normal_", "uniform_", "normal_", "trunc_normal_", "xavier_uniform_",
             "xavier_normal_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def build_model(cfg: ModelConfig, image_token_id: int | None, init: bool = True):
    """Build the model of ``cfg`` (its family's ``build``). ``init`` applies the from-scratch initialisation;
    without it the weights are left uninitialised, for a checkpoint to fill."""
    from vlmkit.family import family_of

    family = family_of(cfg)
    if not init:
        with skip_default_init():
            return family.build(cfg, image_token_id, init=False)
    return family.build(cfg, image_token_id, init=True)


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


__all__ = ["GenerativeModel", "ModelOutput", "VisionLanguageModel", "build_model", "count_parameters",
           "init_from_scratch", "skip_default_init"]
