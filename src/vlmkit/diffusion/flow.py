"""Rectified flow / flow matching: the training target and the sampler of vlmkit's continuous diffusion.

The convention, used everywhere in vlmkit.diffusion (and by the objectives and families that import it)::

    x_t = (1 - t) * x0 + t * noise        t in [0, 1]; t = 0 is data, t = 1 is pure noise
    v   = dx_t / dt = noise - x0          what the model predicts, velocity(x_t, t) ~ v

Training draws t, noise ~ N(0, I), builds x_t (:func:`add_noise`) and regresses the model's output on the velocity
(:func:`velocity_target`) with a plain MSE (:func:`flow_loss`). Sampling starts from noise at t = 1 and integrates
dx/dt = v(x, t) back to t = 0 with Euler steps (:func:`euler_sample`).

Why flow matching (Lipman et al. 2023, "Flow Matching for Generative Modeling"; Liu et al. 2023, "Flow Straight
and Fast: rectified flow"; Esser et al. 2024, "Scaling Rectified Flow Transformers", SD3) rather than DDPM:

- the path from data to noise is a straight line, so the velocity along it is one constant per (x0, noise) pair;
  the ODE the sampler integrates is close to straight and a deterministic Euler sampler of few steps (10-50)
  works, without a noise schedule, betas or an SDE;
- the target ``noise - x0`` has unit-order scale at every t (no 1/sigma blow-up near the data end);
- it is the objective of the unified models vlmkit builds next: JanusFlow and BAGEL train their image parts with
  rectified flow, BLIP3-o's diffusion transformer and SD3 use it as well.

Transfusion (Zhou et al. 2024) trained with DDPM's epsilon-prediction (a cosine schedule, 1000 steps). The two are
the same family of Gaussian paths with a different parametrisation: DDPM's x_t = sqrt(a) x0 + sqrt(1 - a) eps is,
after rescaling x_t by 1 / (sqrt(a) + sqrt(1 - a)), a point on the straight path at t = sqrt(1 - a) / (sqrt(a) +
sqrt(1 - a)), and the velocity, the noise and the clean-data predictions are linear functions of each other given
x_t and t (eps = x_t + (1 - t) v, x0 = x_t - t v). What differs is the loss weighting over t (an MSE on v weights
the noisy end more than one on eps) and the schedule of t; vlmkit's Transfusion uses this module's form.

Timesteps: SD3's logit-normal density, t = sigmoid(N(mean, std)) (:func:`sample_timesteps`), puts more training
on the middle of the path, where the velocity is hardest to predict; "uniform" is Lipman's / Liu's.
:func:`shift_timesteps` is SD3's resolution shift t' = shift t / (1 + (shift - 1) t): at shift > 1 more of the
path is spent at high noise, which larger latents (more pixels sharing one signal-to-noise ratio) need.

Classifier-free guidance (Ho & Salimans 2022): the sampler's ``velocity`` callable returns a conditional and an
unconditional velocity, combined as ``v_uncond + cfg_scale * (v_cond - v_uncond)``; ``cfg_scale`` 1 is no guidance.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from vlmkit.errors import ConfigError

TIMESTEP_KINDS = ("logit_normal", "uniform")
REDUCTIONS = ("mean", "none")
T_EPS = 1e-5  # sampled timesteps stay in [T_EPS, 1 - T_EPS]: strictly inside (0, 1)

__all__ = [
    "REDUCTIONS",
    "TIMESTEP_KINDS",
    "add_noise",
    "euler_sample",
    "flow_loss",
    "guided",
    "sample_timesteps",
    "shift_timesteps",
    "velocity_target",
]


def sample_timesteps(n: int, generator: torch.Generator | None = None, kind: str = "logit_normal",
                     mean: float = 0.0, std: float = 1.0, device: torch.device | str | None = None) -> torch.Tensor:
    """``n`` training timesteps [n] (float32, in (0, 1)): ``kind`` "logit_normal" (SD3: sigmoid of N(mean, std)) or
    "uniform"; drawn from ``generator`` (on its device) when given, so deterministic for a seeded one."""
    if kind not in TIMESTEP_KINDS:
        raise ConfigError(f"timestep kind must be one of {', '.join(TIMESTEP_KINDS)}, got {kind!r}")
    if not (math.isfinite(std) and std > 0) or not math.isfinite(mean):
        raise ConfigError(f"logit-normal timesteps need a finite mean and std > 0, got mean {mean}, std {std}")
    where = generator.device if generator is not None else device
    if kind == "uniform":
        t = torch.rand(n, generator=generator, device=where)
    else:
        t = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=where))
    return t.clamp(T_EPS, 1 - T_EPS).to(device if device is not None else t.device)


def _per_sample(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """``t`` (a number, a 0-d tensor or one value per sample [n]) shaped [n, 1, ...] to broadcast over ``like``."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.dim() == 0:
        return t
    if t.dim() != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"t must be a number or one timestep per sample [{like.shape[0]}], got shape "
                         f"{list(t.shape)}")
    return t.view(-1, *([1] * (like.dim() - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """x_t = (1 - t) * x0 + t * noise, ``t`` [n] broadcast over every dimension after the first."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {list(x0.shape)} and noise {list(noise.shape)} must have the same shape")
    t = _per_sample(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = noise - x0: d x_t / dt along the straight path, what the model learns to predict."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {list(x0.shape)} and noise {list(noise.shape)} must have the same shape")
    return noise - x0


def flow_loss(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The flow-matching loss: the MSE between the predicted velocity ``pred`` and ``noise - x0``, averaged over
    every element of a sample, then (``reduction`` "mean") over the samples; "none" returns the per-sample losses
    [n], for objectives that weight or mask samples."""
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    target = velocity_target(x0, noise)
    if pred.shape != target.shape:
        raise ValueError(f"pred {list(pred.shape)} must have the shape of x0 {list(x0.shape)}")
    per_sample = (pred.float() - target.float()).square().flatten(1).mean(1)
    return per_sample.mean() if reduction == "mean" else per_sample


def shift_timesteps(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """SD3's resolution shift t' = shift * t / (1 + (shift - 1) * t): 0 and 1 stay, the middle moves to the noisy
    end at shift > 1 (shift 3: 0.5 -> 0.75); shift 1 is the identity."""
    if not (math.isfinite(shift) and shift > 0):
        raise ConfigError(f"shift must be > 0 (1: no shift), got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def _check_sampler(steps: int, cfg_scale: float, shift: float) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be an integer >= 1 (Euler steps from noise to data), got {steps!r}")
    if not math.isfinite(cfg_scale) or cfg_scale < 0:
        raise ConfigError(f"cfg_scale must be finite and >= 0 (1: no guidance), got {cfg_scale}")
    if not (math.isfinite(shift) and shift > 0):
        raise ConfigError(f"shift must be > 0 (1: no shift), got {shift}")


def guided(out, cfg_scale: float) -> torch.Tensor:
    """The velocity to step with from what the sampler's callable returned: a tensor (no guidance), or a pair
    (v_cond, v_uncond) combined as v_uncond + cfg_scale * (v_cond - v_uncond)."""
    if isinstance(out, torch.Tensor):
        if cfg_scale != 1.0:
            raise ValueError(f"with cfg_scale {cfg_scale} the velocity callable must return a pair "
                             "(v_cond, v_uncond), got one tensor")
        return out
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ValueError(f"the velocity callable must return a tensor or a pair (v_cond, v_uncond), got {type(out)}")
    v_cond, v_uncond = out
    return v_cond if cfg_scale == 1.0 else v_uncond + cfg_scale * (v_cond - v_uncond)


@torch.no_grad()
def euler_sample(velocity: Callable, shape, steps: int, generator: torch.Generator | None = None,
                 cfg_scale: float = 1.0, shift: float = 1.0, progress: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
    """Samples [*shape] by integrating dx/dt = v(x, t) from t = 1 (noise from ``generator``, or ``noise``) to t = 0
    with ``steps`` Euler steps at timesteps shift_timesteps(linspace(1, 0, steps + 1), shift).

    ``velocity(x, t)`` gets x [n, ...] and t [n] (float, the same value per sample) and returns v [n, ...], or the
    pair (v_cond, v_uncond), which guidance combines (:func:`guided`; a pair is required when ``cfg_scale`` != 1,
    where the callable runs its conditional and unconditional inputs, usually as one batch). Deterministic for a
    seeded ``generator``: the noise is its only randomness. ``progress``: a tqdm bar ("denoise")."""
    from tqdm.auto import tqdm

    _check_sampler(steps, cfg_scale, shift)
    shape = tuple(shape)
    if noise is None:
        where = generator.device if generator is not None else device
        noise = torch.randn(shape, generator=generator, device=where, dtype=dtype)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise {list(noise.shape)} must have the sampled shape {list(shape)}")
    x = noise.to(device=device if device is not None else noise.device, dtype=dtype)
    ts = shift_timesteps(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).tolist()
    for i in tqdm(range(steps), desc="denoise", disable=not progress, dynamic_ncols=True, leave=False):
        t = torch.full((shape[0],), ts[i], dtype=dtype, device=x.device)
        v = guided(velocity(x, t), cfg_scale)
        x = x + (ts[i + 1] - ts[i]) * v.to(dtype)
    return x
