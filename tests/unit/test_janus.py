"""The native Janus model and the shared image-generation path: the two-head loss against hand computation, cached
guided sampling against a from-scratch recomputation, seeded determinism, teacher-forced log-probs against the
sampler's own step distributions, the unconditional prompt, text-to-image pairs, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlmkit.batch import Batch
from vlmkit.errors import ConfigError, DataError
from vlmkit.family import get_family
from vlmkit.image_generation import ImageGenerationConfig, generate_codes, image_tokens
from vlmkit.models.janus import code_runs, two_head_loss
from vlmkit.pipeline import Pipeline
from vlmkit.presets import get_preset

pytestmark = pytest.mark.usefixtures("single_thread")

TEXTS = ["a red circle left of a blue square", "what colour is the circle", "two green triangles", "a star"] * 30


def _pipe(pos_embed: str) -> Pipeline:
    torch.manual_seed(0)
    p = get_preset("tiny-janus")
    p.model.gen.pos_embed = pos_embed
    fam = get_family("janus")
    cfg, model, processor = fam.new_model(p.model, p.processor, fam.new_tokenizer(TEXTS, 300))
    if pos_embed == "grid":  # large enough that a wrong place changes the greedy codes
        for table in (model.generation_rows, model.generation_cols):
            torch.nn.init.normal_(table.weight, std=1.0)
    return Pipeline(model.eval(), processor, cfg)


@pytest.fixture(scope="module", params=["none", "grid"])
def pipe(request) -> Pipeline:
    return _pipe(request.param)


def test_two_head_loss_sums_each_modality_through_its_own_head():
    torch.manual_seed(0)
    V, K, D = 7, 5, 4
    text_head, image_head = torch.nn.Linear(D, V), torch.nn.Linear(D, K)
    hidden = torch.randn(2, 4, D)
    labels = torch.tensor([[-100, 3, V + 2, V + 4], [-100, -100, 1, V]])
    out = two_head_loss(hidden, labels, V, text_head, image_head)
    # targets at positions 1..3 are predicted from the states before them
    h_text = torch.stack([hidden[0, 0], hidden[1, 1]])
    h_img = torch.stack([hidden[0, 1], hidden[0, 2], hidden[1, 2]])
    text = F.cross_entropy(text_head(h_text), torch.tensor([3, 1]), reduction="sum")
    image = F.cross_entropy(image_head(h_img), torch.tensor([2, 4, 0]), reduction="sum")
    assert out.parts["text"][1] == 2 and out.parts["image"][1] == 3 and out.n_tokens == 5
    torch.testing.assert_close(out.parts["text"][0], text)
    torch.testing.assert_close(out.parts["image"][0], image)
    torch.testing.assert_close(out.loss, (text + image) / 5)


def _recomputed_codes(model, cond, uncond, n_codes, scale):
    """Greedy guided codes, every step recomputed from the whole sequence (no cache, one row at a time)."""
    seqs = [list(cond), list(uncond)]
    out = []
    for _ in range(n_codes):
        logits = [model(Batch(torch.tensor([s])), head="image").logits[0, -1] for s in seqs]
        guided = logits[1] + scale * (logits[0] - logits[1])
        k = int(guided.argmax())
        out.append(k)
        for s in seqs:
            s.append(int(model.code_ids(torch.tensor(k))))
    return out


def test_cached_guided_greedy_codes_equal_a_recomputation_without_cache(pipe):
    model, layout = pipe.model, pipe.processor
    cond = layout.image_prompt("a red circle", model.image_grid)
    uncond = layout.image_prompt("a red circle", model.image_grid, unconditional=True)
    assert len(uncond) == len(cond) and uncond[-1] == cond[-1] and set(uncond[:-1]) == {layout.tokenizer.pad_id}
    gen = ImageGenerationConfig(n=2, cfg_scale=3.0, temperature=0.0)
    codes = generate_codes(model, cond, uncond, gen)
    h, w = model.image_grid
    assert codes.shape == (2, h, w) and torch.equal(codes[0], codes[1])
    assert codes[0].flatten().tolist() == _recomputed_codes(model, cond, uncond, h * w, 3.0)
    if model._grid_pos:  # the places matter: without them the codes differ
        rows = model.generation_rows.weight.data.clone()
        model.generation_rows.weight.data.zero_()
        try:
            assert generate_codes(model, cond, uncond, gen)[0].tolist() != codes[0].tolist()
        finally:
            model.generation_rows.weight.data.copy_(rows)


def test_code_runs_index_each_code_in_its_run_across_packing_padding_and_cached_steps():
    is_code = torch.tensor([[0, 1, 1, 1, 0, 1, 1], [1, 1, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)

    def reference(row, carry):
        out, run = [], carry
        for c in row:
            run = run + 1 if c else 0
            out.append(run - 1 if c else 0)
        return out, run

    for carried in (None, torch.tensor([0, 5, 3])):
        index, end = code_runs(is_code, carried)
        for b in range(3):
            want, run = reference(is_code[b].tolist(), 0 if carried is None else int(carried[b]))
            assert index[b].tolist() == want and int(end[b]) == run
    # a decode step at a time continues the run: one token per call equals the whole sequence at once
    carried, steps = torch.zeros(3, dtype=torch.long), []
    for t in range(is_code.shape[1]):
        index, carried = code_runs(is_code[:, t:t + 1], carried)
        steps.append(index)
    assert torch.equal(torch.cat(steps, 1), code_runs(is_code)[0])


def test_seeded_images_are_reproducible_and_the_seed_matters(pipe):
    a = pipe.generate_image("a blue square", n=2, seed=7, top_k=50)
    b = pipe.generate_image("a blue square", n=2, seed=7, top_k=50)
    c = pipe.generate_image("a blue square", n=2, seed=8, top_k=50)
    assert len(a) == 2 and a[0].size == (64, 64) and a[0].mode == "RGB"
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert not all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, c))


def test_teacher_forced_logprobs_equal_the_sampler_step_distributions(pipe):
    """Unguided greedy codes: each code's teacher-forced log-prob is the maximum of the step's log-softmax, read
    through the cached sampler; the whole grid's log-probs come back in reading order."""
    model = pipe.model
    cond = pipe.processor.image_prompt("a green star", model.image_grid)
    codes = generate_codes(model, cond, [], ImageGenerationConfig(n=1, cfg_scale=1.0, temperature=0.0))[0]
    lp = pipe.image_code_logprobs("a green star", codes.tolist())
    h, w = model.image_grid
    assert len(lp) == h * w
    ids = torch.tensor([cond + image_tokens(model, codes)])
    logits = model(Batch(ids), head="image").logits[0, len(cond) - 1:-1]
    best = torch.log_softmax(logits, -1).max(-1).values
    torch.testing.assert_close(torch.tensor(lp), best, atol=1e-5, rtol=0)
    # the decoder's output for the grid, before clamping
    assert pipe.decode_codes(codes).shape == (3, 64, 64)


