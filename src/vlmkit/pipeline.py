"""Pipeline = load(path): chat, generate and score with one model and its Processor; embed with a dual encoder.

The evaluation tasks, the server and the CLI all go through these methods, so a model answers the same
way everywhere.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlmkit.checkpoint import load_checkpoint
from vlmkit.errors import DataError
from vlmkit.generation import GenerationConfig, generate
from vlmkit.processing.image import ImageInputs


def _as_list(images) -> list:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


class Pipeline:
    def __init__(self, model, processor, config=None, meta: dict | None = None):
        self.model = model.eval()
        self.processor = processor
        self.config = config
        self.meta = meta or {}
        self.device = next(model.parameters()).device

    @classmethod
    def from_pretrained(cls, path: str | Path, device="cpu") -> Pipeline:
        """A vlmkit checkpoint folder, or a Hugging Face one (converted in memory; see vlmkit.convert.hf)."""
        from vlmkit.convert.hf import is_hf_folder, load_hf

        if is_hf_folder(path):
            model, processor, cfg, meta = load_hf(path)
            return cls(model.to(device), processor, cfg, meta)
        model, processor, cfg, meta = load_checkpoint(path, device)
        return cls(model, processor, cfg, meta)

    # ------------------------------------------------------------------ generation
    def _need_generative(self, what: str) -> None:
        if self.is_dual_encoder:
            raise DataError(f"{what} needs a generative model; this is a dual encoder ({self.config.family}), which "
                            f"embeds images and texts: use embed_images() / embed_texts()")

    def _run(self, items: list[tuple[ImageInputs, list[int]]], gen: GenerationConfig,
             image_keys: list[list] | None = None) -> list[str]:
        self._need_generative("chat() / generate()")
        tok = self.processor.tokenizer
        features = self._shared_features(items, image_keys) if image_keys else None
        pixel_values = None if features is not None else ImageInputs.cat([imgs for imgs, _ in items]).to(self.device)
        out = generate(self.model, [ids for _, ids in items], pixel_values, tok.eos_id, tok.pad_id, gen,
                       decode=tok.decode, image_features=features)
        texts = [tok.decode(ids) for ids in out]
        return [_cut_at_stop(t, gen.stop) for t in texts]

    @torch.no_grad()
    def _shared_features(self, items: list[tuple[ImageInputs, list[int]]], image_keys: list[list]):
        """Features of a batch whose requests repeat images (evaluation asks several questions about one image):
        each distinct image through the tower once, then gathered in the batch's reading order. Only for
        fixed-size images, whose features are one [M, D] block per image, and that depend on nothing else (not
        InstructBLIP's, which read each prompt's instruction from ``extra``); None otherwise."""
        keys = [k for ks in image_keys for k in ks]
        if self.processor.cfg.image_processor != "fixed" or len(set(keys)) == len(keys) or not keys \
                or any(imgs.extra for imgs, _ in items):
            return None
        first = {}
        singles = [ImageInputs(imgs.pixel_values[i:i + 1], imgs.tokens[i:i + 1])
                   for imgs, _ in items for i in range(len(imgs))]
        for k, single in zip(keys, singles):
            first.setdefault(k, single)
        order = {k: n for n, k in enumerate(first)}
        feats = self.model.encode_images(ImageInputs.cat(list(first.values())).to(self.device))
        if not isinstance(feats, torch.Tensor) or feats.ndim != 3:
            return None
        return feats[torch.tensor([order[k] for k in keys], device=feats.device)]

    def chat_batch(self, requests: list[tuple[object, str]], **gen) -> list[str]:
        """[(images, question), ...] -> answers, generated as one batch with the chat template. An image given
        by the same path in several requests is read and encoded once."""
        self._need_generative("chat()")
        cfg = GenerationConfig(**gen)
        items, keys, prepared = [], [], {}
        for images, question in requests:
            images = _as_list(images)
            ks = [str(Path(im).resolve()) if isinstance(im, (str, Path)) else id(im) for im in images]
            if all(isinstance(k, str) for k in ks) and images:
                for k, im in zip(ks, images):
                    if k not in prepared:
                        prepared[k] = self.processor.prepare_images([im])
                inputs = ImageInputs.cat([prepared[k] for k in ks])
            else:
                inputs = self.processor.prepare_images(images)
            items.append((inputs, self.processor.encode_chat_prompt(question, inputs)))
            keys.append(ks)
        return self._run(items, cfg, keys)

    def chat(self, images, question: str, **gen) -> str:
        """Answer ``question`` about ``images`` with the model's chat template.

        Without placeholders in the question, the images go in front of it.
        """
        return self.chat_batch([(images, question)], **gen)[0]

    def generate(self, images, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None) -> str:
        """Continue a raw ``prompt`` (no template); each image placeholder in it marks an image."""
        self._need_generative("generate()")
        inputs = self.processor.prepare_images(_as_list(images))
        cfg = GenerationConfig(max_new_tokens, temperature, top_p, list(stop or []), seed)
        return self._run([(inputs, self.processor.encode_prompt(prompt, inputs))], cfg)[0]

    # ------------------------------------------------------------------ embeddings (dual encoders)
    @property
    def is_dual_encoder(self) -> bool:
        return bool(getattr(self.model, "is_dual_encoder", False))

    def _need_dual_encoder(self, what: str) -> None:
        if not self.is_dual_encoder:
            family = getattr(self.config, "family", type(self.model).__name__)
            raise DataError(f"{what} needs a dual encoder (CLIP or SigLIP); this model is a {family} "
                            f"vision-language model, which answers with chat() / generate() / rank()")

    @torch.no_grad()
    def embed_images(self, images, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """Images (paths or PIL images) -> L2-normalised embeddings [n, E], in batches of ``batch_size``."""
        from tqdm.auto import tqdm

        self._need_dual_encoder("embed_images")
        images = _as_list(images)
        out = []
        for start in tqdm(range(0, len(images), batch_size), desc="embed images", unit="batch", disable=not progress,
                          dynamic_ncols=True):
            chunk = images[start:start + batch_size]
            where = f"images[{start}:{start + len(chunk)}]"
            pixels = self.processor.preprocess_images(chunk, where).to(self.device)
            out.append(self.model.encode_images(pixels).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.cfg.contrastive.embed_dim)

    @torch.no_grad()
    def embed_texts(self, texts: list[str] | str, batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """Texts -> L2-normalised embeddings [n, E]. Texts longer than the text tower's context are truncated, as
        its tokenizer truncates them; ``last_truncated`` holds how many were."""
        from tqdm.auto import tqdm

        self._need_dual_encoder("embed_texts")
        texts = [texts] if isinstance(texts, str) else list(texts)
        out, self.last_truncated = [], 0
        for start in tqdm(range(0, len(texts), batch_size), desc="embed texts", unit="batch", disable=not progress,
                          dynamic_ncols=True):
            ids, truncated = self.processor.encode_texts(texts[start:start + batch_size],
                                                         where=f"texts[{start}:]")
            self.last_truncated += truncated
            out.append(self.model.encode_texts(ids.to(self.device)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.cfg.contrastive.embed_dim)

    @torch.no_grad()
    def classifier(self, class_names: list[str], templates: list[str] | None = None) -> torch.Tensor:
        """Zero-shot class embeddings [n_classes, E] (CLIP's prompt ensembling): every template filled with each
        class name, embedded, averaged over the templates and re-normalised."""
        templates = list(templates or ["a photo of a {}."])
        texts = [t.format(c) for c in class_names for t in templates]
        z = self.embed_texts(texts).view(len(class_names), len(templates), -1).mean(dim=1)
        return torch.nn.functional.normalize(z, dim=-1)

    # ------------------------------------------------------------------ scoring
    def rank(self, images, question: str, candidates: list[str], normalize: bool = True) -> list[float]:
        """Log-likelihood of each candidate as the model's reply to ``question`` about ``images`` (through the
        chat template, as chat() asks): per token when ``normalize`` (comparable across lengths), else summed.
        All candidates in one forward pass with the images encoded once; zero-shot classification and
        retrieval with a generative model rank by it. Candidates are tokenised on their own."""
        self._need_generative("rank()")
        return _rank(self, images, question, candidates, normalize)

    @torch.no_grad()
    def score(self, images, prompt: str, continuation: str) -> list[float]:
        """Per-token log-probabilities of ``continuation`` given ``images`` and the raw ``prompt``.

        The prompt is text as the model's processor takes it, with its image placeholders; the continuation's
        tokens are those that follow the prompt's when the two are tokenised together (segment-mode
        processors append the continuation's own tokens). PaliGemma scores its processor's ``suffix``: the
        continuation tokenised on its own plus EOS, whose log-probability is the last value (as its labels)."""
        self._need_generative("score()")
        inputs = self.processor.prepare_images(_as_list(images))
        ids, start = self.processor.encode_score(prompt, continuation, inputs)
        if start == len(ids):
            return []
        if start == 0:
            raise DataError("score() needs a non-empty prompt to condition the first continuation token on")
        # a prefix-LM (PaliGemma) attends bidirectionally over the prompt and causally over the continuation
        kw = {"prefix_len": start} if getattr(self.model, "prefix_lm", False) else {}
        logits = self.model(torch.tensor([ids], device=self.device), inputs.to(self.device), **kw).logits[0].float()
        logp = torch.log_softmax(logits[start - 1:-1], dim=-1)  # [T_cont, V]: predictions of the continuation
        target = torch.tensor(ids[start:], device=self.device)[:, None]
        return logp.gather(-1, target).squeeze(-1).tolist()


@torch.no_grad()
def _rank(pipe: Pipeline, images, question: str, candidates: list[str], normalize: bool) -> list[float]:
    inputs = pipe.processor.prepare_images(_as_list(images))
    prompt = pipe.processor.encode_chat_prompt(question, inputs)
    conts = [pipe.processor.tokenizer.encode(c) for c in candidates]
    if not all(conts):
        raise DataError(f"rank(): candidate {candidates[[bool(c) for c in conts].index(False)]!r} has no tokens")
    width = len(prompt) + max(len(c) for c in conts)
    ids = torch.full((len(conts), width), pipe.processor.tokenizer.pad_id, dtype=torch.long)
    for i, c in enumerate(conts):  # right padding: causal attention never lets a real token see it
        ids[i, :len(prompt) + len(c)] = torch.tensor(prompt + c)
    model = pipe.model
    kw = {"prefix_len": len(prompt)} if getattr(model, "prefix_lm", False) else {}
    if len(inputs):
        feats = model.encode_images(inputs.to(pipe.device))
        if isinstance(feats, torch.Tensor):  # one copy of the image's features per candidate
            kw["image_features"] = feats.repeat(len(conts), *([1] * (feats.ndim - 1)))
        else:  # features that carry layout (Qwen2-VL's grids): encode per row
            kw["pixel_values"] = ImageInputs.cat([inputs] * len(conts)).to(pipe.device)
    logits = model(ids.to(pipe.device), **kw).logits.float()  # [K, T, V]
    logp = torch.log_softmax(logits[:, len(prompt) - 1:-1], dim=-1)
    out = []
    for i, c in enumerate(conts):
        tok = logp[i, :len(c)].gather(-1, torch.tensor(c, device=logp.device)[:, None]).sum()
        out.append(float(tok) / (len(c) if normalize else 1))
    return out


def _cut_at_stop(text: str, stop: list[str]) -> str:
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]
