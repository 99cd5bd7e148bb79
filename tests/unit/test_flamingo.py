"""The flamingo family's image-index embeddings: a token that reads several images at once (xattn.only_last:
false) tells them apart only with them; cross-attention over the concatenated states is otherwise blind to order."""

from __future__ import annotations

import pytest
import torch

from vlmkit.config import LanguageConfig, VisionConfig
from vlmkit.models import build_model
from vlmkit.models.flamingo import CrossAttentionConfig, FlamingoConfig

from helpers import fixed_media, forward

pytestmark = pytest.mark.usefixtures("single_thread")
IMAGE = 5


def tiny(index_embed: int):
    cfg = FlamingoConfig(family="flamingo",
                         vision=VisionConfig(arch="cnn", image_size=(16, 16), patch_size=8, width=16, heads=2),
                         lm=LanguageConfig(vocab_size=32, width=32, depth=2, heads=4, kv_heads=2, mlp_dim=48),
                         xattn=CrossAttentionConfig(every=1, use_resampler=False, only_last=False,
                                                    image_index_embed=index_embed))
    torch.manual_seed(0)
    model = build_model(cfg, IMAGE).eval()
    with torch.no_grad():  # open the gates (zero at initialisation: the model would ignore the images)
        for block in model.lm.xattn:
            block.alpha_cross_attn.fill_(1.0)
        if index_embed:
            model.connector.image_index.normal_()
    return model


@pytest.mark.parametrize("index_embed", [0, 3])
def test_image_order_is_seen_only_with_index_embeddings(index_embed):
    """The first gated block's output at the last token (which sees both images; before any self-attention, so
    nothing else carries their order) changes with the images' order only when their places are embedded."""
    model = tiny(index_embed)
    ids = torch.tensor([[1, IMAGE, 7, IMAGE, 8, 9]])
    a, b = torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16)
    embeds = model.lm.embed_tokens(ids)
    sees = model.media_mask(ids)  # [1, T, 2]
    assert sees[0, -1].all() and sees[0, 2].tolist() == [True, False]

    def last(pixels):
        states = model.group_images(ids, model.encode_media(fixed_media(pixels, 1)))  # [1, 2 * M, D]
        M = states.shape[1] // 2
        mask = sees[..., None].expand(-1, -1, -1, M).reshape(1, ids.shape[1], -1)
        return model.lm.xattn[0](embeds, states, mask)[0, -1]

    with torch.no_grad():
        assert torch.allclose(last(torch.cat([a, b])), last(torch.cat([b, a])), atol=1e-6) == (index_embed == 0)


def test_more_images_than_places_is_refused():
    model = tiny(1)
    with pytest.raises(ValueError, match="image_index_embed gives 1 places"):
        forward(model, torch.tensor([[IMAGE, IMAGE, 3]]), fixed_media(torch.randn(2, 3, 16, 16), 1))
