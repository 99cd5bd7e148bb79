"""Images, tokens and chat templates: one path for training, evaluation and serving."""

from vlmkit.processing.chat import TEMPLATES, ChatTemplate, Segment
from vlmkit.processing.image import ImageTransform, load_image
from vlmkit.processing.processor import IGNORE, Processor
from vlmkit.processing.tokenizer import SPECIAL_TOKENS, TextTokenizer, train_bpe

__all__ = [
           "IGNORE",
           "SPECIAL_TOKENS",
           "TEMPLATES",
           "ChatTemplate",
           "ImageTransform",
           "Processor",
           "Segment",
           "TextTokenizer",
           "load_image",
           "train_bpe",
]
