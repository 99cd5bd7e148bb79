"""Muon for the hidden weight matrices and AdamW for everything else, as one optimizer.

Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks") takes SGD-momentum's
update for a 2D weight and replaces it by the nearest semi-orthogonal matrix, computed with a few quintic
Newton-Schulz iterations, so every direction of the update moves at the same rate. Embeddings, the LM's
output head, norms, biases and convolution kernels stay on AdamW, as in the reference recipe.

The update of a ``[A, B]`` matrix is scaled by ``0.2 * sqrt(max(A, B))`` (Liu et al. 2025, "Muon is Scalable
for LLM Training"), which gives it the RMS of a typical AdamW update, so one learning rate serves both kinds
of group. That is ``torch.optim.Muon(adjust_lr_fn="match_rms_adamw")``; this class differs from it in
holding the AdamW groups too (one optimizer, one state dict, one checkpoint) and in orthogonalising in fp32:
torch's version works in bf16, which on CPUs without bf16 matrix units is two orders of magnitude slower.
"""

from __future__ import annotations

import math

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T for G = U S V^T (singular values land in about [0.7, 1.2]; Muon does not need
    them exactly 1)."""
    a, b, c = NS_COEFFICIENTS
    x = g.float()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / (x.norm() + eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        m = x @ x.T
        x = a * x + (b * m + c * m @ m) @ x
    return (x.T if tall else x).to(g.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer over groups flagged ``use_muon`` (2D weights) or not (AdamW).

    Group keys: ``lr``, ``weight_decay`` (decoupled, both kinds), ``use_muon``; AdamW groups also use
    ``betas`` and ``eps``, Muon groups ``momentum``, ``nesterov`` and ``ns_steps``.
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0, betas=(0.9, 0.98), eps: float = 1e-8,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5):
        defaults = dict(lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, momentum=momentum,
                        nesterov=nesterov, ns_steps=ns_steps, use_muon=False)
        super().__init__(params, defaults)
        for g in self.param_groups:
            if g["use_muon"] and any(p.ndim != 2 for p in g["params"]):
                shapes = [tuple(p.shape) for p in g["params"] if p.ndim != 2]
                raise ValueError(f"Muon groups take 2D weight matrices only; got shapes {shapes}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            lr, wd = g["lr"], g["weight_decay"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                grad, st = p.grad, self.state[p]
                if g["use_muon"]:
                    if "momentum_buffer" not in st:
                        st["momentum_buffer"] = torch.zeros_like(p)
                    buf = st["momentum_buffer"]
                    buf.lerp_(grad, 1 - g["momentum"])
                    update = grad.lerp(buf, g["momentum"]) if g["nesterov"] else buf
                    update = orthogonalize(update, g["ns_steps"])
                    p.mul_(1 - lr * wd)
                    p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(p.shape)))
                else:
                    if "step" not in st:
                        st["step"] = torch.tensor(0.0)
                        st["exp_avg"] = torch.zeros_like(p)
                        st["exp_avg_sq"] = torch.zeros_like(p)
                    b1, b2 = g["betas"]
                    st["step"] += 1
                    t = st["step"].item()
                    st["exp_avg"].lerp_(grad, 1 - b1)
                    st["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
                    denom = (st["exp_avg_sq"].sqrt() / math.sqrt(1 - b2**t)).add_(g["eps"])
                    p.mul_(1 - lr * wd)
                    p.addcdiv_(st["exp_avg"], denom, value=-lr / (1 - b1**t))
        return loss
