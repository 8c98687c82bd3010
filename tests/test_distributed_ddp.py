"""A DDP-trained pigeon RGAT (gloo, 2 and 4 processes, float64, reference backend) equals single-process
training on the full graph step for step: same seed, same global batch per step, loss = mean over the global
batch.  One spawn per world size; each rank checks its own copy of the parameters after every step."""
import pytest
import torch
import torch.distributed as dist

from pigeon.distributed.launch import spawn

STEPS = 5


def _check_rank(method):
    from pigeon.distributed.ddp import demo_problem, init_from_env, reference_train, train
    init_from_env("gloo", timeout_s=60)
    try:
        g, x, labels, targets = demo_problem(0)
        kw = dict(steps=STEPS, batch_size=10, lr=0.5, seed=3)
        hist = train(g, x, labels, targets, method=method, **kw)
        ref = reference_train(g, x, labels, targets, **kw)
        assert len(hist) == len(ref) == STEPS
        moved = 0.0
        for step, (h, r) in enumerate(zip(hist, ref)):
            for k in r:
                torch.testing.assert_close(h[k], r[k], rtol=0, atol=1e-10,
                                           msg=lambda m: f"rank {dist.get_rank()} step {step} {k}: {m}")
            moved = max(moved, max(float((r[k] - ref[0][k]).abs().max()) for k in r))
        assert moved > 1e-3          # the parameters do change over the steps
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,method", [(2, "contiguous"), (4, "hash")])
def test_ddp_rgat_equals_single_process(world, method):
    spawn(_check_rank, world, method, start_method="fork")


def test_launcher_runs_the_demo(capfd):
    from pigeon.distributed.launch import main
    main(["--nproc", "2", "--start-method", "fork", "--", "--steps", "2", "--check"])
    out = capfd.readouterr().out
    assert "trained 2 steps on 2 ranks" in out
    err = float(out.rsplit("=", 1)[1])
    assert err < 1e-10


@pytest.mark.slow
def test_launcher_default_spawn_start_method(capfd):
    """The launcher's default (spawn: every child imports torch and pigeon afresh, ~10 s each here)."""
    from pigeon.distributed.launch import main
    main(["--nproc", "2", "--", "--steps", "2", "--check"])
    assert "trained 2 steps on 2 ranks" in capfd.readouterr().out
