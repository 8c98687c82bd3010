"""A rank that exits (or stalls) mid-step makes the others fail with a clear RankFailure within the process
group's timeout instead of hanging (gloo, 2 processes, forked)."""
import multiprocessing as mp
import os
import time

import pytest

from pigeon.distributed.launch import free_port

TIMEOUT = 4.0


def _rank(rank, world, port, mode, q):
    import torch
    import torch.distributed as dist
    from pigeon.distributed.ddp import demo_problem, init_from_env, train
    from pigeon.distributed.faults import RankFailure
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_from_env("gloo", timeout_s=TIMEOUT)

    def on_step(step):
        if rank == 1 and step == 2:
            if mode == "exit":
                os._exit(3)               # dies mid-training, without a word to the others
            time.sleep(60)                # stalls: alive, but never joins the all-reduce
    g, x, labels, targets = demo_problem(0)
    t0 = time.monotonic()
    try:
        train(g, x, labels, targets, steps=5, batch_size=10, lr=0.5, seed=3, on_step=on_step, timeout_s=TIMEOUT)
        q.put((rank, "finished", "", time.monotonic() - t0))
    except RankFailure as e:
        q.put((rank, "RankFailure", str(e), time.monotonic() - t0))
    except BaseException as e:            # noqa: BLE001 (reported to the test)
        q.put((rank, type(e).__name__, str(e), time.monotonic() - t0))
    q.close()
    q.join_thread()                       # flush the queue's feeder thread before os._exit
    os._exit(0)                           # no destroy_process_group: its barrier would wait on the dead peer


@pytest.mark.parametrize("mode", ["exit", "stall"])
def test_dead_or_stalled_rank_fails_the_others_fast(mode):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, mode, q)) for r in range(2)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    try:
        rank, kind, msg, elapsed = q.get(timeout=TIMEOUT + 20)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()          # the stalled rank (ours, by its Process handle)
            p.join(5)
    assert rank == 0, (rank, kind, msg)
    assert kind == "RankFailure", (kind, msg)
    assert "rank 0/2: training step 2" in msg and "another rank exited or did not answer" in msg
    assert elapsed < TIMEOUT + 8, elapsed
    assert time.monotonic() - t0 < TIMEOUT + 20
    if mode == "exit":
        assert procs[1].exitcode == 3
