"""Device selection: CUDA when it is present and asked for, the CPU otherwise."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from stream_infer.inference import parse_device

log = logging.getLogger(__name__)


def select_device(
    spec: str,
    *,
    cuda_available: Callable[[], bool] = torch.cuda.is_available,
    cuda_count: Callable[[], int] = torch.cuda.device_count,
) -> torch.device:
    """Resolve ``auto | cpu | cuda | cuda:N`` (:func:`~stream_infer.inference.parse_device`'s
    grammar) to a usable device.

    ``auto`` takes the first GPU if there is one. An explicit ``cuda`` request on a machine
    without a usable GPU falls back to the CPU with a warning rather than failing to serve.

    >>> select_device("auto", cuda_available=lambda: False)
    device(type='cpu')
    >>> select_device("cuda:1", cuda_available=lambda: True, cuda_count=lambda: 2)
    device(type='cuda', index=1)
    """
    try:
        kind, index = parse_device(spec)
    except ValueError as exc:
        msg = f"select_device: unknown device ({exc})"
        raise ValueError(msg) from None
    if kind == "cpu":
        return torch.device("cpu")
    if not cuda_available():
        if kind != "auto":
            log.warning("device %s was asked for but CUDA is not available; using the CPU", spec)
        return torch.device("cpu")
    index = index or 0  # auto and cuda: the first GPU
    if index >= cuda_count():
        log.warning("device %s does not exist (%d GPUs); using cuda:0", spec, cuda_count())
        index = 0
    return torch.device("cuda", index)
