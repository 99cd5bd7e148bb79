"""A continuous-latent image autoencoder (KL-VAE: Kingma & Welling 2014; LDM's ``AutoencoderKL``, Rombach et al.
2022): the images a latent-diffusion model (Transfusion, a DiT) denoises in place of pixels.

An encoder maps an image to a grid (downsampling factor ``f = 2 ** (len(channel_mult) - 1)``), a 1x1 conv
(``quant_conv``) to ``2 * latent_channels``: the mean and log-variance of a diagonal Gaussian posterior per latent
(log-variance clamped to [-30, 20], as LDM's ``DiagonalGaussianDistribution``), a reparameterised sample of it in
training (the mean in evaluation), a 1x1 conv (``post_quant_conv``) back to the decoder's width, and the decoder.
The encoder (taming's conv one or vlmkit's patch one) and the decoder are models/vq.py's classes, built from this
config's fields of the same names: one implementation of both tokenizers' convolutional halves.

Loss: ``recon + kl_weight * KL``. ``recon`` is L1 or L2 averaged over every pixel value (as the VQ tokenizer's, so
the two log comparable figures; LDM sums it per image). ``KL`` is LDM's ``0.5 * sum(mu^2 + var - 1 - logvar)`` over
an image's latent values, averaged over the batch's images. With the pixel mean, ``kl_weight`` w here is LDM's w /
(3 H W) with its per-image sum: Stable Diffusion's KL-f8 weight 1e-6 would be 1e-6 / 12288 ~ 8e-11 at 64x64. The
default 1e-6 is therefore a much stronger KL than SD's (about 12 000x), chosen by measurement (tiny-vae on
ShapesWorld, 1000 steps, docs/generation.md): against 1e-8 it costs 0.7 dB of PSNR (val 34.3 against 34.9) and
keeps a posterior std of about 0.4 in scaled units (1e-8: 0.004, a point), so the decoder learns to read noisy
latents: noise of std 0.1 on the scaled latents, a denoiser's small error, costs 1.7 dB instead of 4.3. 1e-4 lets
the KL win: the PSNR falls to 27.2 dB and small objects are lost.

Scaling factor (Stable Diffusion's convention: a diffusion model runs on roughly unit-variance latents):
:meth:`VAEModel.encode_latents` multiplies the posterior mean (or a sample) by it, :meth:`VAEModel.decode_latents`
divides by it first. A positive ``scaling_factor`` in the config is used as given (an imported SD VAE's 0.18215).
With ``scaling_factor: 0`` the buffer ``latent_scale`` (saved in model.safetensors) is 1 / the standard deviation
of the posterior means, estimated as BatchNorm's running statistics are: every training forward updates running
moments E[mu], E[mu^2] over all latent values (a cumulative average for the first 10 forwards, then an exponential
one with BatchNorm's momentum 0.1: about the last 10 batches, 160 images' 163 840 values at tiny-vae's batch) and
``latent_scale`` follows them. A longer memory lags: the latents grow through training, and a short run's estimate
with momentum 0.01 was 45% above the exact value (0.92 against 0.64 after 80 steps), 0.1's 7% (0.68). Chosen over a
pass over the training images at the end of a stage because it needs no hook in the stage loop, every saved
checkpoint (an intermediate one too) holds the factor of its own weights, a resumed run continues it exactly (the
buffers are in the checkpoint), and the scale never feeds back into the loss; its lag behind the weights is
measured (bench/vae.py reports the estimate and the exact 1 / std on held-out images).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.batch import MediaInputs
from vlmkit.config import ModelConfig
from vlmkit.errors import ConfigError, DataError
from vlmkit.models.vq import ConvAutoencoderShape, Decoder, Encoder, PatchEncoder

LOGVAR_RANGE = (-30.0, 20.0)  # LDM's DiagonalGaussianDistribution clamp
SCALE_MOMENTUM = 0.1  # the running moments' momentum (BatchNorm's), after a cumulative average over 1 / it forwards


@dataclass
class VAEConfig(ModelConfig, ConvAutoencoderShape):
    """A KL-VAE (module docstring). The encoder / decoder fields are models/vq.py VQConfig's, same names and
    meaning."""

    family: str = "vae"
    image_size: tuple[int, int] = (64, 64)  # (height, width) the processor resizes to
    channels: int = 32  # the first level's width; level i has channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 4)  # one entry per resolution: f = 2 ** (len - 1)
    res_blocks: int = 1  # residual blocks per encoder level (the decoder has one more, as taming's)
    norm_groups: int = 8  # GroupNorm groups; 0: no normalisation
    z_channels: int = 64  # the encoder's output channels (quant_conv maps them to mean and log-variance)
    latent_channels: int = 4  # channels of the latent grid (Stable Diffusion's 4)
    kl_weight: float = 1e-6  # times the per-image KL sum; recon is a per-value mean (module docstring)
    recon_loss: str = "l2"  # l1 | l2
    scaling_factor: float = 0.0  # > 0: the latent scale as given; 0: estimated in training (latent_scale)
    upsample: str = "nearest"  # nearest (then a 3x3 conv) | transpose
    mid_attn: bool = False  # an attention block in the encoder's and decoder's mid (conv encoder)
    attn_levels: tuple[int, ...] = ()  # resolution levels with an attention block after each residual block
    encoder: str = "conv"  # conv: taming's; patch: each latent from its own f x f pixels (models/vq.py)

    def __post_init__(self):
        self.check_shape()
        if self.latent_channels < 1:
            raise ConfigError(f"model.latent_channels must be >= 1, got {self.latent_channels}")
        if not (math.isfinite(self.kl_weight) and self.kl_weight >= 0):
            raise ConfigError(f"model.kl_weight must be a finite number >= 0, got {self.kl_weight}")
        if not (math.isfinite(self.scaling_factor) and self.scaling_factor >= 0):
            raise ConfigError(f"model.scaling_factor must be > 0 (used as given, e.g. Stable Diffusion's 0.18215) "
                              f"or 0 (estimated in training), got {self.scaling_factor}")


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over each image's latent values [n, C, h, w], averaged over the
    images (LDM's ``0.5 * sum(mu^2 + var - 1 - logvar)``)."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1).mean()


@dataclass
class VAEOutput:
    """A forward pass: the total loss (recon + kl_weight * KL), its parts, the reconstruction (normalised pixels,
    unclamped), and the posterior's statistics (std of the means, mean standard deviation)."""

    loss: torch.Tensor
    recon_loss: torch.Tensor
    kl: torch.Tensor
    reconstruction: torch.Tensor
    latent_std: float  # the standard deviation of the posterior means, unscaled
    posterior_std: float  # the mean of the posterior's standard deviations exp(logvar / 2), unscaled
    latent_scale: float  # the factor encode_latents multiplies by

    def metrics(self) -> dict[str, float]:
        return {"recon_loss": float(self.recon_loss.detach()), "kl": float(self.kl.detach()),
                "latent_std": self.latent_std, "posterior_std": self.posterior_std,
                "latent_scale": self.latent_scale}


