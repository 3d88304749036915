"""Device selection: CUDA when it is present and asked for, the CPU otherwise."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


def select_device(
    spec: str,
    *,
    cuda_available: Callable[[], bool] = torch.cuda.is_available,
    cuda_count: Callable[[], int] = torch.cuda.device_count,
) -> torch.device:
    """Resolve ``auto | cpu | cuda | cuda:N`` to a usable device.

    ``auto`` takes the first GPU if there is one. An explicit ``cuda`` request on a machine
    without a usable GPU falls back to the CPU with a warning rather than failing to serve.
    """
    if spec == "cpu":
        return torch.device("cpu")
    if not re.fullmatch(r"auto|cuda(:\d+)?", spec):
        msg = f"unknown device {spec!r}; expected auto, cpu, cuda or cuda:N"
        raise ValueError(msg)
    if not cuda_available():
        if spec != "auto":
            log.warning("device %s was asked for but CUDA is not available; using the CPU", spec)
        return torch.device("cpu")
    index = 0 if spec in {"auto", "cuda"} else int(spec.split(":", 1)[1])
    if index >= cuda_count():
        log.warning("device %s does not exist (%d GPUs); using cuda:0", spec, cuda_count())
        index = 0
    return torch.device("cuda", index)
