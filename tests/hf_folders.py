"""The tiny Hugging Face folders that the parity tests hold vlmkit against: one plain builder per folder.

``build_<name>(folder)`` saves a tiny random transformers checkpoint with its processor's files into ``folder`` (an
empty directory) and returns (the transformers model, in eval mode; the processor as the tests use it, which is
``AutoProcessor.from_pretrained(folder)`` unless the builder says otherwise). :data:`BUILDERS` names them all and
:data:`BASES` the folders that derive from another one. tests/conftest.py's ``hf_folder`` fixture builds each
folder at most once per test session; being plain functions, the builders serve scripts too.

Every builder seeds torch itself, so a folder's weights are the same whichever was built before it. The
tokenizers trained on :data:`~hf_fixtures.CORPUS` are the same from run to run too, except two whose trainer
breaks ties in hash-map order, which changes from process to process: CLIP's BPE (tied merges, and so a few ids,
swap) and the Q-Former's WordPiece (a dozen of its 150 tokens differ); the tests compare vlmkit with
transformers on one folder, whichever ids it has.

What the builders share: :func:`~hf_fixtures.perturb_` moves norms off 1 and biases, class and newline embeddings off 0,
and several families raise ``initializer_range`` above the usual 0.02 or open gates that start closed: a unit
norm, a zero bias, a closed gate or a near-constant model would let a missing or misplaced tensor (or greedy
decoding) agree without testing it.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from hf_fixtures import CORPUS, LLAVA_TEMPLATE, byte_level_tokenizer, perturb_, sentencepiece_tokenizer

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")


# ------------------------------------------------------------------------------------------------ LLaVA-1.5


def build_llava(folder: Path):
    """LLaVA-1.5: CLIP tower, Llama LM, llava-hf's chat template."""
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=sentencepiece_tokenizer(["<image>"]),
                                               bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                               pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    image_id = tok.convert_tokens_to_ids("<image>")
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=32, patch_size=8, layer_norm_eps=1e-6)
    text = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                                    rope_theta=50000.0, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    cfg = transformers.LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                   image_token_index=image_id, image_seq_length=16)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    perturb_(model)
    model.save_pretrained(folder)
    images = transformers.CLIPImageProcessor(size={"shortest_edge": 34}, crop_size={"height": 32, "width": 32},
                                             image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25])
    processor = transformers.LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=8,
                                            vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE,
                                            num_additional_image_tokens=1)  # the class token, as llava-hf
    processor.save_pretrained(folder)
    return model, transformers.AutoProcessor.from_pretrained(folder)


# ------------------------------------------------------------------------------------------------ LLaVA-NeXT

LLAVA_NEXT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}{% for content in "
    "message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{% for "
    "content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{{ ' [/INST]' }}{% else %}{{ ' ' + message['content'][0]['text'] + '</s>' }}{% endif %}"
    "{% endfor %}")
# 16-pixel tiles: the wide image gets 4x5 tiles (feature rows unpadded), the tall one 4x3 (columns unpadded),
# the square one 4x4 (nothing to unpad)
LLAVA_NEXT_PINPOINTS = [[32, 32], [64, 48], [64, 64], [64, 80], [48, 64]]


def build_llava_next(folder: Path):
    """LLaVA-NeXT: CLIP tower at layer -2, Mistral LM with grouped-query attention, AnyRes tiles of 16 px."""
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=sentencepiece_tokenizer(["<image>"]),
                                               bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                               pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=16, patch_size=4, layer_norm_eps=1e-6)
    text = transformers.MistralConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                                      rope_theta=50000.0, max_position_embeddings=1024, sliding_window=None,
                                      bos_token_id=1, eos_token_id=2)
    cfg = transformers.LlavaNextConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                       image_token_index=tok.convert_tokens_to_ids("<image>"),
                                       image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, vision_feature_layer=-2,
                                       vision_feature_select_strategy="default")
    model = transformers.LlavaNextForConditionalGeneration(cfg).eval()
    perturb_(model)
    model.save_pretrained(folder)
    images = transformers.LlavaNextImageProcessorPil(size={"shortest_edge": 18}, crop_size={"height": 16, "width": 16},
                                                     image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
                                                     image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25])
    processor = transformers.LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=4,
                                                vision_feature_select_strategy="default",
                                                chat_template=LLAVA_NEXT_TEMPLATE,
                                                num_additional_image_tokens=1)  # the class token, as llava-hf
    processor.save_pretrained(folder)
    return model, transformers.AutoProcessor.from_pretrained(folder)


# ------------------------------------------------------------------------------------------------ LLaVA-OneVision

# llava-onevision-hf's template: its assistant replies are marked {% generation %} (transformers' assistant mask),
# and its generation prompt differs from how it writes a reply ("assistant\n" vs "assistant \n")
ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}{% for content in "
    "message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}{% for "
    "content in message['content'] | selectattr('type', 'equalto', 'text') %}{% if message['role'] != "
    "'assistant' %}{{ '\n' + content['text'] }}{% else %}{% generation %}{{ '\n' + content['text'] }}"
    "{% endgeneration %}{% endif %}{% endfor %}{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
# 16-pixel tiles: the wide image gets 4x5 tiles (rows unpadded, then reduced), the tall one 4x3 (columns
# unpadded, not reduced), the square one 4x4 (reduced)
ONEVISION_PINPOINTS = [[32, 32], [64, 48], [64, 64], [64, 80], [48, 64]]


class ImageOnlyOnevisionProcessor(transformers.LlavaOnevisionProcessor):
    """LlavaOnevisionProcessor without its video processor (which needs torchvision, absent here; AutoProcessor
    insists on loading one): the same class code, saved as and reloaded from the folder's files."""

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                 vision_feature_select_strategy=None, chat_template=None, image_token="<image>",
                 video_token="<video>", vision_aspect_ratio="anyres_max_9", **kwargs):
        super().__init__(image_processor, tokenizer, None, num_image_tokens=num_image_tokens,
                         vision_feature_select_strategy=vision_feature_select_strategy,
                         chat_template=chat_template, image_token=image_token, video_token=video_token,
                         vision_aspect_ratio=vision_aspect_ratio, **kwargs)


def build_llava_onevision(folder: Path):
    """LLaVA-OneVision: SigLIP tower at layer -1 ("full"), Qwen2 LM with grouped-query attention and tied
    embeddings, anyres_max_9. The processor returned is :class:`ImageOnlyOnevisionProcessor` read from the folder,
    whose processor_config.json names LlavaOnevisionProcessor as a Hub folder does."""
    special = {"image_token": "<image>", "video_token": "<video>"}
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=byte_level_tokenizer(["<image>", "<video>"]),
                                               eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                               extra_special_tokens=special)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(0)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                             num_attention_heads=4, image_size=16, patch_size=4, layer_norm_eps=1e-6,
                                             vision_use_head=False)
    text = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                    rope_theta=20000.0, max_position_embeddings=1024, tie_word_embeddings=True,
                                    eos_token_id=eos, pad_token_id=eos)
    cfg = transformers.LlavaOnevisionConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                            image_token_index=tok.convert_tokens_to_ids("<image>"),
                                            video_token_index=tok.convert_tokens_to_ids("<video>"),
                                            image_grid_pinpoints=ONEVISION_PINPOINTS, vision_feature_layer=-1,
                                            vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                                            tie_word_embeddings=True)
    model = transformers.LlavaOnevisionForConditionalGeneration(cfg).eval()
    perturb_(model)
    model.save_pretrained(folder)
    images = transformers.LlavaOnevisionImageProcessorPil(size={"height": 16, "width": 16},
                                                          image_grid_pinpoints=ONEVISION_PINPOINTS,
                                                          image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25])
    processor = ImageOnlyOnevisionProcessor(image_processor=images, tokenizer=tok, num_image_tokens=16,
                                            vision_feature_select_strategy="full", chat_template=ONEVISION_TEMPLATE,
                                            vision_aspect_ratio="anyres_max_9")
    processor.save_pretrained(folder)
    path = folder / "processor_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "processor_class": "LlavaOnevisionProcessor"}))
    return model, ImageOnlyOnevisionProcessor.from_pretrained(folder)


