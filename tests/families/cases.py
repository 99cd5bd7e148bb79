"""The conformance table: one row per family (and per from-scratch preset family), every row checked the same way
by test_conformance.py.

A row of an imported family names the tiny Hugging Face folder it is built from (tests/hf_folders.py), a few raw
prompts in the family's own convention with the images they read, and how transformers is asked for its numbers:
the inputs its processor builds (:attr:`Case.hf_inputs`) and the log-probabilities it gives a continuation
(:attr:`Case.reference`: the lmms-eval way by default, PaliGemma's suffix). A row of a vlmkit-trained family names its
tiny preset. Adding a family adds one row here (docs/adding-a-family.md).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hf_fixtures import real_images


def images() -> list:
    """Real scenes of several sizes and shapes: 72x48, 40x60, 64x64, 96x32 and a small 24x20."""
    from vlmkit.data.shapes import render_scene, sample_scene

    rng = random.Random(1)
    wide = render_scene(sample_scene(rng, 96, 32, min_objects=1, max_objects=2))
    small = render_scene(sample_scene(rng, 48, 40, min_objects=1, max_objects=2)).resize((24, 20))
    return real_images() + [wide, small]


# ---------------------------------------------------------------------------------------------- transformers' side


def hf_inputs(processor, prompt: str, imgs: list, **kwargs) -> dict:
    """What the family's transformers processor gives for a raw prompt and its images."""
    return processor(text=prompt, images=imgs or None, return_tensors="pt", **kwargs)


def per_prompt_inputs(processor, prompt: str, imgs: list, **kwargs) -> dict:
    """The prompt's images as its own list (images=[[a, b]]), as apply_chat_template passes them: OneVision's
    processor then takes several images untiled (its multi-image mode)."""
    return processor(text=[prompt], images=[imgs] if imgs else None, return_tensors="pt", **kwargs)


def mllama_inputs(processor, prompt: str, imgs: list, **kwargs) -> dict:
    """MllamaProcessor writes BOS into the text (after the leading images), and its tokenizer adds another in front:
    twice in a row for a prompt that does not begin with an image. vlmkit never writes BOS twice: a text beginning
    with BOS is tokenised as transformers documents for it, with ``add_special_tokens=False``."""
    if not prompt.startswith("<|image|>"):
        kwargs.setdefault("add_special_tokens", False)
    return processor(text=prompt, images=imgs or None, return_tensors="pt", **kwargs)


def text_inputs(tokenizer, prompt: str, imgs: list, **kwargs) -> dict:
    """A text LM's transformers side is its tokenizer: a raw prompt's ids (with the tokenizer's special tokens
    unless ``add_special_tokens=False``)."""
    assert not imgs, "a text-only LM reads no images"
    enc = tokenizer(prompt, return_tensors="pt", **kwargs)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def idefics_inputs(processor, prompt: str, imgs: list, **kwargs) -> dict:
    """IdeficsProcessor takes a list of texts and images: the prompt's pieces with the images between them."""
    if "<image>" not in prompt:
        items = list(imgs) + [prompt]
    else:
        items = []
        for i, piece in enumerate(prompt.split("<image>")):
            if i:
                items.append(imgs[i - 1])
            if piece:
                items.append(piece)
    return processor(text=items, return_tensors="pt", **kwargs)


def lmms_eval_logprobs(case: Case, model, processor, prompt: str, continuation: str, imgs: list) -> torch.Tensor:
    """transformers' per-token log-probabilities of a continuation as lm-evaluation-harness / lmms-eval score it: the
    tokens of prompt + continuation after those of the prompt alone, the model run on the whole."""
    n = case.hf_inputs(processor, prompt, imgs)["input_ids"].shape[1]
    full = dict(case.hf_inputs(processor, prompt + continuation, imgs))
    if case.instruction_from_prompt:  # InstructBLIP's Q-Former reads the prompt, never the continuation
        instruction = case.hf_inputs(processor, prompt, imgs)
        full["qformer_input_ids"] = instruction["qformer_input_ids"]
        full["qformer_attention_mask"] = instruction["qformer_attention_mask"]
    with torch.no_grad():
        logits = model(**full).logits[0]
    logp = torch.log_softmax(logits[n - 1:-1].float(), -1)
    return logp.gather(-1, full["input_ids"][0, n:, None]).squeeze(-1)


