"""Image generation by an early-fusion model: a grid of VQ codes sampled token by token after a text prompt, with
classifier-free guidance, then decoded to pixels by the model's VQ decoder; and the log-probabilities of a given
grid under teacher forcing.

Shared code knows a generating model only through the interface of docs/adding-a-family.md ("Generating images"):

- ``image_grid`` (h, w); ``image_plan(h, w)``: the tokens after the prompt's image-start layout, ``None`` for each
  code (row-major) and an id where the family always writes one (Emu3's row ends, Chameleon's end of image);
- ``code_ids(codes)``: the model input ids of code ids; ``codebook_size``: how many codes there are;
- ``forward(batch, cache, logits_to_keep, head="image")``: logits whose column j stands for input id
  ``image_vocab[j]`` (Janus: its generation head over the codebook; Chameleon / Emu3: the LM head);
- ``encode_codes`` / ``decode_codes``.

Guidance: each image has a conditional row (the prompt) and an unconditional one (the family's unconditional
prompt, :meth:`PromptLayout.image_prompt`), run as one batch; the logits sampled from are
``uncond + cfg_scale * (cond - uncond)`` (Ho & Salimans 2022; Janus' and LlamaGen's form). ``cfg_scale`` 1 is no
guidance (the unconditional rows are not run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vlmkit.batch import Batch
from vlmkit.errors import ConfigError, DataError
from vlmkit.generation import left_pad


@dataclass
class ImageGenerationConfig:
    n: int = 1  # images per prompt
    cfg_scale: float = 5.0  # classifier-free guidance (1: none); Janus' default
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # sample among the k most likely codes; 0: all
    seed: int | None = None
    # the denoising or unmasking steps of an iterative sampler (continuous or discrete diffusion); 0: the model's
    # default. An autoregressive family writes one code per step and takes only 0
    steps: int = 0

    def validate(self, max_n: int = 64) -> None:
        if not 1 <= self.n <= max_n:
            raise ConfigError(f"n must be in 1..{max_n}, got {self.n}")
        if not math.isfinite(self.cfg_scale) or self.cfg_scale < 0:
            raise ConfigError(f"cfg_scale must be >= 0 (1: no guidance), got {self.cfg_scale}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0: every code), got {self.top_k}")
        if not 0 <= self.steps <= 1000:
            raise ConfigError(f"steps must be in 0..1000 (0: the model's default), got {self.steps}")


def columns_of(model, ids: torch.Tensor) -> torch.Tensor:
    """The image-head columns of model input ids ``ids`` (an error names an id the image head does not predict)."""
    vocab = model.image_vocab.to(ids.device)
    lookup = torch.full((int(max(int(vocab.max()), int(ids.max()))) + 1,), -1, dtype=torch.long, device=ids.device)
    lookup[vocab] = torch.arange(len(vocab), device=ids.device)
    cols = lookup[ids]
    if bool((cols < 0).any()):
        raise ConfigError(f"token id {int(ids[cols < 0][0])} is not one the model's image head predicts")
    return cols


def check_codes(model, codes) -> torch.Tensor:
    """``codes`` (rows of code ids: a list of lists or a tensor [h, w]) as a LongTensor, checked against the
    model's codebook."""
    try:
        codes = torch.as_tensor(codes)
    except (TypeError, ValueError) as e:
        raise DataError(f"codes must be a grid of integer code ids (rows of equal length): {e}") from None
    if codes.dim() != 2 or 0 in codes.shape or codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise DataError(f"codes must be a grid of integer code ids [h, w] (rows of equal length), got {codes.dtype} "
                        f"{list(codes.shape)}")
    size = model.codebook_size
    bad = (codes < 0) | (codes >= size)
    if bool(bad.any()):
        at = [int(i) for i in bad.nonzero()[0]]
        raise DataError(f"code {int(codes[tuple(at)])} at row {at[0]}, column {at[1]} is out of range: the codebook "
                        f"has {size} codes (0..{size - 1})")
    return codes.long()


def image_tokens(model, codes: torch.Tensor) -> list[int]:
    """The model input ids of an image's code grid [h, w] as the family writes it after the image-start layout."""
    h, w = codes.shape
    code_ids = model.code_ids(codes.reshape(-1)).tolist()
    it = iter(code_ids)
    return [next(it) if t is None else t for t in model.image_plan(h, w)]


@torch.no_grad()
def image_code_logprobs(model, prefix: list[int], codes: torch.Tensor) -> list[float]:
    """The log-probability of every token of the image after ``prefix`` (the prompt in image-generation mode,
    ending with the image-start layout), under teacher forcing, guidance off: the codes row by row plus the
    family's row-end and image-end tokens, each normalised over the image head's columns."""
    device = next(model.parameters()).device
    tokens = image_tokens(model, codes)
    ids = torch.tensor([prefix + tokens], dtype=torch.long, device=device)
    logits = model(Batch(ids), head="image").logits[0, len(prefix) - 1:-1]  # [len(tokens), C]
    logp = torch.log_softmax(logits.float(), dim=-1)
    cols = columns_of(model, torch.tensor(tokens, device=device))
    return logp.gather(-1, cols[:, None])[:, 0].tolist()


