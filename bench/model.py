"""The model every system in the bench serves: the topology's serving version, on the CPU."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from stream_infer.inference.predictor import TorchPredictor
from stream_infer.settings import Topology


class ThreadCountedPredictor:
    """A predictor that sets torch's intra-op thread count on every thread that calls it.

    torch's OpenMP pool size is per calling thread: a system that runs the model on a thread
    other than the one that called ``torch.set_num_threads`` (Bytewax's worker thread, say)
    would run with one OpenMP thread per core, one of them spinning at its barrier between
    batches (found in stream-infer's own worker, issue 16). Every system gets the same
    ``worker.inference_threads`` on whichever thread it scores."""

    def __init__(self, predictor: TorchPredictor, threads: int) -> None:
        self._predictor = predictor
        self._threads = threads
        self._local = threading.local()

    def predict_many(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        if not getattr(self._local, "set", False):
            torch.set_num_threads(self._threads)
            self._local.set = True
        return self._predictor.predict_many(x)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._predictor, name)


def load_serving_predictor(topo: Topology) -> ThreadCountedPredictor:
    """Load and warm up the first model's serving version, as stream-infer's worker does."""
    torch.set_num_threads(topo.worker.inference_threads)
    model = topo.models[0]
    version = model.version(model.serving)
    if version is None:
        msg = f"model {model.name} has no version {model.serving}"
        raise SystemExit(msg)
    _meta, predictor = TorchPredictor.load(
        version.path,
        model=model.name,
        version=version.version,
        features=topo.features,
        device=torch.device("cpu"),
    )
    predictor.warm_up()
    return ThreadCountedPredictor(predictor, topo.worker.inference_threads)
