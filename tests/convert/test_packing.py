"""Packing is exact for every generative family: a packed batch (several samples per row, block-diagonal
attention, positions restarting per sample, images routed to their own sample) gives the same loss and the
same gradients as the same samples padded one per row, within 1e-5.

Every family with a generative model class is covered through the tiny checkpoints of the interop tests
(their real processors: AnyRes tiles, native-resolution M-RoPE, image splitting, prefix-LM), plus the
from-scratch tiny-llava. A new family added to MODEL_FAMILIES fails ``test_every_family_is_covered`` until it
is added here."""

from __future__ import annotations

import pytest
import torch

import vlmkit
from vlmkit.data.collate import collate, collate_packed
from vlmkit.data.conversations import ConversationDataset, Sample, group_by_image
from vlmkit.models import MODEL_FAMILIES, SPLICE_FAMILIES

from hf_fixtures import real_images

pytest.importorskip("transformers", reason="transformers (a test extra) builds the families' tiny checkpoints")

pytestmark = pytest.mark.usefixtures("single_thread")

FOLDERS = {"llava": "llava_folder", "llava_next": "next_folder", "llava_onevision": "ov_folder",
           "qwen2_vl": "qwen_folder", "idefics3": "idefics3", "paligemma": "paligemma_folder",
           "mllama": "mllama_folder", "flamingo": "idefics_folder", "blip2": "blip2_folder",
           "instructblip": "instructblip_folder"}
# families that train on one question and its answer (a prompt and its continuation or suffix)
SINGLE_TURN = {"paligemma", "blip2", "instructblip"}
# the contrastive families train on image-caption pairs with a pooled text tower: no LM sequence to pack
NOT_PACKED = {"clip", "siglip"}


def conversations(single_turn: bool) -> list[list[dict]]:
    qa = [("What colour is the small circle?", "It is red."), ("How many squares?", "Two squares."),
          ("Describe the image.", "A blue triangle left of a green star and a yellow square."), ("Is it red?", "yes")]
    if single_turn:  # PaliGemma trains on one prompt and its suffix
        return [[{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}] for q, a in qa]
    out = []
    for k in range(len(qa)):
        turns = []
        for j, (q, a) in enumerate(qa[:k + 1]):
            turns += [{"from": "human", "value": ("<image>\n" if j == 0 else "") + q}, {"from": "gpt", "value": a}]
        out.append(turns)
    return out


def samples_for(tmp_path, single_turn: bool) -> list[Sample]:
    """Four samples of different lengths on images of different sizes (so tiled / native-resolution families
    give each image its own number of tokens)."""
    paths = []
    for i, im in enumerate(real_images()):
        paths.append(tmp_path / f"im{i}.png")
        im.save(paths[-1])
    convs = conversations(single_turn)
    return [Sample(id=str(i), images=[paths[i % len(paths)]], conversations=c, source=f"sample {i}")
            for i, c in enumerate(convs)]


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(batch["input_ids"], batch["pixel_values"], labels=batch["labels"], position_ids=batch["position_ids"],
                document_ids=batch["document_ids"], segment_ids=batch["segment_ids"])
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.n_tokens, grads


def check_packed_equals_padded(model, items, pad_id, pack_length):
    model.train()
    padded = collate(items, pad_id)
    packed = collate_packed(items, pad_id, pack_length)
    assert packed["input_ids"].shape[0] < len(items), "the samples were not packed"
    assert int(packed["attention_mask"].sum()) == int(padded["attention_mask"].sum())
    loss_a, n_a, grads_a = loss_and_grads(model, padded)
    loss_b, n_b, grads_b = loss_and_grads(model, packed)
    assert n_a == n_b > 0
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=1e-5, msg=name)
    # the proof can fail: the same rows under plain causal attention (samples see each other, positions run on)
    # give gradients far outside that tolerance
    leaky = dict(packed, position_ids=None, document_ids=None, segment_ids=None)
    _, _, grads_c = loss_and_grads(model, leaky)
    assert max(float((grads_c[n] - grads_a[n]).abs().max()) for n in grads_a) > 1e-3


@pytest.mark.parametrize("family", sorted(FOLDERS))
def test_packed_loss_and_gradients_equal_padded(request, family, tmp_path):
    folder = request.getfixturevalue(FOLDERS[family])[0]
    pipe = vlmkit.load(folder)
    assert pipe.config.family == family
    ds = ConversationDataset(samples_for(tmp_path, single_turn=family in SINGLE_TURN), pipe.processor)
    items = [ds[i] for i in range(len(ds))]
    lengths = sorted(len(x["input_ids"]) for x in items)
    check_packed_equals_padded(pipe.model, items, pipe.processor.tokenizer.pad_id, lengths[-1] + lengths[0])


@pytest.mark.parametrize("connector", [{}, {"connector.kind": "qformer", "connector.qformer": {
    "width": 32, "depth": 2, "heads": 4, "mlp_dim": 64, "num_query_tokens": 6}}], ids=["pixel_shuffle", "qformer"])
def test_tiny_llava_with_grouped_questions_packs_exactly(tmp_path, connector):
    """The from-scratch family, with group_by_image's shared-prefix samples (segments inside a sample); with its
    projector and with a Q-Former (learned queries per image, BLIP-2's connector)."""
    from vlmkit.config import apply_overrides
    from vlmkit.models import build_model
    from vlmkit.presets import get_preset
    from vlmkit.processing import Processor, TextTokenizer, train_bpe

    torch.manual_seed(0)
    preset = get_preset("tiny-llava")
    tok = TextTokenizer(train_bpe(["what colour is the small circle? it is red. how many squares? two."] * 4, 300))
    cfg = apply_overrides(preset.model, {"lm.vocab_size": tok.vocab_size, **connector})
    model = build_model(cfg, tok.token_id(preset.processor.image_token))
    processor = Processor(apply_overrides(preset.processor, {"image_seq_len": model.image_seq_len}), tok)
    singles = samples_for(tmp_path, single_turn=True)
    shared = [Sample(id=f"q{i}", images=singles[0].images, conversations=s.conversations, source=s.source)
              for i, s in enumerate(singles)]
    samples = singles[1:] + group_by_image(shared, max_turns=8)  # one grouped sample of four questions
    ds = ConversationDataset(samples, processor)
    items = [ds[i] for i in range(len(ds))]
    assert any(bool((x["segment_ids"] > 0).any()) for x in items)
    check_packed_equals_padded(model, items, tok.pad_id, max(len(x["input_ids"]) for x in items) + 40)


def test_every_family_is_covered():
    families = set(MODEL_FAMILIES.names()) | set(SPLICE_FAMILIES)
    assert families - NOT_PACKED == set(FOLDERS), "add the new family's tiny checkpoint to FOLDERS"
