"""Images, tokens and chat templates: one path for training, evaluation and serving."""

from vlmkit.processing.chat import TEMPLATES, ChatTemplate, Segment
from vlmkit.processing.image import ImageTransform, load_image
from vlmkit.processing.processor import IGNORE, Processor
from vlmkit.processing.tokenizer import SPECIAL_TOKENS, TextTokenizer, train_bpe
# the families' image processors register themselves in IMAGE_PROCESSORS on import
from vlmkit.processing import idefics as _idefics  # noqa: F401, E402  ("idefics")
from vlmkit.processing import blip2 as _blip2  # noqa: F401, E402  ("blip2")
from vlmkit.processing import idefics3 as _idefics3  # noqa: F401, E402  ("idefics3")
from vlmkit.processing import llava_next as _llava_next  # noqa: F401, E402  ("anyres")
from vlmkit.processing import mllama as _mllama  # noqa: F401, E402  ("mllama")
from vlmkit.processing import paligemma as _paligemma  # noqa: F401, E402  ("paligemma")
from vlmkit.processing import qwen2_vl as _qwen2_vl  # noqa: F401, E402  ("qwen2_vl")

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