# ------------------------------------------------------------------------------------------------ Qwen2-VL

QWEN2_VL_SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                    "<|video_pad|>"]

# Qwen2-VL-Instruct's chat template
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")


class ImageOnlyQwen2VLProcessor(transformers.Qwen2VLProcessor):
    """transformers' Qwen2VLProcessor without its video processor. Qwen2VLProcessor holds a video processor,
    which needs torchvision (absent here), so ``AutoProcessor.from_pretrained`` cannot build it; this class's
    ``from_pretrained`` loads the image processor (AutoImageProcessor: the PIL backend) and the tokenizer from the
    folder exactly as AutoProcessor would, and text and image processing are Qwen2VLProcessor's own."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def build_qwen2_vl(folder: Path):
    """Qwen2-VL: byte-level tokenizer without BOS, M-RoPE sections [3, 2, 3], 4 px patches merged 2x2, min/max
    pixels that scale small images up and large ones down. The processor returned is
    :class:`ImageOnlyQwen2VLProcessor` read from the folder, whose processor_config.json names Qwen2VLProcessor as a
    Hub folder does."""
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=byte_level_tokenizer(QWEN2_VL_SPECIAL),
                                               eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = dict(zip(("im_start", "im_end", "vs", "ve", "image", "video"), tok.convert_tokens_to_ids(QWEN2_VL_SPECIAL)))
    torch.manual_seed(0)
    vision = dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, hidden_size=64, initializer_range=0.2,
                  rope_parameters={"rope_type": "axial", "rope_theta": 2000.0})
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=3e-6, max_position_embeddings=512, initializer_range=0.2,
                rope_parameters={"rope_type": "default", "rope_theta": 50000.0, "mrope_section": [3, 2, 3]},
                bos_token_id=None, eos_token_id=ids["im_end"], pad_token_id=tok.pad_token_id)
    cfg = transformers.Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=ids["image"],
                                     video_token_id=ids["video"], vision_start_token_id=ids["vs"],
                                     vision_end_token_id=ids["ve"])
    model = transformers.Qwen2VLForConditionalGeneration(cfg).eval()
    perturb_(model)
    model.save_pretrained(folder)
    images = transformers.Qwen2VLImageProcessorPil(min_pixels=256, max_pixels=2560, patch_size=4, merge_size=2,
                                                   temporal_patch_size=2, resample=2, image_mean=[0.4, 0.5, 0.6],
                                                   image_std=[0.2, 0.3, 0.25])
    ImageOnlyQwen2VLProcessor(images, tok, chat_template=QWEN2_VL_TEMPLATE).save_pretrained(folder)
    path = folder / "processor_config.json"  # as a Hub folder says it
    path.write_text(json.dumps({**json.loads(path.read_text()), "processor_class": "Qwen2VLProcessor"}))
    return model, ImageOnlyQwen2VLProcessor.from_pretrained(folder)


# ------------------------------------------------------------------------------------------------ Idefics3, SmolVLM

IDEFICS3_SPECIAL = (["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
                    + [f"<row_{r}_col_{c}>" for r in range(1, 4) for c in range(1, 4)])  # grids up to 3x3 here
# Idefics3's template, with the tokenizer's BOS in front as the released one has <|begin_of_text|>
IDEFICS3_TEMPLATE = (
    "<s>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] == "
    "'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == "
    "'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def _idefics3_vision(cls, **kw):
    return cls(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32, **kw)


def build_idefics3(folder: Path):
    """Idefics3: SentencePiece tokenizer with BOS, 4x4 patch grid, pixel shuffle x2, grouped-query Llama; images
    split into tiles of 32 px (longest edge 80: grids up to 3x3) plus the global view."""
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=sentencepiece_tokenizer(IDEFICS3_SPECIAL),
                                               bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    torch.manual_seed(0)
    vision = _idefics3_vision(transformers.Idefics3VisionConfig, patch_size=8, layer_norm_eps=1e-5)
    text = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                                    rope_theta=50000.0, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)
    cfg = transformers.Idefics3Config(vision_config=vision.to_dict(), text_config=text.to_dict(), scale_factor=2,
                                      image_token_id=tok.convert_tokens_to_ids("<image>"))
    model = transformers.Idefics3ForConditionalGeneration(cfg).eval()
    perturb_(model)
    model.save_pretrained(folder)
    images = transformers.Idefics3ImageProcessorPil(size={"longest_edge": 80}, max_image_size={"longest_edge": 32},
                                                    image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25])
    transformers.Idefics3Processor(image_processor=images, tokenizer=tok, image_seq_len=4,
                                   chat_template=IDEFICS3_TEMPLATE).save_pretrained(folder)
    return model, transformers.AutoProcessor.from_pretrained(folder)


def build_idefics3_nosplit(folder: Path, idefics3):
    """The idefics3 folder (``idefics3``: its (folder, model, processor)) copied with do_image_splitting: false
    (every image one tile); the model returned is the idefics3 one."""
    source, model, _ = idefics3
    shutil.copytree(source, folder, dirs_exist_ok=True)
    path = folder / "processor_config.json"
    data = json.loads(path.read_text())
    data["image_processor"]["do_image_splitting"] = False
    path.write_text(json.dumps(data))
    return model, transformers.AutoProcessor.from_pretrained(folder)


def smolvlm_processor(image_processor, tokenizer):
    """transformers' SmolVLMProcessor without its video half. SmolVLMProcessor cannot be built here as transformers
    ships it: it requires a video processor (torchvision) and num2words, both only for videos; this is that class
    with those two checks stepped around, its image and text path (``__call__``) transformers' own."""
    from transformers.models.smolvlm import processing_smolvlm

    class ImagesOnly(transformers.SmolVLMProcessor):
        def check_argument_for_proper_class(self, name, arg):
            if name != "video_processor":
                return super().check_argument_for_proper_class(name, arg)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(processing_smolvlm, "num2words", processing_smolvlm.num2words or str)  # only videos use it
        return ImagesOnly(image_processor=image_processor, tokenizer=tokenizer, video_processor=None, image_seq_len=4)


def build_smolvlm(folder: Path):
    """SmolVLM: byte-level tokenizer without BOS, 8x8 patch grid, pixel shuffle x4, tied head, bicubic tiles; no
    chat template. The folder is written file by file as a SmolVLM Hub folder has it (the processor cannot be saved
    here, see :func:`smolvlm_processor`), and the processor returned is :func:`smolvlm_processor` on the image
    processor and tokenizer, not a read of the folder."""
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=byte_level_tokenizer(IDEFICS3_SPECIAL),
                                               eos_token="<end_of_utterance>", pad_token="<|endoftext|>")
    torch.manual_seed(1)
    vision = _idefics3_vision(transformers.SmolVLMVisionConfig, patch_size=4, hidden_act="gelu")
    text = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=1, head_dim=12, rms_norm_eps=1e-5,
                                    rope_theta=100000.0, max_position_embeddings=1024, bos_token_id=None,
                                    eos_token_id=tok.convert_tokens_to_ids("<end_of_utterance>"))
    cfg = transformers.SmolVLMConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), scale_factor=4,
                                     image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=True)
    model = transformers.SmolVLMForConditionalGeneration(cfg).eval()
    perturb_(model, seed=1)
    model.save_pretrained(folder)
    images = transformers.SmolVLMImageProcessorPil(size={"longest_edge": 80}, max_image_size={"longest_edge": 32},
                                                   resample=3)
    processor = smolvlm_processor(images, tok)
    images.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "processor_config.json").write_text(json.dumps({"image_seq_len": 4,
                                                               "processor_class": "SmolVLMProcessor"}))
    return model, processor


# ------------------------------------------------------------------------------------------------ PaliGemma


