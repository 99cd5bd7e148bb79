"""A VQ image tokenizer (VQ-VAE, van den Oord et al. 2017; VQ-VAE-2, Razavi et al. 2019; VQGAN, Esser et al. 2021):
a convolutional encoder maps an image to a grid of vectors (downsampling factor ``f = 2 ** (len(channel_mult) - 1)``:
a 64x64 image -> an 8x8 grid at f 8), a vector quantiser replaces each by its nearest codebook entry, and a
convolutional decoder maps the code grid back to pixels. The code ids are the discrete image tokens that
early-fusion models (Chameleon, Emu3, Janus) read and generate.

The modules are named as taming-transformers' VQModel (``encoder.conv_in``, ``encoder.down[i].block[j].conv1``,
``encoder.down[i].downsample.conv``, ``encoder.mid.block_1``, ``encoder.norm_out``, ``encoder.conv_out``,
``quant_conv``, ``quantize.embedding``, ``post_quant_conv``, ``decoder.up[i].block[j]``, ``decoder.up[i].upsample``,
...), which Chameleon's and Janus' (LlamaGen's) VQ keep, so that such a checkpoint maps onto this model key by key.
Their attention blocks (taming's ``AttnBlock``: GroupNorm, 1x1-conv q/k/v, single-head softmax attention over the
grid, 1x1-conv ``proj_out``, residual) are options: ``mid_attn`` puts one between ``mid.block_1`` and
``mid.block_2`` (``mid.attn_1``), ``attn_levels`` one after every residual block of those resolution levels
(``down[i].attn[j]``, ``up[i].attn[j]``; taming's ``attn_resolutions`` in pixels, as levels). ``encoder: patch``
(vlmkit's, tiny-vq's) replaces the encoder by :class:`PatchEncoder`, whose every code is a function of its own
f x f patch: codes an LM learns to write far sooner than taming's, each of which sees most of a small image.

The quantiser (:class:`VectorQuantizer`):

- ``quantizer: ema``: the codebook follows exponential moving averages of the encoder outputs assigned to each code
  (VQ-VAE-2 / sonnet's ``VectorQuantizerEMA``: decay, epsilon, Laplace smoothing of the counts); no codebook loss;
- ``quantizer: ste``: the codebook is a parameter trained by the codebook loss ``||sg[z] - e||^2``;
- either way the encoder gets the straight-through gradient and the commitment loss ``beta * ||z - sg[e]||^2``;
- ``l2_norm``: codes and encoder outputs are compared (and decoded) L2-normalised (ViT-VQGAN, LlamaGen / Janus);
  ``decode_l2_norm``: only the decoder reads L2-normalised codes, the encoder's outputs are compared with the raw
  codebook (transformers' ``JanusVQVAE``: ``quantize.forward`` uses the raw codebook, ``get_codebook_entry`` the
  normalised one);
- dead-code restarts: a code unused for ``restart_after`` training steps is re-initialised from an encoder output
  of the current batch (Dhariwal et al. 2020, Jukebox);
- each training forward reports the batch's codebook usage (the fraction of codes used) and perplexity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.batch import MediaInputs
from vlmkit.config import ModelConfig
from vlmkit.errors import ConfigError, DataError

QUANTIZERS = ("ema", "ste")
RECON_LOSSES = ("l1", "l2")
UPSAMPLES = ("nearest", "transpose")
ENCODERS = ("conv", "patch")


class ConvAutoencoderShape:
    """What the encoder and decoder below read of a config (VQConfig's, and the KL-VAE's of models/vae.py, with
    the same field names): the downsampling factor, the grid, and the checks of the fields that shape them."""

    @property
    def factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.factor, self.image_size[1] // self.factor

    def check_shape(self) -> None:
        """ConfigError naming the option: unknown recon_loss, upsample or encoder; an image size the factor does
        not divide; GroupNorm groups that do not divide a level's width; attention at a level that does not exist."""
        for name, valid in (("recon_loss", RECON_LOSSES), ("upsample", UPSAMPLES), ("encoder", ENCODERS)):
            if getattr(self, name) not in valid:
                raise ConfigError(f"model.{name} must be one of {', '.join(valid)}, got {getattr(self, name)!r}")
        if any(s % self.factor for s in self.image_size):
            raise ConfigError(f"model.image_size {list(self.image_size)} is not a multiple of the downsampling "
                              f"factor {self.factor} (2 ** (len(channel_mult) - 1))")
        widths = [self.channels * m for m in self.channel_mult]
        if self.norm_groups and any(w % self.norm_groups for w in widths):
            raise ConfigError(f"model.norm_groups {self.norm_groups} does not divide the widths {widths}")
        if any(not 0 <= i < len(self.channel_mult) for i in self.attn_levels):
            raise ConfigError(f"model.attn_levels {list(self.attn_levels)} must be resolution levels 0.."
                              f"{len(self.channel_mult) - 1} (one per channel_mult entry)")


