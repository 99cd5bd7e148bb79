"""Image-processor settings (both layouts found on the Hub), ``tokenizer.json`` tokenizers and chat templates
-> a whole-string vlmkit Processor.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from vlmkit.config import ProcessorConfig
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.processing import Processor
from vlmkit.processing.image import ImageTransform
from vlmkit.processing.tokenizer import TextTokenizer

PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def read_image_processor(folder: str | Path) -> tuple[dict, Path]:
    """The image-processor settings of a folder, from either layout found on the Hub: the classic
    ``preprocessor_config.json``, or ``processor_config.json`` with them nested under ``image_processor``."""
    folder = Path(folder)
    classic, nested = folder / "preprocessor_config.json", folder / "processor_config.json"
    for path in (classic, nested):
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{path}: not valid JSON ({e})") from e
            if path == nested:
                if not isinstance(data.get("image_processor"), dict):
                    continue
                data = data["image_processor"]
            return data, path
    raise CheckpointError(f"{folder} has no image-processor settings: expected preprocessor_config.json, or "
                          f"processor_config.json with an 'image_processor' section")


def image_processor_from_hf(cfg: dict, where: str = "preprocessor_config.json") -> dict:
    """CLIP / SigLIP-style image-processor settings -> ProcessorConfig fields (image_size, shortest_edge,
    resample, mean, std). Anything these do not express is refused by name."""
    size, crop = cfg.get("size") or {}, cfg.get("crop_size") or {}
    if isinstance(size, int):
        size = {"shortest_edge": size}
    out: dict = {}
    resample = cfg.get("resample", 3)
    if resample not in PIL_RESAMPLE:
        raise ConfigError(f"{where}: resample {resample!r}; supported: {sorted(PIL_RESAMPLE)} (PIL filters)")
    out["resample"] = PIL_RESAMPLE[resample]
    if not cfg.get("do_resize", True):
        raise ConfigError(f"{where}: do_resize: false is not supported (vlmkit models take a fixed size)")
    if "shortest_edge" in size:
        if not cfg.get("do_center_crop", False):
            raise ConfigError(f"{where}: size.shortest_edge without do_center_crop gives images of varying size; "
                              f"not supported")
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        if "height" not in crop or "width" not in crop:
            raise ConfigError(f"{where}: crop_size needs height and width, got {crop!r}")
        out["shortest_edge"] = int(size["shortest_edge"])
        out["image_size"] = (int(crop["height"]), int(crop["width"]))
    elif "height" in size and "width" in size:
        if cfg.get("do_center_crop") and crop and (crop.get("height"), crop.get("width")) != (size["height"], size["width"]):
            raise ConfigError(f"{where}: a center crop after a fixed-size resize is not supported")
        out["image_size"] = (int(size["height"]), int(size["width"]))
    else:
        raise ConfigError(f"{where}: size {size!r}: expected shortest_edge (with crop_size) or height and width")
    if cfg.get("do_rescale", True) and abs(float(cfg.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-12:
        raise ConfigError(f"{where}: rescale_factor {cfg.get('rescale_factor')} is not supported (only 1/255)")
    if not cfg.get("do_rescale", True):
        raise ConfigError(f"{where}: do_rescale: false is not supported")
    if cfg.get("do_normalize", True):
        out["mean"] = tuple(float(v) for v in cfg.get("image_mean", (0.5, 0.5, 0.5)))
        out["std"] = tuple(float(v) for v in cfg.get("image_std", (0.5, 0.5, 0.5)))
    else:
        out["mean"], out["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return out


def load_hf_image_transform(folder: str | Path) -> ImageTransform:
    """The folder's image processor as a vlmkit ImageTransform (pixels equal transformers' PIL backend)."""
    cfg, path = read_image_processor(folder)
    f = image_processor_from_hf(cfg, str(path))
    return ImageTransform(f["image_size"], f["mean"], f["std"], f["resample"], f.get("shortest_edge", 0))





def _token_str(v) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def load_hf_tokenizer(folder: str | Path) -> TextTokenizer:
    """``tokenizer.json`` (+ the special tokens named in ``tokenizer_config.json`` or
    ``special_tokens_map.json``) -> TextTokenizer. ``encode`` gives transformers' ids for the same text with
    ``add_special_tokens=False``; the BOS id is there for templates that start with it. Without a pad token
    the EOS token pads (right padding never reaches a loss or an attention key)."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        legacy = [p.name for p in folder.glob("*.model")] + [p.name for p in folder.glob("vocab.*")]
        hint = (f" (found {', '.join(sorted(legacy))}: re-save with transformers' fast tokenizer, "
                f"tokenizer.save_pretrained(out), which writes tokenizer.json)") if legacy else ""
        raise CheckpointError(f"{folder} has no tokenizer.json{hint}")
    special: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        p = folder / name
        if p.is_file():
            try:
                special |= {k: v for k, v in json.loads(p.read_text()).items() if k.endswith("_token")}
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{p}: not valid JSON ({e})") from e
    eos = _token_str(special.get("eos_token"))
    if eos is None:
        raise CheckpointError(f"{folder}: no eos_token in tokenizer_config.json or special_tokens_map.json")
    pad = _token_str(special.get("pad_token")) or eos
    return TextTokenizer.from_file(path, pad_token=pad, eos_token=eos, bos_token=_token_str(special.get("bos_token")))


