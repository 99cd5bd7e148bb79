"""Text-only language models: a plain transformers causal-LM folder (Llama, Mistral, Qwen2 / 2.5, Gemma, Phi-1.5 / 2,
Phi-3, OPT, Persimmon) is the shared decoder and nothing else (models/text.py), so it generates, scores, chats
with its own chat template, serves, evaluates (text tasks: multiple choice without images) and fine-tunes through
the same Pipeline, engine and training loop as the vision-language families.

What the family decides for a model without images:

- the image processor refuses any image, naming the model (processing/text_lm.py); the layout is the folder's
  tokenizer and chat template, as transformers' tokenizer lays text out (a prompt that already begins with the
  BOS gets no second one);
- capabilities: no ``tower_cache`` (no tower), ``shared_prefix`` (causal attention at plain positions);
- objectives: ``lm`` only (``cell_labels`` has no image to label); module groups: ``lm``;
- the Hugging Face model types are every text LM convert/hf/lm.py reads (``LM_TYPES``: a type added there loads
  here with no change to this module) and Phi's (convert/hf/phi.py); export writes the folder's own class.
"""

from __future__ import annotations

from vlmkit.config import apply_overrides
from vlmkit.convert.hf.text import TEXT_TYPES, export_class, export_text, load_text_folder
from vlmkit.family import Capabilities, Family, HFMapping, register
from vlmkit.models.text import TextLMConfig, build_text_lm
from vlmkit.processing.text_lm import NoImages, TextLMLayout, TextLMProcessorConfig


@register
class Text(Family):
    """a decoder-only language model, no images (Llama, Mistral, Qwen2, Gemma, Phi, OPT, Persimmon folders)"""

    name = "text"
    Config = TextLMConfig
    ProcessorConfig = TextLMProcessorConfig
    capabilities = Capabilities(tower_cache=False, shared_prefix=True)
    objectives = ("lm",)
    image_groups = ()
    hf = HFMapping(TEXT_TYPES, load_text_folder, export_text, "AutoModelForCausalLM")

    def build(self, cfg, image_token_id, init=True):
        return build_text_lm(cfg, init)

    def image_processor(self, pcfg):
        return NoImages(pcfg)

    def layout(self, pcfg, tokenizer, files):
        return TextLMLayout(pcfg, tokenizer)

    def configure(self, cfg, pcfg, tokenizer):
        """The LM's vocabulary is the tokenizer's; its processor takes the LM's context."""
        cfg = apply_overrides(cfg, {"lm.vocab_size": tokenizer.vocab_size})
        return cfg, apply_overrides(pcfg, {"family": cfg.family, "max_length": cfg.lm.max_seq_len})

    def export_class(self, cfg) -> str:
        return export_class(cfg)
