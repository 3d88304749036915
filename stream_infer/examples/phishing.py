"""The phishing-risk example: a small torch MLP in two versions, trained on River's bundled
Phishing dataset (1,250 labelled web pages, 9 features; no download).

    stream-infer build-example-models   # writes models/phishing/risk/{v1,v2,v3-degraded}

v1 is a torch.export artifact trained on the first 60% of the data; v2 is a wider network in
state_dict form (weights only, rebuilt from :class:`RiskMLP`) trained on all of it.
v3-degraded is deliberately worse: v2's network trained on the labels in a seeded random order
(:func:`shuffled`), so its scores carry no information about the page (accuracy about 0.52 and
log loss about 0.86 on the whole dataset, where the base rate alone gives 0.56 and 0.69): the
candidate that a backtest flags and a rollout aborts at its first gate. Training is seeded and
deterministic on the CPU.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from river import datasets

from stream_infer.inference.store import ModelMeta, save_export, save_state_dict

FEATURES = (
    "empty_server_form_handler",
    "popup_window",
    "https",
    "request_from_other_domain",
    "anchor_from_other_domain",
    "is_popular",
    "long_url",
    "age_of_domain",
    "ip_in_url",
)


class RiskMLP(torch.nn.Module):
    """features -> hidden -> hidden -> 1 logit."""

    def __init__(self, n_features: int = len(FEATURES), hidden: int = 32) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(n_features, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


def load_dataset() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """The Phishing dataset as (X, y), in River's order."""
    rows, labels = [], []
    for x, y in datasets.Phishing():
        rows.append([float(x[name]) for name in FEATURES])
        labels.append(float(y))
    return np.asarray(rows, dtype=np.float32), np.asarray(labels, dtype=np.float32)


def train(
    x: npt.NDArray[np.float32], y: npt.NDArray[np.float32], *, hidden: int, epochs: int, seed: int
) -> RiskMLP:
    torch.manual_seed(seed)
    model = RiskMLP(hidden=hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).unsqueeze(1)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.split(torch.randperm(len(xt), generator=generator), 64):
            optimizer.zero_grad()
            loss_fn(model(xt[idx]), yt[idx]).backward()
            optimizer.step()
    return model.eval()


def accuracy(
    model: torch.nn.Module, x: npt.NDArray[np.float32], y: npt.NDArray[np.float32]
) -> float:
    with torch.inference_mode():
        p = model(torch.from_numpy(x))[:, 0] > 0
    return float((p.numpy() == (y > 0.5)).mean())


def shuffled(y: npt.NDArray[np.float32], seed: int) -> npt.NDArray[np.float32]:
    """The labels in a seeded random order: what a model learns from them is noise."""
    return y[np.random.default_rng(seed).permutation(len(y))]


def build(out_dir: Path) -> dict[str, ModelMeta]:
    """Train and write the versions under ``out_dir/risk/{v1,v2,v3-degraded}``."""
    torch.use_deterministic_algorithms(True)
    x, y = load_dataset()
    cut = int(len(x) * 0.6)
    v1 = train(x[:cut], y[:cut], hidden=16, epochs=30, seed=1)
    v2 = train(x, y, hidden=32, epochs=40, seed=2)
    v3 = train(x, shuffled(y, seed=3), hidden=32, epochs=40, seed=3)
    metas = {
        "v1": save_export(
            v1,
            out_dir / "risk" / "v1",
            features=FEATURES,
            output="logit",
            description=f"MLP 9-16-16-1 on the first {cut} rows; "
            f"accuracy on the rest {accuracy(v1, x[cut:], y[cut:]):.3f}",
        ),
        "v2": save_state_dict(
            v2,
            out_dir / "risk" / "v2",
            module_class="stream_infer.examples.phishing:RiskMLP",
            module_kwargs={"n_features": len(FEATURES), "hidden": 32},
            features=FEATURES,
            output="logit",
            description=f"MLP 9-32-32-1 on all {len(x)} rows; "
            f"training accuracy {accuracy(v2, x, y):.3f}",
        ),
        "v3-degraded": save_state_dict(
            v3,
            out_dir / "risk" / "v3-degraded",
            module_class="stream_infer.examples.phishing:RiskMLP",
            module_kwargs={"n_features": len(FEATURES), "hidden": 32},
            features=FEATURES,
            output="logit",
            description=f"DEGRADED on purpose: MLP 9-32-32-1 on all {len(x)} rows with their "
            f"labels shuffled (seed 3); accuracy on the true labels {accuracy(v3, x, y):.3f}",
        ),
    }
    return metas


def events(seed: int = 0, *, start: int = 0) -> Iterator[tuple[str, dict[str, float], bool]]:
    """Endless (id, features, label) from the dataset, rows in a seeded random order."""
    x, y = load_dataset()
    rng = random.Random(seed)
    n = start
    while True:
        order = list(range(len(x)))
        rng.shuffle(order)
        for i in order:
            yield f"evt-{seed}-{n}", dict(zip(FEATURES, x[i].tolist(), strict=True)), bool(y[i])
            n += 1
