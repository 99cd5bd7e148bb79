"""Idefics3 (``Idefics3ForConditionalGeneration``) and SmolVLM (``SmolVLMForConditionalGeneration``) <->
``VisionLanguageModel``: a SigLIP-like tower (post-layernorm output) run on every tile, pixel shuffle by
``scale_factor`` and one linear without bias, spliced flat in reading order into a Llama-family LM.

The two model types share the architecture, the tensor names and the image processor (transformers generates
SmolVLM's modeling and image-processing code from Idefics3's). The differences, none of which changes the
numbers of a checkpoint: SmolVLMProcessor reads the names of its image tokens from the tokenizer (defaulting to
Idefics3's) and does not add ``<fake_token_around_image>`` / ``<image>`` / ``<end_of_utterance>`` to the
tokenizer as Idefics3Processor does; SmolVLM also takes videos (not implemented in vlmkit); the first SmolVLM
checkpoints (e.g. SmolVLM-256M-Instruct) are saved with model_type "idefics3".

Idefics3's vision embeddings take bucketed position ids meant for padded images. vlmkit feeds only full tiles
(see processing/idefics3.py), for which the buckets are the plain positions 0..N-1 on the patch grids of the
released checkpoints (26, 27, 32 patches a side); on some other grids transformers' float rounding puts a patch in
its neighbour's bucket, and those configs are refused (:func:`bucketed_positions`).

Export (:func:`export_idefics3`) writes such a model back as an Idefics3 folder in the Hub's layout.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlmkit.config import ConnectorConfig, ProcessorConfig, VLMConfig
from vlmkit.convert.hf.io import export_table, load_state, read_checkpoint, read_json, write_hf_weights, write_json
from vlmkit.convert.hf.lm import lm_config_from_hf, lm_config_to_hf, lm_key_map, untie_if_head_saved
from vlmkit.convert.hf.processor import (PIL_CODES, export_tokenizer, image_processor_from_hf, load_hf_processor,
                                         read_image_processor)
from vlmkit.convert.hf.processor import generation_settings
from vlmkit.convert.hf.vision import export_vision_tensors, vision_config_from_hf, vision_config_to_hf, vision_tensors
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models import build_model
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.processing import Processor
from vlmkit.processing.idefics3 import FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, Idefics3ProcessorConfig, ImageSplitConfig

MODEL_TYPES = {"idefics3": "Idefics3ForConditionalGeneration", "smolvlm": "SmolVLMForConditionalGeneration"}
# Idefics3VisionConfig's defaults (SmolVLMVisionConfig has the same), for keys a config.json leaves out
VISION_DEFAULTS = {"hidden_size": 1152, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 16,
                   "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "gelu_pytorch_tanh",
                   "layer_norm_eps": 1e-6}
# Idefics3ImageProcessor's defaults (size, max_image_size, LANCZOS), for keys a preprocessor config leaves out
IMAGE_DEFAULTS = {"size": {"longest_edge": 4 * 364}, "max_image_size": {"longest_edge": 364}, "resample": 1}
IMAGE_SEQ_LEN_DEFAULT = 169  # Idefics3Processor / SmolVLMProcessor without image_seq_len in processor_config.json
IMAGE_TOKEN, END_OF_UTTERANCE = "<image>", "<end_of_utterance>"

# vlmkit name -> transformers name for the parts outside the tower and the LM
VISION_PREFIX, TEXT_PREFIX, HEAD = "model.vision_model.", "model.text_model.", "lm_head.weight"
CONNECTOR_TABLE = {"connector.proj.weight": "model.connector.modality_projection.proj.weight"}


def bucketed_positions(side: int) -> torch.Tensor:
    """The position id along one axis that Idefics3VisionEmbeddings gives each of ``side`` patches of a full
    (unpadded) image whose tower has ``side`` patches a side: transformers' bucketize, computed the same way."""
    boundaries = torch.arange(1 / side, 1.0, 1 / side)
    step = 1.0 / torch.tensor([side])  # float32, as nb_patches (an integer tensor) divides 1.0 there
    coords = torch.clamp(torch.arange(side, dtype=torch.float32)[None, :] * step[:, None], max=1.0 - 1e-6)
    return torch.bucketize(coords, boundaries, right=True)[0]


