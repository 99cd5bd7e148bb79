"""Images, tokens and chat templates: one path for training, evaluation and serving."""

from vlmkit.batch import IGNORE
from vlmkit.processing.chat import TEMPLATES, ChatTemplate, Segment
from vlmkit.processing.image import ImageProcessor, ImageTransform, load_image
from vlmkit.processing.layouts import PromptLayout, SegmentLayout, TemplateLayout
from vlmkit.processing.processor import Processor
from vlmkit.processing.tokenizer import SPECIAL_TOKENS, TextTokenizer, train_bpe

__all__ = [
           "IGNORE",
           "SPECIAL_TOKENS",
           "TEMPLATES",
           "ChatTemplate",
           "ImageProcessor",
           "ImageTransform",
           "Processor",
           "PromptLayout",
           "Segment",
           "SegmentLayout",
           "TemplateLayout",
           "TextTokenizer",
           "load_image",
           "train_bpe",
]
