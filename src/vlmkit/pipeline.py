"""Pipeline = load(path): chat, generate and score with one model and its Processor; embed with a dual encoder;
images <-> codes with a model that has a VQ codebook; images <-> continuous latents with an image autoencoder;
images drawn for a text prompt by a model that generates them.

The evaluation tasks, the server and the CLI all go through these methods, so a model answers the same
way everywhere. What a model can do is its family's (``Capabilities``): ``can_generate`` models chat, generate,
score and rank; ``can_embed`` models embed images and texts; ``has_image_codes`` models turn images into code grids
and code grids into pixels (``encode_codes`` / ``decode_codes``); ``has_image_latents`` models turn images into
grids of continuous latents and back (``encode_latents`` / ``decode_latents``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlmkit.batch import Batch, Encoded, Features, MediaInputs, item_key
from vlmkit.checkpoint import load_checkpoint
from vlmkit.errors import ConfigError, DataError
from vlmkit.generation import GenerationConfig, generate
from vlmkit.image_generation import ImageGenerationConfig, check_codes, image_code_logprobs, to_images


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
        self.family = processor.family
        self.last_truncated = 0
        # per request of the last chat_batch, why it failed (an endpoint backend's, eval/backends.py); a local
        # model raises instead, so it has none
        self.last_errors: list[str | None] = []

    @classmethod
    def from_pretrained(cls, path: str | Path, device="cpu") -> Pipeline:
        """A vlmkit checkpoint folder, or a Hugging Face one (converted in memory; see vlmkit.convert.hf)."""
        from vlmkit.convert.hf import is_hf_folder, load_hf

        if is_hf_folder(path):
            model, processor, cfg, meta = load_hf(path)
            return cls(model.to(device), processor, cfg, meta)
        model, processor, cfg, meta = load_checkpoint(path, device)
        return cls(model, processor, cfg, meta)

    @property
    def can_generate(self) -> bool:
        return self.family.capabilities.generate

    @property
    def can_embed(self) -> bool:
        return self.family.capabilities.embed

    @property
    def can_generate_images(self) -> bool:
        """Draws images for a text prompt (``generate_image``): a text-to-image family whose model can turn what it
        samples into pixels (Family.can_draw: an imported Chameleon has no VQ decoder)."""
        return self.family.capabilities.generate_images and self.family.can_draw(self.model)

    @property
    def can_score(self) -> bool:
        """Scores and ranks texts by their likelihood (a generative model)."""
        return self.family.capabilities.generate

    @property
    def has_image_codes(self) -> bool:
        """Turns images into grids of discrete codes and back (a VQ codebook)."""
        return self.family.capabilities.image_codes

    @property
    def has_image_latents(self) -> bool:
        """Turns images into grids of continuous latents and back (an image autoencoder: a KL-VAE)."""
        return self.family.capabilities.image_latents

    # ------------------------------------------------------------------ generation
    def _need_generative(self, what: str) -> None:
        if self.can_generate:
            return
        if self.can_embed:
            raise DataError(f"{what} needs a generative model; this is a dual encoder ({self.family.name}), which "
                            f"embeds images and texts: use embed_images() / embed_texts()")
        codes = ": it turns images into codes and back (encode_codes() / decode_codes())" if self.has_image_codes else ""
        if self.has_image_latents:
            codes = ": it turns images into latents and back (encode_latents / decode_latents)"
        if self.family.capabilities.generate_images:
            codes = ": it draws images from text (generate_image())"
        raise DataError(f"{what} needs a generative model; this {self.family.name} model does not generate text{codes}")

    def _run(self, items: list[Encoded], gen: GenerationConfig, image_keys: list[list] | None = None) -> list[str]:
        tok = self.processor.tokenizer
        features = self._shared_features(items, image_keys) if image_keys else None
        media = None if features is not None else MediaInputs.cat([e.media for e in items]).to(self.device)
        out = generate(self.model, [e.ids for e in items], media, self.processor.stop_ids, tok.pad_id, gen,
                       decode=tok.decode,
                       features=features)
        return [_cut_at_stop(tok.decode(ids), gen.stop) for ids in out]

    @torch.no_grad()
    def _shared_features(self, items: list[Encoded], image_keys: list[list]) -> Features | None:
        """Features of a batch whose requests repeat images (evaluation asks several questions about one image):
        each distinct image, read with what its prompt adds to it (InstructBLIP's instruction), through the model
        once, then gathered in the batch's reading order. None when nothing repeats."""
        singles = [single for e in items for single in e.media.split()]
        keys = [item_key(str(k), single) for k, single in zip((k for ks in image_keys for k in ks), singles)]
        if not keys or len(set(keys)) == len(keys):
            return None
        first: dict[str, MediaInputs] = {}
        for k, single in zip(keys, singles):
            first.setdefault(k, single)
        order = {k: n for n, k in enumerate(first)}
        per_image = self.model.encode_media(MediaInputs.cat(list(first.values())).to(self.device)).split()
        return Features.cat([per_image[order[k]] for k in keys])

    def chat_batch(self, requests: list[tuple[object, str]], **gen) -> list[str]:
        """[(images, question), ...] -> answers, generated as one batch with the chat template. An image given
        by the same path (or as the same image object) in several requests is read and encoded once."""
        self._need_generative("chat()")
        cfg = GenerationConfig(**gen)
        items, keys, prepared = [], [], {}
        for images, question in requests:
            images = _as_list(images)
            # the same path, or the same image object (all alive during this call), is the same image
            ks = [str(Path(im).resolve()) if isinstance(im, (str, Path)) else f"object:{id(im)}" for im in images]
            if images:
                key = tuple(ks)  # a prompt's images are prepared together (a family may lay several out jointly)
                if key not in prepared:
                    prepared[key] = self.processor.prepare_images(images)
                inputs = prepared[key]
            else:
                inputs = self.processor.prepare_images(images)
            items.append(self.processor.chat(question, inputs))
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
        return self._run([self.processor.prompt(prompt, inputs)], cfg)[0]

    # ------------------------------------------------------------------ embeddings (dual encoders)
    def _need_embeddings(self, what: str) -> None:
        if not self.can_embed:
            raise DataError(f"{what} needs a dual encoder (CLIP or SigLIP); this model is a {self.family.name} "
                            f"vision-language model, which answers with chat() / generate() / rank()")

    @torch.no_grad()
    def embed_images(self, images, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """Images (paths or PIL images) -> L2-normalised embeddings [n, E], in batches of ``batch_size``."""
        from tqdm.auto import tqdm

        self._need_embeddings("embed_images")
        images = _as_list(images)
        out = []
        for start in tqdm(range(0, len(images), batch_size), desc="embed images", unit="batch", disable=not progress,
                          dynamic_ncols=True):
            chunk = images[start:start + batch_size]
            media = self.processor.prepare_images(chunk, f"images[{start}:{start + len(chunk)}]").to(self.device)
            out.append(self.model.encode_images(media).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.embed_dim)

    @torch.no_grad()
    def embed_texts(self, texts: list[str] | str, batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """Texts -> L2-normalised embeddings [n, E]. Texts longer than the text tower's context are truncated, as
        its tokenizer truncates them; ``last_truncated`` holds how many were."""
        from tqdm.auto import tqdm

        self._need_embeddings("embed_texts")
        texts = [texts] if isinstance(texts, str) else list(texts)
        out, self.last_truncated = [], 0
        for start in tqdm(range(0, len(texts), batch_size), desc="embed texts", unit="batch", disable=not progress,
                          dynamic_ncols=True):
            ids, truncated = self.processor.encode_texts(texts[start:start + batch_size], where=f"texts[{start}:]")
            self.last_truncated += truncated
            out.append(self.model.encode_texts(ids.to(self.device)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.embed_dim)

    @torch.no_grad()
    def classifier(self, class_names: list[str], templates: list[str] | None = None) -> torch.Tensor:
        """Zero-shot class embeddings [n_classes, E] (CLIP's prompt ensembling): every template filled with each
        class name, embedded, averaged over the templates and re-normalised."""
        templates = list(templates or ["a photo of a {}."])
        texts = [t.format(c) for c in class_names for t in templates]
        z = self.embed_texts(texts).view(len(class_names), len(templates), -1).mean(dim=1)
        return torch.nn.functional.normalize(z, dim=-1)

    # ------------------------------------------------------------------ image codes (a VQ codebook)
    def _need_codes(self, what: str) -> None:
        if not self.has_image_codes:
            raise DataError(f"{what} needs a model with an image codebook (a VQ image tokenizer, family vq); this "
                            f"{self.family.name} model has none")

    @torch.no_grad()
    def encode_codes(self, images, batch_size: int = 64) -> torch.Tensor:
        """Images (paths or PIL images) -> their code grids, LongTensor [n, h, w], prepared as the processor
        prepares them (resized to the model's size, normalised)."""
        self._need_codes("encode_codes()")
        images = _as_list(images)
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            media = self.processor.prepare_images(chunk, f"images[{start}:{start + len(chunk)}]").to(self.device)
            out.append(self.model.encode_codes(media).cpu())
        return torch.cat(out) if out else torch.zeros(0, 0, 0, dtype=torch.long)

    @torch.no_grad()
    def decode_codes(self, codes) -> torch.Tensor:
        """A code grid [h, w] (rows of code ids: a tensor or nested lists) -> the decoder's output [3, H, W], before
        clamping or de-normalisation; a batch of grids [n, h, w] -> [n, 3, H, W]."""
        self._need_codes("decode_codes()")
        if not isinstance(codes, torch.Tensor):
            try:
                codes = torch.tensor(codes)
            except (TypeError, ValueError) as e:
                raise DataError(f"decode_codes(): codes must be a grid of code ids (rows of equal length): {e}") \
                    from None
        return self.model.decode_codes(codes.to(self.device)).float().cpu()

    # ------------------------------------------------------------------ image latents (an image autoencoder)
    def _need_latents(self, what: str) -> None:
        if not self.has_image_latents:
            raise DataError(f"{what} needs a model with continuous image latents (an image autoencoder, family "
                            f"vae); this {self.family.name} model has none")

    @torch.no_grad()
    def encode_latents(self, images, sample: bool = False, seed: int | None = None,
                       batch_size: int = 64) -> torch.Tensor:
        """Images (paths or PIL images) -> their latents [n, C, h, w], prepared as the processor prepares them:
        the posterior means (``sample``: posterior samples, drawn from ``seed``) times the model's scaling factor."""
        self._need_latents("encode_latents()")
        images = _as_list(images)
        gen = torch.Generator(self.device).manual_seed(seed) if sample and seed is not None else None
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            media = self.processor.prepare_images(chunk, f"images[{start}:{start + len(chunk)}]").to(self.device)
            out.append(self.model.encode_latents(media, sample=sample, generator=gen).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 0, 0, 0)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [C, h, w] (as encode_latents gives them) -> the decoder's output [3, H, W] in [-1, 1], before
        clamping or de-normalisation; a batch [n, C, h, w] -> [n, 3, H, W]."""
        self._need_latents("decode_latents()")
        if not isinstance(latents, torch.Tensor):
            raise DataError(f"decode_latents(): latents must be a float tensor [C, h, w] or [n, C, h, w], got "
                            f"{type(latents).__name__}")
        one = latents.dim() == 3
        z = (latents[None] if one else latents).to(self.device)
        out = self.model.decode_latents(z).float().cpu()
        return out[0] if one else out

    # ------------------------------------------------------------------ image generation
    def _need_image_generation(self, what: str, pixels: bool = True) -> None:
        """Refuse ``what`` unless the family draws images and, when ``pixels``, the model can make pixels."""
        if not self.family.capabilities.generate_images:
            raise DataError(f"{what} needs a model that generates images (Pipeline.can_generate_images); this "
                            f"{self.family.name} model does not")
        if pixels and not self.family.can_draw(self.model):
            raise ConfigError(f"{what}: this {self.family.name} model writes image codes but its VQ tokenizer has no "
                              f"decoder to turn them into pixels (image_code_logprobs() still scores codes)")

    @torch.no_grad()
    def generate_image(self, prompt: str, n: int = 1, cfg_scale: float = 5.0, temperature: float = 1.0,
                       top_k: int = 0, seed: int | None = None, steps: int = 0, progress: bool = False) -> list:
        """``n`` PIL images drawn for the text ``prompt`` with classifier-free guidance (``cfg_scale`` 1: none; the
        conditional and unconditional prompts run as one batch), as the family draws (Family.draw_images): an
        autoregressive model samples its image codes token by token with a KV cache (``temperature``, ``top_k``)
        and decodes them with its VQ decoder; an iterative sampler takes ``steps`` (0: the model's default). The
        same ``seed`` gives the same images."""
        self._need_image_generation("generate_image()")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError("generate_image(): prompt must be a non-empty string")
        gen = ImageGenerationConfig(n=n, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, seed=seed,
                                    steps=steps)
        gen.validate()
        grid = self.model.image_grid
        cond = self.processor.image_prompt(prompt, grid, where="generate_image()")
        uncond = self.processor.image_prompt(prompt, grid, unconditional=True) if cfg_scale != 1 else []
        return to_images(self.family.draw_images(self.model, cond, uncond, gen, progress))

    def image_code_logprobs(self, prompt: str, codes) -> list[float]:
        """The log-probability of every token of the image ``codes`` (a grid of code ids, rows of a list or a tensor
        [h, w]) after the text ``prompt`` in image-generation mode (the family adds its image-start layout), under
        teacher forcing, guidance off: the codes row by row, plus the family's row-end and image-end tokens."""
        self._need_image_generation("image_code_logprobs()", pixels=False)
        codes = check_codes(self.model, codes)
        prefix = self.processor.image_prompt(prompt, tuple(codes.shape), where="image_code_logprobs()")
        return image_code_logprobs(self.model, prefix, codes.to(self.device))

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
        enc = self.processor.continuation(prompt, continuation, self.processor.prepare_images(_as_list(images)))
        ids, start = enc.ids, enc.prompt_len
        if start == len(ids):
            return []
        if start == 0:
            raise DataError("score() needs a non-empty prompt to condition the first continuation token on")
        prompt_mask = torch.arange(len(ids), device=self.device)[None] < start  # the continuation comes after it
        batch = Batch(torch.tensor([ids], device=self.device), media=enc.media.to(self.device), prompt_mask=prompt_mask)
        logits = self.model(batch).logits[0].float()
        logp = torch.log_softmax(logits[start - 1:-1], dim=-1)  # [T_cont, V]: predictions of the continuation
        target = torch.tensor(ids[start:], device=self.device)[:, None]
        return logp.gather(-1, target).squeeze(-1).tolist()


@torch.no_grad()
def _rank(pipe: Pipeline, images, question: str, candidates: list[str], normalize: bool) -> list[float]:
    prompt = pipe.processor.chat(question, pipe.processor.prepare_images(_as_list(images)))
    conts = [pipe.processor.tokenizer.encode(c) for c in candidates]
    if not all(conts):
        raise DataError(f"rank(): candidate {candidates[[bool(c) for c in conts].index(False)]!r} has no tokens")
    n, width = len(prompt.ids), len(prompt.ids) + max(len(c) for c in conts)
    ids = torch.full((len(conts), width), pipe.processor.tokenizer.pad_id, dtype=torch.long)
    for i, c in enumerate(conts):  # right padding: causal attention never lets a real token see it
        ids[i, :n + len(c)] = torch.tensor(prompt.ids + c)
    features = None
    if len(prompt.media):  # the image(s) encoded once, one copy of their features per candidate
        features = Features.cat([pipe.model.encode_media(prompt.media.to(pipe.device))] * len(conts))
    is_prompt = (torch.arange(width)[None] < n).expand(len(conts), -1)
    batch = Batch(ids.to(pipe.device), prompt_mask=is_prompt.to(pipe.device), features=features)
    logp = torch.log_softmax(pipe.model(batch).logits.float()[:, n - 1:-1], dim=-1)  # [K, T, V]
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
