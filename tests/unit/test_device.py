"""Device selection, with CUDA's presence injected so every branch runs on any machine."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch

from stream_infer.inference.device import select_device

LOGGER = "stream_infer.inference.device"


def no_cuda() -> bool:
    return False


def two_gpus() -> int:
    return 2


def must_not_ask() -> bool:
    raise AssertionError("CUDA was queried for an explicit cpu device")


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING
    ]


def test_cpu_is_the_cpu_without_asking_cuda(caplog: pytest.LogCaptureFixture) -> None:
    assert select_device("cpu", cuda_available=must_not_ask) == torch.device("cpu")
    assert warnings_of(caplog) == []


def test_auto_without_cuda_is_the_cpu_quietly(caplog: pytest.LogCaptureFixture) -> None:
    assert select_device("auto", cuda_available=no_cuda) == torch.device("cpu")
    assert warnings_of(caplog) == []


@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_cuda_without_cuda_falls_back_to_the_cpu_with_a_warning(
    caplog: pytest.LogCaptureFixture, spec: str
) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert select_device(spec, cuda_available=no_cuda) == torch.device("cpu")
    assert warnings_of(caplog) == [
        f"device {spec} was asked for but CUDA is not available; using the CPU"
    ]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("auto", "cuda:0"), ("cuda", "cuda:0"), ("cuda:0", "cuda:0"), ("cuda:1", "cuda:1")],
)
def test_with_gpus(caplog: pytest.LogCaptureFixture, spec: str, expected: str) -> None:
    device = select_device(spec, cuda_available=lambda: True, cuda_count=two_gpus)
    assert device == torch.device(expected)
    assert warnings_of(caplog) == []


def test_a_gpu_that_does_not_exist_falls_back_to_the_first(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        device = select_device("cuda:5", cuda_available=lambda: True, cuda_count=two_gpus)
    assert device == torch.device("cuda", 0)
    assert warnings_of(caplog) == ["device cuda:5 does not exist (2 GPUs); using cuda:0"]


@pytest.mark.parametrize("spec", ["gpu", "", "CUDA", "mps", "cpu:0", "cuda:", "cuda:x", "cuda:-1"])
@pytest.mark.parametrize("cuda_available", [no_cuda, lambda: True], ids=["no-cuda", "cuda"])
def test_an_invalid_spec_is_refused(spec: str, cuda_available: Callable[[], bool]) -> None:
    with pytest.raises(ValueError, match="unknown device"):
        select_device(spec, cuda_available=cuda_available, cuda_count=two_gpus)


def test_the_real_machine_resolves_to_a_device() -> None:
    device = select_device("auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
