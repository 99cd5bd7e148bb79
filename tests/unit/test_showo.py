"""Show-o (models/showo.py, families/showo.py) and the mask-predict sampler (mask_predict.py): the masking hook
against the schedule's draw, the loss against a hand computation from the model's own logits, omni-attention
through the model (text never sees a later image, an image sees itself whole, packed equals alone), the sampler's
schedule, fixed codes, seeds and guidance with a stub model, the layout, and the refusals."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from vlmkit.batch import IGNORE, Batch
from vlmkit.config import apply_overrides
from vlmkit.errors import ConfigError
from vlmkit.family import get_family
from vlmkit.mask_predict import guide, masked_after, training_mask, unmask
from vlmkit.models.showo import ShowoConfig, ShowoGenConfig
from vlmkit.models.vq import VQConfig
from vlmkit.pipeline import Pipeline
from vlmkit.presets import get_preset

pytestmark = pytest.mark.usefixtures("single_thread")

TEXTS = ["a red circle left of a blue square", "what colour is the circle", "two green triangles", "a star"] * 30


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    torch.manual_seed(0)
    p, fam = get_preset("tiny-showo"), get_family("showo")
    cfg, model, processor = fam.new_model(p.model, p.processor, fam.new_tokenizer(TEXTS, 300))
    return Pipeline(model.eval(), processor, cfg)


def image_ids(model, seed: int = 0) -> list[int]:
    """A random image's tokens as the unified objective writes them: h*w code ids, then <|eoi|>."""
    g = torch.Generator().manual_seed(seed)
    h, w = model.image_grid
    codes = torch.randint(0, model.codebook_size, (h * w,), generator=g)
    return model.code_ids(codes).tolist() + [model.eoi_token_id]


# ------------------------------------------------------------------------------------------------ the masking hook


def test_masking_hook_follows_the_schedule_draw_and_labels_only_masked_codes(pipe):
    fam, model = get_family("showo"), pipe.model
    tokens = image_ids(model)
    n = len(tokens) - 1
    shares = []
    for seed in range(40):
        inputs, labels = fam.t2i_training_tokens(model, tokens, random.Random(seed))
        again = fam.t2i_training_tokens(model, tokens, random.Random(seed))
        assert (inputs, labels) == again  # deterministic for a seed
        masked = [i for i, t in enumerate(inputs) if t == model.mask_id]
        u = random.Random(seed).random()  # the hook's first draw is the schedule's u
        assert len(masked) == max(1, math.ceil(math.cos(math.pi / 2 * u) * n))
        assert [i for i, t in enumerate(labels) if t != IGNORE] == masked
        assert all(labels[i] == tokens[i] for i in masked)  # the original code at its own position
        assert all(inputs[i] == tokens[i] for i in range(len(tokens)) if i not in masked)
        assert inputs[-1] == model.eoi_token_id and labels[-1] == IGNORE
        shares.append(len(masked) / n)
    # the share is cos(pi/2 u), u uniform: its mean is 2/pi
    assert abs(sum(shares) / len(shares) - 2 / math.pi) < 0.12
    other = fam.t2i_training_tokens(model, tokens, random.Random(1))
    assert other != fam.t2i_training_tokens(model, tokens, random.Random(2))


def test_autoregressive_families_hook_is_the_identity():
    tokens = [5, 9, 700, 701, 3]
    for name in ("janus", "chameleon", "emu3"):
        rng = random.Random(0)
        assert get_family(name).t2i_training_tokens(None, tokens, rng) == (tokens, tokens)
        assert rng.random() == random.Random(0).random()  # it draws nothing


def test_training_mask_is_within_bounds():
    for seed in range(20):
        pos = training_mask(7, random.Random(seed))
        assert 1 <= len(pos) <= 7 and pos == sorted(set(pos)) and all(0 <= p < 7 for p in pos)


# ------------------------------------------------------------------------------------------------ the loss


def test_image_loss_is_the_cross_entropy_at_masked_positions(pipe):
    fam, model, proc = get_family("showo"), pipe.model, pipe.processor
    prompt = proc.image_prompt("a red circle", model.image_grid)
    inputs, targets = fam.t2i_training_tokens(model, image_ids(model, 1), random.Random(3))
    text = proc.tokenizer.encode("two green triangles")
    ids = torch.tensor([prompt + inputs + text])
    labels = torch.tensor([[IGNORE] * len(prompt) + targets + text])
    out = model(Batch(ids, labels=labels))
    V = model.vocab_size
    code_logits = model(Batch(ids), head="image").logits[0]  # [T, K]
    lm_logits = model.lm.lm_head(model.lm(model.embed(ids, None), mask=model.attention(Batch(ids))))[0]
    at = [i for i, t in enumerate(labels[0].tolist()) if t >= V]
    assert at and all(ids[0, i] == model.mask_id for i in at)
    image = F.cross_entropy(code_logits[at], labels[0, at] - V, reduction="sum")
    t_at = [i for i, t in enumerate(labels[0].tolist()) if 0 <= t < V]  # next-token: predicted one earlier
    text_sum = F.cross_entropy(lm_logits[[i - 1 for i in t_at]][:, :V], labels[0, t_at], reduction="sum")
    assert out.parts["image"][1] == len(at) and out.parts["text"][1] == len(t_at) == len(text)
    torch.testing.assert_close(out.parts["image"][0], image)
    torch.testing.assert_close(out.parts["text"][0], text_sum)
    torch.testing.assert_close(out.loss, (image + text_sum) / (len(at) + len(t_at)))
    # the code logits are the LM head's code columns
    torch.testing.assert_close(code_logits, lm_logits[:, V:V + model.codebook_size])


