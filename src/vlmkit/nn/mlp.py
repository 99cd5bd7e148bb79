"""Feed-forward blocks and activations."""

import math

import torch
import torch.nn.functional as F
from torch import nn


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


def relu2(x: torch.Tensor) -> torch.Tensor:
    """Squared ReLU (So et al. 2021, "Primer"; Persimmon's MLP): relu(x) ** 2, as transformers' ReLUSquared."""
    return F.relu(x).square()


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": quick_gelu,
    "silu": F.silu,
    "relu": F.relu,
    "relu2": relu2,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class MLP(nn.Module):
    """fc1 -> act -> fc2 (ViT / CLIP / SigLIP)."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu", bias: bool = True, out_dim: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, out_dim or dim, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

    @property
    def output(self) -> nn.Linear:
        """The projection that writes into the residual stream."""
        return self.fc2


class SwiGLU(nn.Module):
    """down(act(gate(x)) * up(x)) (Llama / Qwen2 / Mistral)."""

    def __init__(self, dim: int, hidden: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))

    @property
    def output(self) -> nn.Linear:
        """The projection that writes into the residual stream."""
        return self.down_proj


def init_linear_(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2 style init used by models trained from scratch."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=math.sqrt(1.0 / (m.in_channels * m.kernel_size[0] * m.kernel_size[1])))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
