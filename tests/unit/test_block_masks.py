"""Block-bidirectional attention (nn/masks.py ``block_ids`` / ``with_blocks``): causal text, every image's tokens
seeing each other both ways (Transfusion; Show-o's omni-attention), per sample and safe under packing."""

from __future__ import annotations

import torch

from vlmkit.config import LanguageConfig
from vlmkit.lm.decoder import DecoderLM
from vlmkit.nn import block_ids, causal_mask, document_mask, with_blocks

# one sample: 2 text tokens, an image of 3, 1 text token, an image of 2 (I = image)
LAYOUT = "TTIIITII"


def _in_block(layout: str) -> torch.Tensor:
    return torch.tensor([[c == "I" for c in layout]])


def test_block_ids_number_runs_and_break_at_documents():
    in_block = torch.tensor([[0, 1, 1, 0, 1, 1, 1, 1, 0]]).bool()
    docs = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, -1]])
    assert block_ids(in_block).tolist() == [[-1, 0, 0, -1, 1, 1, 1, 1, -1]]
    # the second sample's image starts a block of its own though it follows the first's without a text token
    assert block_ids(in_block, docs).tolist() == [[-1, 0, 0, -1, 1, 2, 2, 2, -1]]


def test_text_sees_no_later_image_and_images_see_their_whole_block():
    ids = block_ids(_in_block(LAYOUT))
    mask = with_blocks(causal_mask(len(LAYOUT)), ids)[0, 0]
    img1, img2 = [2, 3, 4], [6, 7]
    for q in range(len(LAYOUT)):
        for k in range(len(LAYOUT)):
            if q in img1 and k in img1 or q in img2 and k in img2:
                assert mask[q, k], (q, k)  # the whole block, both ways
            else:
                assert bool(mask[q, k]) == (k <= q), (q, k)  # causal elsewhere: text 5 never sees image 2
    assert not mask[5, 6] and not mask[1, 2] and mask[5, 4]


def test_with_blocks_after_a_cache_takes_the_queries_as_the_last_keys():
    ids = block_ids(_in_block(LAYOUT))
    full = with_blocks(causal_mask(len(LAYOUT)), ids)
    tail = with_blocks(causal_mask(3, offset=len(LAYOUT) - 3), ids)  # the image 2 block and the text before it
    assert torch.equal(tail, full[:, :, -3:])


def test_packed_equals_unpacked_through_a_decoder():
    torch.manual_seed(0)
    lm = DecoderLM(LanguageConfig(vocab_size=32, width=32, depth=2, heads=4, kv_heads=2, mlp_dim=64)).eval()
    a, b = "TTIIITII", "TIITT"
    xa, xb = torch.randn(1, len(a), 32), torch.randn(1, len(b), 32)

    def alone(x, layout):
        mask = with_blocks(causal_mask(len(layout)), block_ids(_in_block(layout)))
        return lm(x, mask=mask)

    docs = torch.tensor([[0] * len(a) + [1] * len(b) + [-1, -1]])
    in_block = torch.cat([_in_block(a), _in_block(b), torch.zeros(1, 2, dtype=torch.bool)], 1)
    pos = torch.tensor([list(range(len(a))) + list(range(len(b))) + [0, 0]])
    x = torch.cat([xa, xb, torch.zeros(1, 2, 32)], 1)
    packed = lm(x, position_ids=pos, mask=with_blocks(document_mask(docs), block_ids(in_block, docs)))
    torch.testing.assert_close(packed[:, :len(a)], alone(xa, a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, len(a):len(a) + len(b)], alone(xb, b), atol=1e-5, rtol=1e-5)
    # and the blocks matter: the causal mask alone gives the first image's first token another output
    assert not torch.allclose(lm(xa, mask=causal_mask(len(a)))[:, 2], alone(xa, a)[:, 2], atol=1e-4)