def test_text_head_never_writes_a_code_or_the_mask(pipe):
    model = pipe.model
    ids = torch.tensor([pipe.processor.tokenizer.encode("a red circle")])
    logits = model(Batch(ids)).logits
    assert int(logits[0, -1].argmax()) < model.vocab_size
    assert bool((logits[..., model.vocab_size:] == torch.finfo(logits.dtype).min).all())


# ------------------------------------------------------------------------------------------------ omni-attention


def sequence(pipe, grid_a: list[int], grid_b: list[int]) -> tuple[list[int], range, range, range]:
    """text, image a, text, image b: ids and where the first text, image a and image b are."""
    tok, model = pipe.processor.tokenizer, pipe.model
    t1, t2 = tok.encode("a red circle"), tok.encode("two green triangles")
    ids = t1 + grid_a + [model.eoi_token_id] + t2 + grid_b + [model.eoi_token_id]
    a0, b0 = len(t1), len(t1) + len(grid_a) + 1 + len(t2)
    return ids, range(len(t1)), range(a0, a0 + len(grid_a)), range(b0, b0 + len(grid_b))


def logits_of(model, ids: list[int]) -> torch.Tensor:
    return model(Batch(torch.tensor([ids])), head="image").logits[0]


def test_text_never_sees_a_later_image_and_an_image_sees_itself_whole(pipe):
    model = pipe.model
    a, b = image_ids(model, 1)[:-1], image_ids(model, 2)[:-1]
    ids, text, img_a, img_b = sequence(pipe, a, b)
    base = logits_of(model, ids)
    # a different later image: nothing before it changes
    ids_b, *_ = sequence(pipe, a, [model.mask_id] * len(b))
    other = logits_of(model, ids_b)
    torch.testing.assert_close(other[:img_b.start], base[:img_b.start], rtol=0, atol=0)
    assert (other[img_b] - base[img_b]).abs().amax(-1).min() > 1e-6
    # the last code of image a changed: every position of image a changes, the text before it does not
    changed = list(a)
    changed[-1] = model.mask_id
    ids_a, *_ = sequence(pipe, changed, b)
    moved = logits_of(model, ids_a)
    torch.testing.assert_close(moved[text], base[text], rtol=0, atol=0)
    assert (moved[img_a] - base[img_a]).abs().amax(-1).min() > 1e-6


def test_a_packed_batch_equals_the_samples_alone(pipe):
    model = pipe.model
    one, *_ = sequence(pipe, image_ids(model, 1)[:-1], image_ids(model, 2)[:-1])
    one = one[:-1]  # ends in an image, and the next sample starts with one: two blocks side by side
    two = [model.mask_id] * 256 + [model.eoi_token_id] + pipe.processor.tokenizer.encode("a star")
    ids = torch.tensor([one + two])
    docs = torch.tensor([[0] * len(one) + [1] * len(two)])
    pos = torch.tensor([list(range(len(one))) + list(range(len(two)))])
    packed = model(Batch(ids, position_ids=pos, document_ids=docs), head="image").logits[0]
    torch.testing.assert_close(packed[:len(one)], logits_of(model, one), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[len(one):], logits_of(model, two), rtol=1e-5, atol=1e-5)