def sample_top_k(logits: torch.Tensor, temperature: float, top_k: int, generator=None) -> torch.Tensor:
    """logits [B, K] -> indices [B]: greedy at temperature 0, else sampled among the ``top_k`` best (0: all)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_codes(model, cond: list[int], uncond: list[int], gen: ImageGenerationConfig,
                   grid: tuple[int, int] | None = None, progress: bool = False) -> torch.Tensor:
    """``gen.n`` code grids [n, h, w] for the prompt ids ``cond`` (``uncond``: the unconditional prompt's, read when
    ``gen.cfg_scale`` != 1), sampled with a KV cache; deterministic for a seed."""
    from tqdm.auto import tqdm

    gen.validate()
    device = next(model.parameters()).device
    h, w = grid or model.image_grid
    plan = model.image_plan(h, w)
    guided = gen.cfg_scale != 1.0
    rows = [cond] * gen.n + ([uncond] * gen.n if guided else [])
    ids, attn = left_pad(rows, 0)
    ids, attn = ids.to(device), attn.to(device)
    generator = torch.Generator(device=device).manual_seed(gen.seed) if gen.seed is not None else None
    code_cols = columns_of(model, model.code_ids(torch.arange(model.codebook_size, device=device)))
    cache = model.new_cache(len(rows), ids.shape[1] + len(plan), device)
    out = model(Batch(ids, attention_mask=attn), cache=cache, logits_to_keep=1, head="image")
    codes = []
    for step, forced in enumerate(tqdm(plan, desc="generate-image", unit="token", disable=not progress,
                                       dynamic_ncols=True, leave=False)):
        if forced is None:
            logits = out.logits[:, -1, code_cols]
            if guided:
                logits = logits[gen.n:] + gen.cfg_scale * (logits[:gen.n] - logits[gen.n:])
            k = sample_top_k(logits, gen.temperature, gen.top_k, generator)
            codes.append(k)
            nxt = model.code_ids(k)
        else:
            nxt = torch.full((gen.n,), forced, dtype=torch.long, device=device)
        if step == len(plan) - 1:
            break
        nxt = torch.cat([nxt, nxt]) if guided else nxt
        attn = torch.cat([attn, torch.ones(len(rows), 1, dtype=attn.dtype, device=device)], dim=1)
        out = model(Batch(nxt[:, None], attention_mask=attn), cache=cache, logits_to_keep=1, head="image")
    return torch.stack(codes, dim=1).view(gen.n, h, w)


def draw_autoregressive(model, cond: list[int], uncond: list[int], gen: ImageGenerationConfig,
                        progress: bool = False) -> torch.Tensor:
    """Pixels [n, 3, H, W] in [-1, 1]: codes sampled token by token (:func:`generate_codes`), decoded by the model's
    VQ decoder. ``gen.steps`` other than 0 is refused: such a model writes one code per step."""
    if gen.steps:
        raise ConfigError(f"steps={gen.steps}: this model draws its codes one at a time (autoregressively), so it "
                          f"takes no step count; leave steps at 0 (steps is for diffusion and mask-predict samplers)")
    return model.decode_codes(generate_codes(model, cond, uncond, gen, model.image_grid, progress))


def check_ode_sampling(gen: ImageGenerationConfig, family: str) -> None:
    """Refuse ``temperature`` and ``top_k`` for a family that draws by integrating a flow ODE (Transfusion, latent
    diffusion): they mean nothing to deterministic Euler steps from the seed's noise, and a user who set them would
    believe they changed the images."""
    if gen.temperature != 1.0 or gen.top_k != 0:
        raise ConfigError(f"temperature and top_k do not apply to {family}'s sampler (deterministic Euler steps "
                          f"of the flow ODE from the seed's noise); leave them at 1.0 and 0, got {gen.temperature} "
                          f"and {gen.top_k} (steps, cfg_scale and seed are what it reads)")


def to_images(pixels: torch.Tensor) -> list:
    """VQ decoder outputs [n, 3, H, W] in [-1, 1] (VQGAN's convention, which Janus, Emu3 and vlmkit's VQ keep) ->
    PIL images."""
    from PIL import Image

    arr = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


__all__ = ["ImageGenerationConfig", "check_codes", "check_ode_sampling", "columns_of", "draw_autoregressive", "generate_codes",
           "image_code_logprobs", "image_tokens",
           "sample_top_k", "to_images"]