def suffix_logprobs(case: Case, model, processor, prompt: str, continuation: str, imgs: list) -> torch.Tensor:
    """PaliGemma's: the log-probabilities of the processor's ``suffix`` (the continuation + EOS), its labels."""
    inputs = processor(text=prompt, images=imgs, suffix=continuation, return_tensors="pt")
    labels = inputs.pop("labels")[0]
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    keep = labels[1:] != -100
    logp = torch.log_softmax(logits[:-1][keep].float(), -1)
    return logp.gather(-1, labels[1:][keep, None]).squeeze(-1)


# ---------------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    name: str
    family: str
    folder: str = ""  # a tests/hf_folders.py folder; "" for a from-scratch preset
    preset: str = ""  # the tiny preset of a vlmkit-trained family
    prompts: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (raw prompt, indices into images())
    continuation: str = " It is red."
    single_turn: bool = False  # trains on one question and its answer (a prompt and its continuation or suffix)
    hf_inputs: Callable = hf_inputs
    reference: Callable = lmms_eval_logprobs
    instruction_from_prompt: bool = False
    images: bool = True  # False: a text-only LM (the text family), whose checks run without images
    # parameters no loss can reach, by name fragment, with the reason
    no_gradient: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.name


IMAGE_QWEN = "<|vision_start|><|image_pad|><|vision_end|>"
INTERNVL_CHAT = "<|im_start|>user\n<IMG_CONTEXT>\nWhat colour is the small circle?<|im_end|>\n<|im_start|>assistant\n"
LAST_TEXT_MLP = "the Q-Former's last layer's text outputs feed nothing: the LM reads the queries"

