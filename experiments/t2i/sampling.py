"""shapes_t2i accuracy per prompt type under several sampling settings, on the first prompts of each type of the
test split (docs/generation.md, "Sampling"). Each setting is a JSON object of Pipeline.generate_image's keywords.

    python experiments/t2i/sampling.py --model runs/tiny-janus/checkpoint --data shapes --per-type 8 \\
        '{"cfg_scale": 5}' '{"cfg_scale": 8}' '{"cfg_scale": 8, "temperature": 0.8}'
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from tqdm.auto import tqdm

import vlmkit
from vlmkit.eval.judge.task import judge_prompt, read_t2i


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="a ShapesWorld folder (t2i_test.json)")
    ap.add_argument("--per-type", type=int, default=8)
    ap.add_argument("settings", nargs="+", help="generate_image keywords as JSON objects")
    args = ap.parse_args()
    pipe = vlmkit.load(args.model)
    samples = read_t2i(Path(args.data), "test", None)
    for setting in map(json.loads, args.settings):
        scores = collections.defaultdict(list)
        for s in tqdm(samples, desc=json.dumps(setting), unit="prompt"):
            if len(scores[s.meta["type"]]) >= args.per_type:
                continue
            _, verdicts = judge_prompt(pipe, s, **setting)
            scores[s.meta["type"]].append(sum(ok for ok, _ in verdicts) / len(verdicts))
        print("RESULT", json.dumps({"model": args.model, "setting": setting,
                                    **{t: round(sum(v) / len(v), 3) for t, v in scores.items()}}), flush=True)


if __name__ == "__main__":
    main()
