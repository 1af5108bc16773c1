"""The pool advertises the prefix chunks its KV cache still backs (gateway/worker/prefix_summary.py)."""
from __future__ import annotations

import random

from gateway.core.prefix import IDS_PER_CHUNK, id_chunks, request_chunks
from gateway.core.types import LoadReport
from gateway.worker.engine import Engine
from gateway.worker.request import Request, SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True, max_tokens=2)


def serve(engine: Engine, rid: str, ids: list[int], chunks: object = None) -> Request:
    req = Request(rid, list(ids), SamplingParams(**GREEDY), prefix_chunks=chunks or id_chunks(ids))  # type: ignore[arg-type]
    engine.add_request(req)
    while engine.has_work():
        engine.step()
    return req


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(2, 250) for _ in range(n)]


def test_served_chunks_are_advertised_until_their_blocks_are_evicted(make_engine) -> None:
    engine = make_engine(block_size=16, num_blocks=48, max_model_len=512, max_num_batched_tokens=128)
    a = prompt(2 * IDS_PER_CHUNK + 40, 1)
    serve(engine, "a", a)
    hashes = id_chunks(a).hashes
    report = engine.load_report()
    assert set(hashes) <= set(report.hot_prefix_hashes)
    # the same prefix again: served from the cache, counted exactly
    again = serve(engine, "a2", a[:2 * IDS_PER_CHUNK] + prompt(30, 2))
    assert again.num_cached_tokens == 2 * IDS_PER_CHUNK
    # other prompts fill the cache (48 blocks of 16 tokens) and evict a's blocks
    for i in range(4):
        serve(engine, f"o{i}", prompt(300, 10 + i))
    assert not set(hashes) & set(engine.load_report().hot_prefix_hashes)


def test_text_chunks_map_to_the_blocks_in_proportion_and_the_summary_is_bounded(make_engine) -> None:
    engine = make_engine(block_size=16, num_blocks=256, max_model_len=1024, max_num_batched_tokens=256)
    engine.prefixes.max_advertised = 5
    tok = engine.tokenizer
    for i in range(3):
        messages = [{"role": "system", "content": f"policy {i} " + "abc def ghi " * 100},
                    {"role": "user", "content": "question"}]
        ids = tok.apply_chat_template(messages)
        chunks = request_chunks(None, None, messages)
        assert chunks.hashes  # ~1,200 characters: two chunks
        serve(engine, f"c{i}", ids, chunks)
        assert chunks.hashes[0] in engine.load_report().hot_prefix_hashes
    report = engine.load_report()
    assert len(report.hot_prefix_hashes) == 5
    # the stream line carries them, and the gateway reads them back
    line = report.to_stream_line()
    assert LoadReport.from_header(line).hot_prefix_hashes == report.hot_prefix_hashes
    assert len(line) < 200 + 17 * 5
