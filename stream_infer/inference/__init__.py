"""Models: artifacts on disk, their verified loading, device placement and batched prediction.

The device grammar (``auto | cpu | cuda | cuda:N``) is defined here, once, by
:func:`parse_device`: the settings validate a topology's ``device`` with it without loading
torch, and :func:`~stream_infer.inference.device.select_device` resolves what it parses.
"""

from __future__ import annotations

import re

DEVICES = "auto, cpu, cuda or cuda:N"
_DEVICE_RE = re.compile(r"auto|cpu|cuda(?::(\d+))?")


def parse_device(spec: str) -> tuple[str, int | None]:
    """A device spec's kind (auto, cpu or cuda) and GPU index (cuda:N only); else ValueError.

    >>> parse_device("cuda:1")
    ('cuda', 1)
    >>> parse_device("auto")
    ('auto', None)
    >>> parse_device("gpu")
    Traceback (most recent call last):
    ...
    ValueError: 'gpu' is not a device; expected auto, cpu, cuda or cuda:N
    """
    match = _DEVICE_RE.fullmatch(spec) if isinstance(spec, str) else None
    if match is None:
        msg = f"{spec!r} is not a device; expected {DEVICES}"
        raise ValueError(msg)
    return spec.partition(":")[0], None if match[1] is None else int(match[1])
