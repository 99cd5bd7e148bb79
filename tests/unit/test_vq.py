"""The VQ image tokenizer (models/vq.py, families/vq.py): the quantiser's maths against hand computations (nearest
code, straight-through gradient, EMA update with Laplace smoothing, commitment and codebook losses, dead-code
restarts, l2-normalised codes), encode -> decode shapes, the Pipeline's encode_codes / decode_codes and their
refusals (codes out of range, a grid of the wrong rank, a model without a codebook)."""

from __future__ import annotations

import pytest
import torch

from vlmkit.errors import ConfigError, DataError
from vlmkit.family import get_family
from vlmkit.models import build_model
from vlmkit.models.vq import VectorQuantizer, VQConfig, build_vq
from vlmkit.pipeline import Pipeline
from vlmkit.processing import Processor
from vlmkit.processing.vq import VQProcessorConfig, empty_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")


def quantizer(kind="ema", size=3, dim=2, **kw) -> VectorQuantizer:
    q = VectorQuantizer(VQConfig(codebook_size=size, code_dim=dim, quantizer=kind, **kw))
    q.initialised.fill_(1)  # no data-dependent init: the hand-set codebook stays
    return q


def set_codebook(q: VectorQuantizer, codes) -> None:
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor(codes, dtype=torch.float))
        if q.kind == "ema":
            q.ema_weight.copy_(q.embedding.weight)
            q.ema_count.fill_(1.0)


def grid(rows) -> torch.Tensor:
    """Vectors [N, D] as one image's grid [1, D, 1, N]."""
    return torch.tensor(rows, dtype=torch.float).t()[None, :, None, :].contiguous()


def test_nearest_code_commitment_and_codebook_loss_equal_hand_computation():
    q = quantizer("ste", beta=0.25).eval()
    set_codebook(q, [[0.0, 0.0], [1.0, 1.0], [-2.0, 0.0]])
    z = grid([[0.1, 0.2], [0.9, 1.4], [-1.5, 0.3]])
    out = q(z)
    assert out.codes.flatten().tolist() == [0, 1, 2]
    e = torch.tensor([[0.0, 0.0], [1.0, 1.0], [-2.0, 0.0]])
    zz = torch.tensor([[0.1, 0.2], [0.9, 1.4], [-1.5, 0.3]])
    mse = float(((zz - e) ** 2).mean())
    assert float(out.commit_loss) == pytest.approx(0.25 * mse, rel=1e-6)
    assert float(out.codebook_loss.detach()) == pytest.approx(mse, rel=1e-6)
    assert torch.allclose(out.z_q[0, :, 0, :].t(), e)  # the codes go forward
    assert out.usage == pytest.approx(1.0) and out.perplexity == pytest.approx(3.0, rel=1e-5)


def test_straight_through_gradient_reaches_the_encoder_output_unchanged():
    q = quantizer("ema").eval()
    set_codebook(q, [[0.0, 0.0], [1.0, 1.0], [-2.0, 0.0]])
    z = grid([[0.1, 0.2], [0.9, 1.4]]).requires_grad_(True)
    w = torch.randn(1, 2, 1, 2)
    (q(z).z_q * w).sum().backward()
    assert torch.equal(z.grad, w)  # d z_q / d z = identity (the commitment loss is not in this sum)
    q2 = quantizer("ste").eval()
    set_codebook(q2, [[0.0, 0.0], [1.0, 1.0], [-2.0, 0.0]])
    z2 = grid([[0.1, 0.2], [0.9, 1.4]])
    q2(z2).codebook_loss.backward()  # the codebook loss trains the used codes only
    g = q2.embedding.weight.grad
    assert g[2].abs().sum() == 0 and g[0].abs().sum() > 0 and g[1].abs().sum() > 0


def test_ema_update_equals_hand_computation_with_laplace_smoothing():
    decay, eps = 0.9, 0.01
    q = quantizer("ema", ema_decay=decay, ema_eps=eps, restart_after=0)
    set_codebook(q, [[0.0, 0.0], [1.0, 1.0], [-2.0, 0.0]])
    z = grid([[0.2, 0.0], [0.0, 0.4], [1.2, 0.8]])  # codes 0, 0, 1; code 2 unused
    q.train()(z)
    n = torch.tensor([2.0, 1.0, 0.0])
    count = decay * torch.ones(3) + (1 - decay) * n
    sums = decay * torch.tensor([[0.0, 0.0], [1.0, 1.0], [-2.0, 0.0]]) + \
        (1 - decay) * torch.tensor([[0.2, 0.4], [1.2, 0.8], [0.0, 0.0]])
    total = count.sum()
    smoothed = (count + eps) / (total + 3 * eps) * total
    assert torch.allclose(q.ema_count, count)
    assert torch.allclose(q.embedding.weight, sums / smoothed[:, None], atol=1e-6)
    assert q.unused_steps.tolist() == [0, 0, 1]