def build_paligemma(folder: Path):
    """PaliGemma: SigLIP tower, Gemma LM (prefix-LM attention), no chat template, as the released checkpoints."""
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=sentencepiece_tokenizer(["<image>"]),
                                               bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                               pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    images = transformers.SiglipImageProcessor(size={"height": 28, "width": 28}, image_mean=[0.4, 0.5, 0.6],
                                               image_std=[0.2, 0.3, 0.25], image_seq_length=16)
    # the processor adds PaliGemma's 1152 <locNNNN>/<segNNN> tokens to the tokenizer: the LM's vocabulary has them
    processor = transformers.PaliGemmaProcessor(image_processor=images, tokenizer=tok)
    processor.save_pretrained(folder)
    torch.manual_seed(0)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=28, patch_size=7, layer_norm_eps=1e-6)
    # initializer_range 0.2, not 0.02: with Gemma's sqrt(width)-scaled tied embeddings a 0.02 model only ever
    # repeats its last input token, and greedy tokens would agree without testing anything
    text = transformers.GemmaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                                    rope_theta=50000.0, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                                    pad_token_id=3, initializer_range=0.2)
    cfg = transformers.PaliGemmaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                       image_token_index=processor.image_token_id, projection_dim=48)
    model = transformers.PaliGemmaForConditionalGeneration(cfg).eval()
    perturb_(model)
    model.save_pretrained(folder)
    return model, transformers.AutoProcessor.from_pretrained(folder)


# ------------------------------------------------------------------------------------------------ Mllama

# Llama 3's chat layout (the released template's, without its tool and date preamble)
MLLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|image|>{% elif c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
MLLAMA_GATES = ("gate", "gate_attn", "gate_ffn", "cross_attn_attn_gate", "cross_attn_mlp_gate")


def build_mllama(folder: Path):
    """Llama 3.2 Vision with the released checkpoint's layout: the <|image|> token is the id right after the text
    vocabulary (the embedding has 8 rows more than the head), cross-attention layers among the decoder layers (two
    of them consecutive, one last), local and gated global vision layers with unsorted intermediate layers, tiles
    of 28 px (up to 4), every gate open."""
    special = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|image|>"]
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=sentencepiece_tokenizer(special), bos_token="<s>",
                                               eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    image_id = tok.convert_tokens_to_ids("<|image|>")
    assert image_id == len(tok) - 1  # as the released tokenizer: the first id past the text vocabulary
    images_proc = transformers.MllamaImageProcessorPil(size={"height": 28, "width": 28}, max_image_tiles=4,
                                                       image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25])
    transformers.MllamaProcessor(image_processor=images_proc, tokenizer=tok,
                                 chat_template=MLLAMA_TEMPLATE).save_pretrained(folder)
    torch.manual_seed(0)
    vision = transformers.MllamaVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                             num_global_layers=2, attention_heads=4, image_size=28, patch_size=7,
                                             max_num_tiles=4, intermediate_layers_indices=[3, 1], vision_output_dim=96,
                                             norm_eps=1e-6)
    # initializer_range 0.2: greedy tokens of a 0.02 model barely depend on the input
    text = transformers.MllamaTextConfig(vocab_size=image_id, hidden_size=48, intermediate_size=80, num_hidden_layers=5,
                                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                         cross_attention_layers=[1, 2, 4], max_position_embeddings=256,
                                         rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
                                         bos_token_id=1, eos_token_id=2, pad_token_id=3, initializer_range=0.2)
    cfg = transformers.MllamaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                    image_token_index=image_id)
    model = transformers.MllamaForConditionalGeneration(cfg).eval()
    perturb_(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every gate open (they start at or near zero, which would hide their branches)
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] in MLLAMA_GATES:
                p.copy_(0.4 + 0.6 * torch.rand(p.shape, generator=g))
    model.save_pretrained(folder)
    return model, transformers.AutoProcessor.from_pretrained(folder)


# ------------------------------------------------------------------------------------------------ IDEFICS (Flamingo)

IDEFICS_SIZE = 30


def build_idefics(folder: Path):
    """IDEFICS (vlmkit's flamingo family): perceiver resampler, gated cross-attention every 2 layers with qk norms
    and vector gates (opened: they start at zero, and images would change nothing), decoupled embeddings (the added
    tokens are the extra rows)."""
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=sentencepiece_tokenizer(["<fake_token_around_image>", "<image>"]), bos_token="<s>",
        eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    images = transformers.IdeficsImageProcessorPil(image_size=IDEFICS_SIZE, image_mean=[0.4, 0.5, 0.6],
                                                   image_std=[0.2, 0.3, 0.25])
    transformers.IdeficsProcessor(image_processor=images, tokenizer=tok).save_pretrained(folder)
    torch.manual_seed(0)
    base = tok.convert_tokens_to_ids("<fake_token_around_image>")  # the added tokens are the decoupled rows
    cfg = transformers.IdeficsConfig(
        vocab_size=base, additional_vocab_size=len(tok) - base, hidden_size=48, intermediate_size=80,
        num_hidden_layers=4, num_attention_heads=4, rms_norm_eps=1e-5, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, cross_layer_interval=2,
        qk_layer_norms=True, alpha_type="vector", use_resampler=True, initializer_range=0.1,
        perceiver_config={"use_resampler": True, "resampler_n_latents": 3, "resampler_depth": 2,
                          "resampler_n_heads": 2, "resampler_head_dim": 8, "qk_layer_norms_perceiver": True},
        vision_config={"embed_dim": 32, "image_size": IDEFICS_SIZE, "patch_size": 6, "intermediate_size": 48,
                       "num_hidden_layers": 2, "num_attention_heads": 4, "layer_norm_eps": 1e-6},
        bos_token_id=1, eos_token_id=2, pad_token_id=3, freeze_text_layers=False, freeze_vision_layers=False)
    model = transformers.IdeficsForVisionText2Text(cfg).eval()
    perturb_(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # open the gates (zero at init: images would change nothing) and move the MLP norms
        for name, p in model.named_parameters():
            if "alpha" in name or ".ln." in name:
                p.copy_(1.0 * (".ln.weight" in name) + 0.5 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)
    return model, transformers.AutoProcessor.from_pretrained(folder)


# ------------------------------------------------------------------------------------------------ BLIP-2, InstructBLIP


def opt_tokenizer():
    """OPT's tokenizer, tiny: GPT-2 byte-level BPE with "</s>" (BOS and EOS) put in front of every text."""
    tok = byte_level_tokenizer(["<pad>", "</s>", "<unk>"])
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="<pad>")


def wake_(model: torch.nn.Module, seed: int = 1) -> None:
    """What transformers initialises at zero or 1e-10 (the query tokens, the tower's positions and class token)
    gets a spread: identical queries or a blind tower would hide a misplaced tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("query_tokens", "position_embedding", "embed_positions.weight")):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


def build_blip2(folder: Path):
    """BLIP-2 with an OPT LM (LayerNorms, ReLU MLP, biases, learned positions offset by 2), 6 query tokens, a
    3-layer Q-Former cross-attending every 2nd layer."""
    images = transformers.BlipImageProcessorPil(size={"height": 28, "width": 28}, image_mean=[0.4, 0.5, 0.6],
                                                image_std=[0.2, 0.3, 0.25])
    processor = transformers.Blip2Processor(image_processor=images, tokenizer=opt_tokenizer(), num_query_tokens=6)
    processor.save_pretrained(folder)  # the processor adds "<image>" to the tokenizer: the LM's vocabulary has it
    tok = processor.tokenizer
    torch.manual_seed(0)
    vision = transformers.Blip2VisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, image_size=28, patch_size=7, layer_norm_eps=1e-5,
                                            initializer_range=0.3)
    qformer = transformers.Blip2QFormerConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                              intermediate_size=40, cross_attention_frequency=2, layer_norm_eps=1e-6,
                                              initializer_range=0.2)
    text = transformers.OPTConfig(vocab_size=len(tok), hidden_size=48, ffn_dim=80, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=96, init_std=0.3, pad_token_id=1,
                                  bos_token_id=2, eos_token_id=2)
    cfg = transformers.Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                                   text_config=text.to_dict(), num_query_tokens=6,
                                   image_token_index=tok.convert_tokens_to_ids("<image>"),
                                   initializer_range=0.2)  # 0.02 (and the tower's 1e-10): the image barely matters
    model = transformers.Blip2ForConditionalGeneration(cfg).eval()
    perturb_(model)
    wake_(model)
    model.save_pretrained(folder)
    return model, transformers.AutoProcessor.from_pretrained(folder)


def bert_tokenizer():
    """A tiny BERT WordPiece tokenizer (lower-casing, [CLS] ... [SEP]): the Q-Former's, as bert-base-uncased."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS * 10, trainers.WordPieceTrainer(
        vocab_size=150, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return transformers.BertTokenizer(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                      sep_token="[SEP]", mask_token="[MASK]")


