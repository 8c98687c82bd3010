"""A stand-in for torch's CUDA graphs on the CPU (the ``CUDA`` object of pigeon/runtime/replay.py):
the tests of the replay path (tests/test_replay.py, tests/test_shiftadd_moe.py) capture with it."""


class FakeGraph:
    """Runs the captured function again at each replay and writes its outputs into the first run's
    tensors in place: what a CUDA graph does to its static outputs."""

    def __init__(self, fn):
        self.fn = fn
        self.result = fn()

    def replay(self):
        outputs, _ = self.fn()
        for name, t in self.result[0].items():
            t.copy_(outputs[name])


class FakeCuda:
    def __init__(self, fail=None):
        self.fail, self.captures, self.warmups = fail, 0, 0

    def capturing(self):
        return False

    def stream_handle(self, device):
        return 0

    def order_after(self, handle, device):
        pass

    def warmup(self, fn, device):
        self.warmups += 1
        fn()

    def capture(self, fn, device):
        if self.fail is not None:
            raise self.fail
        self.captures += 1
        g = FakeGraph(fn)
        return g, g.result


def install_for_layers(monkeypatch) -> FakeCuda:
    """The cuda executor path of compiled layers on the CPU: the torch backend answers to 'cuda',
    launches run their semantics, CPU devices may be captured, and CUDA graphs are FakeGraphs
    (tests/test_replay.py, tests/test_train_replay.py). The caller clears the replay sets after."""
    from pigeon.runtime import program, replay
    from pigeon.runtime.family import family_of
    from pigeon.runtime.program import TorchBackend
    fake = FakeCuda()
    monkeypatch.setattr(replay, "CUDA", fake)
    monkeypatch.setattr(replay, "DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(TorchBackend, "name", "cuda")
    monkeypatch.setattr(program, "run_launch",
                        lambda backend, launch, kg, bufs: family_of(launch).semantics(launch, kg, bufs))
    monkeypatch.setenv(replay.ENV, "1")
    for name in replay.DEBUG_ENVS:
        monkeypatch.delenv(name, raising=False)
    replay._SETS.clear()       # layers of equal content share one registry entry (and its replays)
    return fake