def test_dead_code_restart_replaces_an_unused_code_with_an_encoder_output():
    q = quantizer("ema", restart_after=2)
    set_codebook(q, [[0.0, 0.0], [1.0, 1.0], [50.0, 50.0]])  # code 2 is never anyone's nearest
    rows = [[0.2, 0.0], [1.2, 0.8], [0.1, 0.1], [0.9, 1.1]]
    q.train()(grid(rows))
    assert q.embedding.weight[2].tolist() == pytest.approx([50.0, 50.0], rel=1e-5) and int(q.unused_steps[2]) == 1
    q(grid(rows))  # its second unused step: re-initialised from this batch
    assert any(torch.allclose(q.embedding.weight[2], torch.tensor(r)) for r in rows)
    assert int(q.unused_steps[2]) == 0 and float(q.ema_count[2]) == 1.0
    q.eval()(grid(rows))  # evaluation never updates the codebook
    assert int(q.unused_steps[2]) == 0


def test_first_training_step_initialises_the_codebook_from_the_data():
    q = VectorQuantizer(VQConfig(codebook_size=4, code_dim=2, quantizer="ste")).train()
    rows = torch.randn(16, 2) * 5
    out = q(grid(rows.tolist()))
    assert all(any(torch.allclose(c, r) for r in rows) for c in q.embedding.weight)
    assert out.usage > 0.25 and int(q.initialised) == 1


