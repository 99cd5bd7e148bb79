"""Retrieval recall@K (CLIP_benchmark semantics: any caption hits) and zero-shot top-K accuracy, by hand and vs topk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmkit.errors import DataError
from vlmkit.eval.metrics.retrieval import (
    classification_ranks,
    image_to_text_ranks,
    retrieval_metrics,
    text_to_image_ranks,
    zero_shot_classification_metrics,
)

# 3 images, 5 captions: captions 0, 1 -> image 0; 2, 3 -> image 1; 4 -> image 2
SIM = [
    [0.9, 0.1, 0.8, 0.2, 0.3],
    [0.5, 0.6, 0.1, 0.4, 0.7],
    [0.2, 0.3, 0.9, 0.1, 0.0],
]
OWNER = [0, 0, 1, 1, 2]


def test_image_to_text_ranks_by_hand():
    # image 0 row order: t0 t2 t4 t3 t1 -> caption t0 at rank 0
    # image 1 row order: t4 t1 t0 t3 t2 -> best of its captions (t3) at rank 3
    # image 2 row order: t2 t1 t0 t3 t4 -> its caption at rank 4
    assert image_to_text_ranks(SIM, OWNER).tolist() == [0, 3, 4]


def test_text_to_image_ranks_by_hand():
    # columns: t0 [.9 .5 .2] img0 rank 0; t1 [.1 .6 .3] img0 rank 2; t2 [.8 .1 .9] img1 rank 2;
    #          t3 [.2 .4 .1] img1 rank 0; t4 [.3 .7 .0] img2 rank 2
    assert text_to_image_ranks(SIM, OWNER).tolist() == [0, 2, 2, 0, 2]


def test_retrieval_metrics_by_hand():
    m = retrieval_metrics(SIM, OWNER, ks=(1, 2, 3, 4, 5, 10))
    assert m["image_to_text_recall@1"] == pytest.approx(1 / 3)
    assert m["image_to_text_recall@3"] == pytest.approx(1 / 3)
    assert m["image_to_text_recall@4"] == pytest.approx(2 / 3)
    assert m["image_to_text_recall@5"] == 1.0
    assert m["text_to_image_recall@1"] == pytest.approx(2 / 5)
    assert m["text_to_image_recall@2"] == pytest.approx(2 / 5)
    assert m["text_to_image_recall@3"] == 1.0
    assert m["text_to_image_recall@10"] == 1.0  # K above the number of images: every text is a hit
    assert (m["n_images"], m["n_texts"]) == (3, 5)


def test_blockwise_ranking_gives_the_same_ranks(monkeypatch):
    import vlmkit.eval.metrics.retrieval as retrieval

    monkeypatch.setattr(retrieval, "_CHUNK", 2)  # 5 texts / 3 images: several blocks, the last one partial
    assert image_to_text_ranks(SIM, OWNER).tolist() == [0, 3, 4]
    assert text_to_image_ranks(SIM, OWNER).tolist() == [0, 2, 2, 0, 2]


def test_ties_rank_lower_index_first():
    sim = [[0.5, 0.5], [0.5, 0.5]]
    assert image_to_text_ranks(sim, [0, 1]).tolist() == [0, 1]
    assert text_to_image_ranks(sim, [0, 1]).tolist() == [0, 1]
    m = retrieval_metrics(sim, [0, 1], ks=(1, 2))
    assert m["image_to_text_recall@1"] == 0.5 and m["text_to_image_recall@1"] == 0.5
    assert m["image_to_text_recall@2"] == 1.0
    # a tie with a higher-index candidate does not push the target down
    assert text_to_image_ranks([[0.3], [0.3], [0.3]], [1]).tolist() == [1]


def test_matches_topk_reference_on_random_matrix_without_ties():
    # CLIP_benchmark recall_at_k: torch.topk over the row, hit if any positive among the top k
    gen = torch.Generator().manual_seed(0)
    n_images, n_texts = 7, 23
    sim = torch.randn(n_images, n_texts, generator=gen)
    owner = torch.cat([torch.arange(n_images), torch.randint(0, n_images, (n_texts - n_images,), generator=gen)])
    m = retrieval_metrics(sim, owner, ks=(1, 3, 5))
    positive = torch.zeros(n_images, n_texts, dtype=torch.bool)
    positive[owner, torch.arange(n_texts)] = True
    for k in (1, 3, 5):
        top_texts = sim.topk(k, dim=1).indices
        i2t = positive.gather(1, top_texts).any(1).double().mean().item()
        top_images = sim.T.topk(k, dim=1).indices
        t2i = positive.T.gather(1, top_images).any(1).double().mean().item()
        assert m[f"image_to_text_recall@{k}"] == pytest.approx(i2t)
        assert m[f"text_to_image_recall@{k}"] == pytest.approx(t2i)


def test_accepts_numpy_and_tensors():
    a = retrieval_metrics(np.array(SIM), np.array(OWNER))
    b = retrieval_metrics(torch.tensor(SIM, dtype=torch.float16), torch.tensor(OWNER))
    assert a == retrieval_metrics(SIM, OWNER)
    assert b["text_to_image_recall@1"] == pytest.approx(2 / 5)


@pytest.mark.parametrize("sim, owner, message", [
    (SIM, [0, 0, 1, 1, 1], "image 2 has no caption"),
    (SIM, [0, 0, 1, 2], "one image index per"),
    (SIM, [0, 0, 1, 3, 2], r"text_to_image\[3\] = 3"),
    (SIM, [0.0, 0.0, 1.0, 1.0, 2.0], "integer"),
    ([[0.1, float("nan")]], [0, 0], "NaN"),
    ([1.0, 2.0], [0, 0], "2-D"),
    ([[]], [], "non-empty"),
])
def test_retrieval_input_errors(sim, owner, message):
    with pytest.raises(DataError, match=message):
        retrieval_metrics(sim, owner)


@pytest.mark.parametrize("ks", [(), (0,), (1.5,), (True,)])
def test_bad_ks(ks):
    with pytest.raises(DataError, match="ks"):
        retrieval_metrics(SIM, OWNER, ks=ks)


# --- zero-shot classification ----------------------------------------------------------------------------------

LOGITS = [
    [0.1, 0.9, 0.0, 0.0, 0.0, 0.0],  # label 1: rank 0
    [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # label 4: rank 4 (top-5, not top-1)
    [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # label 5: rank 5 (not top-5)
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # label 0: all tied, lower index first -> rank 0
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # label 1: all tied -> rank 1
]
LABELS = [1, 4, 5, 0, 1]


def test_classification_ranks_by_hand():
    assert classification_ranks(LOGITS, LABELS).tolist() == [0, 4, 5, 0, 1]


def test_zero_shot_classification_metrics_by_hand():
    m = zero_shot_classification_metrics(LOGITS, LABELS)
    assert m["top1_accuracy"] == pytest.approx(2 / 5)
    assert m["top5_accuracy"] == pytest.approx(4 / 5)
    # top-1 recall per class present: class 0 -> 1/1, class 1 -> 1/2, class 4 -> 0/1, class 5 -> 0/1
    assert m["mean_per_class_recall"] == pytest.approx((1 + 0.5 + 0 + 0) / 4)
    assert m["n"] == 5


def test_top_k_above_class_count_is_clamped():
    m = zero_shot_classification_metrics([[0.2, 0.8], [0.9, 0.1]], [0, 0], ks=(1, 5))
    assert m["top1_accuracy"] == 0.5 and m["top5_accuracy"] == 1.0


def test_classification_matches_topk_reference():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(50, 10, generator=gen)
    labels = torch.randint(0, 10, (50,), generator=gen)
    m = zero_shot_classification_metrics(logits, labels, ks=(1, 3, 5))
    for k in (1, 3, 5):
        expected = (logits.topk(k, dim=1).indices == labels[:, None]).any(1).double().mean().item()
        assert m[f"top{k}_accuracy"] == pytest.approx(expected)


@pytest.mark.parametrize("labels, message", [([0, 1], "one class index"), ([0, 1, 2, 0, 6], r"labels\[4\] = 6"),
                                             ([0, 1, 2, 0, -1], r"labels\[4\] = -1")])
def test_classification_label_errors(labels, message):
    with pytest.raises(DataError, match=message):
        zero_shot_classification_metrics(LOGITS, labels)
