"""The tiny-vae recipe: `vlmkit train tiny-vae` on ShapesWorld scenes at 64 px, then what a latent-diffusion model
would get from it, on held-out test images: PSNR of the decoded posterior mean (and of a posterior sample), the KL
per image, the scaling factor the run estimated against the exact 1 / std of the test images' latents, the scaled
latents' std, the PSNR after adding Gaussian noise of std 0.1 to the scaled latents (how much an imperfect
denoiser's error costs), and how much of the originals' scenes the fixed ShapesWorld parser of ``shapes_t2i`` reads
back in the reconstructions (bench/vq.py's judge). One JSON line.

    python bench/vae.py [--n 2000] [--threads 1] [--steps N] [--set KEY=VALUE] [--images 200] [--figure PNG] [--out DIR]

About 8 minutes on one core of these machines (docs/generation.md quotes a run).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

# bench/vq.py's figure and pixels -> image (a script's own folder is on sys.path)
from vq import _figure, _to_image

import vlmkit
from vlmkit.data.shapes import generate_shapes
from vlmkit.eval.judge.parser import agreement, load_parser, parse_images
from vlmkit.objectives.vq import psnr
from vlmkit.train.loop import train
from vlmkit.train.recipe import load_recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="ShapesWorld scenes (80/10/10 train/val/test)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, help="override the recipe's steps (stages.0.steps)")
    ap.add_argument("--set", action="append", default=[], help="more recipe overrides, KEY=VALUE")
    ap.add_argument("--figure", help="write the first 8 test images (top) and their reconstructions (bottom) here")
    ap.add_argument("--images", type=int, default=200, help="test images measured and judged")
    ap.add_argument("--out", help="keep the data and the run here (the trained VAE: OUT/run/checkpoint)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        if not (root / "shapes" / "pairs_train.csv").is_file():  # a kept --out folder's scenes are reused
            generate_shapes(root / "shapes", n=args.n, seed=0, size=64, progress=False)
        overrides = [f"data.path={root / 'shapes'}", *args.set] + ([f"stages.0.steps={args.steps}"] if args.steps else [])
        t0 = time.perf_counter()
        res = train(load_recipe("tiny-vae", overrides), root / "run", progress=True, log=lambda m: None)
        seconds = time.perf_counter() - t0
        rows = [json.loads(x) for x in (root / "run" / "metrics.jsonl").read_text().splitlines()]
        val = [r for r in rows if "val_psnr" in r][-1]
        images = sorted((root / "shapes" / "images").glob("*.png"))[-args.images:]  # the test split's
        originals = [Image.open(p).convert("RGB") for p in images]
        result = measure(vlmkit.load(res.checkpoint), originals, args.figure)
    print(json.dumps({"bench": "vae", "config": vars(args), "train_seconds": round(seconds, 1),
                      "threads": torch.get_num_threads(), "val_psnr": val["val_psnr"], "val_kl": val["val_kl"],
                      **result}))


@torch.no_grad()
def measure(pipe, originals: list, figure: str | None) -> dict:
    """The test images' figures (module docstring) through the loaded pipeline's model."""
    model, cfg = pipe.model, pipe.processor.cfg
    pixels = pipe.processor.prepare_images(originals).pixel_values
    z = model.encode_latents(pixels)
    recon = model.decode_latents(z)
    sample = model.decode_latents(model.encode_latents(pixels, sample=True, generator=torch.Generator().manual_seed(0)))
    noisy = model.decode_latents(z + 0.1 * torch.randn(z.shape, generator=torch.Generator().manual_seed(1)))
    mean, logvar = model.posterior(pixels)
    pictures = [_to_image(x) for x in recon]
    if figure:
        _figure(originals[:8], pictures[:8], figure)
    parser = load_parser()
    agree = sum(agreement(a, b) for a, b in zip(parse_images(originals, parser), parse_images(pictures, parser)))
    return {"psnr": round(float(psnr(recon, pixels, cfg.mean, cfg.std).mean()), 2),
            "psnr_sample": round(float(psnr(sample, pixels, cfg.mean, cfg.std).mean()), 2),
            "psnr_noise_0.1": round(float(psnr(noisy, pixels, cfg.mean, cfg.std).mean()), 2),
            "kl_per_image": round(float(model(pixels).kl), 1),
            "scaling_factor": round(model.scale, 4), "exact_inverse_std": round(float(1 / mean.std()), 4),
            "scaled_latent_std": round(float(z.std()), 4), "scaled_latent_mean": round(float(z.mean()), 4),
            "scaled_posterior_std": round(float(torch.exp(0.5 * logvar).mean() * model.scale), 4),
            "latent_grid": [model.latent_channels, *model.latent_grid],
            "judge_agreement": round(agree / len(originals), 4)}


if __name__ == "__main__":
    main()
