"""The load report's headroom figures: the batch's slots and how long a request holds one."""
from __future__ import annotations

from gateway.core.types import LoadReport
from gateway.worker.request import Request, SamplingParams
from tests.worker.test_engine import run


def test_load_report_carries_slots_and_the_mean_request_duration(make_engine) -> None:
    engine = make_engine(max_num_seqs=4)
    engine.warm_up()
    rep = engine.load_report()
    assert rep.max_num_seqs == 4
    assert rep.mean_request_s == 0.0  # the warm-up request does not count
    reqs = [Request(f"r{i}", [5 + i] * 8, SamplingParams(max_tokens=6 + 4 * i, ignore_eos=True)) for i in range(3)]
    run(engine, reqs)
    held = [r.finish_s - r.first_token_s for r in reqs]  # type: ignore[operator]
    rep = engine.load_report()
    assert rep.mean_request_s > 0
    # an average of the three (with the prefill added): above the shortest's decode time
    assert min(held) < rep.mean_request_s
    back = LoadReport.from_header(rep.to_header())
    assert back.max_num_seqs == 4 and abs(back.mean_request_s - rep.mean_request_s) < 1e-3


def test_load_report_carries_the_cache_size_in_tokens(make_engine) -> None:
    engine = make_engine()
    rep = engine.load_report()
    assert rep.kv_block_tokens == engine.kv.block_size > 0
    assert rep.kv_blocks_total * rep.kv_block_tokens == engine.kv.num_blocks * engine.kv.block_size
    assert LoadReport(**rep.to_dict()).kv_block_tokens == rep.kv_block_tokens  # GET /load's JSON