HF_CASES = [
    Case("llava", "llava", "llava", prompts=(("USER: <image>\nWhat colour is the small circle? ASSISTANT:", (0,)),
                                            ("<image> caption en", (1,)),
                                            ("Compare <image> and <image>: how many squares?", (2, 0)))),
    Case("llava_next", "llava_next", "llava_next",
         prompts=(("[INST] <image>\nWhat colour is the small circle? [/INST]", (0,)), ("<image> caption en", (1,)),
                  ("Compare <image> and <image>: how many squares?", (2, 0)))),
    Case("llava_onevision", "llava_onevision", "llava_onevision", hf_inputs=per_prompt_inputs,
         prompts=(("<|im_start|>user <image>\nWhat colour is the small circle?<|im_end|>\n<|im_start|>assistant\n",
                   (0,)), ("<image>caption en", (1,)), ("Compare <image> and <image>: how many squares?", (2, 0)))),
    Case("qwen2_vl", "qwen2_vl", "qwen2_vl",
         prompts=((f"{IMAGE_QWEN}{IMAGE_QWEN}Compare the two pictures: how many squares?", (0, 1)),
                  (f"<|im_start|>user\n{IMAGE_QWEN}What colour is the small circle?<|im_end|>\n<|im_start|>"
                   f"assistant\n", (0,)), ("the quick brown fox", ()))),
    Case("idefics3", "idefics3", "idefics3",
         prompts=(("User:<image>What colour is the small circle?<end_of_utterance>\nAssistant:", (0,)),
                  ("<image> caption en", (1,)), ("Compare <image> and <image>: how many squares?", (2, 0)))),
    Case("smolvlm", "idefics3", "smolvlm",  # SmolVLM's processor and template on the Idefics3 model
         prompts=(("User:<image>What colour is the small circle?<end_of_utterance>\nAssistant:", (0,)),
                  ("Compare <image> and <image>: how many squares?", (2, 0)))),
    Case("idefics3_nosplit", "idefics3", "idefics3_nosplit",  # do_image_splitting off: one tile per image
         prompts=(("<image> caption en", (1,)), ("Compare <image> and <image>: how many squares?", (2, 0)))),
    Case("paligemma", "paligemma", "paligemma", single_turn=True, reference=suffix_logprobs,
         prompts=(("caption en", (0,)), ("<image>answer en What colour is the small circle?", (1,)),
                  ("<image><image>Compare: how many squares?", (0, 2)))),
    Case("mllama", "mllama", "mllama", hf_inputs=mllama_inputs,
         prompts=(("<|image|>What colour is the small circle?", (0,)), ("Look: <|image|>How many squares?", (3,)),
                  ("a <|image|> b <|image|> c", (1, 2)))),
    Case("idefics", "flamingo", "idefics", hf_inputs=idefics_inputs,
         prompts=(("<image>What colour is the small circle?", (0,)),
                  ("User: what is in the picture? <image> Answer:", (1,)),
                  ("Compare <image> and <image>: how many squares?", (2, 0)))),
    Case("blip2", "blip2", "blip2", single_turn=True,
         prompts=(("Question: what colour is the small circle? Answer:", (0,)), ("Describe the image.", (1,)))),
    # FuyuProcessor puts a prompt's first image before its text and each further one at a |SPEAKER| in the text;
    # without images the text alone, with the tokenizer's BOS (|ENDOFTEXT|) and no beginning-of-answer token
    Case("fuyu", "fuyu", "fuyu", single_turn=True,
         prompts=(("What colour is the small circle?", (0,)), ("Compare |SPEAKER| how many squares?", (3, 1)),
                  ("the quick brown fox", ()))),
    Case("instructblip", "instructblip", "instructblip", single_turn=True, instruction_from_prompt=True,
         prompts=(("What colour is the small circle?", (0,)), ("How many squares are there?", (2,))),
         no_gradient={"qformer.layers.2.text_mlp": LAST_TEXT_MLP}),
    # windowed tower: each image 2x2 to 3x4 windows (edge ones cut short), blocks 1 and 3 full attention
    Case("qwen2_5_vl", "qwen2_5_vl", "qwen2_5_vl",
         prompts=((f"{IMAGE_QWEN}{IMAGE_QWEN}Compare the two pictures: how many squares?", (0, 1)),
                  (f"<|im_start|>user\n{IMAGE_QWEN}What colour is the small circle?<|im_end|>\n<|im_start|>assistant\n",
                   (3,)), (f"A: {IMAGE_QWEN} B: {IMAGE_QWEN} C: {IMAGE_QWEN}", (2, 4, 0)),
                  ("the quick brown fox", ()))),
    Case("idefics2", "idefics2", "idefics2",  # four quarters + the whole image, padded to the largest crop
         prompts=(("User:<image>What colour is the small circle?<end_of_utterance>\nAssistant:", (0,)),
                  ("<image>caption en", (1,)), ("Compare <image><image> and <image>: how many squares?", (2, 3, 4)))),
    Case("idefics2_nosplit", "idefics2", "idefics2_nosplit",  # do_image_splitting off: one crop per image
         prompts=(("<image> caption en", (1,)), ("Compare <image> and <image>: how many squares?", (2, 0)))),
    # InternVL: <IMG_CONTEXT> is the placeholder; the images tile 3x2, 2x2, 3x1 (each with a thumbnail) and 1x1
    Case("internvl", "internvl", "internvl",
         prompts=((INTERNVL_CHAT, (0,)), ("<IMG_CONTEXT> caption en", (3,)),
                  ("Compare <IMG_CONTEXT> and <IMG_CONTEXT> and <IMG_CONTEXT>: how many squares?", (2, 4, 1)))),
    # PixtralProcessor: each [IMG] becomes its image's rows of [IMG] (its own count: every image keeps its aspect
    # ratio), [IMG_BREAK] after each row, [IMG_END] after the last
    Case("mistral3", "mistral3", "mistral3",
         prompts=(("[INST][IMG]What colour is the small circle?[/INST]", (0,)),
                  ("[INST]Compare [IMG] and [IMG]: how many squares?[/INST]", (3, 4)),
                  ("[IMG][IMG] caption en", (1, 2)), ("the quick brown fox", ()))),
    # Pixtral-12B's Hub format (LlavaForConditionalGeneration with a Pixtral tower, no merger): family mistral3
    Case("pixtral_llava", "mistral3", "pixtral_llava",
         prompts=(("[INST][IMG]What colour is the small circle?[/INST]", (0,)),
                  ("[INST]Compare [IMG] and [IMG]: how many squares?[/INST]", (3, 1)), ("the quick brown fox", ()))),
    # Gemma 3: 9 tokens per image against a 5-token sliding window, several images per prompt (the prompts holding
    # BOS are test_a_prompt_already_holding_bos_gets_no_second_bos's)
    Case("gemma3", "gemma3", "gemma3",
         prompts=(("<start_of_turn>user\n<start_of_image>What colour is the small circle?<end_of_turn>\n"
                   "<start_of_turn>model\n", (0,)),
                  ("Compare <start_of_image> and <start_of_image>: how many squares?", (2, 3)),
                  ("the quick brown fox", ()),
                  ("a <start_of_image> b <start_of_image> c <start_of_image>", (1, 4, 0)))),
    # PaliGemma 2: the paligemma row on a Gemma 2 LM with a 6-token sliding window, shorter than a prompt (16 image
    # tokens + BOS + text) and than the continuation: the suffix sees only the window, the prefix all of itself
    Case("paligemma2", "paligemma", "paligemma2", single_turn=True, reference=suffix_logprobs,
         continuation=" It is a red circle next to a blue square.",
         prompts=(("caption en", (0,)), ("<image>answer en What colour is the small circle?", (1,)),
                  ("<image><image>Compare: how many squares?", (0, 2)))),
]