def idefics3_config_from_hf(cfg: dict, where: str = "config.json") -> tuple[VLMConfig, int]:
    """An Idefics3Config / SmolVLMConfig -> (VLMConfig, image token id)."""
    kind = cfg.get("model_type")
    if kind not in MODEL_TYPES:
        raise ConfigError(f"{where}: model_type {kind!r} is not one of {', '.join(MODEL_TYPES)}")
    # transformers builds the Idefics3 tower whatever model_type the nested vision_config names
    vcfg = {**VISION_DEFAULTS, **(cfg.get("vision_config") or {}), "model_type": "idefics3_vision"}
    vision = vision_config_from_hf(vcfg, -1, f"{where} (vision_config)")  # last_hidden_state: post-layernorm
    gh, gw = vision.grid
    if vision.image_size[0] != vision.image_size[1]:
        raise ConfigError(f"{where}: vision_config.image_size {list(vision.image_size)}: Idefics3's tower takes "
                          f"square tiles; give one integer")
    if not torch.equal(bucketed_positions(gh), torch.arange(gh)):
        raise ConfigError(f"{where}: vision_config image_size {vision.image_size[0]} / patch_size "
                          f"{vision.patch_size} gives a {gh}x{gw} patch grid on which transformers' bucketed "
                          f"position ids are not 0..{gh - 1} (float rounding); vlmkit's tower uses plain positions, "
                          f"so this grid is not implemented (released checkpoints use 26, 27 or 32 patches a side)")
    scale = cfg.get("scale_factor", 2)
    if not isinstance(scale, int) or scale < 1 or gh % scale:
        raise ConfigError(f"{where}: scale_factor {scale!r} must be a positive integer dividing the {gh}x{gw} "
                          f"patch grid (vision_config image_size // patch_size)")
    # the head is tied by the top-level tie_word_embeddings (the text model has no head of its own)
    text = {**(cfg.get("text_config") or {}), "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False))}
    lm = lm_config_from_hf(text, f"{where} (text_config)")
    connector = ConnectorConfig(kind="pixel_shuffle", scale_factor=scale, layers=1, bias=False)
    token = cfg.get("image_token_id", 128257)  # Idefics3Config's default
    return VLMConfig(family="idefics3", vision=vision, connector=connector, lm=lm), int(token)


def load_hf_idefics3(folder: str | Path) -> VisionLanguageModel:
    """A transformers Idefics3 / SmolVLM folder -> VisionLanguageModel (fp32)."""
    return _load_idefics3(folder)[0]


def _load_idefics3(folder: str | Path) -> tuple[VisionLanguageModel, VLMConfig, str]:
    """(model, its config, the folder's model_type)."""
    ckpt = read_checkpoint(folder)
    cfg, image_token = idefics3_config_from_hf(ckpt.config, str(ckpt.folder / "config.json"))
    t = ckpt.tensors
    cfg = untie_if_head_saved(cfg, t, HEAD, f"{TEXT_PREFIX}embed_tokens.weight")
    model = build_model(cfg, image_token, init=False)
    table, tensors = vision_tensors(t, cfg.vision, VISION_PREFIX, "encoder.")
    table |= {f"lm.{k}": v for k, v in lm_key_map(cfg.lm, TEXT_PREFIX, HEAD).items()}
    table |= CONNECTOR_TABLE
    ignore = (HEAD,) if cfg.lm.tie_embeddings else ()
    load_state(model, tensors, table, str(ckpt.folder), ignore)
    if cfg.lm.tie_embeddings:
        model.lm.lm_head.weight = model.lm.embed_tokens.weight
    return model.eval(), cfg, ckpt.config["model_type"]


def idefics3_image_settings(cfg: dict, where: str = "preprocessor_config.json") -> dict:
    """Idefics3ImageProcessor / SmolVLMImageProcessor settings -> ProcessorConfig fields (image_size = one tile,
    split: longest_edge and enabled, resample, mean, std)."""
    cfg = {**IMAGE_DEFAULTS, **cfg}
    tile = (cfg.get("max_image_size") or {}).get("longest_edge")
    if not isinstance(tile, int) or tile < 1:
        raise ConfigError(f"{where}: max_image_size {cfg.get('max_image_size')!r}: expected {{'longest_edge': N}}")
    longest = 0
    if cfg.get("do_resize", True):
        longest = (cfg.get("size") or {}).get("longest_edge")
        if not isinstance(longest, int) or longest < 1:
            raise ConfigError(f"{where}: size {cfg.get('size')!r}: only {{'longest_edge': N}} is supported")
    # rescale, normalisation and the PIL filter are checked and read as for every family; the tile is the size
    fixed = image_processor_from_hf({**cfg, "do_resize": True, "do_center_crop": False,
                                     "size": {"height": tile, "width": tile}}, where)
    return {**fixed, "split": ImageSplitConfig(longest, bool(cfg.get("do_image_splitting", True)))}


def load_idefics3_processor(folder: Path, model: VisionLanguageModel, cfg: VLMConfig, kind: str) -> Processor:
    """The folder's processor as Idefics3Processor / SmolVLMProcessor builds input_ids: each ``<image>`` becomes
    its tiles' markers and image tokens, the whole string tokenised with the tokenizer's special tokens."""
    image_cfg, path = read_image_processor(folder)
    settings = idefics3_image_settings(image_cfg, str(path))
    if settings["image_size"][0] != cfg.vision.image_size[0]:
        raise ConfigError(f"{path}: max_image_size.longest_edge {settings['image_size'][0]} differs from "
                          f"config.json vision_config.image_size {cfg.vision.image_size[0]}: tiles of another size "
                          f"than the tower's would go through its position buckets, which vlmkit does not implement")
    proc_path = folder / "processor_config.json"
    seq_len = read_json(proc_path).get("image_seq_len", IMAGE_SEQ_LEN_DEFAULT)
    if seq_len != model.image_seq_len:
        raise ConfigError(f"{proc_path}: image_seq_len {seq_len} differs from the model's {model.image_seq_len} "
                          f"((image_size // patch_size)^2 / scale_factor^2 from config.json)")
    tok_cfg = read_json(folder / "tokenizer_config.json")
    named = tok_cfg.get("extra_special_tokens") if isinstance(tok_cfg.get("extra_special_tokens"), dict) else {}
    if kind == "smolvlm":  # SmolVLMProcessor takes the names of these tokens from the tokenizer
        for key, default in (("image_token", IMAGE_TOKEN), ("fake_image_token", FAKE_IMAGE_TOKEN),
                             ("global_image_token", GLOBAL_IMAGE_TOKEN)):
            if named.get(key, default) != default:
                raise ConfigError(f"{folder / 'tokenizer_config.json'}: extra_special_tokens.{key} "
                                  f"{named[key]!r}: vlmkit writes Idefics3's {default!r}")
    processor = load_hf_processor(folder, "idefics3", model.image_token_id, model.image_seq_len, cfg.lm.max_seq_len,
                                  Idefics3ProcessorConfig, fixed_images=False, **settings)
    if processor.cfg.image_token != IMAGE_TOKEN:
        raise ConfigError(f"{folder / 'config.json'}: image_token_id {model.image_token_id} is "
                          f"{processor.cfg.image_token!r} in tokenizer.json; the processor writes {IMAGE_TOKEN!r}")
    # Idefics3Processor adds these to a tokenizer that lacks them, giving ids beyond this vocabulary
    needed = (FAKE_IMAGE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE) if kind == "idefics3" else ()
    missing = [s for s in needed if processor.tokenizer.tok.token_to_id(s) is None]
    if missing:
        raise CheckpointError(f"{folder / 'tokenizer.json'}: special tokens {missing} are missing; "
                              f"Idefics3Processor would add them with ids the model's embeddings do not have")
    return processor


def load_idefics3_folder(folder: Path):
    """(model, config, processor) of an Idefics3 or SmolVLM folder."""
    model, cfg, kind = _load_idefics3(folder)
    return model, cfg, load_idefics3_processor(Path(folder), model, cfg, kind)


# ---------------------------------------------------------------------------------------------- export

# the processor class and image-processor class transformers builds for each model type
PROCESSOR_CLASSES = {"idefics3": ("Idefics3Processor", "Idefics3ImageProcessor"),
                     "smolvlm": ("SmolVLMProcessor", "SmolVLMImageProcessor")}


def idefics3_config_to_hf(cfg: VLMConfig, image_token_id: int, model_type: str = "idefics3") -> dict:
    """VLMConfig -> Idefics3Config's (or SmolVLMConfig's) config.json. The tower is written with the layers vlmkit
    built and its final norm, which Idefics3 always applies (last_hidden_state); anything this architecture
    cannot compute the same way is refused by field name."""
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"model_type {model_type!r}: the idefics3 family exports as {', '.join(MODEL_TYPES)}")
    v, c = cfg.vision, cfg.connector
    if v.class_token:
        raise ConfigError("vision.class_token: true: Idefics3's tower has no class token (a SigLIP-style tower, "
                          "class_token: false, is needed)")
    if not v.post_norm:
        raise ConfigError("vision.post_norm: false: Idefics3 feeds the connector the tower's last hidden state "
                          "after its final layernorm (post_layernorm); this model is not expressible as an Idefics3 "
                          "checkpoint")
    vision = vision_config_to_hf(v, "vision")  # the SigLIP checks: arch, stem, norm, biases, square tiles, act
    gh, _ = v.grid
    if not torch.equal(bucketed_positions(gh), torch.arange(gh)):
        raise ConfigError(f"vision.image_size {v.image_size[0]} / patch_size {v.patch_size}: on a {gh}x{gh} patch grid "
                          f"Idefics3's bucketed position ids are not the plain 0..{gh - 1} vlmkit's tower uses "
                          f"(float rounding in transformers); choose another grid (e.g. 26, 27 or 32 patches a side)")
    if c.kind != "pixel_shuffle" or c.layers != 1 or c.bias:
        raise ConfigError(f"connector kind {c.kind!r}, layers {c.layers}, bias {c.bias}: Idefics3's connector is a "
                          f"pixel shuffle and one linear without bias (kind: pixel_shuffle, layers: 1, bias: false)")
    if c.scale_factor < 1 or gh % c.scale_factor:
        raise ConfigError(f"connector.scale_factor {c.scale_factor} must divide the {gh}x{gh} patch grid")
    del vision["vision_use_head"]  # a SiglipVisionConfig key; Idefics3's tower has no pooling head
    vision["model_type"] = f"{model_type}_vision"
    text = lm_config_to_hf(cfg.lm, "lm")
    return {"model_type": model_type, "architectures": [MODEL_TYPES[model_type]], "vision_config": vision,
            "text_config": text, "image_token_id": image_token_id, "scale_factor": c.scale_factor,
            "tie_word_embeddings": cfg.lm.tie_embeddings, "torch_dtype": "float32"}


