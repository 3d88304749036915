"""The worker's threads that run torch set their own intra-op thread count (issue 16)."""

from __future__ import annotations

import threading

import torch

from stream_infer.runtime.threads import Threads, torch_threads


def test_the_inference_and_loader_threads_run_the_initializer() -> None:
    seen: list[str] = []
    threads = Threads(lambda: seen.append(threading.current_thread().name))
    try:
        names = {
            threads.inference.submit(lambda: threading.current_thread().name).result(5),
            threads.loader.submit(lambda: threading.current_thread().name).result(5),
        }
    finally:
        threads.inference.shutdown()
        threads.loader.shutdown()
    assert sorted(seen) == sorted(names) and len(names) == 2


def test_torch_threads_sets_the_calling_threads_count() -> None:
    wanted = 3 if torch.get_num_threads() != 3 else 2
    got: list[int] = []

    def run() -> None:
        torch_threads(wanted)()
        got.append(torch.get_num_threads())

    before = torch.get_num_threads()
    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    try:
        assert got == [wanted]
    finally:
        torch.set_num_threads(before)


def test_a_version_loaded_after_the_start_up_freeze_is_freed_when_dropped() -> None:
    """freeze_heap runs before any version loads: a torch.export version is full of reference
    cycles, and a frozen one would stay resident after a swap unloads it."""
    import gc
    import weakref
    from pathlib import Path

    from stream_infer.inference.predictor import TorchPredictor
    from stream_infer.runtime.worker import freeze_heap
    from stream_infer.settings import load_topology

    root = Path(__file__).resolve().parents[2]
    topo = load_topology(root / "topologies" / "phishing.yaml", env={})
    model = topo.models[0]
    version = model.version(model.serving)
    assert version is not None
    freeze_heap()
    try:
        _meta, predictor = TorchPredictor.load(
            version.path,
            model=model.name,
            version=version.version,
            features=topo.features,
            device=torch.device("cpu"),
        )
        module = weakref.ref(predictor._module)
        del predictor, _meta
        gc.collect()
        assert module() is None
    finally:
        gc.unfreeze()