def test_l2_normalised_codes_compare_directions():
    q = quantizer("ste", l2_norm=True).eval()
    set_codebook(q, [[1.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    out = q(grid([[10.0, 1.0], [0.1, 0.2], [-0.5, 0.01]]))
    assert out.codes.flatten().tolist() == [0, 1, 2]
    assert torch.allclose(out.z_q.norm(dim=1), torch.ones(1, 1, 3))


@pytest.mark.parametrize("size, mult", [((32, 32), (1, 2, 2, 2)), ((64, 48), (1, 2, 2, 2)), ((32, 64), (1, 2)),
                                        ((16, 16), (1, 2, 2))])
def test_encode_decode_shapes(size, mult):
    cfg = VQConfig(image_size=size, channels=8, channel_mult=mult, norm_groups=4, code_dim=4, z_channels=8,
                   codebook_size=16, upsample="transpose" if len(mult) == 3 else "nearest")
    model = build_vq(cfg).eval()
    f = 2 ** (len(mult) - 1)
    x = torch.randn(2, 3, *size)
    codes = model.encode_codes(x)
    assert codes.shape == (2, size[0] // f, size[1] // f) and codes.dtype == torch.long
    assert model.decode_codes(codes).shape == (2, 3, *size)
    assert model.decode_codes(codes[0]).shape == (3, *size)
    out = model(x)
    assert torch.equal(out.codes, codes) and out.reconstruction.shape == x.shape


@pytest.mark.parametrize("encoder", ["patch", "conv"])
def test_a_patch_encoders_codes_depend_on_their_own_patch_only(encoder):
    """Changing one 4x4 patch changes the patch encoder's output at that cell alone (and a flat image's cells are
    all equal); taming's conv encoder spreads the change and the borders over many cells."""
    torch.manual_seed(0)
    cfg = VQConfig(image_size=(32, 32), channels=8, channel_mult=(1, 2, 4), norm_groups=0, code_dim=4,
                   z_channels=8, codebook_size=16, encoder=encoder)
    model = build_vq(cfg).eval()
    x = torch.randn(1, 3, 32, 32)
    y = x.clone()
    y[:, :, 12:16, 20:24] += 1.0  # the patch of cell (3, 5)
    with torch.no_grad():
        changed = (model.encode(x) - model.encode(y)).abs().sum(1)[0] > 0
        flat = model.encode(torch.full((1, 3, 32, 32), 0.3))[0].flatten(1)
    if encoder == "patch":
        assert changed.nonzero().tolist() == [[3, 5]]
        assert torch.equal(flat, flat[:, :1].expand_as(flat))
    else:
        assert changed.sum() > 9 and not torch.equal(flat, flat[:, :1].expand_as(flat))


def test_config_refusals():
    with pytest.raises(ConfigError, match="quantizer must be one of ema, ste"):
        VQConfig(quantizer="gumbel")
    with pytest.raises(ConfigError, match="encoder must be one of conv, patch"):
        VQConfig(encoder="vit")
    with pytest.raises(ConfigError, match="not a multiple of the downsampling factor 8"):
        VQConfig(image_size=(60, 64))
    with pytest.raises(ConfigError, match="norm_groups 8 does not divide"):
        VQConfig(channels=4, channel_mult=(1, 3))


@pytest.fixture(scope="module")
def vq_pipe():
    cfg = VQConfig(image_size=(32, 32), channels=8, channel_mult=(1, 2, 2, 2), norm_groups=4, code_dim=4,
                   z_channels=8, codebook_size=16)
    tok = empty_tokenizer()
    _, model, processor = get_family("vq").new_model(cfg, VQProcessorConfig(), tok)
    return Pipeline(model, processor)


def test_pipeline_codes_round_trip_equals_the_model(vq_pipe):
    from PIL import Image

    images = [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (32, 32), (0, 0, 255))]
    codes = vq_pipe.encode_codes(images)
    pixels = vq_pipe.processor.prepare_images(images).pixel_values
    assert pixels.shape == (2, 3, 32, 32) and float(pixels.min()) >= -1 and float(pixels.max()) <= 1
    assert codes.shape == (2, 4, 4) and torch.equal(codes, vq_pipe.model.encode_codes(pixels))
    one = vq_pipe.decode_codes(codes[0].tolist())  # rows of ids, as the API takes them
    assert one.shape == (3, 32, 32)
    assert torch.equal(one, vq_pipe.model.decode(vq_pipe.model.quantize.lookup(codes[:1]))[0])
    assert torch.allclose(vq_pipe.decode_codes(codes)[1], vq_pipe.decode_codes(codes[1]), atol=1e-5)


def test_pipeline_refuses_bad_codes(vq_pipe):
    with pytest.raises(DataError, match=r"code 16 at \[1, 2\] is out of range: the codebook has 16 codes"):
        vq_pipe.decode_codes([[0, 1, 2], [3, 4, 16]])
    with pytest.raises(DataError, match="code -1"):
        vq_pipe.decode_codes(torch.tensor([[[-1]]]))
    with pytest.raises(DataError, match=r"integer code ids \[h, w\] or \[n, h, w\], got torch.int64 \[4\]"):
        vq_pipe.decode_codes([1, 2, 3, 4])
    with pytest.raises(DataError, match="rows of equal length"):
        vq_pipe.decode_codes([[1, 2], [3]])
    with pytest.raises(DataError, match="integer code ids"):
        vq_pipe.decode_codes(torch.zeros(2, 2))
    with pytest.raises(DataError, match="this vq model does not generate text: it turns images into codes and back"):
        vq_pipe.chat([], "what is this?")
    with pytest.raises(DataError, match="VQ image tokenizer"):
        vq_pipe.processor.prompt("hello", None)


def test_a_chat_model_is_refused_codes(tiny_config, make_processor, tokenizer):
    model = build_model(tiny_config(), tokenizer.token_id("<image>"))
    pipe = Pipeline(model, make_processor(image_seq_len=model.image_seq_len))
    with pytest.raises(DataError, match="encode_codes\\(\\) needs a model with an image codebook .* this llava"):
        pipe.encode_codes([torch.zeros(3, 16, 16)])
    with pytest.raises(DataError, match="decode_codes\\(\\) needs a model with an image codebook"):
        pipe.decode_codes([[0]])
    assert not pipe.has_image_codes


def test_processor_saves_and_reads_back(vq_pipe, tmp_path):
    vq_pipe.processor.save(tmp_path)
    again = Processor.from_pretrained(tmp_path)
    assert again.cfg == vq_pipe.processor.cfg and again.tokenizer.vocab_size == 2


def test_ste_codebook_is_a_parameter_and_ema_codebook_is_not():
    assert build_vq(VQConfig(quantizer="ste")).quantize.embedding.weight.requires_grad
    assert not build_vq(VQConfig(quantizer="ema")).quantize.embedding.weight.requires_grad
