"""Fixtures of the Hugging Face tests: a tiny LLaVA-1.5 folder saved by transformers with its processor."""

from __future__ import annotations

import pytest
import torch

from hf_fixtures import LLAVA_TEMPLATE, perturb_, sentencepiece_tokenizer


@pytest.fixture(scope="session")
def llava_folder(tmp_path_factory):
    """(folder, the transformers model, the processor as AutoProcessor reads it back from the folder)."""
    transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")
    folder = tmp_path_factory.mktemp("llava")
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
    return folder, model, transformers.AutoProcessor.from_pretrained(folder)
