"""vlmkit eval end to end: a checkpoint trained for a few steps is evaluated on ShapesWorld's files in the
official layouts; results.json carries each task's metrics, sample count, confidence interval, fingerprint,
config, seed and timing; predictions and a report are written; the scores are the metrics' own on the
predictions written."""

from __future__ import annotations

import json

import pytest

from vlmkit.cli import main
from vlmkit.data.shapes import generate_shapes
from vlmkit.errors import ConfigError, DataError
from vlmkit.eval.metrics.pope import pope_metrics, score_pope
from vlmkit.eval.metrics.vqa import vqa_accuracy
from vlmkit.eval.runner import fingerprint, run_eval
from vlmkit.eval.tasks import TASKS
from vlmkit.train.loop import train
from vlmkit.train.recipe import load_recipe

from helpers import forward

TINY = ["model.vision.image_size=[32, 32]", "model.vision.patch_size=8", "model.vision.width=32",
        "model.lm.width=64", "model.lm.depth=2", "model.lm.heads=4", "model.lm.kv_heads=2", "model.lm.mlp_dim=128",
        "train.batch_size=8", "train.eval_every=1000", "data.val_samples=8", "stages.0.steps=2",
        "stages.0.batch_size=8", "stages.1.steps=4"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    generate_shapes(root / "shapes", n=40, seed=2, size=32, progress=False)
    res = train(load_recipe("tiny-llava", [f"data.path={root / 'shapes'}", *TINY]), root / "run", progress=False,
                log=lambda m: None)
    return res.checkpoint, root / "shapes"


def test_eval_writes_results_predictions_and_report(trained, tmp_path):
    ckpt, data = trained
    out = tmp_path / "results.json"
    assert main(["eval", "--model", str(ckpt), "--tasks", "shapes_vqa,vqav2,pope", "--data", str(data), "--out",
                 str(out), "--limit", "6", "--quiet"]) == 0
    res = json.loads(out.read_text())
    assert res["model"]["fingerprint"] == fingerprint(ckpt) and res["seed"] == 0 and res["wall_seconds"] > 0
    assert res["config"]["tasks"] == ["shapes_vqa", "vqav2", "pope"] and res["config"]["limit"] == 6
    for name, r in res["tasks"].items():
        value, (lo, hi) = r["metrics"][r["metric"]], r["ci95"][r["metric"]]
        assert 0 <= lo <= value <= hi <= 1 and r["samples_per_second"] > 0
    assert res["tasks"]["vqav2"]["n"] == 6 and res["tasks"]["pope"]["n"] == 6  # --limit: samples per task
    # the metrics are those of the predictions written
    rows = [json.loads(x) for x in (tmp_path / "predictions_vqav2.jsonl").read_text().splitlines()]
    expected = sum(vqa_accuracy(r["prediction"], r["answers"]).score for r in rows) / len(rows)
    assert res["tasks"]["vqav2"]["metrics"]["vqa_accuracy"] == pytest.approx(expected)
    pope = [json.loads(x) for x in (tmp_path / "predictions_pope.jsonl").read_text().splitlines()]
    again = pope_metrics(score_pope(r["prediction"], r["answers"][0], r["meta"]["category"]) for r in pope)
    assert res["tasks"]["pope"]["metrics"]["f1"] == pytest.approx(again["f1"])
    assert {r["meta"]["category"] for r in pope} == {"random", "popular", "adversarial"}
    report = (tmp_path / "results.md").read_text()
    assert "| vqav2 | vqa_accuracy |" in report and (tmp_path / "results_shapes_vqa.png").is_file()


def test_captions_and_grounding_tasks_run_with_their_corpus_metrics(trained, tmp_path):
    ckpt, data = trained
    res = run_eval(ckpt, ["coco_captions", "grounding"], data, tmp_path / "results.json", limit=4, progress=False)
    captions = res["tasks"]["coco_captions"]
    assert set(captions["metrics"]) >= {"Bleu_4", "METEOR", "ROUGE_L", "CIDEr"} and captions["n"] == 4
    lo, hi = captions["ci95"]["CIDEr"]  # from per-image CIDEr
    assert lo <= hi and "_per_sample" not in captions["metrics"]
    rows = [json.loads(x) for x in (tmp_path / "predictions_grounding.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(set(r) >= {"accuracy", "iou", "unparsed"} for r in rows)
    assert res["tasks"]["grounding"]["metrics"]["unparsed"] == sum(r["unparsed"] for r in rows) / 4


def test_multiple_choice_and_circular_eval(trained, tmp_path):
    ckpt, data = trained
    res = run_eval(ckpt, ["multiple_choice", "multiple_choice_circular"], data, tmp_path / "r.json", limit=5,
                   progress=False)
    plain, circular = res["tasks"]["multiple_choice"], res["tasks"]["multiple_choice_circular"]
    assert plain["n"] == 5 and circular["n"] == 20 and circular["metrics"]["n"] == 5  # 4 rotations a question
    rows = [json.loads(x) for x in (tmp_path / "predictions_multiple_choice_circular.jsonl").read_text().splitlines()]
    by_question: dict = {}
    for r in rows:
        by_question.setdefault(r["meta"]["question_id"], []).append(r["accuracy"])
    assert circular["metrics"]["circular_accuracy"] == sum(all(v) for v in by_question.values()) / 5
    assert circular["metrics"]["vanilla_accuracy"] == sum(v[0] for v in by_question.values()) / 5
    assert [r["accuracy"] for r in rows[::4]] == [json.loads(x)["accuracy"] for x in
                                                  (tmp_path / "predictions_multiple_choice.jsonl").read_text()
                                                  .splitlines()]  # rotation 0 is the question as written


def test_every_task_runs_on_shapesworld(trained, tmp_path):
    ckpt, data = trained
    tasks = sorted(t for t in TASKS if t != "shapes_t2i")  # it judges generated images: tiny-llava draws none
    res = run_eval(ckpt, tasks, data, tmp_path / "r.json", limit=2, progress=False)
    assert sorted(res["tasks"]) == tasks
    for name, r in res["tasks"].items():
        assert r["n"] >= 2 and r["metric"] in r["metrics"], name
    # refused right after the model loads, before the other tasks of the run spend their time
    with pytest.raises(ConfigError, match="task 'shapes_t2i': it judges generated images; this model does not"):
        run_eval(ckpt, ["shapes_vqa", "shapes_t2i"], data, tmp_path / "t2i" / "r.json", limit=2, progress=False)
    assert not (tmp_path / "t2i").exists()


def test_unknown_tasks_and_missing_files_are_named(trained, tmp_path):
    ckpt, data = trained
    with pytest.raises(ConfigError, match=r"unknown task 'vqa3'; available: " + ", ".join(sorted(TASKS))
                       + r" \(see `vlmkit tasks`\)"):
        run_eval(ckpt, ["vqa3"], data, tmp_path / "r.json")
    with pytest.raises(DataError, match=r"none of vqav2_val2014_questions.json, v2_OpenEnded_mscoco_val2014_questions.json "
                                        r"found"):
        run_eval(ckpt, ["vqav2"], data, tmp_path / "r.json", split="val2014")
    assert not (tmp_path / "r.json").exists()
    # every task's files are checked before the model loads (here: a model folder that does not exist): the last
    # task's missing file is named at once, not after the others ran
    only_vqa = tmp_path / "only_vqa"
    only_vqa.mkdir()
    for name in ("vqav2_test_questions.json", "vqav2_test_annotations.json", "images"):
        (only_vqa / name).symlink_to(data / name)
    with pytest.raises(DataError, match=r"MMBench_TEST\.tsv"):
        run_eval(tmp_path / "no_model", ["shapes_vqa", "mmbench"], only_vqa, tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()


def test_repeated_images_are_encoded_once_and_answer_the_same(trained, tmp_path, monkeypatch):
    import shutil

    import vlmkit

    ckpt, data = trained
    pipe = vlmkit.load(ckpt)
    image = data / "images" / "000000.png"
    copies = []
    for k in range(3):  # the same pixels under different paths: no sharing
        copies.append(tmp_path / f"copy{k}.png")
        shutil.copy(image, copies[-1])
    questions = ["What color is the circle?", "How many objects are there?", "Is there a red square?"]
    separate = pipe.chat_batch(list(zip(copies, questions)), max_new_tokens=6)
    encoded = []
    real = pipe.model.encode_media
    monkeypatch.setattr(pipe.model, "encode_media", lambda x: encoded.append(len(x)) or real(x))
    shared = pipe.chat_batch([(image, q) for q in questions] + [([], "hello")], max_new_tokens=6)
    assert shared[:3] == separate and encoded == [1]  # one image through the tower for three questions


def test_rank_is_the_replys_log_likelihood_through_the_chat_template(trained):
    import torch

    import vlmkit

    ckpt, data = trained
    pipe = vlmkit.load(ckpt)
    image, question = data / "images" / "000000.png", "How many objects are there?"
    candidates = ["1", "two", "a red circle"]
    ranked = pipe.rank(image, question, candidates, normalize=False)
    inputs = pipe.processor.prepare_images([image])
    prompt = pipe.processor.chat(question, inputs).ids
    for cand, value in zip(candidates, ranked):  # one candidate at a time, by hand
        cont = pipe.processor.tokenizer.encode(cand)
        with torch.no_grad():
            logits = forward(pipe.model, prompt + cont, inputs).logits[0]
        logp = torch.log_softmax(logits[len(prompt) - 1:-1], -1).gather(-1, torch.tensor(cont)[:, None]).sum()
        assert value == pytest.approx(float(logp), abs=1e-4)
    per_token = pipe.rank(image, question, candidates)
    assert per_token == pytest.approx([v / len(pipe.processor.tokenizer.encode(c)) for v, c in zip(ranked, candidates)])


def test_ranking_tasks_refuse_a_model_that_only_generates(trained):
    from vlmkit.eval.runner import run_task
    from vlmkit.eval.tasks import get_task

    class Endpoint:  # what an OpenAI-compatible backend offers: generation only
        can_generate, can_embed, can_score, can_generate_images = True, False, False, False

        def chat_batch(self, requests, **gen):
            return ["1"] * len(requests)

    with pytest.raises(ConfigError, match=r"task 'retrieval' ranks candidates by the model's likelihoods"):
        run_task(Endpoint(), get_task("retrieval"), trained[1], "test", 2, 8)


@pytest.mark.parametrize("name", ["multiple_choice_circular", "mmbench", "mme", "hallusionbench"])
def test_a_failed_sample_takes_the_samples_scored_with_it_out_of_the_metrics(name, tmp_path_factory):
    """A sample that failed (an endpoint's request) is scored in groups with others (the circular copies of a
    question, MME's image pair, HallusionBench's figure and question groups): the whole group leaves the metrics,
    never a group judged on what is left of it."""
    from vlmkit.eval import runner
    from vlmkit.eval.tasks import get_task

    root = tmp_path_factory.getbasetemp() / "units_shapes"
    if not root.exists():
        generate_shapes(root, n=60, seed=0, size=32, progress=False)
    task = get_task(name)
    samples = task.read(root, "test", None)
    failed = len(samples) // 2
    answers = [s.answers[0] for s in samples]
    errors = [None] * len(samples)
    answers[failed], errors[failed] = None, "HTTP 500"
    result, records = runner._score(task, samples, [task.prompt(s) for s in samples], answers, errors, 0)
    groups = set(task.units(samples[failed]))
    shares = [bool(set(task.units(s)) & groups) for s in samples]
    assert groups and sum(shares) > 1  # the failed sample is scored with others
    assert [("excluded" in r) for r in records] == [sh and i != failed for i, sh in enumerate(shares)]
    assert result["n_errors"] == 1 and result["n_excluded"] == sum(shares) - 1
    assert result["n"] == len(samples) - sum(shares)


def test_an_image_shared_inside_a_benchmark_file_is_decoded_and_prepared_once(trained, monkeypatch):
    """MMBench's circular copies share their question's embedded image: one batch decodes it once and the Pipeline
    prepares (and encodes) it once, as it does for an image asked about by path."""
    import vlmkit
    from vlmkit.eval import runner
    from vlmkit.eval.readers import EmbeddedImage
    from vlmkit.eval.tasks import get_task

    ckpt, data = trained
    pipe = vlmkit.load(ckpt)
    decodes, prepares = [], []
    real_open, real_prepare = EmbeddedImage.open, pipe.processor.prepare_images
    monkeypatch.setattr(EmbeddedImage, "open", lambda self: decodes.append(1) or real_open(self))
    monkeypatch.setattr(pipe.processor, "prepare_images", lambda *a, **k: prepares.append(1) or real_prepare(*a, **k))
    result, _ = runner.run_task(pipe, get_task("mmbench"), data, "test", 2, batch_size=8, progress=False)
    assert result["n"] == 8  # 2 questions x 4 copies, one batch
    assert len(decodes) == len(prepares) == 2
