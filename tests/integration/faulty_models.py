"""A model with faults on purpose, loaded by worker subprocesses from a state_dict artifact
(``module: tests.integration.faulty_models:Faulty``).

The first feature picks the fault: RAISES makes it raise, NAN returns NaN, HANGS blocks the
call for an hour. Any other value is scored normally.
"""

from __future__ import annotations

import time

import torch

RAISES, NAN, HANGS = 7.0, 9.0, 13.0


class Faulty(torch.nn.Module):
    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(n_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = x[:, 0]
        if bool((first == HANGS).any()):
            time.sleep(3600)
        if bool((first == RAISES).any()):
            raise RuntimeError("the model cannot score 7")
        out = torch.sigmoid(self.linear(x))
        return torch.where((first == NAN).unsqueeze(1), torch.full_like(out, float("nan")), out)
