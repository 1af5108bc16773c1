"""Output processing on the event loop (AsyncEngine): the same tokens and text as the inline
Engine.step(), and a stop string found there ends the request in the engine (blocks freed)."""
from __future__ import annotations

import asyncio
import time

from gateway.worker.async_engine import AsyncEngine
from gateway.worker.engine import RequestOutput
from gateway.worker.request import Request, RequestStatus, SamplingParams
from tests.worker.test_engine import (
    TEXT,
    ScriptedRunner,
    random_prompts,
    run,
    text_of,
    tokens_of,
)


async def _collect(ae: AsyncEngine, req: Request) -> list[RequestOutput]:
    return [o async for o in ae.generate(req)]


def _serve(engine, reqs: list[Request]) -> dict[str, list[RequestOutput]]:
    async def main() -> dict[str, list[RequestOutput]]:
        ae = AsyncEngine(engine)
        ae.start(asyncio.get_running_loop())
        try:
            outs = await asyncio.wait_for(asyncio.gather(*(_collect(ae, r) for r in reqs)), 60)
            for _ in range(100):  # the stop command reaches the engine thread a step later
                if not engine.has_work():
                    break
                await asyncio.sleep(0.01)
            return {r.request_id: o for r, o in zip(reqs, outs)}
        finally:
            ae.stop()

    return asyncio.run(main())


def test_async_outputs_equal_the_inline_engine(make_engine) -> None:
    prompts = random_prompts([7, 19, 3, 30], seed=31)
    params = [SamplingParams(max_tokens=12, temperature=t, seed=i, ignore_eos=True, logprobs=2 if i == 1 else None)
              for i, t in enumerate([0.0, 1.0, 0.7, 0.0])]
    inline = run(make_engine(), [Request(f"r{i}", list(p), sp) for i, (p, sp) in enumerate(zip(prompts, params))])
    served = _serve(make_engine(), [Request(f"r{i}", list(p), sp) for i, (p, sp) in enumerate(zip(prompts, params))])
    for rid, outs in inline.items():
        assert tokens_of(served[rid]) == tokens_of(outs)
        assert text_of(served[rid]) == text_of(outs)
        assert [o.logprobs for o in served[rid]] == [o.logprobs for o in outs]
        assert served[rid][-1].finish_reason == outs[-1].finish_reason == "length"


class SlowScriptedRunner(ScriptedRunner):
    """A step takes 2 ms (sleeping, as a device would), so the loop's stop command arrives long
    before the request could end by its length."""

    def execute(self, batch):  # type: ignore[no-untyped-def]
        time.sleep(0.002)
        return super().execute(batch)


def test_a_stop_string_found_on_the_loop_ends_the_request_in_the_engine(make_engine) -> None:
    runner = SlowScriptedRunner()
    engine = make_engine(runner=runner)
    script = engine.tokenizer.encode(TEXT, add_special_tokens=False)
    runner.scripts["s"] = script * 16  # the engine runs on past the stop until the command comes
    req = Request("s", engine.tokenizer.encode("prompt"), SamplingParams(max_tokens=200, temperature=0.0,
                                                                         stop=("stop",)))
    outs = _serve(engine, [req])["s"]
    assert text_of(outs) == "Hello world, " and outs[-1].finish_reason == "stop"
    assert len(tokens_of(outs)) == 9  # tokens past the stop are not delivered
    assert not engine.has_work()
    assert req.status == RequestStatus.FINISHED_STOPPED and req.stop_reason == "stop"
    assert len(req.output_token_ids) < 200  # ended by the stop, not by its length
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_a_failure_in_output_processing_fails_those_requests_and_frees_them(make_engine, monkeypatch) -> None:
    from gateway.worker.async_engine import EngineDeadError

    engine = make_engine()

    def broken(events):  # type: ignore[no-untyped-def]
        raise RuntimeError("detokenizer bug")

    monkeypatch.setattr(engine, "process_outputs", broken)
    req = Request("x", random_prompts([5], seed=40)[0], SamplingParams(max_tokens=50, ignore_eos=True))

    async def main() -> Exception | None:
        ae = AsyncEngine(engine)
        ae.start(asyncio.get_running_loop())
        try:
            await asyncio.wait_for(_collect(ae, req), 30)
        except EngineDeadError as e:
            for _ in range(100):  # the abort reaches the engine thread between steps
                if not engine.has_work():
                    break
                await asyncio.sleep(0.01)
            return e
        finally:
            ae.stop()
        return None

    err = asyncio.run(main())
    assert isinstance(err, EngineDeadError) and "output processing failed" in str(err)
    assert not engine.has_work() and engine.kv.num_free_blocks == engine.kv.num_blocks
