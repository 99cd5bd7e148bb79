"""Numeric precision of a training step: bf16 autocast on CUDA, fp32 on the CPU (bf16 matmuls are far slower than
fp32 on most CPUs, ~100x on these machines)."""

from __future__ import annotations

import contextlib

import torch


def autocast(precision: str):
    """The context a training forward runs in: ``auto`` (bf16 on CUDA, fp32 on the CPU), ``fp32`` or ``bf16``."""
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_available()):
        return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


__all__ = ["autocast"]
