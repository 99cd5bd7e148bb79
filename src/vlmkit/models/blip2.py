"""BLIP-2 (Li et al. 2023) and InstructBLIP (Dai et al. 2023): image tower -> Q-Former -> decoder LM.

The Q-Former's learned queries read the tower's features (:class:`~vlmkit.connectors.qformer.QFormerConnector`);
their outputs, projected to the LM width, are spliced at the image-token positions, ``num_query_tokens`` per
image, as any spliced family's (transformers' processors write those tokens before the prompt's BOS; vlmkit's
own presets put the placeholder where their template says).

InstructBLIP's Q-Former also reads the instruction: the prompt tokenised by the Q-Former's own tokenizer (never
the continuation), which the processor puts in each image's ``MediaInputs.extra`` (``qformer_input_ids`` and
``qformer_attention_mask``, padded to one length; see :meth:`vlmkit.processing.Processor.instruction`). So an
image's features depend on its prompt, and are computed per prompt.

The tower is a ViT (BLIP-2's EVA-CLIP: class token, pre-norm blocks, the final norm on every token the Q-Former
reads) or vlmkit's CNN for from-scratch presets; the LM is any ``DecoderLM`` (OPT for BLIP-2, Vicuna for
InstructBLIP). Packing needs nothing of its own: each image's queries see only that image, and the spliced
sequence attends as any other (``VisionLanguageModel.document_attention``).
"""

from __future__ import annotations


from vlmkit.config import VLMConfig
from vlmkit.connectors import build_connector
from vlmkit.connectors.qformer import init_qformer_from_bert
from vlmkit.encoders.cnn import ConvEncoder
from vlmkit.encoders.vit import ViTEncoder
from vlmkit.lm.decoder import DecoderLM
from vlmkit.models.init import init_from_scratch
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.batch import Features, MediaInputs

INSTRUCTION_KEYS = ("qformer_input_ids", "qformer_attention_mask")


class QueryVisionLanguageModel(VisionLanguageModel):
    """encoder -> Q-Former connector -> splice into the LM; with ``reads_instruction`` (InstructBLIP) the Q-Former
    reads each image's instruction. A BLIP-2 Q-Former may have text embeddings too (its stage-1 objectives read
    captions), but with the LM it reads the image alone."""

    def __init__(self, encoder, connector, lm, image_token_id: int, reads_instruction: bool = False):
        super().__init__(encoder, connector, lm, image_token_id)
        self.reads_instruction = reads_instruction

    def encode_media(self, media: MediaInputs) -> Features:
        """Images [n, C, H, W] (with the instruction's ids [n, L] in ``media.extra`` when the Q-Former reads one) ->
        LM-space features [n, num_query_tokens, D_lm]. A precomputed tower output (``media.tower``) is used as is."""
        feats = media.tower if media.tower is not None else self.encoder(media.pixel_values)  # [n, N, D_v]
        if not self.reads_instruction:
            return Features.stacked(self.connector(feats, self.encoder.grid))  # [n, Q, D_lm]
        if any(k not in media.extra for k in INSTRUCTION_KEYS):
            raise ValueError("this model's Q-Former reads each image's instruction (InstructBLIP): pass the "
                             "processor's MediaInputs, whose extra holds qformer_input_ids and "
                             "qformer_attention_mask (the Processor fills them from the prompt)")
        ids, mask = media.extra["qformer_input_ids"], media.extra["qformer_attention_mask"]  # [n, L], right-padded
        if ids.numel() and int(ids.max()) >= self.connector.cfg.vocab_size:
            raise ValueError(f"instruction token id {int(ids.max())} is outside the Q-Former's vocabulary "
                             f"(connector.qformer.vocab_size {self.connector.cfg.vocab_size}): the processor's "
                             f"Q-Former tokenizer does not belong to this model")
        n = int(mask.sum(-1).max()) if mask.numel() else 0  # the padding every row has is dropped: no key sees it
        return Features.stacked(self.connector(feats, self.encoder.grid, text_ids=ids[:, :n], text_mask=mask[:, :n]))


def _build(cfg: VLMConfig, image_token_id: int, init: bool, text: bool) -> QueryVisionLanguageModel:
    encoders = {"vit": ViTEncoder, "cnn": ConvEncoder}
    if cfg.vision.arch not in encoders:
        raise ValueError(f"the {cfg.family} family needs vision.arch 'vit' or 'cnn', got {cfg.vision.arch!r}")
    if cfg.connector.kind != "qformer":
        raise ValueError(f"the {cfg.family} family reads images through a Q-Former: connector.kind must be "
                         f"'qformer', got {cfg.connector.kind!r}")
    if text and not cfg.connector.qformer.text_input:
        raise ValueError("connector.qformer.vocab_size 0: InstructBLIP's Q-Former reads the instruction; set its "
                         "vocabulary size (> 0)")
    if cfg.lm.head_init_std is not None and cfg.lm.tie_embeddings:
        raise ValueError("lm.head_init_std initialises an untied LM head; with lm.tie_embeddings: true the head "
                         "is the token embedding (set tie_embeddings: false, or leave head_init_std unset)")
    encoder = encoders[cfg.vision.arch](cfg.vision)
    connector = build_connector(cfg.connector, cfg.vision.width, cfg.lm.width)
    model = QueryVisionLanguageModel(encoder, connector, DecoderLM(cfg.lm), image_token_id, reads_instruction=text)
    if init:
        init_from_scratch(model, cfg)
        if cfg.connector.qformer.init_from and not any(p.is_meta for p in model.parameters()):
            init_qformer_from_bert(connector.qformer, cfg.connector.qformer.init_from)  # BLIP-2 starts from a BERT
    return model


def build_blip2(cfg: VLMConfig, image_token_id: int, init: bool = True) -> QueryVisionLanguageModel:
    """A BLIP-2 model from its config; ``init`` applies the from-scratch initialisation of ``build_model``."""
    return _build(cfg, image_token_id, init, text=False)


def build_instructblip(cfg: VLMConfig, image_token_id: int, init: bool = True) -> QueryVisionLanguageModel:
    """An InstructBLIP model from its config; ``init`` applies the from-scratch initialisation of ``build_model``."""
    return _build(cfg, image_token_id, init, text=True)
