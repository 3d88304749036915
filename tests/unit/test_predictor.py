"""TorchPredictor: output kinds and shapes, validation of what the module returns, warm-up."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stream_infer.errors import ModelOutputError
from stream_infer.examples.phishing import RiskMLP
from stream_infer.inference.predictor import TorchPredictor
from stream_infer.inference.store import OutputKind, save_state_dict

N_FEATURES = 3
CPU = torch.device("cpu")


class Affine(torch.nn.Module):
    """x @ w + b with fixed weights: outputs are known in closed form."""

    def __init__(self, outputs: int = 1) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(N_FEATURES, outputs)
        with torch.no_grad():
            self.linear.weight.copy_(torch.arange(N_FEATURES * outputs).reshape(outputs, -1) - 2.0)
            self.linear.bias.fill_(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def expected(self, x: np.ndarray) -> np.ndarray:
        w = self.linear.weight.detach().numpy().astype(np.float64)
        return x.astype(np.float64) @ w.T + 0.5


class Lambda(torch.nn.Module):
    def __init__(self, fn: object) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)  # type: ignore[operator, no-any-return]


def predictor(module: torch.nn.Module, output: OutputKind = "regression") -> TorchPredictor:
    return TorchPredictor(
        module, model="m", version="v1", device=CPU, output=output, n_features=N_FEATURES
    )


def features(n: int) -> np.ndarray:
    return np.random.default_rng(n).normal(size=(n, N_FEATURES)).astype(np.float32)


def test_a_logit_output_goes_through_a_sigmoid() -> None:
    module = Affine()
    x = features(8)
    out = predictor(module, "logit").predict_many(x)

    assert out.shape == (8,)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, 1 / (1 + np.exp(-module.expected(x)[:, 0])), atol=1e-6)
    assert ((out > 0) & (out < 1)).all()


@pytest.mark.parametrize("output", ["probability", "regression"])
def test_other_outputs_are_returned_as_they_are(output: OutputKind) -> None:
    module = Affine()
    x = features(8)
    out = predictor(module, output).predict_many(x)
    np.testing.assert_allclose(out, module.expected(x)[:, 0], atol=1e-5)
    assert (out < 0).any()  # no sigmoid was applied


def test_one_column_is_squeezed_and_several_are_kept() -> None:
    x = features(5)
    assert predictor(Affine(outputs=1)).predict_many(x).shape == (5,)
    module = Affine(outputs=4)
    out = predictor(module).predict_many(x)
    assert out.shape == (5, 4)
    np.testing.assert_allclose(out, module.expected(x), atol=1e-5)


def test_a_one_dimensional_output_is_kept() -> None:
    out = predictor(Lambda(lambda x: x.sum(dim=1))).predict_many(features(6))
    assert out.shape == (6,)


@pytest.mark.parametrize(
    ("fn", "shape"),
    [
        (lambda x: x[:1, :1], "(1,)"),
        (lambda x: torch.cat([x, x])[:, :1], "(10,)"),
        (lambda x: x.reshape(-1, 1, N_FEATURES), f"(5, 1, {N_FEATURES})"),
        (lambda x: x.sum(), "()"),
    ],
    ids=["too few rows", "too many rows", "3-d", "scalar"],
)
def test_the_wrong_shape_is_refused(fn: object, shape: str) -> None:
    with pytest.raises(ModelOutputError) as info:
        predictor(Lambda(fn)).predict_many(features(5))
    assert (info.value.model, info.value.version) == ("m", "v1")
    assert f"returned shape {shape} for a batch of 5" in str(info.value)


def test_it_runs_in_inference_mode_and_accepts_any_float_layout() -> None:
    seen: list[tuple[bool, torch.dtype, bool]] = []

    def record(x: torch.Tensor) -> torch.Tensor:
        seen.append((torch.is_inference_mode_enabled(), x.dtype, x.is_contiguous()))
        return x[:, :1]

    x = np.asfortranarray(features(4).astype(np.float64))
    out = predictor(Lambda(record)).predict_many(x)
    assert seen == [(True, torch.float32, True)]
    np.testing.assert_allclose(out, x[:, 0], atol=1e-6)


def test_warm_up_runs_each_batch_size() -> None:
    sizes: list[tuple[int, ...]] = []

    def record(x: torch.Tensor) -> torch.Tensor:
        sizes.append(tuple(x.shape))
        return x[:, :1]

    p = predictor(Lambda(record))
    p.warm_up()
    assert sizes == [(1, N_FEATURES), (64, N_FEATURES), (512, N_FEATURES)]
    sizes.clear()
    p.warm_up((3,))
    assert sizes == [(3, N_FEATURES)]


def test_warm_up_surfaces_a_broken_model() -> None:
    with pytest.raises(ModelOutputError):
        predictor(Lambda(lambda x: x[:1, :1])).warm_up((4,))


def test_load_builds_a_predictor_from_the_store(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = RiskMLP(n_features=N_FEATURES, hidden=4).eval()
    names = ("a", "b", "c")
    save_state_dict(
        module,
        tmp_path,
        module_class="stream_infer.examples.phishing:RiskMLP",
        module_kwargs={"n_features": N_FEATURES, "hidden": 4},
        features=names,
        output="logit",
    )
    meta, p = TorchPredictor.load(tmp_path, model="risk", version="v2", features=names, device=CPU)

    assert (p.model, p.version, p.output, p.n_features) == ("risk", "v2", "logit", N_FEATURES)
    assert meta.output == "logit"
    x = features(10)
    with torch.inference_mode():
        expected = torch.sigmoid(module(torch.from_numpy(x)))[:, 0].double().numpy()
    np.testing.assert_allclose(p.predict_many(x), expected, atol=1e-6)