def test_an_unknown_code_position_embedding_is_refused_by_name():
    p = get_preset("tiny-janus")
    p.model.gen.pos_embed = "rope2d"
    with pytest.raises(ConfigError, match="gen.pos_embed must be one of none, grid"):
        p.model.__post_init__()


def test_bad_requests_are_refused_by_name(pipe):
    with pytest.raises(ConfigError, match="n must be"):
        pipe.generate_image("a red circle", n=0)
    with pytest.raises(ConfigError, match="cfg_scale"):
        pipe.generate_image("a red circle", cfg_scale=-1)
    with pytest.raises(ConfigError, match="temperature"):
        pipe.generate_image("a red circle", temperature=float("nan"))
    with pytest.raises(DataError, match="non-empty"):
        pipe.generate_image("   ")
    with pytest.raises(ConfigError, match="steps must be in 0..1000"):
        pipe.generate_image("a red circle", steps=-1)
    with pytest.raises(ConfigError, match="steps=4: this model draws its codes one at a time"):
        pipe.generate_image("a red circle", steps=4)
    with pytest.raises(DataError, match="reads no image"):
        pipe.generate_image("<image> a red circle")
    size = pipe.model.codebook_size
    with pytest.raises(DataError, match=f"code {size} at row 1, column 0 is out of range"):
        pipe.image_code_logprobs("a red circle", [[0, 1], [size, 2]])
    with pytest.raises(DataError, match="rows of equal length"):
        pipe.image_code_logprobs("a red circle", [[0, 1], [2]])


def test_a_model_that_does_not_draw_refuses_image_generation():
    p = get_preset("tiny-llava")
    fam = get_family("llava")
    _, model, processor = fam.new_model(p.model, p.processor, fam.new_tokenizer(TEXTS, 300))
    pipe = Pipeline(model.eval(), processor)
    assert not pipe.can_generate_images
    with pytest.raises(DataError, match="generates images"):
        pipe.generate_image("a red circle")
    with pytest.raises(DataError, match="generates images"):
        pipe.image_code_logprobs("a red circle", [[0]])


def test_text_to_image_pairs_never_hold_a_held_out_prompt(tmp_path):
    import csv

    from vlmkit.eval.judge.pairs import held_out_prompts, write_t2i_pairs

    path = write_t2i_pairs(tmp_path, 400, seed=3)
    assert path.name == "t2i_pairs_train.csv"
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 400 and all((tmp_path / r["image"]).is_file() for r in rows)
    held = held_out_prompts()
    # 2 splits x 4 compositional types x 30 prompts, less the few both splits drew
    assert 200 < len(held) <= 240 and not held & {r["caption"] for r in rows}
    assert {" left of " in r["caption"] or " above " in r["caption"] or " below " in r["caption"]
            or " right of " in r["caption"] for r in rows} == {True, False}
    with pytest.raises(ConfigError, match="--t2i"):
        write_t2i_pairs(tmp_path / "x", 0)


def test_generate_image_cli_writes_the_same_pngs_for_a_seed(pipe, tmp_path, capsys):
    import json

    from vlmkit.checkpoint import write_model_files
    from vlmkit.cli import main

    folder = tmp_path / "ckpt"
    folder.mkdir()
    write_model_files(folder, pipe.model, pipe.config, pipe.processor)
    runs = []
    for out in ("a", "b"):
        assert main(["generate-image", "a red circle", "--model", str(folder), "--out", str(tmp_path / out),
                     "--n", "2", "--seed", "4", "--quiet"]) == 0
        runs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert [p.rsplit("/", 1)[-1] for p in runs[0]["images"]] == ["a-red-circle-4-0.png", "a-red-circle-4-1.png"]
    for x, y in zip(runs[0]["images"], runs[1]["images"]):
        assert open(x, "rb").read() == open(y, "rb").read()
    ref = pipe.generate_image("a red circle", n=2, seed=4)
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(runs[0]["images"][1]).convert("RGB")), np.asarray(ref[1]))
    assert main(["generate-image", "a red circle", "--model", str(folder), "--out", str(tmp_path / "c"),
                 "--n", "0", "--quiet"]) == 2
    assert "n must be in 1.." in capsys.readouterr().err