def text_rows() -> list[Case]:
    """One row per text-only LM folder (tests/hf_folders.py's TEXT_FOLDERS; none without transformers)."""
    import pytest

    try:
        from hf_folders import TEXT_FOLDERS
    except pytest.skip.Exception:
        return []
    prompts = (("What colour is the small circle?", ()), ("the quick brown fox jumps over", ()),
               ("Describe the image. A blue triangle", ()))
    return [Case(name, "text", name, prompts=prompts, hf_inputs=text_inputs, images=False) for name in TEXT_FOLDERS]


HF_CASES += text_rows()


def chameleon_inputs(processor, prompt: str, imgs: list, **kwargs) -> dict:
    """ChameleonProcessor in text-completion mode (its default chat mode appends the sep token to the text)."""
    return processor(text=prompt, images=imgs or None, return_tensors="pt", return_for_text_completion=True, **kwargs)


def chameleon_rows() -> list[Case]:
    """Chameleon (tests/hf_chameleon_folders.py adds its folders to hf_folders.BUILDERS): 16 code tokens per image
    between <racm3:break> and <eoss>, several images per prompt."""
    import pytest

    try:
        import hf_chameleon_folders  # noqa: F401
    except pytest.skip.Exception:
        return []
    return [Case("chameleon", "chameleon", "chameleon", hf_inputs=chameleon_inputs,
                 prompts=(("<image>What colour is the small circle?", (0,)),
                          ("Compare <image> and <image>: how many squares?", (2, 3)), ("the quick brown fox", ()),
                          ("a <image> b <image> c <image>", (1, 4, 0))),
                 no_gradient={"vq.": "the VQ encoder's codes are an argmin: no loss reaches it"})]


HF_CASES += chameleon_rows()