class VAEModel(nn.Module):
    """Encoder, Gaussian posterior and decoder (module docstring). ``forward(pixels)`` trains it (the ``vae``
    objective); :meth:`encode_latents` and :meth:`decode_latents` are what a latent-diffusion model calls."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = PatchEncoder(cfg) if cfg.encoder == "patch" else Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)
        self.register_buffer("latent_scale", torch.ones(()))
        self.register_buffer("latent_moments", torch.zeros(2))  # running E[mu], E[mu^2]
        self.register_buffer("latent_count", torch.zeros((), dtype=torch.long))  # training forwards seen

    @property
    def latent_grid(self) -> tuple[int, int]:
        return self.cfg.grid

    @property
    def latent_channels(self) -> int:
        return self.cfg.latent_channels

    @property
    def scale(self) -> float:
        """The factor encode_latents multiplies by: the config's, or the estimated ``latent_scale``."""
        return self.cfg.scaling_factor or float(self.latent_scale)

    def module_groups(self) -> dict[str, nn.Module]:
        """What a stage trains or freezes (a vae stage trains them all: ``train: [all]``)."""
        return {"encoder": nn.ModuleList([self.encoder, self.quant_conv]),
                "decoder": nn.ModuleList([self.post_quant_conv, self.decoder])}

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        f = self.cfg.factor
        if pixels.dim() != 4 or pixels.shape[1] != 3 or pixels.shape[2] % f or pixels.shape[3] % f:
            raise DataError(f"a VAE takes images [n, 3, H, W] with H and W multiples of {f}, got "
                            f"{list(pixels.shape)}")

    def posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels [n, 3, H, W] -> the posterior's (mean, clamped log-variance), each [n, latent_channels, h, w],
        unscaled."""
        self._check_pixels(pixels)
        mean, logvar = self.quant_conv(self.encoder(pixels)).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents [n, latent_channels, h, w] -> pixels [n, 3, h*f, w*f] (normalised, unclamped)."""
        return self.decoder(self.post_quant_conv(z))

    @torch.no_grad()
    def encode_latents(self, pixels: torch.Tensor | MediaInputs, sample: bool = False,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised pixels [n, 3, H, W] (or the processor's MediaInputs of them) -> latents [n, latent_channels,
        H/f, W/f]: the posterior mean (``sample``: a sample of the posterior, drawn with ``generator``) times the
        scaling factor. No running-statistics update."""
        if isinstance(pixels, MediaInputs):
            pixels = pixels.pixel_values
        mean, logvar = self.posterior(pixels)
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            mean = mean + torch.exp(0.5 * logvar) * noise
        return mean * self.scale

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents [n, latent_channels, h, w] (as encode_latents gives them) -> pixels [n, 3, h*f, w*f] in
        the processor's normalisation ([-1, 1]), unclamped."""
        if not z.dtype.is_floating_point or z.dim() != 4 or z.shape[1] != self.cfg.latent_channels:
            raise DataError(f"latents must be a float tensor [n, {self.cfg.latent_channels}, h, w], got {z.dtype} "
                            f"{list(z.shape)}")
        return self.decode(z / self.scale)

    @torch.no_grad()
    def _update_scale(self, mean: torch.Tensor) -> None:
        """One training forward's update of the running moments of the posterior means, and of latent_scale."""
        m = mean.detach().float()
        batch = torch.stack([m.mean(), m.pow(2).mean()])
        self.latent_count.add_(1)
        momentum = max(SCALE_MOMENTUM, 1.0 / float(self.latent_count))
        self.latent_moments.mul_(1 - momentum).add_(batch, alpha=momentum)
        var = self.latent_moments[1] - self.latent_moments[0].pow(2)
        self.latent_scale.fill_(float(var.clamp_min(1e-12).rsqrt()))

    def forward(self, pixels: torch.Tensor) -> VAEOutput:
        mean, logvar = self.posterior(pixels)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if self.training else mean
        if self.training:
            self._update_scale(mean)
        recon = self.decode(z)
        rec = F.l1_loss(recon, pixels) if self.cfg.recon_loss == "l1" else F.mse_loss(recon, pixels)
        kl = kl_divergence(mean, logvar)
        return VAEOutput(rec + self.cfg.kl_weight * kl, rec, kl, recon, float(mean.detach().std()),
                         float(torch.exp(0.5 * logvar.detach()).mean()), self.scale)


def build_vae(cfg: VAEConfig, init: bool = True) -> VAEModel:
    return VAEModel(cfg)


__all__ = ["LOGVAR_RANGE", "VAEConfig", "VAEModel", "VAEOutput", "build_vae", "kl_divergence"]
