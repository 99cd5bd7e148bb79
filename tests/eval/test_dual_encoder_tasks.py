"""Zero-shot classification and retrieval with a dual encoder (CLIP): vlmkit eval's results equal the metrics
computed directly from Pipeline.embed_images / embed_texts, prompt ensembling is the renormalised mean of the
templates' embeddings, and the refusals (empty class folder, generative tasks, chat) come before any work."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from vlmkit.errors import ConfigError, DataError
from vlmkit.eval.metrics.retrieval import retrieval_metrics
from vlmkit.eval.readers import read_class_templates, read_coco_captions, read_image_folder
from vlmkit.eval.runner import run_eval
from vlmkit.pipeline import Pipeline

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def clip(tiny_dual_encoder):
    return tiny_dual_encoder


@pytest.fixture(scope="module")
def pipe(clip):
    return Pipeline.from_pretrained(clip[0])


def predictions(out, task: str) -> list[dict]:
    return [json.loads(line) for line in (out.parent / f"predictions_{task}.jsonl").read_text().splitlines()]


def test_zero_shot_classification_equals_direct_computation(clip, pipe, tmp_path):
    ckpt, shapes = clip
    folder = shapes / "objects_val"
    out = tmp_path / "results.json"
    res = run_eval(ckpt, ["zero_shot_classification"], data=folder, out=out, split="val", progress=False)
    r = res["tasks"]["zero_shot_classification"]
    # direct: the classes.json templates, classifier = prompt-ensembled class embeddings, top-1 = argmax
    samples, classes, _ = read_image_folder(folder)
    templates = read_class_templates(folder)
    assert len(classes) == 30 and len(samples) == 30 and len(templates) == 3 and classes[0] == "blue circle"
    weights = pipe.classifier(classes, templates)
    logits = pipe.embed_images([s.images[0] for s in samples]) @ weights.t()
    labels = torch.tensor([s.meta["label"] for s in samples])
    top1 = (logits.argmax(dim=1) == labels).double().mean().item()
    top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(dim=1).double().mean().item()
    assert r["n"] == 30 and r["metric"] == "top1_accuracy"
    assert r["metrics"]["top1_accuracy"] == pytest.approx(top1, abs=1e-12)
    assert r["metrics"]["top5_accuracy"] == pytest.approx(top5, abs=1e-12)
    assert r["metrics"]["prompt_templates"] == 3.0
    per_class = [(logits.argmax(1)[labels == c] == c).double().mean() for c in labels.unique()]
    assert r["metrics"]["mean_per_class_recall"] == pytest.approx(torch.stack(per_class).mean().item(), abs=1e-12)
    # and sample by sample: the predicted class names are the argmax's, in the reader's order
    recs = predictions(out, "zero_shot_classification")
    assert [x["id"] for x in recs] == [s.id for s in samples]
    assert [x["prediction"] for x in recs] == [classes[i] for i in logits.argmax(dim=1).tolist()]
    assert len(set(x["prediction"] for x in recs)) > 1  # not one class for everything
    # the folder resolves the same as root/{split}
    (tmp_path / "alt").mkdir()
    (tmp_path / "alt" / "val").symlink_to(folder, target_is_directory=True)
    again = run_eval(ckpt, ["zero_shot_classification"], data=tmp_path / "alt", out=tmp_path / "alt.json",
                     split="val", progress=False)
    assert again["tasks"]["zero_shot_classification"]["metrics"] == r["metrics"]


def test_retrieval_equals_direct_computation(clip, pipe, tmp_path):
    ckpt, shapes = clip
    out = tmp_path / "results.json"
    res = run_eval(ckpt, ["retrieval"], data=shapes, out=out, split="val", progress=False)
    r = res["tasks"]["retrieval"]
    samples = read_coco_captions(shapes / "captions_val.json", shapes)
    texts = [t for s in samples for t in s.answers]
    owner = [i for i, s in enumerate(samples) for _ in s.answers]
    sim = pipe.embed_images([s.images[0] for s in samples]) @ pipe.embed_texts(texts).t()
    direct = retrieval_metrics(sim, owner, ks=(1, 5, 10))
    assert direct["n_images"] == 10 and direct["n_texts"] == 30
    for k, v in direct.items():
        assert r["metrics"][k] == pytest.approx(v, abs=1e-12), k
    assert r["metrics"]["truncated_captions"] == pipe.last_truncated
    assert r["metric"] == "image_to_text_recall@1" and r["n"] == 10
    recs = predictions(out, "retrieval")
    assert [x["prediction"] for x in recs] == [texts[i] for i in sim.argmax(dim=1).tolist()]


def test_classifier_is_the_renormalised_mean_of_the_template_embeddings(pipe):
    classes = ["red circle", "blue square", "green star"]  # not all the classes: any names work
    templates = ["one shape: a {}.", "Just one shape: a small {}.", "Just one shape: a large {}."]
    w = pipe.classifier(classes, templates)
    per_template = torch.stack([pipe.embed_texts([t.format(c) for c in classes]) for t in templates])  # [T, C, E]
    expected = F.normalize(per_template.mean(dim=0), dim=-1)
    assert w.shape == (3, 32)
    torch.testing.assert_close(w, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(w, per_template[0], atol=1e-3)  # the ensemble is not just the first template
    # one template: that template's embeddings; none: CLIP's "a photo of a {}."
    torch.testing.assert_close(pipe.classifier(classes, templates[:1]), per_template[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pipe.classifier(classes), pipe.embed_texts([f"a photo of a {c}." for c in classes]),
                               rtol=1e-5, atol=1e-6)


def test_empty_class_folder_is_named(clip, tmp_path):
    ckpt, shapes = clip
    folder = tmp_path / "objects"
    for src in sorted((shapes / "objects_val").iterdir())[:4]:
        if src.is_dir():
            (folder / src.name).mkdir(parents=True)
            for f in src.iterdir():
                (folder / src.name / f.name).write_bytes(f.read_bytes())
    (folder / "purple_blob").mkdir()
    (folder / "purple_blob" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"class folder 'purple_blob' has no images"):
        run_eval(ckpt, ["zero_shot_classification"], data=folder, out=tmp_path / "r.json", progress=False)
    assert not (tmp_path / "r.json").exists()


def test_generative_tasks_are_refused_before_anything_runs(clip, tmp_path):
    ckpt, shapes = clip
    for tasks in (["vqav2"], ["retrieval", "pope"]):
        with pytest.raises(ConfigError, match=rf"dual encoder \(clip\).* task '{tasks[-1]}' cannot run; its tasks: "
                                              r".*zero_shot_classification"):
            run_eval(ckpt, tasks, data=shapes, out=tmp_path / "r.json", split="val", progress=False)
    assert list(tmp_path.iterdir()) == []  # not even the retrieval task that came first


def test_generation_and_scoring_refuse_a_dual_encoder(clip, pipe):
    image = clip[1] / "images" / "000000.png"
    for call in (lambda: pipe.chat(image, "What is this?"), lambda: pipe.generate(image, "a"),
                 lambda: pipe.rank(image, "What is this?", ["a", "b"]), lambda: pipe.score([image], "a", " b"),
                 lambda: pipe.chat_batch([(image, "What is this?")])):
        with pytest.raises(DataError, match=r"needs a generative model; this is a dual encoder \(clip\).*embed_images"):
            call()


@pytest.mark.parametrize("templates", [["a photo of a thing."], ["{} and {}"], "a {}", [3]])
def test_class_templates_need_one_slot_for_the_name(tmp_path, templates):
    (tmp_path / "classes.json").write_text(json.dumps({"templates": templates}))
    with pytest.raises(DataError, match=r"'templates' must be a list of strings with one \{\} each"):
        read_class_templates(tmp_path)