# ---------------------------------------------------------------------------------------------- chat templates


def read_stop_tokens(folder: str | Path, tok: TextTokenizer) -> list[str]:
    """The tokens besides the tokenizer's EOS that end a generation: generation_config.json's ``eos_token_id``
    when it lists several (transformers' generate stops at any of them; Gemma 3's <end_of_turn>, Phi-3's
    <|end|>, Llama 3's <|eom_id|>). [] without the file or with one id."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return []
    ids = json.loads(path.read_text()).get("eos_token_id")
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    out = []
    for i in ids:
        token = tok.tok.id_to_token(int(i))
        if token is None:
            raise CheckpointError(f"{path}: eos_token_id {i} is not in tokenizer.json's vocabulary")
        if token != tok.eos_token and token not in out:
            out.append(token)
    return out


def generation_settings(special: dict, processor: Processor) -> dict:
    """generation_config.json's ids for an export: ``special`` (eos, pad, bos), eos_token_id listing every id the
    processor stops at when it has more than EOS."""
    stops = list(processor.stop_ids)
    return {**special, "eos_token_id": stops} if len(stops) > 1 else special


def read_chat_template(folder: str | Path) -> str:
    """The folder's Jinja chat template, from wherever transformers saved it: ``chat_template.jinja``,
    ``chat_template.json``, ``processor_config.json`` or ``tokenizer_config.json`` (a string, or a list of
    named templates of which "default" is used). "" when the folder has none."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            template = json.loads(path.read_text()).get("chat_template")
        except (json.JSONDecodeError, AttributeError) as e:
            raise CheckpointError(f"{path}: not a JSON object ({e})") from e
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str) and template:
            return template
    return ""


def load_hf_processor(folder: str | Path, family: str, image_token_id: int, image_seq_len: int, max_length: int,
                      config: type[ProcessorConfig] = ProcessorConfig, fixed_images: bool = True, files=None,
                      **settings) -> Processor:
    """The folder's tokenizer, image-processor settings and chat template as a whole-string vlmkit Processor of
    ``family`` (``input_ids`` equal to the family's transformers processor). ``fixed_images``: read the folder's
    fixed-size image settings (CLIP/SigLIP-style); ``settings`` are further fields of the family's processor config
    type ``config``; ``files`` the tokenizers the family keeps beside tokenizer.json."""
    tok = load_hf_tokenizer(folder)
    image_token = tok.tok.id_to_token(image_token_id)
    if image_token is None:
        raise CheckpointError(f"{folder}: the image token id {image_token_id} of config.json is not in "
                              f"tokenizer.json's vocabulary")
    if fixed_images:
        cfg, path = read_image_processor(folder)
        settings = {**image_processor_from_hf(cfg, str(path)), **settings}
    settings.setdefault("stop_tokens", read_stop_tokens(folder, tok))
    pcfg = config(family=family, image_token=image_token, image_seq_len=image_seq_len, max_length=max_length,
                  text_mode="whole", chat_template_jinja=read_chat_template(folder), pad_token=tok.pad_token,
                  eos_token=tok.eos_token, bos_token=tok.bos_token or "", **settings)
    return Processor(pcfg, tok, files)