def build_instructblip(folder: Path):
    """InstructBLIP with a Llama (Vicuna) LM, 5 query tokens, and the Q-Former's own BERT WordPiece tokenizer in
    qformer_tokenizer/ beside the LM's."""
    lm_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=sentencepiece_tokenizer([]), bos_token="<s>",
                                                  eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    images = transformers.BlipImageProcessorPil(size={"height": 28, "width": 28}, image_mean=[0.4, 0.5, 0.6],
                                                image_std=[0.2, 0.3, 0.25])
    processor = transformers.InstructBlipProcessor(image_processor=images, tokenizer=lm_tok,
                                                   qformer_tokenizer=bert_tokenizer(), num_query_tokens=5)
    processor.save_pretrained(folder)  # with qformer_tokenizer/ beside the LM's tokenizer
    tok = processor.tokenizer
    torch.manual_seed(0)
    vision = transformers.InstructBlipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                   num_attention_heads=4, image_size=28, patch_size=7,
                                                   initializer_range=0.3)
    qformer = transformers.InstructBlipQFormerConfig(vocab_size=len(processor.qformer_tokenizer), hidden_size=32,
                                                     num_hidden_layers=3, num_attention_heads=4, intermediate_size=40,
                                                     cross_attention_frequency=2, max_position_embeddings=64,
                                                     initializer_range=0.2)
    text = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                                    rope_theta=50000.0, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                                    pad_token_id=3, initializer_range=0.2)
    cfg = transformers.InstructBlipConfig(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                                          text_config=text.to_dict(), num_query_tokens=5, initializer_range=0.2,
                                          image_token_index=tok.convert_tokens_to_ids("<image>"))
    model = transformers.InstructBlipForConditionalGeneration(cfg).eval()
    perturb_(model)
    wake_(model)
    model.save_pretrained(folder)
    return model, transformers.AutoProcessor.from_pretrained(folder)


# ------------------------------------------------------------------------------------------------ CLIP

CLIP_CONTEXT = 20  # text_config.max_position_embeddings: the tests' last text is longer and is cut
CLIP_TOWERS = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)


def clip_tokenizer():
    """CLIPTokenizer with a small vocabulary of CLIP's layout (byte symbols, the same with the end-of-word "</w>",
    merges learnt with CLIP's pre-tokenisation) and its start/end-of-text tokens at ids 0 and 1, so that the
    highest id of a text is not its end-of-text token and the two pooling rules read different positions."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    learner = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    learner.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
    learner.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    alphabet = list(bytes_to_unicode().values())
    learner.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet,
                                                                 end_of_word_suffix="</w>", show_progress=False))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
              for m in json.loads(learner.to_str())["model"]["merges"]]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [*alphabet, *(c + "</w>" for c in alphabet), *(a + b for a, b in merges)]:
        vocab.setdefault(token, len(vocab))
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_CONTEXT)


def _clip(folder: Path, legacy: bool):
    """A tiny CLIPModel (norms, biases, class embedding and temperature away from their init) saved with
    CLIPProcessor's files; ``legacy``: text_config.eos_token_id 2, which makes transformers pool argmax(ids)."""
    tok = clip_tokenizer()
    torch.manual_seed(0)
    text = transformers.CLIPTextConfig(**CLIP_TOWERS, vocab_size=len(tok), max_position_embeddings=CLIP_CONTEXT,
                                       layer_norm_eps=1e-6, bos_token_id=tok.bos_token_id,
                                       pad_token_id=tok.pad_token_id, eos_token_id=2 if legacy else tok.eos_token_id)
    vision = transformers.CLIPVisionConfig(**CLIP_TOWERS, image_size=32, patch_size=8, hidden_act="gelu")
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                                           projection_dim=24)).eval()
    perturb_(model)
    with torch.no_grad():
        model.logit_scale.fill_(1.7)
    model.save_pretrained(folder)
    images = transformers.CLIPImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                                             image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25])
    transformers.CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(folder)
    return model, transformers.AutoProcessor.from_pretrained(folder)


def build_clip_eos(folder: Path):
    """CLIP as current checkpoints: the text is pooled at its first end-of-text token."""
    return _clip(folder, legacy=False)


def build_clip_legacy(folder: Path):
    """CLIP with a legacy config (text_config.eos_token_id 2): transformers pools the text at its highest id."""
    return _clip(folder, legacy=True)


# ------------------------------------------------------------------------------------------------ SigLIP

SIGLIP_CONTEXT = 24  # text_config.max_position_embeddings: SigLIP pads every text to it; the tests' last text is cut
SIGLIP_EXTRA = ["a photo of a cat", "a photo of two dogs", "a red circle and a blue square", "three green triangles",
                "the cafe is naive", "what is this", "it is a small star"]


def train_sentencepiece(path: Path) -> None:
    """A unigram SentencePiece model laid out as SigLIP's (T5's): <pad> 0, </s> 1, <unk> 2, no BOS, NFKC."""
    spm = pytest.importorskip("sentencepiece", reason="SiglipTokenizer and its conversion need sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter((CORPUS + SIGLIP_EXTRA) * 20), model_writer=buf,
                                   vocab_size=80, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   minloglevel=2)
    path.write_bytes(buf.getvalue())


def build_siglip(folder: Path):
    """A tiny SiglipModel (text narrower than its projection, norms, biases, probe, scale and bias away from their
    init) saved with SiglipProcessor's files: spiece.model and no tokenizer.json, as google/siglip-*, and a
    tokenizer that returns no attention mask (SiglipModel then attends over the padding, as vlmkit does)."""
    pytest.importorskip("google.protobuf", reason="reading a SentencePiece model needs protobuf")
    train_sentencepiece(folder / "source.model")
    tok = transformers.SiglipTokenizer(vocab_file=str(folder / "source.model"), model_max_length=SIGLIP_CONTEXT,
                                       model_input_names=["input_ids"])
    torch.manual_seed(0)
    text = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, vocab_size=len(tok),
                max_position_embeddings=SIGLIP_CONTEXT, layer_norm_eps=1e-5, projection_size=32)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    model = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision)).eval()
    perturb_(model)
    with torch.no_grad():
        model.logit_scale.fill_(1.3)
        model.logit_bias.fill_(-2.1)
        model.vision_model.head.probe.normal_()
    model.save_pretrained(folder)
    images = transformers.SiglipImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6],
                                               image_std=[0.2, 0.3, 0.25])
    transformers.SiglipProcessor(image_processor=images, tokenizer=tok).save_pretrained(folder)
    (folder / "source.model").unlink()
    return model, transformers.AutoProcessor.from_pretrained(folder)


# ------------------------------------------------------------------------------------------------ Fuyu


