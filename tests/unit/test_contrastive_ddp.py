"""The contrastive losses under data parallelism: two gloo processes, each with half of a batch of 8 pairs
and the same tiny DualEncoder wrapped in DistributedDataParallel, run forward + backward. For the CLIP and
the SigLIP loss, the mean of the two ranks' losses is the loss of one process on all 8 pairs, and every
parameter's DDP-averaged gradient (the logit scale and bias included) is that process's gradient.

The ranks are spawned (torch.multiprocessing, start method spawn) and meet through a ``file://`` rendezvous in
a temporary directory; they write their losses and gradients to files. Every wait is bounded: the process
group's collectives time out after 30 s and the test kills the ranks if they have not finished after 90 s, so
a failing rank fails the test (with its traceback) instead of hanging it.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from vlmkit.models import build_model
from vlmkit.presets import get_preset

from helpers import pairs

pytestmark = [pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with the gloo backend is needed"),
              pytest.mark.usefixtures("single_thread")]

WORLD = 2
BATCH = 8
EOS = 2
PRESETS = {"clip": "tiny-clip-vit", "siglip": "tiny-siglip-vit"}
DEADLINE_S = 90.0  # the whole spawn (two interpreters importing torch on a busy 2-core machine) + both losses


def tiny_model(kind: str):
    """A small DualEncoder of the ``kind`` preset's layout (same seed everywhere)."""
    cfg = get_preset(PRESETS[kind]).model
    vision = dataclasses.replace(cfg.vision, image_size=(16, 16), patch_size=8, width=16, depth=1, heads=2,
                                 mlp_dim=32)
    text = dataclasses.replace(cfg.text, vocab_size=32, width=16, depth=1, heads=2, mlp_dim=32,
                               context_length=8, eos_token_id=EOS)
    contrastive = dataclasses.replace(cfg.contrastive, embed_dim=16)
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(cfg, vision=vision, text=text, contrastive=contrastive), None)
    with torch.no_grad():  # non-trivial temperature and bias, so that their gradients are not special
        model.logits.scale.fill_(1.9)
        if model.logits.bias is not None:
            model.logits.bias.fill_(-2.0)
    return model


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(BATCH, 3, 16, 16, generator=g)
    ids = torch.randint(3, 32, (BATCH, 6), generator=g)
    ids[:, -1] = EOS
    return pixels, ids


def _rank(rank: int, init_file: str, out_dir: str) -> None:
    """One data-parallel rank: its half of the batch through a DDP-wrapped model, for both losses."""
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=30))
    try:
        pixels, ids = make_batch()
        shard = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        results = {}
        for kind in PRESETS:
            model = tiny_model(kind)
            ddp = DistributedDataParallel(model)
            out = ddp(pairs(pixels[shard], ids[shard]))  # the loss gathers the other rank's embeddings by default
            out.loss.backward()
            results[kind] = {"loss": out.loss.detach(),
                             "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()}}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def single_process(kind: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = tiny_model(kind)
    pixels, ids = make_batch()
    out = model(pairs(pixels, ids), gather=False)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def spawn_ranks(tmp: Path, target=_rank, deadline_s: float = DEADLINE_S) -> list[dict]:
    """Run ``target(rank, rendezvous_file, tmp)`` in WORLD spawned processes; their results, one dict per
    rank.
    A rank that raises or dies fails the call at once (torch's ProcessContext.join re-raises its traceback and
    terminates the other ranks); ranks still running after ``deadline_s`` are killed."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(target, args=(str(tmp / "rendezvous"), str(tmp)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + deadline_s
    try:
        # join raises ProcessRaisedException / ProcessExitedException as soon as a rank fails
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {WORLD} gloo ranks did not finish within {deadline_s:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """The two ranks, spawned once for both losses."""
    return spawn_ranks(tmp_path_factory.mktemp("ddp"))


@pytest.mark.parametrize("kind", list(PRESETS))
def test_mean_of_rank_losses_is_the_single_process_loss(ranks, kind):
    loss, _ = single_process(kind)
    per_rank = torch.stack([r[kind]["loss"] for r in ranks])
    assert not torch.allclose(per_rank[0], per_rank[1])  # the halves' losses differ: the mean means something
    torch.testing.assert_close(per_rank.mean(), loss, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", list(PRESETS))
def test_ddp_gradients_are_the_single_process_gradients(ranks, kind):
    _, grads = single_process(kind)
    expected_names = {"logits.scale"} | ({"logits.bias"} if kind == "siglip" else set())
    assert expected_names <= set(grads)
    for r, result in enumerate(ranks):
        got = result[kind]["grads"]
        assert set(got) == set(grads)
        for name, g in grads.items():
            torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, name=name, r=r: f"rank {r}, {name}: {m}")
    for name in expected_names:
        assert float(grads[name].abs()) > 1e-4, f"{name} has no gradient to compare"
