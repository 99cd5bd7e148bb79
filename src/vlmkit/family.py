"""Families: the one interface shared code asks about a model family.

A family (LLaVA, Qwen2-VL, BLIP-2, Fuyu, CLIP, ...) is one module under ``vlmkit/families/`` that registers one
:class:`Family`: its config types (the model's, and its processor's: typed dataclasses that live with the family),
how to build its model, its image processor and prompt layout, its Hugging Face mapping, what it can do
(:class:`Capabilities`) and which stage objectives it trains with. The processor, generation, the Pipeline, the
serving engine, training, evaluation and conversion ask this interface; none of them tests which family it holds.

Family modules are discovered, not listed: every module of the ``vlmkit.families`` package is imported the first
time the registry is read, and so is every entry point of the group ``vlmkit.families`` (a family in another
package). docs/adding-a-family.md walks through adding one.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from vlmkit.config import ModelConfig, ProcessorConfig, VLMConfig, apply_overrides
from vlmkit.processing.image import ImageProcessor
from vlmkit.processing.layouts import SegmentLayout, TemplateLayout
from vlmkit.families import (FAMILIES, family_of, get_family, hf_family_of, model_config_from_dict,
                             processor_config_from_dict, register)
from vlmkit.processing.processor import Processor


@dataclass(frozen=True)
class Capabilities:
    """What a family's models can do, as shared code needs to know it."""

    generate: bool = True  # chat / generate / score / rank: a generative model
    embed: bool = False  # embed_images / embed_texts: a dual encoder
    generate_images: bool = False  # generate_image(prompt, n=, seed=, ...) -> PIL images: a text-to-image model
    # train.precompute_frozen_vision: an image's tower output depends on the image alone (fixed size, nothing read
    # with it) and the model takes it precomputed (MediaInputs.tower)
    tower_cache: bool = False
    # data.group_turns: questions about one image may share one prompt prefix, at plain positions with a causal
    # segment mask (not with M-RoPE positions or prefix-LM attention)
    shared_prefix: bool = True
    # encode_codes / decode_codes: images <-> a grid of discrete codes through the model's VQ codebook (a VQ image
    # tokenizer; an early-fusion family that generates image codes)
    image_codes: bool = False
    # encode_latents / decode_latents: images <-> grids of continuous latents (a KL-VAE: what latent diffusion
    # denoises)
    image_latents: bool = False


@dataclass(frozen=True)
class HFMapping:
    """How a family reads and writes Hugging Face folders (convert/hf/)."""

    model_types: tuple[str, ...]  # config.json model_type values it reads
    load: Callable  # folder -> (model, model config, Processor)
    export: Callable | None = None  # (model, model config, Processor, folder) -> None; writes into ``folder``
    transformers_class: str = ""  # the class transformers loads an export with