def fuyu_tokenizer() -> Tokenizer:
    """Fuyu's tokenizer, tiny: a unigram model behind the SentencePiece normaliser (a "▁" put in front of the text,
    spaces made "▁", no pre-tokeniser), whose vocabulary holds FuyuProcessor's |SPEAKER|, |NEWLINE|, <s> and <0x04>
    as ordinary pieces (so that "▁" comes before the image tokens, the token FuyuProcessor drops), and the
    post-processor adds |ENDOFTEXT| in front (adept/fuyu-8b: LlamaTokenizer with bos = eos = |ENDOFTEXT|)."""
    from tokenizers import AddedToken

    norm = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    probe = Tokenizer(models.Unigram())
    probe.normalizer = norm
    probe.train_from_iterator(CORPUS * 10, trainers.UnigramTrainer(vocab_size=150, special_tokens=["<unk>"],
                                                                    unk_token="<unk>", show_progress=False))
    learned = [(p, s) for p, s in json.loads(probe.to_str())["model"]["vocab"] if p != "<unk>"]
    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("|ENDOFTEXT|", 0.0)] + learned + [(p, 0.0) for p in
                                                                             ("|SPEAKER|", "|NEWLINE|", "<0x04>")]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=False))
    tok.normalizer = norm
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "|ENDOFTEXT|")])
    tok.post_processor = processors.TemplateProcessing(single="|ENDOFTEXT| $A", pair="|ENDOFTEXT| $A |ENDOFTEXT| $B",
                                                       special_tokens=[("|ENDOFTEXT|", 2)])
    return tok


def fuyu_patchify_fix(processor):
    """``processor`` with transformers 5.25's FuyuImageProcessorPil.patchify_image made to take and give the torch
    tensors FuyuProcessor hands it (it indexes them as numpy arrays and fails; the torchvision image processor, which
    takes tensors, needs torchvision, absent here). The numbers are its own."""
    import numpy as np

    images = processor.image_processor
    patchify = type(images).patchify_image

    def fixed(image, patch_size=None):
        array = image.numpy() if torch.is_tensor(image) else image
        return torch.from_numpy(np.ascontiguousarray(patchify(images, array, patch_size)))

    images.patchify_image = fixed
    return processor


def build_fuyu(folder: Path):
    """Fuyu: Persimmon LM (partial rotary 0.5, qk LayerNorms, theta 25000), 6-px patches, a 36x48 target (every test
    image gets its own grid of patches), normalisation per channel; the processor is FuyuProcessor's, patched to run
    (:func:`fuyu_patchify_fix`)."""
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=fuyu_tokenizer(), bos_token="|ENDOFTEXT|",
                                               eos_token="|ENDOFTEXT|", unk_token="<unk>")
    torch.manual_seed(0)
    text = transformers.PersimmonConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=512, qk_layernorm=True,
                                        rope_parameters={"rope_type": "default", "rope_theta": 25000.0,
                                                         "partial_rotary_factor": 0.5},
                                        bos_token_id=2, eos_token_id=2, initializer_range=0.1)
    cfg = transformers.FuyuConfig(text_config=text.to_dict(), patch_size=6, num_channels=3,
                                  image_token_id=tok.convert_tokens_to_ids("|SPEAKER|"))
    model = transformers.FuyuForCausalLM(cfg).eval()
    perturb_(model)
    model.save_pretrained(folder)
    images = transformers.FuyuImageProcessor(size={"height": 36, "width": 48}, patch_size={"height": 6, "width": 6},
                                              image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25])
    transformers.FuyuProcessor(image_processor=images, tokenizer=tok).save_pretrained(folder)
    return model, fuyu_patchify_fix(transformers.AutoProcessor.from_pretrained(folder))


# ------------------------------------------------------------------------------------------------ Qwen2.5-VL


class ImageOnlyQwen25VLProcessor(transformers.Qwen2_5_VLProcessor):
    """transformers' Qwen2_5_VLProcessor without its video processor (as :class:`ImageOnlyQwen2VLProcessor`)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def build_qwen2_5_vl(folder: Path):
    """Qwen2.5-VL: Qwen2-VL's tokenizer, template and image settings (4 px patches merged 2x2, min/max pixels that
    scale small images up and large ones down); a tower of depth 4 whose blocks 1 and 3 attend over the whole image
    and 0 and 2 within 16-px windows (2x2 merge units: the test images get 2x2 to 3x4 windows, edge ones cut
    short), SwiGLU MLP, tied embeddings as Qwen2.5-VL-3B. The processor returned is
    :class:`ImageOnlyQwen25VLProcessor` read from the folder, whose processor_config.json names Qwen2_5_VLProcessor
    as a Hub folder does."""
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=byte_level_tokenizer(QWEN2_VL_SPECIAL),
                                               eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = dict(zip(("im_start", "im_end", "vs", "ve", "image", "video"), tok.convert_tokens_to_ids(QWEN2_VL_SPECIAL)))
    torch.manual_seed(0)
    vision = {"depth": 4, "hidden_size": 32, "num_heads": 2, "intermediate_size": 48, "hidden_act": "silu",
              "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 16,
              "fullatt_block_indexes": [1, 3], "out_hidden_size": 64, "tokens_per_second": 2, "initializer_range": 0.2,
              "rope_parameters": {"rope_type": "axial", "rope_theta": 2000.0}}
    text = {"vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 80, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 3e-6, "max_position_embeddings": 512,
            "initializer_range": 0.2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0, "mrope_section": [3, 2, 3]},
            "bos_token_id": None, "eos_token_id": ids["im_end"], "pad_token_id": tok.pad_token_id}
    cfg = transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=ids["image"],
                                        video_token_id=ids["video"], vision_start_token_id=ids["vs"],
                                        vision_end_token_id=ids["ve"], tie_word_embeddings=True)
    model = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    perturb_(model)
    model.save_pretrained(folder)
    images = transformers.Qwen2VLImageProcessorPil(min_pixels=256, max_pixels=2560, patch_size=4, merge_size=2,
                                                   temporal_patch_size=2, resample=2, image_mean=[0.4, 0.5, 0.6],
                                                   image_std=[0.2, 0.3, 0.25])
    ImageOnlyQwen25VLProcessor(images, tok, chat_template=QWEN2_VL_TEMPLATE).save_pretrained(folder)
    path = folder / "processor_config.json"  # as a Hub folder says it
    path.write_text(json.dumps({**json.loads(path.read_text()), "processor_class": "Qwen2_5_VLProcessor"}))
    return model, ImageOnlyQwen25VLProcessor.from_pretrained(folder)
# ------------------------------------------------------------------------------------------------ Idefics2

IDEFICS2_SPECIAL = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
# Idefics2's released chat template (the tokenizer adds BOS)
IDEFICS2_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}{% if message['content'][0]['type'] == 'image' %}"
    "{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
    "{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def build_idefics2(folder: Path, split: bool = True):
    """Idefics2: SentencePiece tokenizer with BOS, an 8x8 position table of 7-px patches (images resized to edges
    between 28 and 56 px: grids of several shapes, off the patch grid), a perceiver of 4 latents with grouped
    heads, a Mistral LM with grouped-query attention; images split into four quarters plus the whole."""
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=sentencepiece_tokenizer(IDEFICS2_SPECIAL),
                                               bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    torch.manual_seed(0)
    vision = transformers.Idefics2VisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                               num_attention_heads=4, image_size=56, patch_size=7, layer_norm_eps=1e-5)
    text = transformers.MistralConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                                      rope_theta=50000.0, max_position_embeddings=1024, sliding_window=4096,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    perceiver = transformers.Idefics2PerceiverConfig(hidden_size=48, rms_norm_eps=1e-5, resampler_n_latents=4,
                                                     resampler_depth=2, resampler_n_heads=4, resampler_head_dim=8,
                                                     num_key_value_heads=2)
    cfg = transformers.Idefics2Config(vision_config=vision.to_dict(), perceiver_config=perceiver.to_dict(),
                                      text_config=text.to_dict(), image_token_id=tok.convert_tokens_to_ids("<image>"))
    model = transformers.Idefics2ForConditionalGeneration(cfg).eval()
    perturb_(model)
    model.save_pretrained(folder)
    images = transformers.Idefics2ImageProcessorPil(size={"shortest_edge": 28, "longest_edge": 56},
                                                    do_image_splitting=split, image_mean=[0.4, 0.5, 0.6],
                                                    image_std=[0.2, 0.3, 0.25])
    transformers.Idefics2Processor(image_processor=images, tokenizer=tok, image_seq_len=4,
                                   chat_template=IDEFICS2_TEMPLATE).save_pretrained(folder)
    return model, transformers.AutoProcessor.from_pretrained(folder)


def build_idefics2_nosplit(folder: Path, idefics2):
    """The idefics2 folder (``idefics2``: its (folder, model, processor)) copied with do_image_splitting: false."""
    source, model, _ = idefics2
    shutil.copytree(source, folder, dirs_exist_ok=True)
    path = folder / "processor_config.json"
    data = json.loads(path.read_text())
    data["image_processor"]["do_image_splitting"] = False
    path.write_text(json.dumps(data))
    return model, transformers.AutoProcessor.from_pretrained(folder)
# ------------------------------------------------------------------------------------------------ InternVL

INTERNVL_SPECIAL = ["<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
# InternVL3-hf's chat template (transformers' conversion script's, with the image placeholder its processor reads)
INTERNVL_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' "
    "%}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}")
INTERNVL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                   "video_token": "<video>"}


class ImageOnlyInternVLProcessor(transformers.InternVLProcessor):
    """transformers' InternVLProcessor without its video processor, which needs torchvision (absent here), so that
    ``AutoProcessor.from_pretrained`` cannot build it; ``from_pretrained`` reads the image processor (the PIL
    backend) and the tokenizer from the folder as AutoProcessor would, and text and image processing are
    InternVLProcessor's own."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None,
                 **kwargs):
        kwargs.pop("video_processor", None)
        super().__init__(image_processor, tokenizer, None, image_seq_length, chat_template, **kwargs)

    def check_argument_for_proper_class(self, name, arg):
        if name != "video_processor":
            return super().check_argument_for_proper_class(name, arg)


