"""Mistral 3 (Mistral Small 3.1 / 3.2): the Pixtral tower and Mistral 3's projector with its patch merger
(encoders/pixtral.py), spliced into a Mistral LM at the image tokens (``[IMG]``), as transformers'
``Mistral3ForConditionalGeneration``.

Images arrive as the processor's MediaInputs (processing/mistral3.py: each image's flattened patches, its patch grid
in ``extra["image_grid"]``). Their features are flat [total image tokens, D_lm], each image's tokens its rows
(``Features.rows``), in the order the text holds them: each image's merged grid row by row, the row breaks and the
image end being ordinary tokens of the text. Positions and attention are the LM's own (causal, plain positions).
"""

from __future__ import annotations

from vlmkit.batch import Features, MediaInputs
from vlmkit.config import VLMConfig
from vlmkit.encoders.pixtral import Mistral3Projector, PixtralLlavaProjector, PixtralVisionEncoder
from vlmkit.lm.decoder import DecoderLM
from vlmkit.models.init import check_head_init, init_from_scratch
from vlmkit.models.vlm import VisionLanguageModel


class Mistral3Model(VisionLanguageModel):
    """Mistral3ForConditionalGeneration: Pixtral tower -> projector (RMSNorm, patch merger, MLP) -> splice into a
    DecoderLM at the image token."""

    @property
    def image_seq_len(self) -> int:
        raise NotImplementedError("mistral3 images fill a number of tokens that depends on their size "
                                  "(MediaInputs.tokens); there is no fixed image_seq_len")

    def encode_media(self, media: MediaInputs) -> Features:
        """The processor's MediaInputs (flattened patches + ``extra["image_grid"]``) -> features
        [total image tokens, D_lm], each image's tokens its rows."""
        if "image_grid" not in media.extra:
            raise ValueError("mistral3 encodes images from the processor's MediaInputs (flattened patches with "
                             "extra['image_grid']), not from a bare pixel tensor")
        grid = media.extra["image_grid"]
        m = self.connector.merge
        if bool((grid % m).any()):
            raise ValueError(f"image grids {grid.tolist()} must be whole multiples of the merge size {m}")
        feats = self.connector(self.encoder(media.pixel_values, grid), grid)
        tokens = [int(h) // m * (int(w) // m) for h, w in grid.tolist()]
        return Features(feats, tokens, {"image_grid": grid})


def build_mistral3(cfg: VLMConfig, image_token_id: int, init: bool = True) -> Mistral3Model:
    """A Mistral3Model from its config: vision.arch "pixtral" (vision.merge_size: the patch merger's window),
    connector.kind "patch_merger" (RMSNorm with the LM's eps, the merger, Linear -> connector.act -> Linear), or
    "mlp" with merge_size 1 (Pixtral-12B's LLaVA projector: Linear -> act -> Linear, no merger)."""
    if cfg.vision.arch != "pixtral":
        raise ValueError(f"family mistral3 needs vision.arch 'pixtral', got {cfg.vision.arch!r}")
    if cfg.connector.kind == "mlp":
        if cfg.vision.merge_size != 1:
            raise ValueError(f"connector.kind 'mlp' (Pixtral-12B's projector) merges no patches: vision.merge_size "
                             f"must be 1, got {cfg.vision.merge_size}")
        connector = PixtralLlavaProjector(cfg.vision.width, cfg.lm.width, cfg.connector.act, cfg.connector.bias)
    elif cfg.connector.kind == "patch_merger":
        if cfg.connector.scale_factor != cfg.vision.merge_size or cfg.vision.merge_size < 1:
            raise ValueError(f"connector.scale_factor {cfg.connector.scale_factor} must equal vision.merge_size "
                             f"{cfg.vision.merge_size} (>= 1: the patch merger's window)")
        connector = Mistral3Projector(cfg.vision.width, cfg.lm.width, cfg.vision.merge_size, cfg.connector.act,
                                      cfg.connector.bias, cfg.lm.norm_eps)
    else:
        raise ValueError(f"family mistral3 needs connector.kind 'patch_merger' (Mistral 3) or 'mlp' (Pixtral-12B), "
                         f"got {cfg.connector.kind!r}")
    check_head_init(cfg)
    model = Mistral3Model(PixtralVisionEncoder(cfg.vision), connector, DecoderLM(cfg.lm), image_token_id)
    if init:
        init_from_scratch(model, cfg)
    return model


__all__ = ["Mistral3Model", "build_mistral3"]