@dataclass
class VQConfig(ModelConfig, ConvAutoencoderShape):
    """A VQ image tokenizer (module docstring)."""

    family: str = "vq"
    image_size: tuple[int, int] = (64, 64)  # (height, width) the processor resizes to
    channels: int = 32  # the first level's width; level i has channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)  # one entry per resolution: f = 2 ** (len - 1)
    res_blocks: int = 1  # residual blocks per encoder level (the decoder has one more, as taming's)
    norm_groups: int = 8  # GroupNorm groups (taming: 32); 0: no normalisation
    code_dim: int = 64  # the codebook vectors' size (taming's embed_dim)
    z_channels: int = 64  # the encoder's output channels, before quant_conv maps them to code_dim
    codebook_size: int = 512
    quantizer: str = "ema"  # ema | ste
    beta: float = 0.25  # commitment loss weight
    ema_decay: float = 0.99
    ema_eps: float = 1e-5  # Laplace smoothing of the EMA counts
    l2_norm: bool = False  # compare and decode L2-normalised codes
    restart_after: int = 100  # training steps a code may go unused before it is re-initialised; 0: never
    recon_loss: str = "l1"  # l1 | l2
    upsample: str = "nearest"  # nearest (then a 3x3 conv, taming) | transpose (a 4x4 stride-2 transposed conv)
    mid_attn: bool = False  # an attention block between mid.block_1 and mid.block_2 (taming, Chameleon, Janus)
    attn_levels: tuple[int, ...] = ()  # resolution levels (0 = full size) with an attention block after each block
    decode_l2_norm: bool = False  # the decoder reads L2-normalised codes, the encoder compares raw ones
    # conv: taming's encoder (each code sees about +-40 px through its stacked 3x3 convs and GroupNorm's image-wide
    # statistics); patch: each code is a function of its own f x f pixels alone (a stride-f conv and 1x1 convs), so
    # that a flat background is one code per colour and an object's codes do not depend on what else is in the image:
    # the codes an autoregressive LM must write are compositional (docs/generation.md measures the difference)
    encoder: str = "conv"
    decoder: bool = True  # False: an encoder alone (Chameleon's released VQ: no decoder weights); no decode_codes

    def __post_init__(self):
        if self.quantizer not in QUANTIZERS:
            raise ConfigError(f"model.quantizer must be one of {', '.join(QUANTIZERS)}, got {self.quantizer!r}")
        self.check_shape()
        if self.codebook_size < 2 or self.code_dim < 1:
            raise ConfigError(f"model.codebook_size must be >= 2 and code_dim >= 1, got {self.codebook_size}, "
                              f"{self.code_dim}")

def _norm(cfg: VQConfig, ch: int) -> nn.Module:
    return nn.GroupNorm(cfg.norm_groups, ch, eps=1e-6) if cfg.norm_groups else nn.Identity()


