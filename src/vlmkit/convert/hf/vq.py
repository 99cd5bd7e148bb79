"""transformers' VQ image tokenizers (``JanusVQVAEConfig`` / ``janus_vqgan``, ``ChameleonVQVAEConfig`` /
``chameleon_vqgan``) <-> vlmkit's ``VQModel`` (models/vq.py). Family converters call :func:`vq_config_from_hf`
on the folder's ``vq_config`` and load the weights through :func:`vq_key_map` with the key prefix they use
(``model.vqmodel.`` for Chameleon, ``model.vqmodel.`` for Janus).

What the two references compute, as VQConfig options:

- both: taming's modules (GroupNorm with 32 groups and eps 1e-6, swish, asymmetric-pad stride-2 downsampling,
  nearest upsampling + 3x3 conv), nearest code by squared L2 distance to the raw codebook, ``dropout`` is
  inference-time identity;
- Janus (LlamaGen): attention in ``mid`` and after every block of the lowest resolution (encoder and decoder), the
  decoder reads L2-normalised codes (``get_codebook_entry``) -> ``mid_attn``, ``attn_levels=(last,)``,
  ``decode_l2_norm``; the grid is ``num_patches`` square;
- Chameleon: attention in ``mid`` and at the pixel resolutions of ``attn_resolutions`` (counted from
  ``resolution``) when ``attn_type`` is ``vanilla``; transformers has its encoder only -> ``decoder: false``.

transformers stores a decoder's levels lowest resolution first (``decoder.up[0]`` is the last level); vlmkit keeps
taming's order (``decoder.up[i]`` is level i), so the key map reverses them.
"""

from __future__ import annotations

import re

from torch import nn

from vlmkit.errors import ConfigError
from vlmkit.models.vq import VQConfig

VQ_TYPES = ("janus_vqgan", "chameleon_vqgan")


def vq_config_from_hf(cfg: dict, kind: str, where: str = "config.json vq_config",
                      image_size: int | None = None) -> VQConfig:
    """A transformers VQ config (``kind``: janus_vqgan | chameleon_vqgan) -> VQConfig. ``image_size``: the
    processor's image side, when the family knows it better than the VQ config (Chameleon's ``resolution``)."""
    if kind not in VQ_TYPES:
        raise ConfigError(f"{where}: VQ model_type {kind!r} is not one vlmkit imports; supported: "
                          f"{', '.join(VQ_TYPES)}")
    if cfg.get("double_latent"):
        raise ConfigError(f"{where}: double_latent true is not supported (its encoder's 2 * latent_channels "
                          f"outputs do not fit quant_conv's latent_channels inputs in transformers either)")
    for key in ("in_channels", "out_channels"):
        if int(cfg.get(key, 3)) != 3:
            raise ConfigError(f"{where}: {key} must be 3 (RGB), got {cfg[key]}")
    mult = tuple(int(m) for m in cfg.get("channel_multiplier", (1, 1, 2, 2, 4)))
    factor = 2 ** (len(mult) - 1)
    janus = kind == "janus_vqgan"
    if janus:
        side = image_size or int(cfg.get("num_patches", 32)) * factor
        levels, mid_attn = (len(mult) - 1,), True
    else:
        resolution = int(cfg.get("resolution", 512))
        side = image_size or resolution
        vanilla = cfg.get("attn_type", "vanilla") == "vanilla"
        attn_res = {int(r) for r in (cfg.get("attn_resolutions") or ())}
        levels = tuple(i for i in range(len(mult)) if vanilla and resolution // 2 ** i in attn_res)
        mid_attn = vanilla
    try:
        return VQConfig(
            image_size=(side, side), channels=int(cfg.get("base_channels", 128)), channel_mult=mult,
            res_blocks=int(cfg.get("num_res_blocks", 2)), norm_groups=32,
            code_dim=int(cfg.get("embed_dim", 8 if janus else 256)),
            z_channels=int(cfg.get("latent_channels", 256)),
            codebook_size=int(cfg.get("num_embeddings", 16384 if janus else 8192)), quantizer="ste",
            beta=float(cfg.get("beta", 0.25)), restart_after=0, mid_attn=mid_attn, attn_levels=levels,
            decode_l2_norm=janus, decoder=janus)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e


_UP = re.compile(r"^decoder\.up\.(\d+)\.")


def vq_key_map(model: nn.Module, cfg: VQConfig, prefix: str = "") -> dict[str, str]:
    """vlmkit VQModel parameter name -> transformers tensor name (``prefix`` + the same taming name; the decoder's
    levels reversed). ``model`` is the VQModel the names come from (its options decide which blocks exist)."""
    last = len(cfg.channel_mult) - 1
    table = {}
    for name, _ in model.named_parameters():
        theirs = _UP.sub(lambda m: f"decoder.up.{last - int(m.group(1))}.", name)
        table[name] = prefix + theirs
    return table


__all__ = ["VQ_TYPES", "vq_config_from_hf", "vq_key_map"]
