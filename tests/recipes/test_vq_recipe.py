"""tiny-vq (the VQ image tokenizer, objectives/vq.py) trained through vlmkit.train.loop.train on a small generated
ShapesWorld: the reconstruction loss falls and the PSNR rises, the log holds the VQ figures, the checkpoint loads
with vlmkit.load and its encode_codes / decode_codes equal the model's own forward; the refusals name what to
change. The full recipe on 2000 scenes (about 18 minutes) is `python bench/vq.py`, quoted in
docs/generation.md."""

from __future__ import annotations

import json

import pytest
import torch

import vlmkit
from vlmkit.data.shapes import generate_shapes
from vlmkit.errors import ConfigError
from vlmkit.train.loop import train
from vlmkit.train.recipe import load_recipe, override_recipe

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = ["model.image_size=[32, 32]", "data.val_samples=12", "train.batch_size=16", "train.log_every=1",
        "train.eval_every=1000", "train.save_every=1000", "stages.0.lr=3e-3", "stages.0.warmup=0.05"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """80 ShapesWorld scenes at 32 px: 64 training images, 8 validation images."""
    out = tmp_path_factory.mktemp("data") / "shapes"
    generate_shapes(out, n=80, seed=3, size=32, progress=False)
    return out


def recipe(shapes, *extra):
    return override_recipe(load_recipe("tiny-vq"), [f"data.path={shapes}", *TINY, *extra])


def rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "vq"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures come before the function-scoped single_thread
    try:
        # L1: in 80 steps at 32 px it leaves the first plateau (each image's mean) sooner than the preset's L2
        res = train(recipe(shapes, "stages.0.steps=80", "model.restart_after=10", "model.recon_loss=l1"), run,
                    progress=False, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    return res, run


def test_reconstruction_loss_falls_and_psnr_rises(trained):
    res, run = trained
    steps = [r for r in rows(run) if "loss" in r]
    assert len(steps) == 80 and res.steps == 80
    for key in ("recon_loss", "commit_loss", "psnr", "codebook_usage", "perplexity"):
        assert all(key in r for r in steps), key
    first = sum(r["recon_loss"] for r in steps[:5]) / 5
    last = sum(r["recon_loss"] for r in steps[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    psnr0, psnr1 = sum(r["psnr"] for r in steps[:5]) / 5, sum(r["psnr"] for r in steps[-5:]) / 5
    assert psnr1 > psnr0 + 3, (psnr0, psnr1)
    val = [r for r in rows(run) if "val_psnr" in r][-1]
    assert val["val_psnr"] > psnr0 + 3 and 0 < val["val_codebook_usage"] <= 1 and val["val_perplexity"] > 1
    data = next(r for r in rows(run) if r.get("event") == "data")
    assert data == {"event": "data", "step": 0, "images": 64, "val_images": 8, "skipped_rows": 0}
    report = (run / "training_report.md").read_text()
    assert "val_psnr" in report and "val_codebook_usage" in report


def test_checkpoint_loads_and_codes_round_trip_equals_the_model(trained, shapes):
    res, _ = trained
    pipe = vlmkit.load(res.checkpoint)
    assert pipe.has_image_codes and not pipe.can_generate and not pipe.can_embed
    images = sorted((shapes / "images").glob("*.png"))[:3]
    codes = pipe.encode_codes(images)
    f = pipe.model.cfg.factor  # 32 px images at the preset's factor
    assert codes.shape == (3, 32 // f, 32 // f) and codes.dtype == torch.long
    pixels = pipe.processor.prepare_images(images).pixel_values
    with torch.no_grad():
        out = pipe.model(pixels)  # eval mode: no codebook update
    assert torch.equal(codes, out.codes)
    decoded = pipe.decode_codes(codes)
    assert torch.allclose(decoded, out.reconstruction, atol=1e-5)
    assert torch.allclose(pipe.decode_codes(codes[1].tolist()), out.reconstruction[1], atol=1e-5)
    # and the decoded grid is a reconstruction: far nearer its image than another image is
    assert (decoded[0] - pixels[0]).abs().mean() < 0.5 * (pixels[1] - pixels[0]).abs().mean()


def test_refusals_name_what_to_change(shapes, tmp_path):
    with pytest.raises(ConfigError, match="grad_accum 2: a vq stage updates its codebook on every forward"):
        train(recipe(shapes, "train.grad_accum=2", "stages.0.steps=1"), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="stages\\[0\\].objective: 'lm' does not train a vq model; tiny-vq set "
                                          "objective: vq"):
        train(recipe(shapes, "stages.0.objective=lm", "stages.0.steps=1"), tmp_path / "b", progress=False)
    with pytest.raises(ConfigError, match="train.batch_size 100 is larger than the 64 training images"):
        train(recipe(shapes, "train.batch_size=100", "stages.0.steps=1"), tmp_path / "c", progress=False,
              log=lambda m: None)
    with pytest.raises(ConfigError, match="train \\['vision'\\] names 'vision', which this model does not have"):
        train(recipe(shapes, "stages.0.train=[vision]", "stages.0.steps=1"), tmp_path / "d", progress=False,
              log=lambda m: None)
