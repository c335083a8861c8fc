"""DDP: the BiLSTM-CRF tagger of the examples trained on two gloo processes
(CPU), each with half of every global batch, ends with the parameters of one
process trained on the whole global batches.

The tagger's loss is the mean over the sequences of its batch and DDP averages
the gradients of the processes, so with equal halves both runs follow the
gradient of the global batch's mean."""

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist

from tagging import TaggingTask, bilstm_crf

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")

WORLD_SIZE = 2
STEPS = 3
GLOBAL_BATCH = 8
LR = 0.05  # plain SGD: Adam would magnify rounding differences in tiny gradients


def global_batches():
    return TaggingTask().batches(seed=5, count=STEPS, size=GLOBAL_BATCH)


def build():
    torch.manual_seed(0)
    return bilstm_crf(TaggingTask(), "fastnlp", embed_dim=16, hidden=24)


def train(model, batches):
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for batch in batches:
        optimizer.zero_grad()
        loss = model(batch.tokens, batch.tags, batch.lengths)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _worker(rank, port, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=120))
    try:
        model = torch.nn.parallel.DistributedDataParallel(build())
        train(model, [batch.split(WORLD_SIZE)[rank] for batch in global_batches()])
        if rank == 0:
            torch.save(model.module.state_dict(), out_path)
        # Both ranks done talking before either tears its connections down:
        # without it, one rank closing while the other still was in gloo
        # aborted that one now and then ("terminate called without an active
        # exception", SIGABRT).
        dist.barrier()
        open(f"{out_path}.rank{rank}.done", "w").close()  # everything the test checks is behind us
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(out_path):
    """Trains on WORLD_SIZE processes. A rank that dies while gloo tears down
    (SIGABRT, "terminate called without an active exception", still seen
    about once in five CI runs after the barrier above) is let go once every
    rank has marked its work done: the state checked below is complete."""
    try:
        torch.multiprocessing.spawn(_worker, args=(free_port(), out_path), nprocs=WORLD_SIZE, join=True)
    except torch.multiprocessing.ProcessExitedException:
        if not all(os.path.exists(f"{out_path}.rank{rank}.done") for rank in range(WORLD_SIZE)):
            raise


def test_ddp_matches_single_process_on_the_global_batch(tmp_path):
    out_path = os.path.join(tmp_path, "ddp_state.pt")
    run_ranks(out_path)
    ddp_state = torch.load(out_path)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = build()
        initial = {name: value.clone() for name, value in single.state_dict().items()}
        losses = train(single, global_batches())
    finally:
        torch.set_num_threads(threads)
    assert losses[-1] < losses[0]

    state = single.state_dict()
    assert ddp_state.keys() == state.keys()
    moved = 0
    for name, value in state.items():
        torch.testing.assert_close(ddp_state[name], value, rtol=1e-4, atol=1e-5, msg=name)
        moved += not torch.equal(value, initial[name])
    assert moved > 0  # the steps did change the parameters