STAGE_ONE = "BLIP-2's stage-1 heads (ITC, ITM, ITG) train in the qformer stage, not through the LM"
BLIP2_TEXT = "BLIP-2's Q-Former reads text only in stage 1; with the LM it reads the image alone"
PRESET_CASES = [
    Case("tiny-llava", "llava", preset="tiny-llava"),
    Case("tiny-blip2", "blip2", preset="tiny-blip2",
         no_gradient={"connector.heads": STAGE_ONE, "qformer.word_embed": BLIP2_TEXT, "qformer.pos_embed": BLIP2_TEXT,
                      "text_mlp": BLIP2_TEXT}),
    Case("tiny-instructblip", "instructblip", preset="tiny-instructblip",
         no_gradient={"connector.heads": STAGE_ONE, "qformer.layers.1.text_mlp": LAST_TEXT_MLP}),
    Case("tiny-flamingo", "flamingo", preset="tiny-flamingo"),
    Case("tiny-mllama", "mllama", preset="tiny-mllama"),
    Case("tiny-fuyu", "fuyu", preset="tiny-fuyu"),
    Case("tiny-mistral3", "mistral3", preset="tiny-mistral3"),
    Case("tiny-gemma3", "gemma3", preset="tiny-gemma3"),
    Case("tiny-llava-ldp", "llava", preset="tiny-llava-ldp"),
    Case("tiny-llava-ldpv2", "llava", preset="tiny-llava-ldpv2"),
    Case("tiny-llava-cabs", "llava", preset="tiny-llava-cabs"),
    Case("tiny-llava-avgpool", "llava", preset="tiny-llava-avgpool"),
    Case("tiny-llava-attnpool", "llava", preset="tiny-llava-attnpool"),
    Case("tiny-janus", "janus", preset="tiny-janus",
         no_gradient={"vqmodel": "the VQ tokenizer only turns images into codes and back (no loss reaches it)",
                      "generation_": "the generation path is trained by image-code targets, and a conversation has "
                                     "none (tests/unit/test_janus.py trains it)"}),
    Case("tiny-chameleon", "chameleon", preset="tiny-chameleon",
         no_gradient={"vq.": "the VQ tokenizer's codes are an argmin and its decoder only draws: no loss reaches it"}),
    Case("tiny-showo", "showo", preset="tiny-showo",
         no_gradient={"vq.": "the VQ tokenizer's codes are an argmin and its decoder only draws: no loss reaches it"}),
    Case("tiny-transfusion", "transfusion", preset="tiny-transfusion",
         no_gradient={"vae.": "the VAE is frozen: its posterior mean is read without gradient and its decoder only draws",
                      "patch_out": "the velocity head is trained by written images' flow loss, and a conversation "
                                   "only reads images (tests/unit/test_transfusion.py trains it)"}),
]



def emu3_rows() -> list[Case]:
    """Emu3 (tests/hf_emu3_folders.py registers its folder). transformers pads a call's images to the largest and
    encodes them together, so an image's codes there depend on the others; vlmkit encodes each alone (models/emu3.py):
    the prompts with two images read the same image twice (test_hf_emu3.py checks different sizes one by one)."""
    import pytest

    try:
        import hf_emu3_folders  # noqa: F401
    except pytest.skip.Exception:
        return []
    frozen = "Emu3's VQ-VAE is frozen: images reach the LM as discrete tokens, no loss reaches it"
    return [Case("emu3", "emu3", "emu3", no_gradient={"vq.": frozen},
                 prompts=(("USER: <image>What colour is the small circle? ASSISTANT:", (0,)),
                          ("Compare <image> and <image>: how many squares?", (2, 2)), ("<image> caption en", (3,)),
                          ("the quick brown fox", ())))]


HF_CASES += emu3_rows()


def janus_rows() -> list[Case]:
    """Janus (tests/hf_janus_folders.py registers its folder): each <image_placeholder> becomes <begin_of_image>, 16
    placeholders and <end_of_image> (JanusProcessor); images padded to a square of the mean colour
    (JanusImageProcessor); the generation path is test_hf_janus.py's."""
    import pytest

    try:
        import hf_janus_folders  # noqa: F401
    except pytest.skip.Exception:
        return []
    vq = "Janus' VQ tokenizer turns images into codes and back outside any loss (a separate, frozen model)"
    gen = "the generation embeddings, aligner and head read and predict image codes; a text sample has none"
    return [Case("janus", "janus", "janus", no_gradient={"vqmodel.": vq, "generation_": gen},
                 prompts=(("<|User|>: <image_placeholder>\nWhat colour is the small circle?\n\n<|Assistant|>:",
                           (0,)), ("Compare <image_placeholder> and <image_placeholder>: how many squares?", (3, 1)),
                          ("the quick brown fox", ())))]


HF_CASES += janus_rows()
CASES = HF_CASES + PRESET_CASES