def internvl_tokenizer(llama: bool = False):
    """A Qwen2-style tokenizer (byte-level, no BOS) naming InternVL's image tokens as the Hub's does; ``llama``:
    a SentencePiece-style one whose post-processor adds ``<s>`` (InternVL 2.5's Llama-converted InternLM2 LMs)."""
    if llama:
        return transformers.PreTrainedTokenizerFast(tokenizer_object=sentencepiece_tokenizer(INTERNVL_SPECIAL),
                                                    bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>",
                                                    pad_token="</s>", extra_special_tokens=INTERNVL_TOKENS)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=byte_level_tokenizer(INTERNVL_SPECIAL),
                                                eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                                extra_special_tokens=INTERNVL_TOKENS)


def wake_internvl_(model: torch.nn.Module, seed: int = 0) -> None:
    """perturb_, and the InternViT parameters it leaves at their init: layer scales (0.1), class token and
    positions (0)."""
    perturb_(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lambda_" in name:
                p.copy_(0.5 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(("cls_token", "position_embeddings")):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def build_internvl(folder: Path, vision: dict | None = None, llama: bool = False, **top):
    """InternVL (2.5 / 3): InternViT (layer scale, class token, 4x4 patch grid of 32-px tiles), pixel shuffle 0.5,
    LayerNorm + MLP projector, grouped-query Qwen2 LM with a tied head; GotOcr2 tiling up to 6 tiles and a
    thumbnail (PIL backend). ``vision`` / ``top``: vision_config / InternVLConfig overrides (variants); ``llama``:
    a Llama LM with an untied head and a BOS-adding tokenizer instead (InternVL2.5-2B/8B's kind)."""
    tok = internvl_tokenizer(llama)
    torch.manual_seed(0)
    vcfg = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "image_size": 32, "patch_size": 8, "layer_norm_eps": 1e-5, "attention_bias": True,
            "initializer_range": 0.1, **(vision or {})}
    text = {"model_type": "qwen2", "vocab_size": len(tok), "hidden_size": 48, "intermediate_size": 80,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 3e-6,
            "max_position_embeddings": 1024, "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0},
            "initializer_range": 0.1, "bos_token_id": None, "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
            "tie_word_embeddings": True}
    if llama:
        text |= {"model_type": "llama", "head_dim": 12, "bos_token_id": tok.bos_token_id, "tie_word_embeddings": False}
        top.setdefault("tie_word_embeddings", False)
    cfg = transformers.InternVLConfig(vision_config=vcfg, text_config=text, image_seq_length=4,
                                      image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), **top)
    model = transformers.InternVLForConditionalGeneration(cfg).eval()
    wake_internvl_(model)
    model.save_pretrained(folder)
    images = transformers.GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True,
                                                   max_patches=6, image_mean=[0.485, 0.456, 0.406],
                                                   image_std=[0.229, 0.224, 0.225])
    ImageOnlyInternVLProcessor(images, tok, chat_template=INTERNVL_TEMPLATE, image_seq_length=4).save_pretrained(folder)
    path = folder / "processor_config.json"  # as a Hub folder says it
    path.write_text(json.dumps({**json.loads(path.read_text()), "processor_class": "InternVLProcessor"}))
    return model, ImageOnlyInternVLProcessor.from_pretrained(folder)

# ------------------------------------------------------------------------------------------------ Mistral 3 / Pixtral

MISTRAL3_SPECIAL = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
# Mistral Small 3.1's template in short: BOS, [INST]...[/INST] around each user turn with [IMG] at each image,
# replies followed by EOS
MISTRAL3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST]' }}{% for content in "
    "message['content'] %}{% if content['type'] == 'image' %}{{ '[IMG]' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{{ '[/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'][0]['text'] + eos_token }}{% endif %}{% endfor %}")


def pixtral_processor_class():
    """transformers' PixtralProcessor. ``transformers.PixtralProcessor`` is a stand-in that needs torchvision (absent
    here): the module imports the torchvision image processor only for ``get_resize_output_image_size``, which the
    PIL image processor's module defines the same; with that module standing in, the class is transformers' own."""
    import sys
    import types

    from transformers.models.pixtral import image_processing_pil_pixtral as pil

    name = "transformers.models.pixtral.image_processing_pixtral"
    if name not in sys.modules:
        try:
            import torchvision  # noqa: F401
        except ImportError:
            stub = types.ModuleType(name)
            stub.get_resize_output_image_size = pil.get_resize_output_image_size
            sys.modules[name] = stub
    from transformers.models.pixtral.processing_pixtral import PixtralProcessor

    return PixtralProcessor


def mistral3_tokenizer():
    """(tokenizer, special token ids) of the Mistral 3 / Pixtral folders: byte-level, its post-processor adding <s>
    (Tekken's)."""
    from tokenizers import processors as tok_processors

    raw = byte_level_tokenizer(MISTRAL3_SPECIAL)
    raw.post_processor = tok_processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", raw.token_to_id("<s>"))])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                               unk_token="<unk>")
    return tok, dict(zip(MISTRAL3_SPECIAL, tok.convert_tokens_to_ids(MISTRAL3_SPECIAL)))


def mistral3_text_config(tok, ids: dict):
    """The Mistral LM of the Mistral 3 / Pixtral folders: grouped-query attention, head_dim 16 != width / heads."""
    return transformers.MistralConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=3e-6,
                                      rope_theta=50000.0, max_position_embeddings=1024, sliding_window=None,
                                      bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], initializer_range=0.2)


