"""bench/profile.py: the tail target and the report lines, computed from results."""

from __future__ import annotations

from bench import profile


def _run(si: float, floor: float) -> dict[str, dict[str, float]]:
    return {"stream_infer": {"p99_ms": si, "p50_ms": 10.0}, "floor": {"p99_ms": floor}}


def test_the_tail_target_uses_the_medians_of_both() -> None:
    met = profile.tail_summary([_run(20, 12), _run(90, 11), _run(26, 13)])
    assert met == {"floor_p99_ms": 12.0, "p99_ms": 26.0, "over_floor_ms": 14.0, "met": True}
    missed = profile.tail_summary([_run(40, 12), _run(90, 11), _run(28, 13)])
    assert missed["over_floor_ms"] == 28.0 and missed["met"] is False
    assert profile.tail_summary([]) == {}


def test_the_report_shows_every_tail_run_the_target_and_the_threads() -> None:
    runs = [_run(20, 12), _run(30, 12)]
    results = {
        "tail": {"rate_eps": 5000.0, "duration_s": 20.0, "runs": runs} | profile.tail_summary(runs),
        "profile": {
            "window_s": 10.0,
            "saturation": {"throughput_eps": 42000.0, "cpu_s_per_1k": 0.02},
            "threads": [{"thread": "inference_0", "tid": "1", "cpu_s": 4.0}],
        },
    }
    text = "\n".join(profile.markdown_lines(results))
    assert "| 1 | 10.0 | 20.0 |" in text and "| 2 | 10.0 | 30.0 |" in text
    assert "25.0 ms against 12.0 ms, +13.0 ms: **met**" in text
    assert "| inference_0 | 4.00 | 40 % |" in text
    assert profile.markdown_lines({}) == []
