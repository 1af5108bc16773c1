"""benchmarks.engine_host runs whole engine steps with the null runner (no timings asserted)."""
from __future__ import annotations

from dataclasses import replace

from benchmarks import engine_host


def test_measure_runs_steady_decode_steps_with_the_null_runner() -> None:
    w = replace(engine_host.QUICK, num_steps=5, max_prompt_tokens=64)
    row = engine_host.measure(64, "sampled", w)
    assert row["num_seqs"] == 64 and row["num_steps"] == 5 and row["outputs_off_path"]
    assert 0 < row["p50_us"] <= row["p99_us"] and row["with_outputs_p99_us"] >= row["p99_us"]
    goals = engine_host.goals({"rows": [{**row, "tree": "after"}]})
    assert set(goals) == {"host_step_p99_us_64_sampled"}
