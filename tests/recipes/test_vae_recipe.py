"""tiny-vae (the KL-VAE, objectives/vae.py) trained through vlmkit.train.loop.train on a small generated ShapesWorld:
the reconstruction loss falls and the PSNR rises, the log holds the VAE figures, the scaling factor the run
estimated is near 1 / std of the training images' posterior means and travels with the checkpoint (vlmkit.load and
families/vae.py's loaders give the same latents as the logged scale says), and the refusals name what to change.
The full recipe on 2000 scenes is `python bench/vae.py`, quoted in docs/generation.md."""

from __future__ import annotations

import json

import pytest
import torch

import vlmkit
from vlmkit.data.shapes import generate_shapes
from vlmkit.errors import ConfigError
from vlmkit.families.vae import load_vae_weights, vae_config_from
from vlmkit.models.vae import build_vae
from vlmkit.train.loop import train
from vlmkit.train.recipe import load_recipe, override_recipe

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = ["model.image_size=[32, 32]", "data.val_samples=12", "train.batch_size=8", "train.log_every=1",
        "train.eval_every=1000", "train.save_every=1000", "stages.0.lr=3e-3", "stages.0.warmup=0.05"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """80 ShapesWorld scenes at 32 px: 64 training images, 8 validation images."""
    out = tmp_path_factory.mktemp("data") / "shapes"
    generate_shapes(out, n=80, seed=3, size=32, progress=False)
    return out


def recipe(shapes, *extra):
    return override_recipe(load_recipe("tiny-vae"), [f"data.path={shapes}", *TINY, *extra])


def rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "vae"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures come before the function-scoped single_thread
    try:
        res = train(recipe(shapes, "stages.0.steps=60"), run, progress=False, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    return res, run


def test_reconstruction_loss_falls_and_psnr_rises(trained):
    res, run = trained
    steps = [r for r in rows(run) if "loss" in r]
    assert len(steps) == 60 and res.steps == 60
    for key in ("recon_loss", "kl", "psnr", "latent_std", "posterior_std", "latent_scale"):
        assert all(key in r for r in steps), key
    first = sum(r["recon_loss"] for r in steps[:5]) / 5
    last = sum(r["recon_loss"] for r in steps[-5:]) / 5
    assert last < 0.3 * first, (first, last)
    psnr0, psnr1 = sum(r["psnr"] for r in steps[:5]) / 5, sum(r["psnr"] for r in steps[-5:]) / 5
    assert psnr1 > psnr0 + 5, (psnr0, psnr1)
    val = [r for r in rows(run) if "val_psnr" in r][-1]
    assert val["val_psnr"] > psnr0 + 5 and val["val_kl"] > 0 and val["val_latent_std"] > 0
    assert val["val_loss"] == pytest.approx(val["val_recon_loss"] + 1e-6 * val["val_kl"], rel=1e-5)
    data = next(r for r in rows(run) if r.get("event") == "data")
    assert data == {"event": "data", "step": 0, "images": 64, "val_images": 8, "skipped_rows": 0}
    report = (run / "training_report.md").read_text()
    assert "val_psnr" in report and "val_kl" in report


def test_the_estimated_scale_is_near_one_over_the_latents_std_and_is_saved(trained, shapes):
    res, run = trained
    pipe = vlmkit.load(res.checkpoint)
    logged = [r for r in rows(run) if "latent_scale" in r][-1]["latent_scale"]
    assert pipe.model.cfg.scaling_factor == 0 and pipe.model.scale == pytest.approx(logged, rel=1e-6)
    train_images = sorted((shapes / "images").glob("*.png"))[:64]  # the training split's 64
    pixels = pipe.processor.prepare_images(train_images).pixel_values
    with torch.no_grad():
        mean, _ = pipe.model.posterior(pixels)
    exact = float(1 / mean.std())
    assert pipe.model.scale == pytest.approx(exact, rel=0.15), (pipe.model.scale, exact)
    z = pipe.model.encode_latents(pixels)
    assert float(z.std()) == pytest.approx(1.0, rel=0.15)  # roughly unit-variance latents
    # the checkpoint read back through families/vae.py's loaders (what a latent-diffusion model calls) gives the
    # same latents and pixels
    cfg = vae_config_from(str(res.checkpoint), pipe.processor.cfg, "model.vae_from")
    again = build_vae(cfg).eval()
    load_vae_weights(again, str(res.checkpoint))
    assert torch.equal(again.encode_latents(pixels), z)
    decoded = again.decode_latents(z)
    with torch.no_grad():
        out = pipe.model(pixels)  # eval mode: the posterior mean decoded
    assert torch.allclose(decoded, out.reconstruction, atol=1e-5)
    # and it is a reconstruction: far nearer its image than another image is
    assert (decoded[0] - pixels[0]).abs().mean() < 0.5 * (pixels[1] - pixels[0]).abs().mean()


def test_refusals_name_what_to_change(shapes, tmp_path):
    with pytest.raises(ConfigError, match="grad_accum 2: a vae stage takes one batch per step"):
        train(recipe(shapes, "train.grad_accum=2", "stages.0.steps=1"), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="stages\\[0\\].objective: 'vq' does not train a vae model; tiny-vae set "
                                          "objective: vae"):
        train(recipe(shapes, "stages.0.objective=vq", "stages.0.steps=1"), tmp_path / "b", progress=False)
    with pytest.raises(ConfigError, match="train.batch_size 100 is larger than the 64 training images"):
        train(recipe(shapes, "train.batch_size=100", "stages.0.steps=1"), tmp_path / "c", progress=False,
              log=lambda m: None)
