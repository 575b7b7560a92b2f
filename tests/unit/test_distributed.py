"""FlowMatchTrainer under torch.distributed (2 gloo ranks on the CPU) against one process."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lora_ops import flow_match as fm
from lora_ops.distributed import World, rank_slots


def toy_problem():
    """Examples in two aspect buckets, a tiny linear velocity model; all from fixed seeds."""
    g = torch.Generator().manual_seed(0)
    examples = [fm.TrainingExample(torch.randn(4, *shape, generator=g),
                                   fm.Conditioning(torch.randn(tokens, 8, generator=g), torch.randn(8, generator=g)))
                for shape, tokens in [((4, 4), 3), ((4, 4), 5), ((4, 4), 3), ((2, 8), 3), ((2, 8), 3)]]
    empty = fm.Conditioning(torch.zeros(3, 8), torch.zeros(8))
    params = {"mix": torch.nn.Parameter(0.1 * torch.randn(4, 4, generator=g)),
              "text": torch.nn.Parameter(0.1 * torch.randn(8, 4, generator=g))}

    def predict(x_t, t, context, pooled, reference):
        shift = (context.mean(1) + pooled) @ params["text"]  # (B, 4)
        return torch.einsum("oc,bchw->bohw", params["mix"], x_t) * t[:, None, None, None] + shift[:, :, None, None]

    return predict, examples, empty, params


def train(world: World, batch_size: int, steps: int, state=None, start=None, stop_after=None):
    """`steps` sets the schedule; `stop_after` stops early (as a cancel would)."""
    predict, examples, empty, params = toy_problem()
    with torch.no_grad():
        for name, value in (start or {}).items():
            params[name].copy_(value)
    settings = fm.TrainSettings(steps=steps, learning_rate=0.05, batch_size=batch_size, gradient_accumulation=2,
                                caption_dropout=0.3, lr_schedule="cosine", seed=5)
    trainer = fm.FlowMatchTrainer(predict, examples, empty, params, settings, state, world)
    losses = []
    for step, loss in trainer.run():
        losses.append(loss)
        if step == stop_after:
            break
    return {k: v.detach().clone() for k, v in params.items()}, losses, trainer


def _rank_main(rank: int, port: int, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        params, losses, trainer = train(World(rank, 2), batch_size=2, steps=6, stop_after=4)
        if rank == 0:
            torch.save((params, losses, trainer.optimizer_state()), result_path)
        # as scripts/fluxq_train.py: a rank that tears gloo down while the other still talks to it
        # can abort that one (seen once here: SIGABRT, "terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process_with_twice_the_batch(tmp_path):
    result = tmp_path / "rank0.pt"
    mp.start_processes(_rank_main, args=(free_port(), str(result)), nprocs=2, start_method="spawn", join=True)
    ddp_params, ddp_losses, ddp_optimizer = torch.load(result)

    params, losses, _ = train(World(), batch_size=4, steps=6, stop_after=4)
    for name in params:
        torch.testing.assert_close(ddp_params[name], params[name], rtol=1e-5, atol=1e-6)
    assert ddp_losses == pytest.approx(losses, rel=1e-5)

    # and one process resumes the 2-rank run's parameters and state, to the end of a 6-step run
    straight, straight_losses, _ = train(World(), batch_size=4, steps=6)
    resumed, resumed_losses, _ = train(World(), batch_size=4, steps=6, start=ddp_params,
                                       state=fm.TrainState(4, list(ddp_losses), ddp_optimizer))
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-5, atol=1e-6)
    assert resumed_losses == pytest.approx(straight_losses[4:], rel=1e-5)


def test_rank_slots_split_the_global_batch_evenly():
    assert [list(rank_slots(6, World(r, 3))) for r in range(3)] == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="does not split over 4 ranks"):
        rank_slots(6, World(0, 4))


def test_batch_larger_than_a_bucket_cycles_through_it():
    predict, examples, empty, params = toy_problem()
    trainer = fm.FlowMatchTrainer(predict, examples, empty, params,
                                  fm.TrainSettings(steps=1, learning_rate=0.1, batch_size=5))
    chosen = trainer._global_micro_batch(fm.step_generator(0, 0))
    assert len(chosen) == 5
    bucket = next(b for b in trainer.buckets if chosen[0] in b)
    assert set(chosen) == set(bucket) and chosen[len(bucket):] == chosen[: 5 - len(bucket)]
