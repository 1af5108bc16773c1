"""A continuation on the engine (gateway/worker/resume.py): a request resumed from the tokens another
pool already produced goes on exactly as the uninterrupted request would."""
from __future__ import annotations

import pytest

from gateway.core.errors import BadRequest
from gateway.worker.request import Request, SamplingParams
from gateway.worker.resume import resumed_ids, unwrap
from tests.worker.test_engine import TEXT, ScriptedRunner, run, text_of, tokens_of

PROMPT = [7, 99, 301, 45, 12, 250, 3, 88, 160]


def whole_and_resumed(make_engine, params: SamplingParams, cut: int) -> tuple[list[int], list[int], str, str, dict]:
    full = run(make_engine(), [Request("a", list(PROMPT), params)])["a"]
    ids = tokens_of(full)
    engine = make_engine()
    outs = run(engine, [Request("b", list(PROMPT), params, output_token_ids=ids[:cut])])["b"]
    first_part = text_of(full[:cut])
    info = {"num_output": outs[-1].num_output_tokens, "num_prompt": outs[-1].num_prompt_tokens,
            "reason": (full[-1].finish_reason, outs[-1].finish_reason)}
    return ids, ids[:cut] + tokens_of(outs), text_of(full), first_part + text_of(outs), info


@pytest.mark.parametrize("cut", [1, 5, 17])
def test_greedy_continuation_is_token_for_token_the_uninterrupted_answer(make_engine, cut) -> None:
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    whole, joined, text, joined_text, info = whole_and_resumed(make_engine, params, cut)
    assert joined == whole and joined_text == text
    # max_tokens counted the resumed tokens; usage: the prompt once, every completion token.
    assert info["num_output"] == 24 and info["num_prompt"] == len(PROMPT) and info["reason"] == ("length", "length")


def test_seeded_continuation_continues_the_random_stream(make_engine) -> None:
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    whole, joined, *_ = whole_and_resumed(make_engine, params, cut=8)
    assert joined == whole
    # ...and the seed matters (else the equality above would prove nothing).
    other = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, seed=99, ignore_eos=True)
    assert whole_and_resumed(make_engine, other, cut=8)[0] != whole


def test_a_stop_string_spanning_the_join_still_stops(make_engine) -> None:
    # TEXT tokenizes as H|ell|o| wor|ld|,| st|o|p|...: "stop" spans " st", "o", "p"; cut after " st".
    runner = ScriptedRunner()
    engine = make_engine(runner=runner)
    script = engine.tokenizer.encode(TEXT, add_special_tokens=False)
    runner.scripts["s"] = script
    params = SamplingParams(max_tokens=len(script), temperature=0.0, stop=("stop",))
    prompt = engine.tokenizer.encode("prompt")
    outs = run(engine, [Request("s", prompt, params, output_token_ids=script[:7])])["s"]
    # The first pool showed "Hello world, " (" st" held back, maybe "stop"); the rest adds nothing.
    assert text_of(outs) == "" and outs[-1].finish_reason == "stop"
    assert outs[-1].num_output_tokens == 9


def test_resume_field_is_checked(model_dir) -> None:
    from gateway.worker.tokenizer import Tokenizer
    tok = Tokenizer(model_dir)
    def ids(body):
        return resumed_ids(unwrap(body)[1], tok, 512)

    assert unwrap({"model": "m"}) == ({"model": "m"}, None) and ids({"model": "m"}) is None
    # The original request travels inside the field; the outer body is for third-party pools.
    orig = {"model": "m", "prompt": "a"}
    body = {"model": "m", "prompt": "a and more", "meshgate_resume": {"request": orig, "output_token_ids": [1, 2]}}
    assert unwrap(body)[0] == orig and ids(body) == [1, 2]
    assert ids({"meshgate_resume": {"text": "Hello"}}) == tok.encode("Hello", add_special_tokens=False)
    for bad in ({"output_token_ids": [1, 9999]}, {"output_token_ids": "x"}, {}, [1], {"request": 3, "text": ""}):
        with pytest.raises(BadRequest):
            ids({"meshgate_resume": bad})