def idefics3_image_processor_to_hf(pcfg: ProcessorConfig, tile: int, image_processor_type: str) -> dict:
    """An "idefics3" ProcessorConfig -> Idefics3ImageProcessor settings (:func:`idefics3_image_settings` inverted):
    the first resize to ``longest_edge`` (do_resize: false when vlmkit has none), tiles of ``max_image_size``,
    ``do_image_splitting``, then the shared rescale and normalisation. ``do_pad`` only pads a batch of prompts
    with different tile counts; transformers drops those all-zero images before its tower."""
    if tuple(pcfg.image_size) != (tile, tile):
        raise ConfigError(f"processor image_size {tuple(pcfg.image_size)} differs from the tower's ({tile}, {tile}): "
                          f"Idefics3's tiles (max_image_size) are the tower's image_size")
    return {"image_processor_type": image_processor_type, "do_convert_rgb": True, "do_resize": bool(pcfg.split.longest_edge),
            "size": {"longest_edge": pcfg.split.longest_edge or 4 * tile}, "max_image_size": {"longest_edge": tile},
            "do_image_splitting": pcfg.split.enabled, "resample": PIL_CODES[pcfg.resample], "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(pcfg.mean),
            "image_std": list(pcfg.std), "do_pad": True}


def export_idefics3(model: VisionLanguageModel, cfg: VLMConfig, processor: Processor, folder: Path,
                    model_type: str = "idefics3") -> None:
    """An Idefics3-layout vlmkit model -> a folder that transformers' Idefics3ForConditionalGeneration and
    AutoProcessor (Idefics3Processor) load, in the Hub's tensor layout (``model.vision_model.``,
    ``model.connector.modality_projection.proj``, ``model.text_model.``, ``lm_head``: the one transformers 4
    and 5, vLLM and SGLang read; transformers has no legacy key mapping for this family).

    ``model_type`` "smolvlm" writes the same weights as a SmolVLMForConditionalGeneration folder instead (its
    processor, SmolVLMProcessor, needs torchvision for videos). vlmkit's config does not record which of the two
    an imported folder was; ``vlmkit convert --to hf`` writes idefics3, which computes the same function."""
    config = idefics3_config_to_hf(cfg, model.image_token_id, model_type)
    pcfg, tok = processor.cfg, processor.tokenizer
    processor_class, image_processor_type = PROCESSOR_CLASSES[model_type]
    # processor.json names the family whose image processor and layout the processor uses, and nothing makes it the
    # model's: another family's processor neither tiles images nor has the split settings to write (before the
    # family interface: image_processor 'idefics3')
    if processor.family.name != "idefics3":
        raise ConfigError(f"processor family {processor.family.name!r}: an Idefics3 checkpoint's processor splits "
                          f"images into tiles with row/column markers (family: idefics3)")
    images = idefics3_image_processor_to_hf(pcfg, cfg.vision.image_size[0], image_processor_type)
    if pcfg.text_mode != "whole":
        raise ConfigError(f"processor text_mode {pcfg.text_mode!r}: {processor_class} tokenises the whole prompt "
                          f"with each image's tiles and markers spelled out (text_mode: whole)")
    if pcfg.image_seq_len != model.image_seq_len:
        raise ConfigError(f"processor image_seq_len {pcfg.image_seq_len} differs from the model's "
                          f"{model.image_seq_len} (tokens per tile after the pixel shuffle)")
    if pcfg.image_token != IMAGE_TOKEN:
        raise ConfigError(f"processor image_token {pcfg.image_token!r}: {processor_class} writes {IMAGE_TOKEN!r}")
    # Idefics3Processor adds these when the tokenizer lacks them: new ids, beyond the model's embeddings
    missing = [s for s in (FAKE_IMAGE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE) if tok.tok.token_to_id(s) is None]
    if missing:
        raise ConfigError(f"tokenizer: special tokens {missing} are missing; {processor_class} would add them with "
                          f"ids the model's embeddings do not have (train the tokenizer with them)")
    special = {"eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id, "bos_token_id": tok.bos_id}
    config["text_config"] |= special  # generation stops where vlmkit's does
    config["pad_token_id"] = tok.pad_id  # transformers 4 reads it here (Idefics3Config's default is Llama 3's)
    tensors = export_vision_tensors(model.encoder, cfg.vision, VISION_PREFIX)
    tensors |= export_table(model.lm, lm_key_map(cfg.lm, TEXT_PREFIX, HEAD))
    tensors |= export_table(model, CONNECTOR_TABLE)
    write_hf_weights(folder, tensors)
    write_json(folder / "config.json", config)
    write_json(folder / "generation_config.json", generation_settings(special, processor))
    write_json(folder / "preprocessor_config.json", {**images, "processor_class": processor_class})
    write_json(folder / "processor_config.json", {"processor_class": processor_class,
                                                  "image_seq_len": model.image_seq_len})
    export_tokenizer(processor, folder)


