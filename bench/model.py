"""The model every system in the bench serves: the topology's serving version, on the CPU."""

from __future__ import annotations

import torch

from stream_infer.inference.predictor import TorchPredictor
from stream_infer.settings import Topology


def load_serving_predictor(topo: Topology) -> TorchPredictor:
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
    return predictor