class Family:
    """The interface of a family (module docstring). Subclass it in a module of ``vlmkit.families`` and decorate the
    class with :func:`register`; one instance serves every caller."""

    name: ClassVar[str]
    doc: ClassVar[str] = ""
    Config: ClassVar[type[ModelConfig]] = ModelConfig
    ProcessorConfig: ClassVar[type[ProcessorConfig]] = ProcessorConfig
    capabilities: ClassVar[Capabilities] = Capabilities()
    objectives: ClassVar[tuple[str, ...]] = ("lm",)  # the stage objectives its models train with
    # the module groups that see an image before the LM reads it, which a cell_labels stage pretrains (through
    # ``image_tower()``): a tower's ("vision"); an encoder-free model's patch projection and the LM itself
    image_groups: ClassVar[tuple[str, ...]] = ("vision",)
    hf: ClassVar[HFMapping | None] = None
    # files beside tokenizer.json that its processor keeps (InstructBLIP's Q-Former tokenizer)
    processor_files: ClassVar[tuple[str, ...]] = ()

    def build(self, cfg: ModelConfig, image_token_id: int | None, init: bool = True):
        """The model of ``cfg``; ``init`` applies the from-scratch initialisation, otherwise weights are left for a
        checkpoint to fill."""
        raise NotImplementedError

    def image_processor(self, pcfg: ProcessorConfig):
        """Images -> MediaInputs, for this family's models."""
        raise NotImplementedError

    def layout(self, pcfg: ProcessorConfig, tokenizer, files: dict[str, Any]):
        """The prompt layout (processing/layouts.py) of ``pcfg``: vlmkit's segment layout for models trained in
        vlmkit (``text_mode: segments``), the reference processor's layout for imported ones (``whole``)."""
        raise NotImplementedError

    def configure(self, cfg: ModelConfig, pcfg: ProcessorConfig, tokenizer) -> tuple[ModelConfig, ProcessorConfig]:
        """A from-scratch model's config fitted to the recipe's ``tokenizer`` (vocabulary, special ids), and the
        processor's to the model's (image size)."""
        return cfg, pcfg

    def new_model(self, cfg: ModelConfig, pcfg: ProcessorConfig, tokenizer):
        """(config, model, processor) of a model built from scratch for a recipe's ``tokenizer``."""
        cfg, pcfg = self.configure(cfg, pcfg, tokenizer)
        model = self.build(cfg, tokenizer.token_id(pcfg.image_token) if pcfg.image_token else None, init=True)
        return cfg, model, self.new_processor(model, pcfg, tokenizer)

    def new_processor(self, model, pcfg: ProcessorConfig, tokenizer):
        """The processor of a model built from scratch."""
        return Processor(pcfg, tokenizer)

    def new_tokenizer(self, texts: list[str], vocab_size: int):
        """A tokenizer trained on ``texts`` for a model built from scratch."""
        from vlmkit.processing.tokenizer import TextTokenizer, train_bpe

        return TextTokenizer(train_bpe(texts, vocab_size))

    def can_draw(self, model) -> bool:
        """Whether ``model`` (of a family with ``generate_images``) can turn what it samples into pixels: by default
        whether it has a VQ decoder (an imported Chameleon has none)."""
        return bool(model.can_decode_codes)

    def draw_images(self, model, cond: list[int], uncond: list[int], gen, progress: bool = False):
        """Pixels [n, 3, H, W] in [-1, 1] drawn for the prompt ids ``cond`` (``uncond``: the unconditional prompt's,
        for classifier-free guidance; empty when ``gen.cfg_scale`` is 1) with the sampling options ``gen``
        (image_generation.ImageGenerationConfig). By default an autoregressive family's drawing: codes sampled one by
        one with a KV cache, decoded by the VQ decoder. A family that draws otherwise (mask-predict over codes,
        diffusion over continuous latents) overrides this; Pipeline.generate_image, the images API and
        ``shapes_t2i`` all draw through it."""
        from vlmkit.image_generation import draw_autoregressive

        return draw_autoregressive(model, cond, uncond, gen, progress)

    def t2i_training_tokens(self, model, tokens: list[int], rng: random.Random) -> tuple[list[int], list[int]]:
        """(inputs, labels) of a text-to-image sample's image ``tokens`` (its code ids and the family's forced ids, as
        ``image_generation.image_tokens`` writes them) after the prompt: what the model reads and what it is trained
        to predict there. ``rng`` is seeded per sample and step from the run's seed (objectives/unified.py), so a
        resumed run draws the same. By default an autoregressive family's: the tokens read as they are, each
        supervised as the next token (the model's loss shifts). A mask-predict family replaces some codes by its
        mask id and supervises those positions with the original codes (families/showo.py)."""
        return list(tokens), list(tokens)

    def t2i_pairs(self, pairs: list, processor, model, where: str, progress: bool = False):
        """The unified objective's text-to-image samples of ``pairs`` (data/pairs.py rows) for ``model``, or None for
        the default: the images' VQ codes (objectives/unified.py ``CodePairs``). A family that writes something else
        than codes (continuous latents: families/transfusion.py) returns its own, with CodePairs' interface
        (``len``, ``length(i)``, ``item(i, unconditional, rng)``, ``counts(batch)``)."""
        return None

    def describe(self) -> str:
        return self.doc or (type(self).__doc__ or "").strip().splitlines()[0]

    def image_tokens(self, model) -> str:
        """How many LM positions an image fills, for listings ("-": none, the model does not read images so)."""
        return "-"

    def export_class(self, cfg: ModelConfig) -> str:
        """The transformers class a model of ``cfg`` exports to ("": it does not)."""
        return self.hf.transformers_class if self.hf is not None and self.hf.export is not None else ""


class VLMFamily(Family):
    """The defaults of a generative family composed of VLMConfig's parts: fixed-size images, vlmkit's segment layout
    for models trained in vlmkit and the reference processor's template layout for imported ones, a from-scratch
    model fitted to the recipe's tokenizer."""

    Config = VLMConfig
    objectives = ("lm", "cell_labels", "qformer")  # qformer: a model whose connector is a Q-Former

    def image_processor(self, pcfg: ProcessorConfig):
        return ImageProcessor(pcfg)

    def layout(self, pcfg: ProcessorConfig, tokenizer, files: dict[str, Any]):
        return (SegmentLayout if pcfg.text_mode == "segments" else TemplateLayout)(pcfg, tokenizer)

    def image_tokens(self, model) -> str:
        return str(model.image_seq_len)

    def export_class(self, cfg) -> str:
        """vlmkit's CNN tower has no transformers counterpart: such models do not export."""
        return "" if cfg.vision.arch == "cnn" else super().export_class(cfg)

    def configure(self, cfg, pcfg, tokenizer):
        """The LM's vocabulary is the tokenizer's, and so is that of a Q-Former connector that reads text (stage 1,
        an instruction) unless it starts from a BERT (which brings its own); images are the tower's size."""
        cfg = apply_overrides(cfg, {"lm.vocab_size": tokenizer.vocab_size})
        q = cfg.connector.qformer
        if cfg.connector.kind == "qformer" and q.vocab_size and not q.init_from:
            cfg = apply_overrides(cfg, {"connector.qformer.vocab_size": tokenizer.vocab_size})
        return cfg, apply_overrides(pcfg, {"image_size": list(cfg.vision.image_size), "family": cfg.family})

    def new_processor(self, model, pcfg, tokenizer):
        """Each image fills the model's tokens."""
        return Processor(apply_overrides(pcfg, {"image_seq_len": model.image_seq_len}), tokenizer)


__all__ = ["FAMILIES", "Capabilities", "Family", "HFMapping", "VLMFamily", "family_of", "get_family", "hf_family_of",
           "model_config_from_dict", "processor_config_from_dict", "register"]