def test_reading_an_image_puts_its_codes_in_one_bidirectional_block(pipe):
    """A chat prompt reads the image as <|mmu|> <|soi|> placeholders <|eoi|>; the model's features are the embeddings
    of the VQ's codes, and the logits equal those of the code ids written in place of the placeholders."""
    from PIL import Image

    model, proc = pipe.model, pipe.processor
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    enc = proc.chat([{"role": "user", "content": "<image>\nWhat colour?"}], proc.prepare_images([image]))
    tok = proc.tokenizer
    k = enc.ids.index(tok.token_id("<|soi|>"))
    assert enc.ids[k - 1] == tok.token_id("<|mmu|>") and enc.ids[k + 257] == tok.token_id("<|eoi|>")
    read = model(Batch(torch.tensor([enc.ids]), media=enc.media), head="image").logits[0]
    codes = model.code_ids(model.encode_codes(enc.media).reshape(-1)).tolist()
    written = list(enc.ids)
    written[k + 1:k + 257] = codes
    torch.testing.assert_close(read, logits_of(model, written), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ the sampler


def stub(K: int = 6, n: int = 2, seed: int = 0, calls: list | None = None):
    """logits_of for ``n`` images (2n rows): random fixed logits per row and position, independent of the codes."""
    def fn(codes, masked):
        if calls is not None:
            calls.append(masked.clone())
        g = torch.Generator().manual_seed(seed)
        return torch.randn(2 * n, codes.shape[1], K, generator=g) * 2
    return fn


@pytest.mark.parametrize("steps", [1, 4, 12])
def test_unmasking_follows_the_cosine_schedule_and_keeps_fixed_codes(steps):
    N, trace = 37, []
    codes = unmask(stub(), 2, N, steps, cfg_scale=3.0, temperature=1.0, seed=0, trace=trace)
    counts = [int(m.sum(1)[0]) for _, m in trace]
    assert counts == [masked_after(s, steps, N) for s in range(steps)]
    assert counts[-1] == 0 and all(int(m.sum(1)[1]) == c for (_, m), c in zip(trace, counts))
    expect = [math.floor(N * math.cos(math.pi / 2 * (s + 1) / steps)) for s in range(steps - 1)] + [0]
    assert counts == expect
    for (c0, m0), (c1, _) in zip(trace, trace[1:]):
        assert torch.equal(c1[~m0], c0[~m0])  # a code fixed at a step never changes
    assert torch.equal(trace[-1][0], codes)


def test_same_seed_same_codes_other_seed_different():
    a = unmask(stub(), 2, 64, 6, 3.0, 1.0, seed=5)
    assert torch.equal(a, unmask(stub(), 2, 64, 6, 3.0, 1.0, seed=5))
    assert not torch.equal(a, unmask(stub(), 2, 64, 6, 3.0, 1.0, seed=6))


def test_guidance_combines_cond_and_uncond_as_the_formula():
    cond, uncond = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    both = torch.cat([cond, uncond])
    torch.testing.assert_close(guide(both, 2, 4.0), uncond + 4.0 * (cond - uncond))
    torch.testing.assert_close(guide(both, 2, 1.0), cond)
    # greedy, one step: every code is the argmax of the guided logits; the unconditional rows are read
    codes = unmask(lambda c, m: both, 2, 5, 1, cfg_scale=4.0, temperature=0.0)
    assert torch.equal(codes, (uncond + 4.0 * (cond - uncond)).argmax(-1))
    assert not torch.equal(codes, cond.argmax(-1))  # (a check that guidance changed something here)


def test_each_step_reads_the_grid_with_the_masks_still_unknown():
    calls = []
    unmask(stub(calls=calls), 2, 20, 5, 3.0, 1.0, seed=0)
    assert len(calls) == 5 and bool(calls[0].all())
    assert [int(m[0].sum()) for m in calls[1:]] == [masked_after(s, 5, 20) for s in range(4)]


# ------------------------------------------------------------------------------------------------ drawing, refusals


def test_draw_images_is_deterministic_for_a_seed_and_takes_steps(pipe):
    a = pipe.generate_image("a red circle", n=2, seed=0, steps=3)
    b = pipe.generate_image("a red circle", n=2, seed=0, steps=3)
    assert [im.size for im in a] == [(64, 64)] * 2
    assert [im.tobytes() for im in a] == [im.tobytes() for im in b]
    c = pipe.generate_image("a red circle", n=2, seed=1, steps=3)
    assert [im.tobytes() for im in a] != [im.tobytes() for im in c]


def test_layout_of_the_text_to_image_prompts(pipe):
    proc, tok = pipe.processor, pipe.processor.tokenizer
    cond = proc.image_prompt("a red circle", pipe.model.image_grid)
    uncond = proc.image_prompt("a red circle", pipe.model.image_grid, unconditional=True)
    t2i, soi = tok.token_id("<|t2i|>"), tok.token_id("<|soi|>")
    assert cond == [t2i] + tok.encode("a red circle") + [soi]
    assert uncond == [t2i, soi]
    assert pipe.model.image_plan(16, 16) == [None] * 256 + [tok.token_id("<|eoi|>")]


def test_refusals_name_the_option(pipe):
    base = get_preset("tiny-showo").model
    with pytest.raises(ConfigError, match="model.foo"):
        apply_overrides(base, {"foo": 1}, root="model")
    with pytest.raises(ConfigError, match=r"model.gen.steps must be in 1\.\.1000"):
        apply_overrides(base, {"gen.steps": 0}, root="model")
    with pytest.raises(ConfigError, match="model.gen.vq.decoder must be true"):
        ShowoConfig(lm=base.lm, gen=ShowoGenConfig(vq=VQConfig(decoder=False)), text_vocab=1024)
    with pytest.raises(ConfigError, match="model.lm.vocab_size must be the text vocabulary"):
        apply_overrides(base, {"lm.vocab_size": 1024}, root="model")
    with pytest.raises(ConfigError, match=r"steps must be in 0\.\.256 for this model"):
        pipe.generate_image("a red circle", steps=257)
    with pytest.raises(ConfigError, match=r"steps must be in 0\.\.1000"):
        pipe.generate_image("a red circle", steps=1001)