class ResnetBlock(nn.Module):
    """taming's ResnetBlock: norm, swish, conv, norm, swish, conv, plus the input (through a 1x1 conv when the
    width changes)."""

    def __init__(self, cfg: VQConfig, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cfg, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cfg, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class Downsample(nn.Module):
    """A 3x3 stride-2 conv after padding right and bottom by one (taming)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """x2: nearest-neighbour then a 3x3 conv (taming), or a 4x4 stride-2 transposed conv."""

    def __init__(self, ch: int, kind: str):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(ch, ch, 3, padding=1) if kind == "nearest" else nn.ConvTranspose2d(ch, ch, 4, 2, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest") if self.kind == "nearest" else x)


class AttnBlock(nn.Module):
    """taming's AttnBlock: norm, 1x1-conv q, k, v, one softmax attention head over the h*w positions (scaled by
    channels ** -0.5), a 1x1-conv ``proj_out``, plus the input."""

    def __init__(self, cfg: VQConfig, ch: int):
        super().__init__()
        self.norm = _norm(cfg, ch)
        self.q, self.k, self.v = nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        n, c, h, w = x.shape
        y = self.norm(x)
        q = self.q(y).reshape(n, c, h * w).transpose(1, 2)  # [n, hw, c]
        k = self.k(y).reshape(n, c, h * w)  # [n, c, hw]
        v = self.v(y).reshape(n, c, h * w)
        attn = torch.softmax(torch.bmm(q, k) * (int(c) ** -0.5), dim=2)  # [n, hw (query), hw (key)]
        return x + self.proj_out(torch.bmm(v, attn.transpose(1, 2)).reshape(n, c, h, w))


class Level(nn.Module):
    """One resolution: its residual blocks (each followed by an attention block when ``attn``), then the
    resampling after them (taming's ``down[i]`` / ``up[i]``)."""

    def __init__(self, blocks: list[nn.Module], resample: nn.Module | None, name: str,
                 attn: list[nn.Module] | None = None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if attn:
            self.attn = nn.ModuleList(attn)
        if resample is not None:
            self.add_module(name, resample)
        self.resample = name if resample is not None else None

    def forward(self, x):
        attn = self.attn if "attn" in self._modules else None
        for j, b in enumerate(self.block):
            x = b(x)
            if attn is not None:
                x = attn[j](x)
        return getattr(self, self.resample)(x) if self.resample else x


class Mid(nn.Module):
    def __init__(self, cfg: VQConfig, ch: int):
        super().__init__()
        self.block_1 = ResnetBlock(cfg, ch, ch)
        if cfg.mid_attn:
            self.attn_1 = AttnBlock(cfg, ch)
        self.block_2 = ResnetBlock(cfg, ch, ch)

    def forward(self, x):
        x = self.block_1(x)
        if "attn_1" in self._modules:
            x = self.attn_1(x)
        return self.block_2(x)


class Encoder(nn.Module):
    """Pixels [n, 3, H, W] -> [n, z_channels, H/f, W/f]."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(3, cfg.channels, 3, padding=1)
        levels, cin = [], cfg.channels
        for i, w in enumerate(widths):
            blocks = [ResnetBlock(cfg, cin if j == 0 else w, w) for j in range(cfg.res_blocks)]
            attn = [AttnBlock(cfg, w) for _ in blocks] if i in cfg.attn_levels else None
            levels.append(Level(blocks, Downsample(w) if i < len(widths) - 1 else None, "downsample", attn))
            cin = w
        self.down = nn.ModuleList(levels)
        self.mid = Mid(cfg, cin)
        self.norm_out = _norm(cfg, cin)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class PatchEncoder(nn.Module):
    """Pixels [n, 3, H, W] -> [n, z_channels, H/f, W/f], each output from its own f x f patch only: a stride-f conv
    (``proj``), then ``res_blocks + 1`` residual (SiLU, 1x1 conv) layers at the last level's width (``mlp``), then
    ``conv_out`` (1x1)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        width = cfg.channels * cfg.channel_mult[-1]
        self.proj = nn.Conv2d(3, width, cfg.factor, stride=cfg.factor)
        self.mlp = nn.ModuleList([nn.Conv2d(width, width, 1) for _ in range(cfg.res_blocks + 1)])
        self.conv_out = nn.Conv2d(width, cfg.z_channels, 1)

    def forward(self, x):
        h = self.proj(x)
        for layer in self.mlp:
            h = h + layer(F.silu(h))
        return self.conv_out(F.silu(h))


class Decoder(nn.Module):
    """[n, z_channels, h, w] -> pixels [n, 3, h*f, w*f]. ``up[i]`` is resolution i as in the encoder (taming's
    order), run from the lowest resolution up."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        cin = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = Mid(cfg, cin)
        up = []
        for i in reversed(range(len(widths))):
            w = widths[i]
            blocks = [ResnetBlock(cfg, cin if j == 0 else w, w) for j in range(cfg.res_blocks + 1)]
            attn = [AttnBlock(cfg, w) for _ in blocks] if i in cfg.attn_levels else None
            up.insert(0, Level(blocks, Upsample(w, cfg.upsample) if i > 0 else None, "upsample", attn))
            cin = w
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(cfg, cin)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@dataclass
class Quantized:
    """A quantiser's output: the codes (straight-through: forward the code vectors, backward to ``z``), their ids,
    the commitment and codebook losses (0 for EMA), and the batch's codebook usage and perplexity."""

    z_q: torch.Tensor  # [n, D, h, w]
    codes: torch.Tensor  # [n, h, w] long
    commit_loss: torch.Tensor
    codebook_loss: torch.Tensor
    usage: float
    perplexity: float


def code_statistics(codes: torch.Tensor, size: int) -> tuple[torch.Tensor, float, float]:
    """(per-code counts, fraction of the ``size`` codes used, perplexity exp(H) of the code histogram)."""
    counts = torch.bincount(codes.reshape(-1), minlength=size).float()
    p = counts / counts.sum().clamp_min(1)
    perplexity = float(torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum()))
    return counts, float((counts > 0).float().mean()), perplexity


class VectorQuantizer(nn.Module):
    """Nearest-code quantisation with EMA or codebook-loss updates, commitment loss, optional L2-normalised codes
    and dead-code restarts (module docstring). ``embedding.weight`` [K, D] is the codebook."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.size, self.dim, self.kind = cfg.codebook_size, cfg.code_dim, cfg.quantizer
        self.beta, self.decay, self.eps = cfg.beta, cfg.ema_decay, cfg.ema_eps
        self.l2_norm, self.restart_after = cfg.l2_norm, cfg.restart_after
        self.decode_l2_norm = cfg.decode_l2_norm
        self.embedding = nn.Embedding(self.size, self.dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / self.size, 1.0 / self.size)
        if self.kind == "ema":
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("ema_count", torch.zeros(self.size))
            self.register_buffer("ema_weight", self.embedding.weight.detach().clone())
        self.register_buffer("unused_steps", torch.zeros(self.size, dtype=torch.long))
        # 0 until the first training step sets every code to one of its encoder outputs (data-dependent init)
        self.register_buffer("initialised", torch.zeros((), dtype=torch.long))

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """The id of the nearest code (squared L2) of each row of ``flat`` [N, D]."""
        e = self.codebook()
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]
        return d.argmin(dim=1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Code ids [n, h, w] -> the code vectors the decoder reads [n, D, h, w]."""
        e = self.codebook()
        if self.decode_l2_norm:
            e = F.normalize(e, dim=-1)
        return F.embedding(codes, e).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> Quantized:
        n, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        if self.l2_norm:
            flat = F.normalize(flat, dim=-1)
        ids = self.nearest(flat.detach())
        if self.training:
            ids = self.update(flat.detach(), ids)
        e = F.embedding(ids, self.codebook())
        commit = self.beta * F.mse_loss(flat, e.detach())
        codebook_loss = F.mse_loss(e, flat.detach()) if self.kind == "ste" else flat.new_zeros(())
        read = F.normalize(e, dim=-1) if self.decode_l2_norm else e  # what the decoder reads (as lookup())
        q = flat + (read - flat).detach()  # straight-through: the codes forward, the gradient to z
        _, usage, perplexity = code_statistics(ids, self.size)
        return Quantized(q.view(n, h, w, d).permute(0, 3, 1, 2).contiguous(), ids.view(n, h, w), commit,
                         codebook_loss, usage, perplexity)

    @torch.no_grad()
    def update(self, flat: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """One training step's codebook update: the first step's data-dependent init, the EMA (``ema``), then
        dead-code restarts; returns the step's code ids (reassigned after an init)."""
        if not int(self.initialised):
            self.unused_steps.fill_(max(self.restart_after, 1))
            self.restart(flat)
            self.initialised.fill_(1)
            ids = self.nearest(flat)
        onehot = F.one_hot(ids, self.size).type_as(flat)  # [N, K]
        counts = onehot.sum(0)
        if self.kind == "ema":
            self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            self.ema_weight.mul_(self.decay).add_(onehot.t() @ flat, alpha=1 - self.decay)
            total = self.ema_count.sum()
            smoothed = (self.ema_count + self.eps) / (total + self.size * self.eps) * total  # Laplace smoothing
            self.embedding.weight.copy_(self.ema_weight / smoothed[:, None])
        self.unused_steps.add_(1).masked_fill_(counts > 0, 0)
        if self.restart_after:
            self.restart(flat)
        return ids

    @torch.no_grad()
    def restart(self, flat: torch.Tensor) -> int:
        """Re-initialise the codes unused for ``restart_after`` steps from random rows of ``flat`` (this batch's
        encoder outputs); returns how many."""
        dead = (self.unused_steps >= max(self.restart_after, 1)).nonzero().flatten()
        if not len(dead):
            return 0
        n = flat.shape[0]
        pick = torch.randperm(n, device=flat.device)[:len(dead)] if n >= len(dead) else \
            torch.randint(0, n, (len(dead),), device=flat.device)
        self.embedding.weight[dead] = flat[pick]
        if self.kind == "ema":
            self.ema_weight[dead] = flat[pick]
            self.ema_count[dead] = 1.0
        self.unused_steps[dead] = 0
        return len(dead)


@dataclass
class VQOutput:
    """A forward pass: the total loss (reconstruction + commitment + codebook), its parts, the reconstruction
    (normalised pixels, unclamped), the codes and the batch's codebook usage and perplexity."""

    loss: torch.Tensor
    recon_loss: torch.Tensor
    commit_loss: torch.Tensor
    codebook_loss: torch.Tensor
    reconstruction: torch.Tensor
    codes: torch.Tensor
    usage: float
    perplexity: float

    def metrics(self) -> dict[str, float]:
        return {"recon_loss": float(self.recon_loss.detach()), "commit_loss": float(self.commit_loss.detach()),
                "codebook_loss": float(self.codebook_loss.detach()), "codebook_usage": self.usage,
                "perplexity": self.perplexity}


class VQModel(nn.Module):
    """Encoder, quantiser and decoder (module docstring). ``forward(pixels)`` trains it (the ``vq`` objective);
    :meth:`encode_codes` and :meth:`decode_codes` are the tokenizer's two directions."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = PatchEncoder(cfg) if cfg.encoder == "patch" else Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.code_dim, 1)
        self.quantize = VectorQuantizer(cfg)
        self.post_quant_conv = nn.Conv2d(cfg.code_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg) if cfg.decoder else None

    @property
    def grid(self) -> tuple[int, int]:
        return self.cfg.grid

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    def module_groups(self) -> dict[str, nn.Module]:
        """What a stage trains or freezes, as the run's table shows it (a vq stage trains them all: ``train:
        [all]``; recipes name only train/recipe.py's MODULE_GROUPS)."""
        groups = {"encoder": nn.ModuleList([self.encoder, self.quant_conv]), "quantizer": self.quantize}
        if self.decoder is not None:
            groups["decoder"] = nn.ModuleList([self.post_quant_conv, self.decoder])
        return groups

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        f = self.cfg.factor
        if pixels.dim() != 4 or pixels.shape[1] != 3 or pixels.shape[2] % f or pixels.shape[3] % f:
            raise DataError(f"a VQ tokenizer takes images [n, 3, H, W] with H and W multiples of {f}, got "
                            f"{list(pixels.shape)}")

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [n, 3, H, W] -> encoder outputs [n, code_dim, H/f, W/f], before quantisation."""
        self._check_pixels(pixels)
        return self.quant_conv(self.encoder(pixels))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Code vectors [n, code_dim, h, w] -> pixels [n, 3, h*f, w*f] (normalised, unclamped)."""
        if self.decoder is None:
            raise ConfigError("this VQ tokenizer has no decoder (model.decoder: false): it maps images to codes "
                              "but not codes to images (Chameleon's released VQ-GAN and transformers' "
                              "ChameleonVQVAE ship the encoder alone)")
        return self.decoder(self.post_quant_conv(z_q))

    @torch.no_grad()
    def encode_codes(self, pixels: torch.Tensor | MediaInputs) -> torch.Tensor:
        """Normalised pixels [n, 3, H, W] (or the processor's MediaInputs of them) -> code ids [n, H/f, W/f] (no
        codebook update)."""
        if isinstance(pixels, MediaInputs):
            pixels = pixels.pixel_values
        z = self.encode(pixels).permute(0, 2, 3, 1)
        flat = z.reshape(-1, z.shape[-1])
        if self.cfg.l2_norm:
            flat = F.normalize(flat, dim=-1)
        return self.quantize.nearest(flat).view(z.shape[:3])

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code ids [n, h, w] (or one grid [h, w]) -> the decoder's output [n, 3, h*f, w*f] ([3, H, W]), before
        clamping or de-normalisation."""
        if codes.dtype.is_floating_point or codes.dim() not in (2, 3) or 0 in codes.shape:
            raise DataError(f"codes must be integer code ids [h, w] or [n, h, w], got {codes.dtype} "
                            f"{list(codes.shape)}")
        bad = (codes < 0) | (codes >= self.cfg.codebook_size)
        if bad.any():
            at = [int(i) for i in bad.nonzero()[0]]
            raise DataError(f"code {int(codes[tuple(at)])} at {at} is out of range: the codebook has "
                            f"{self.cfg.codebook_size} codes (0..{self.cfg.codebook_size - 1})")
        one = codes.dim() == 2
        out = self.decode(self.quantize.lookup(codes[None] if one else codes))
        return out[0] if one else out

    def forward(self, pixels: torch.Tensor) -> VQOutput:
        q = self.quantize(self.encode(pixels))
        recon = self.decode(q.z_q)
        rec = F.l1_loss(recon, pixels) if self.cfg.recon_loss == "l1" else F.mse_loss(recon, pixels)
        loss = rec + q.commit_loss + q.codebook_loss
        return VQOutput(loss, rec, q.commit_loss, q.codebook_loss, recon, q.codes, q.usage, q.perplexity)


def build_vq(cfg: VQConfig, init: bool = True) -> VQModel:
    model = VQModel(cfg)
    if init and cfg.quantizer == "ema":  # the EMA sums start at the codebook, each code counted once
        model.quantize.ema_weight.copy_(model.quantize.embedding.weight)
        model.quantize.ema_count.fill_(1.0)
    return model


__all__ = ["QUANTIZERS", "Quantized", "VQConfig", "VQModel", "VQOutput", "VectorQuantizer", "build_vq",
           "code_statistics"]