# ---------------------------------------------------------------------------------------------- export

PIL_CODES = {v: k for k, v in PIL_RESAMPLE.items()}


def image_processor_to_hf(cfg: ProcessorConfig, image_processor_type: str = "CLIPImageProcessor") -> dict:
    """A fixed-size ProcessorConfig -> preprocessor_config.json settings (CLIP's shortest-edge resize and
    centre crop when ``shortest_edge`` is set, else a resize to height x width)."""
    h, w = cfg.image_size
    out = {"image_processor_type": image_processor_type, "do_resize": True, "resample": PIL_CODES[cfg.resample],
           "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(cfg.mean),
           "image_std": list(cfg.std), "do_convert_rgb": True}
    if cfg.shortest_edge:
        out |= {"size": {"shortest_edge": cfg.shortest_edge}, "do_center_crop": True,
                "crop_size": {"height": h, "width": w}}
    else:
        out |= {"size": {"height": h, "width": w}, "do_center_crop": False}
    return out


def export_tokenizer(processor: Processor, folder: Path) -> None:
    """tokenizer.json with the files that name its special tokens and carry the chat template, so that
    transformers' AutoTokenizer gives the same ids."""
    tok = processor.tokenizer
    tok.save(folder / "tokenizer.json")
    special = {"eos_token": tok.eos_token, "pad_token": tok.pad_token}
    if tok.bos_token:
        special["bos_token"] = tok.bos_token
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": processor.cfg.max_length,
              "clean_up_tokenization_spaces": False, **special}
    template = processor.cfg.chat_template_jinja
    if not template and processor.cfg.text_mode == "segments":  # a vlmkit-trained model: its own template
        template = processor.layout.template.to_jinja(processor.cfg.image_token)
    if template:
        (folder / "chat_template.jinja").write_text(template)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


# ------------------------------------------------------------------------------------- SigLIP's SentencePiece

SPM_UNIGRAM = 1  # sentencepiece ModelProto.TrainerSpec.model_type
SPM_USER_DEFINED = 4  # ModelProto.SentencePiece.type


@functools.cache
def _python_whitespace() -> str:
    """Every character Python's ``str.isspace`` (and so ``re``'s ``\\s``) counts as whitespace: a few more than
    Unicode's White_Space (the ASCII separators 0x1c-0x1f), which SiglipTokenizer collapses like spaces."""
    return "".join(c for c in map(chr, range(0x110000)) if c.isspace())


def _char_class(chars: str) -> str:
    return "[" + "".join(f"\\x{{{ord(c):x}}}" for c in chars) + "]"


