"""The benchmark scripts run on the current interface and print their one JSON line (tiny settings: speed is
measured by running them, never asserted here). They are not imported by the package, so nothing else would
notice when an interface change breaks them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.parametrize("script, args, keys", [
    ("train.py", ["--steps", "1", "--images", "24", "--batch-size", "8"], {"grouped", "mixed_packed"}),
    ("contrastive.py", ["--steps", "1", "--warmup", "1", "--batch-size", "8"], {"train", "embed"}),
    ("t2i.py", ["--n", "40", "--pairs", "32", "--vq-steps", "2", "--steps", "2", "--set", "stages.0.steps=1",
                "--set", "train.batch_size=8", "--limit", "2"], {"janus", "train_seconds"}),
    ("vae.py", ["--n", "40", "--steps", "2", "--images", "4", "--set", "data.val_samples=4", "--set",
                "train.batch_size=8"], {"val_psnr", "scaling_factor", "exact_inverse_std", "judge_agreement"}),
    ("generation.py", ["--n", "40", "--pairs", "32", "--steps", "2", "--set", "train.batch_size=8", "--set",
                       "data.val_samples=4", "--limit", "2"], {"models", "parts"}),
])
def test_a_bench_script_prints_its_json_line(script, args, keys):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(BENCH / script), *args, "--threads", "1"], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["bench"] == script.removesuffix(".py") and keys <= set(line), line
