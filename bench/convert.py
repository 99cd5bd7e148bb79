"""Importing a Hugging Face checkpoint: seconds and peak memory of loading its weights into a vlmkit model (fp32),
against the model's own size, as one JSON line.

    python bench/convert.py [--preset smolvlm-256m] [--dtype bfloat16] [--threads 2]

The checkpoint is a random one of the preset's shapes, written by transformers' own class in the Hub's dtype
(bf16 by default) to a temporary folder; the load runs in a fresh process so its peak memory is its own. Peak
RSS counts the file's memory-mapped pages (safetensors maps the file), which the kernel can drop under
pressure; peak anonymous memory (sampled every 5 ms) is what it cannot. Absolute figures are noisy; the ratio
of peak anonymous memory to the fp32 model is the figure to compare. Needs transformers (a test extra).
Presets: the Idefics3 family's (smolvlm-256m, idefics3-8b) and the LLaVA ones (llava-1.5-7b, tiny-llava-vit).

Measured once (smolvlm-256m, bf16 file of 489 MB, fp32 model of 978 MB): reading tensors one at a time
through ``safe_open`` instead of ``load_file`` changed neither peak (1162 vs 1170 MB anonymous) and was slower
(1.5 vs 1.0 s): ``load_file`` already maps the file rather than reading it into memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from vlmkit.models import build_model, count_parameters
from vlmkit.presets import get_preset

LOAD = """
import json, resource, sys, threading, time
import torch
torch.set_num_threads({threads})
folder = sys.argv[1]
peak_anon = [0]


def watch():  # private (anonymous) memory: what cannot be dropped under pressure, unlike mapped file pages
    while True:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                peak_anon[0] = max(peak_anon[0], int(line.split()[1]) / 1024)
        time.sleep(0.005)


threading.Thread(target=watch, daemon=True).start()
t0 = time.perf_counter()
from vlmkit.convert.hf.{module} import {loader}
model = {loader}(folder)
seconds = time.perf_counter() - t0
time.sleep(0.05)
print(json.dumps({{"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "peak_anon_mb": peak_anon[0]}}))
"""


def write_checkpoint(preset_name: str, folder: Path, dtype: torch.dtype) -> str:
    """A random transformers checkpoint of the preset's shapes; returns the vlmkit loader's (module, name)."""
    import transformers

    from vlmkit.convert.hf.idefics3 import idefics3_config_to_hf
    from vlmkit.convert.hf.llava import llava_config_to_hf

    cfg = get_preset(preset_name).model
    if cfg.family == "idefics3":
        config, cls, loader = idefics3_config_to_hf(cfg, 0), transformers.Idefics3ForConditionalGeneration, \
            ("idefics3", "load_hf_idefics3")
        config_class = transformers.Idefics3Config
    elif cfg.family == "llava":
        config, cls, loader = llava_config_to_hf(cfg, 0, 1), transformers.LlavaForConditionalGeneration, \
            ("llava", "load_hf_llava")
        config_class = transformers.LlavaConfig
    else:
        raise SystemExit(f"bench/convert.py: preset {preset_name!r} (family {cfg.family}) is not supported here")
    config.pop("model_type")
    model = cls(config_class(**config)).to(dtype)
    model.save_pretrained(folder)
    return loader


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smolvlm-256m")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "hf"
        loader = write_checkpoint(args.preset, folder, getattr(torch, args.dtype))
        file_mb = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20
        code = LOAD.format(threads=args.threads, module=loader[0], loader=loader[1])
        out = subprocess.run([sys.executable, "-c", code, str(folder)],
                             capture_output=True, text=True, check=True)
        run = json.loads(out.stdout.strip().splitlines()[-1])
    with torch.device("meta"):
        params = count_parameters(build_model(get_preset(args.preset).model, 0))
    model_mb = params * 4 / 2**20
    print(json.dumps({
        "bench": "convert", "preset": args.preset, "dtype": args.dtype, "threads": args.threads,
        "parameters": params, "file_mb": round(file_mb), "model_fp32_mb": round(model_mb),
        "load_seconds": round(run["seconds"], 2), "peak_rss_mb": round(run["peak_rss_mb"]),
        "peak_anon_mb": round(run["peak_anon_mb"]), "peak_anon_over_model": round(run["peak_anon_mb"] / model_mb, 3),
    }))


if __name__ == "__main__":
    main()