def build_mistral3(folder: Path):
    """Mistral 3: a Pixtral tower (4-px patches, SiLU SwiGLU, rope theta 2000) whose features are merged 2x2, a
    Mistral LM with grouped-query attention and head_dim 16 != width / heads, an untied head; a byte-level tokenizer
    whose post-processor adds <s> (Tekken's); images fitted to a 40-px longest edge in 8-px units, so every test
    image gets its own grid. The processor returned is PixtralProcessor read from the folder
    (:func:`pixtral_processor_class`)."""
    tok, ids = mistral3_tokenizer()
    torch.manual_seed(0)
    vision = transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                              num_attention_heads=2, patch_size=4, image_size=40, hidden_act="silu",
                                              rope_parameters={"rope_type": "axial", "rope_theta": 2000.0},
                                              initializer_range=0.2)
    text = mistral3_text_config(tok, ids)
    cfg = transformers.Mistral3Config(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                      image_token_index=ids["[IMG]"], spatial_merge_size=2,
                                      projector_hidden_act="gelu", tie_word_embeddings=False)
    model = transformers.Mistral3ForConditionalGeneration(cfg).eval()
    perturb_(model)
    model.save_pretrained(folder)
    images = transformers.PixtralImageProcessorPil(size={"longest_edge": 40}, patch_size={"height": 4, "width": 4},
                                                   image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25])
    processor = pixtral_processor_class()
    processor(image_processor=images, tokenizer=tok, patch_size=4, spatial_merge_size=2,
              chat_template=MISTRAL3_TEMPLATE).save_pretrained(folder)
    return model, processor.from_pretrained(folder)



def build_pixtral_llava(folder: Path):
    """Pixtral-12B's Hub format: LlavaForConditionalGeneration with a Pixtral tower (6-px patches, GELU SwiGLU, read
    at layer -1 with strategy "full"), LLaVA's projector with biases, no patch merger (PixtralProcessor's
    spatial_merge_size 1), a Mistral LM with head_dim != width / heads; the tokenizer and template of
    :func:`build_mistral3`, images fitted to a 30-px longest edge."""
    tok, ids = mistral3_tokenizer()
    torch.manual_seed(1)
    vision = transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                              num_attention_heads=4, patch_size=6, image_size=30, hidden_act="gelu",
                                              rope_parameters={"rope_type": "axial", "rope_theta": 5000.0},
                                              initializer_range=0.2)
    text = mistral3_text_config(tok, ids)
    cfg = transformers.LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                   image_token_index=ids["[IMG]"], vision_feature_layer=-1,
                                   vision_feature_select_strategy="full", projector_hidden_act="gelu",
                                   image_seq_length=1, tie_word_embeddings=False)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    perturb_(model)
    model.save_pretrained(folder)
    images = transformers.PixtralImageProcessorPil(size={"longest_edge": 30}, patch_size={"height": 6, "width": 6},
                                                   image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25])
    processor = pixtral_processor_class()
    processor(image_processor=images, tokenizer=tok, patch_size=6, chat_template=MISTRAL3_TEMPLATE).save_pretrained(folder)
    return model, processor.from_pretrained(folder)

# ------------------------------------------------------------------------------------------------ Gemma 3

GEMMA3_SPECIAL = ["<start_of_image>", "<end_of_image>", "<image_soft_token>", "<start_of_turn>", "<end_of_turn>"]
# google/gemma-3-*-it's chat template
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}{%- elif item['type'] == 'text' -%}"
    "{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}{%- else -%}"
    "{{ raise_exception(\"Invalid content type\") }}{%- endif -%}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}")
GEMMA3_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}


def gemma_text_kwargs(**extra) -> dict:
    """A tiny Gemma 2 / 3 text decoder: grouped-query attention, a 5-token sliding window (prompts are longer),
    query_pre_attn_scalar not head_dim, a large initializer (a 0.02 Gemma only repeats its last token)."""
    return dict(hidden_size=48, intermediate_size=80, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=256, sliding_window=5,
                query_pre_attn_scalar=24, bos_token_id=1, eos_token_id=2, pad_token_id=3, initializer_range=0.2,
                **extra)


GEMMA3_TEXT_ROPE = {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
GEMMA3_LAYERS = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]


def build_gemma3(folder: Path):
    """Gemma 3: SigLIP tower on 30-px images (a 6x6 grid pooled to 3x3 = 9 tokens per image, more than the 5-token
    sliding window), Gemma 3 LM with linear rope scaling on its full layer, BOS-adding tokenizer naming boi / eoi /
    image tokens, the released chat template."""
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=sentencepiece_tokenizer(GEMMA3_SPECIAL),
                                               bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                               pad_token="<pad>", extra_special_tokens=GEMMA3_TOKENS)
    images = transformers.Gemma3ImageProcessorPil(size={"height": 30, "width": 30}, image_mean=[0.4, 0.5, 0.6],
                                                  image_std=[0.2, 0.3, 0.25])
    transformers.Gemma3Processor(image_processor=images, tokenizer=tok, chat_template=GEMMA3_TEMPLATE,
                                 image_seq_length=9).save_pretrained(folder)
    torch.manual_seed(0)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=30, patch_size=5, layer_norm_eps=1e-6,
                                             vision_use_head=False)
    text = transformers.Gemma3TextConfig(vocab_size=len(tok), rope_parameters=GEMMA3_TEXT_ROPE,
                                         layer_types=GEMMA3_LAYERS, **gemma_text_kwargs())
    ids = tok.convert_tokens_to_ids(GEMMA3_SPECIAL[:3])
    cfg = transformers.Gemma3Config(vision_config=vision.to_dict(), text_config=text.to_dict(), mm_tokens_per_image=9,
                                    boi_token_index=ids[0], eoi_token_index=ids[1], image_token_index=ids[2])
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    perturb_(model)
    with torch.no_grad():  # transformers initialises the projection at zero: the images would not count
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.3)
    model.save_pretrained(folder)
    return model, transformers.AutoProcessor.from_pretrained(folder)


# ------------------------------------------------------------------------------------------------ text-only LMs

# chat templates of the released instruct models' kinds (their layouts, without tool and date preambles); contents
# are strings, as a tokenizer's apply_chat_template passes them
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] "
    "+ ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else "
    "message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
PHI3_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
TEXT_SHAPE = {"hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 256, "initializer_range": 0.1}


def _llama_tokenizer(special: list[str], template: str):
    """A SentencePiece-style tokenizer whose post-processor adds <s> (Llama, Mistral, Gemma, Phi-3's kind)."""
    return transformers.PreTrainedTokenizerFast(tokenizer_object=sentencepiece_tokenizer(special), bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                                chat_template=template)


def _byte_tokenizer(special: list[str], template: str):
    """A byte-level BPE without BOS (Qwen2's, and Phi-1.5 / 2's CodeGen kind); <|endoftext|> ends and pads."""
    return transformers.PreTrainedTokenizerFast(tokenizer_object=byte_level_tokenizer(special),
                                                eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                                chat_template=template)


def _text_folder(folder: Path, cls, cfg, tok):
    """Save a random ``cls`` model of ``cfg`` (norms and biases perturbed) and its tokenizer; (model, the tokenizer
    as AutoTokenizer reads it back)."""
    torch.manual_seed(0)
    model = cls(cfg).eval()
    perturb_(model)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, transformers.AutoTokenizer.from_pretrained(folder)


def build_llama(folder: Path):
    """Llama 3 style: grouped-query attention, Llama 3's RoPE scaling, its header chat template (BOS written by the
    template, and added by the tokenizer to raw prompts)."""
    tok = _llama_tokenizer(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], LLAMA3_TEMPLATE)
    rope = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    cfg = transformers.LlamaConfig(vocab_size=len(tok), head_dim=16, rms_norm_eps=1e-5, rope_parameters=rope,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=3, **TEXT_SHAPE)
    return _text_folder(folder, transformers.LlamaForCausalLM, cfg, tok)


def build_mistral(folder: Path):
    """Mistral: a sliding window longer than the context, [INST] template."""
    tok = _llama_tokenizer([], MISTRAL_TEMPLATE)
    cfg = transformers.MistralConfig(vocab_size=len(tok), head_dim=16, rms_norm_eps=1e-6, rope_theta=1e6,
                                     sliding_window=512, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                                     **TEXT_SHAPE)
    return _text_folder(folder, transformers.MistralForCausalLM, cfg, tok)


