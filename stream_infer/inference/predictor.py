"""Batched prediction with a loaded torch module on one device."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from stream_infer.errors import ModelOutputError
from stream_infer.inference.store import ModelMeta, OutputKind, load_artifact


class TorchPredictor:
    """A torch module on a device, called under ``torch.inference_mode`` once per batch.

    The host-to-device copy is one transfer per batch (from pinned memory when the device is a
    GPU, so it can overlap); the result comes back to the host once. Output is validated:
    one row per input row, or the batch is refused with :class:`ModelOutputError`.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        model: str,
        version: str,
        device: torch.device,
        output: OutputKind,
        n_features: int,
    ) -> None:
        self.model = model
        self.version = version
        self.device = device
        self.output = output
        self.n_features = n_features
        self._module = module.to(device)

    @classmethod
    def load(
        cls,
        directory: Path,
        *,
        model: str,
        version: str,
        features: tuple[str, ...],
        device: torch.device,
    ) -> tuple[ModelMeta, TorchPredictor]:
        meta, module = load_artifact(directory, features=features, model=model, version=version)
        predictor = cls(
            module,
            model=model,
            version=version,
            device=device,
            output=meta.output,
            n_features=len(features),
        )
        return meta, predictor

    def warm_up(self, batch_sizes: tuple[int, ...] = (1, 64, 512)) -> None:
        """Run the model once per size so the first real batch pays no first-call costs."""
        for n in batch_sizes:
            self.predict_many(np.zeros((n, self.n_features), dtype=np.float32))

    def predict_many(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """Score a batch. Returns shape (n,) for one output per row, (n, k) for k outputs."""
        n = x.shape[0]
        tensor = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if self.device.type == "cuda":
            tensor = tensor.pin_memory().to(self.device, non_blocking=True)
        # No lock: a call that hangs past the watchdog's limit must not block the next one.
        with torch.inference_mode():
            out = self._module(tensor)
            if self.output == "logit":
                out = torch.sigmoid(out)
            result = np.asarray(out.detach().to("cpu", dtype=torch.float64).numpy())
        if result.ndim == 2 and result.shape[1] == 1:
            result = result[:, 0]
        if result.ndim not in (1, 2) or result.shape[0] != n:
            msg = f"returned shape {tuple(result.shape)} for a batch of {n}; expected ({n},...)"
            raise ModelOutputError(msg, model=self.model, version=self.version)
        return result