def read_sentencepiece_model(path: Path):
    """A SentencePiece ``*.model`` file as its protobuf message (needs the packages sentencepiece, for the message
    definition, and protobuf)."""
    missing = []
    for module, package in (("sentencepiece", "sentencepiece"), ("google.protobuf", "protobuf")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise CheckpointError(f"{path}: reading a SentencePiece tokenizer (SigLIP's spiece.model) into tokenizer.json "
                              f"needs the Python package{'s' if len(missing) > 1 else ''} {' and '.join(missing)}: "
                              f"pip install {' '.join(missing)}")
    try:
        from sentencepiece import sentencepiece_model_pb2
    except Exception as e:  # a protobuf runtime too old or too new for sentencepiece's generated module
        raise CheckpointError(f"{path}: sentencepiece's model definition does not load with the installed protobuf "
                              f"({type(e).__name__}: {e}); pip install -U sentencepiece protobuf") from e
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except Exception as e:  # protobuf's DecodeError
        raise CheckpointError(f"{path}: not a SentencePiece model ({e})") from e
    return proto


def siglip_tokenizer_from_sentencepiece(path: str | Path, eos_token: str = "</s>", special: tuple[str, ...] = (),
                                        lowercase: bool = True):
    """SigLIP's SentencePiece model -> a ``tokenizers`` Tokenizer giving transformers' SiglipTokenizer's ids.

    SiglipTokenizer does more than the SentencePiece model: before encoding it canonicalises the text as
    big_vision does (``canonicalize_text``: "▁" read as a space, lowercased, ASCII punctuation removed, runs
    of whitespace -- Python's, which includes 0x1c-0x1f -- made one space, stripped) and adds the end-of-text
    token after it. The normalizer here is that canonicalisation followed by the model's own normalisation (its
    precompiled NFKC map; spaces the map creates are collapsed and stripped as SentencePiece does), then the
    pieces are found per word ("▁" + word) by the unigram model. Texts that contain the tokenizer's special
    tokens literally (``</s>``, ``<unk>``) are split at them as transformers does, but the words after one
    are not tokenised exactly as SiglipTokenizer does (it runs them through the model glued to "<unk>")."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    import string

    path = Path(path)
    proto = read_sentencepiece_model(path)
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != SPM_UNIGRAM:
        raise CheckpointError(f"{path}: trainer_spec.model_type {trainer.model_type}: only unigram SentencePiece "
                              f"models (1, SigLIP's) are converted")
    if not trainer.split_by_whitespace or trainer.treat_whitespace_as_suffix:
        raise CheckpointError(f"{path}: trainer_spec.split_by_whitespace false or treat_whitespace_as_suffix true "
                              f"is not converted (SigLIP's model splits words at whitespace, prefixing them)")
    tok = Tokenizer(models.Unigram([(p.piece, p.score) for p in proto.pieces], unk_id=trainer.unk_id,
                                   byte_fallback=trainer.byte_fallback))
    steps = [normalizers.Replace("▁", " ")]
    if lowercase:
        steps.append(normalizers.Lowercase())
    steps += [normalizers.Replace(Regex(_char_class(string.punctuation)), ""),
              normalizers.Replace(Regex(_char_class(_python_whitespace()) + "+"), " "), normalizers.Strip()]
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
        if norm.remove_extra_whitespaces:
            steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Strip()]
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    names = [t for t in dict.fromkeys((eos_token, *special)) if t]
    unknown = [t for t in names if t not in vocab]
    if unknown:
        raise CheckpointError(f"{path}: special token(s) {unknown} of the tokenizer config are not pieces of the "
                              f"model")
    user = [p.piece for p in proto.pieces if p.type == SPM_USER_DEFINED]
    if user:  # SentencePiece matches user-defined pieces in the text before segmenting
        tok.add_tokens([AddedToken(p, normalized=False, special=False) for p in user])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in names])
    eos = vocab[eos_token]
    tok.post_processor = processors.TemplateProcessing(single=f"$A {eos_token}",
                                                       pair=f"$A {eos_token} $B {eos_token}",
                                                       special_tokens=[(eos_token, eos)])
    return tok


def _tokenizer_config(folder: Path) -> dict:
    special: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        p = folder / name
        if p.is_file():
            try:
                special |= json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{p}: not valid JSON ({e})") from e
    return special


def load_hf_text_tokenizer(folder: str | Path) -> TextTokenizer:
    """A dual encoder's tokenizer as transformers loads it: SigLIP's SentencePiece ``spiece.model`` (its
    tokenizer_config.json names SiglipTokenizer, which reads that file even next to a tokenizer.json) converted
    at import (:func:`siglip_tokenizer_from_sentencepiece`); anything else from ``tokenizer.json``
    (:func:`load_hf_tokenizer`; CLIP's, as transformers 5 saves CLIPTokenizer)."""
    folder = Path(folder)
    config = _tokenizer_config(folder)
    spm = folder / "spiece.model"
    if config.get("tokenizer_class") != "SiglipTokenizer" or not spm.is_file():
        if config.get("tokenizer_class") == "SiglipTokenizer" and not (folder / "tokenizer.json").is_file():
            raise CheckpointError(f"{folder}: tokenizer_config.json names SiglipTokenizer but the folder has neither "
                                  f"its spiece.model nor a tokenizer.json")
        return load_hf_tokenizer(folder)
    eos = _token_str(config.get("eos_token")) or "</s>"
    unk = _token_str(config.get("unk_token")) or "<unk>"
    pad = _token_str(config.get("pad_token")) or eos
    extra = [_token_str(t) for t in config.get("additional_special_tokens") or []]
    tok = siglip_tokenizer_from_sentencepiece(spm, eos, (unk, pad, *[t for t in extra if t]),
                                              lowercase=bool(config.get("do_lower_case", True)))
    return TextTokenizer(tok, pad_token=pad, eos_token=eos, bos_token=None)


def swap_token_ids(tokenizer_json: dict, a: int, b: int) -> dict:
    """tokenizer.json (as a dict) with token ids ``a`` and ``b`` exchanged everywhere ids appear: the model's
    vocabulary, the added tokens, the post-processor's special tokens and the padding id."""
    out = json.loads(json.dumps(tokenizer_json))

    def swap(i):
        return b if i == a else a if i == b else i

    model = out["model"]
    vocab = model.get("vocab")
    if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel: token -> id
        model["vocab"] = {t: swap(i) for t, i in vocab.items()}
    elif isinstance(vocab, list):  # Unigram: the id is the position
        vocab[a], vocab[b] = vocab[b], vocab[a]
    else:
        raise ConfigError(f"tokenizer model {model.get('type')!r}: cannot renumber its vocabulary")
    for t in out.get("added_tokens") or []:
        t["id"] = swap(t["id"])

    def fix(proc):
        if not isinstance(proc, dict):
            return
        for key in ("sep", "cls"):  # BertProcessing / RobertaProcessing: [token, id]
            if isinstance(proc.get(key), list):
                proc[key][1] = swap(proc[key][1])
        for spec in (proc.get("special_tokens") or {}).values():  # TemplateProcessing
            spec["ids"] = [swap(i) for i in spec.get("ids", [])]
        for sub in proc.get("processors") or []:  # Sequence
            fix(sub)

    fix(out.get("post_processor"))
    if isinstance(out.get("padding"), dict) and "pad_id" in out["padding"]:
        out["padding"]["pad_id"] = swap(out["padding"]["pad_id"])
    return out


def export_text_tokenizer(processor: Processor, folder: Path, tokenizer_class: str = "PreTrainedTokenizerFast",
                          swap: tuple[int, int] | None = None, **settings) -> None:
    """A dual encoder's tokenizer as tokenizer.json, tokenizer_config.json and special_tokens_map.json, so that
    transformers' AutoTokenizer (and the family's processor) gives vlmkit's ids (renumbered by ``swap``), with
    ``model_max_length`` the processor's. No chat template: a dual encoder has none."""
    tok = processor.tokenizer
    data = json.loads(tok.tok.to_str())
    if swap is not None:
        data = swap_token_ids(data, *swap)
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    special = {"eos_token": tok.eos_token, "pad_token": tok.pad_token}
    if tok.bos_token:
        special["bos_token"] = tok.bos_token
    config = {"tokenizer_class": tokenizer_class, "model_max_length": processor.cfg.max_length,
              "clean_up_tokenization_spaces": False, **special, **settings}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