def build_qwen2(folder: Path):
    """Qwen2 / 2.5: q, k, v biases, tied embeddings (as the small ones), byte-level BPE without BOS, ChatML."""
    tok = _byte_tokenizer(["<|im_start|>", "<|im_end|>"], CHATML_TEMPLATE)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = transformers.Qwen2Config(vocab_size=len(tok), rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
                                   use_sliding_window=False, bos_token_id=None, eos_token_id=eos, pad_token_id=eos,
                                   **TEXT_SHAPE)
    return _text_folder(folder, transformers.Qwen2ForCausalLM, cfg, tok)


def build_gemma(folder: Path):
    """Gemma 1: 1 + weight norms, embeddings scaled by sqrt(width), GELU-gated MLP, tied, turn template."""
    tok = _llama_tokenizer(["<start_of_turn>", "<end_of_turn>"], GEMMA_TEMPLATE)
    cfg = transformers.GemmaConfig(vocab_size=len(tok), head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
                                   hidden_activation="gelu_pytorch_tanh", bos_token_id=1, eos_token_id=2,
                                   pad_token_id=3, **TEXT_SHAPE)
    return _text_folder(folder, transformers.GemmaForCausalLM, cfg, tok)


def build_phi(folder: Path):
    """Phi-1.5 / Phi-2: parallel attention + MLP block, partial rotary (0.4, Phi-2's), biases and a biased head,
    gelu_new; here with grouped-query heads and qk_layernorm on too (Phi's options), a byte-level tokenizer."""
    tok = _byte_tokenizer(["<|user|>", "<|assistant|>", "<|end|>"], PHI3_TEMPLATE)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = transformers.PhiConfig(vocab_size=len(tok), hidden_act="gelu_new", layer_norm_eps=1e-5, qk_layernorm=True,
                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "partial_rotary_factor": 0.4},
                                 bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, **TEXT_SHAPE)
    return _text_folder(folder, transformers.PhiForCausalLM, cfg, tok)


def build_phi3(folder: Path):
    """Phi-3: fused qkv_proj and gate_up_proj, partial rotary (0.75, Phi-4-mini's), a sliding window, its
    <|user|> template; a Llama tokenizer adding BOS to raw prompts."""
    tok = _llama_tokenizer(["<|user|>", "<|assistant|>", "<|end|>"], PHI3_TEMPLATE)
    cfg = transformers.Phi3Config(vocab_size=len(tok), rms_norm_eps=1e-5, sliding_window=300,
                                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                   "partial_rotary_factor": 0.75},
                                  bos_token_id=1, eos_token_id=2, pad_token_id=3, **TEXT_SHAPE | {"hidden_size": 64})
    return _text_folder(folder, transformers.Phi3ForCausalLM, cfg, tok)


def build_gemma2_text(folder: Path):
    """Gemma 2 (Gemma2ForCausalLM): sandwich norms, attention and final-logit soft-capping (7 and 5: they bite on
    a random model), query_pre_attn_scalar 24, a 5-token sliding window on every other layer."""
    tok = _llama_tokenizer(["<start_of_turn>", "<end_of_turn>"], GEMMA_TEMPLATE)
    cfg = transformers.Gemma2Config(vocab_size=len(tok), attn_logit_softcapping=7.0, final_logit_softcapping=5.0,
                                    rope_parameters={"rope_type": "default", "rope_theta": 20000.0},
                                    **gemma_text_kwargs())
    return _text_folder(folder, transformers.Gemma2ForCausalLM, cfg, tok)


def build_gemma3_text(folder: Path):
    """Gemma 3's text decoder (Gemma3ForCausalLM): QK-norm, a 5-token sliding window, rope_local_base_freq on the
    sliding layers and linear rope scaling on the full one, untied head, final-logit soft-capping 5 (the text-only
    class applies it)."""
    tok = _llama_tokenizer(["<start_of_turn>", "<end_of_turn>"], GEMMA_TEMPLATE)
    cfg = transformers.Gemma3TextConfig(vocab_size=len(tok), rope_parameters=GEMMA3_TEXT_ROPE,
                                        layer_types=GEMMA3_LAYERS, final_logit_softcapping=5.0,
                                        tie_word_embeddings=False, **gemma_text_kwargs())
    return _text_folder(folder, transformers.Gemma3ForCausalLM, cfg, tok)


#: the text-only LM folders (the text family; tests/convert/test_hf_text.py and the conformance table run each)
TEXT_FOLDERS = {"llama": build_llama, "mistral": build_mistral, "qwen2": build_qwen2, "gemma": build_gemma,
                "phi": build_phi, "phi3": build_phi3, "gemma2_text": build_gemma2_text, "gemma3_text": build_gemma3_text}


# ------------------------------------------------------------------------------------------------ PaliGemma 2


def build_paligemma2(folder: Path):
    """PaliGemma 2: build_paligemma's tower and processor on a Gemma 2 LM (google/paligemma2-*): sandwich norms,
    attention and final-logit soft-capping (7 and 5: they bite on a random model; PaliGemmaForConditionalGeneration
    caps the logits itself), query_pre_attn_scalar 24, a 6-token sliding window on layers 0, 2 and 3: a prompt is 16
    image tokens + BOS + text, so the window cuts what the suffix sees while the prefix still sees all of itself."""
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=sentencepiece_tokenizer(["<image>"]),
                                               bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                               pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    images = transformers.SiglipImageProcessor(size={"height": 28, "width": 28}, image_mean=[0.4, 0.5, 0.6],
                                               image_std=[0.2, 0.3, 0.25], image_seq_length=16)
    processor = transformers.PaliGemmaProcessor(image_processor=images, tokenizer=tok)
    processor.save_pretrained(folder)
    torch.manual_seed(0)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=28, patch_size=7, layer_norm_eps=1e-6)
    layers = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
    text = transformers.Gemma2Config(vocab_size=len(tok), attn_logit_softcapping=7.0, final_logit_softcapping=5.0,
                                     rope_parameters={"rope_type": "default", "rope_theta": 20000.0},
                                     layer_types=layers, **{**gemma_text_kwargs(), "sliding_window": 6})
    cfg = transformers.PaliGemmaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                       image_token_index=processor.image_token_id, projection_dim=48)
    model = transformers.PaliGemmaForConditionalGeneration(cfg).eval()
    perturb_(model)
    model.save_pretrained(folder)
    return model, transformers.AutoProcessor.from_pretrained(folder)


# ------------------------------------------------------------------------------------------------ the registry

#: every folder by name (vlmkit's family name where there is one folder per family; IDEFICS is the flamingo family)
BUILDERS = {
    "llava": build_llava,
    "llava_next": build_llava_next,
    "llava_onevision": build_llava_onevision,
    "qwen2_vl": build_qwen2_vl,
    "idefics3": build_idefics3,
    "idefics3_nosplit": build_idefics3_nosplit,
    "smolvlm": build_smolvlm,
    "paligemma": build_paligemma,
    "mllama": build_mllama,
    "idefics": build_idefics,
    "blip2": build_blip2,
    "instructblip": build_instructblip,
    "clip_eos": build_clip_eos,
    "clip_legacy": build_clip_legacy,
    "siglip": build_siglip,
    "fuyu": build_fuyu,
    "qwen2_5_vl": build_qwen2_5_vl,
    "idefics2": build_idefics2,
    "idefics2_nosplit": build_idefics2_nosplit,
    "internvl": build_internvl,
    "mistral3": build_mistral3,
    "pixtral_llava": build_pixtral_llava,
    "gemma3": build_gemma3,
    "paligemma2": build_paligemma2,
    **TEXT_FOLDERS,
}
#: folders built from others: their builder takes the (folder, model, processor) of each of these after its folder
BASES = {"idefics3_nosplit": ("idefics3",), "idefics2_nosplit": ("idefics2",)}
