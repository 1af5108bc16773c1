"""The prefix-chunk scheme both gateway and worker use (gateway/core/prefix.py)."""
from __future__ import annotations

from unittest import mock

from gateway.core import prefix
from gateway.core.prefix import (CHUNK_CHARS, IDS_PER_CHUNK, MAX_CHUNKS, chat_text, longest_match,
                                 request_chunks, text_chunks)

SYSTEM = "You are a careful assistant. " * 100  # 2,900 characters


def chat(*contents: str) -> list[dict[str, str]]:
    roles = ["system", "user", "assistant"]
    return [{"role": roles[min(i, 2)] if i < 2 else ("assistant" if i % 2 == 0 else "user"), "content": c}
            for i, c in enumerate(contents)]


def test_shared_prefix_shares_leading_hashes_and_only_those() -> None:
    a = request_chunks(None, None, chat(SYSTEM, "What is the capital of France?" * 30))
    b = request_chunks(None, None, chat(SYSTEM, "Tell me about the history of Rome." * 30))
    shared = len(SYSTEM) // CHUNK_CHARS  # whole chunks before the texts differ
    assert a.hashes[:shared] == b.hashes[:shared]
    assert a.hashes[shared + 1:] != b.hashes[shared + 1:]
    assert len(set(a.hashes[shared + 1:]) & set(b.hashes)) == 0  # chained: later chunks never collide


def test_chat_growing_turn_by_turn_extends_the_chain() -> None:
    first = chat(SYSTEM, "question one " * 50)
    second = first + [{"role": "assistant", "content": "answer " * 80}, {"role": "user", "content": "next " * 60}]
    a, b = request_chunks(None, None, first), request_chunks(None, None, second)
    assert b.hashes[:len(a.hashes)] == a.hashes
    assert len(b.hashes) > len(a.hashes)


def test_canonical_forms_are_distinct_and_documented() -> None:
    text, total = chat_text([{"role": "user", "content": "hi"}])
    assert text == "\x1euser\x1fhi" and total == len(text)
    # the same characters as a completion prompt and as a chat are different canonical texts
    body = "z" * (3 * CHUNK_CHARS)
    assert request_chunks(body, None, None).hashes != request_chunks(None, None, [{"role": "user", "content": body}]).hashes
    ids = request_chunks(None, list(range(3 * IDS_PER_CHUNK)), None)
    assert ids.unit == "ids" and len(ids.hashes) == 3 and ids.per_chunk == IDS_PER_CHUNK
    assert request_chunks("", None, None).hashes == ()
    assert all(0 <= h < 2**63 for h in ids.hashes)


def test_only_whole_chunks_are_hashed() -> None:
    assert len(text_chunks("a" * (CHUNK_CHARS - 1)).hashes) == 0
    assert len(text_chunks("a" * (2 * CHUNK_CHARS + 7)).hashes) == 2


def test_a_1mb_prompt_hashes_a_bounded_amount() -> None:
    """The bound, not a time: a 1 MB prompt hashes MAX_CHUNKS chunks of CHUNK_CHARS characters."""
    calls: list[int] = []
    real = prefix.hashlib.blake2b

    def counting(data: bytes, **kw: object) -> object:
        calls.append(len(data))
        return real(data, **kw)  # type: ignore[arg-type]

    with mock.patch.object(prefix.hashlib, "blake2b", counting):
        c = request_chunks("q" * 1_000_000, None, None)
        assert len(calls) == MAX_CHUNKS and sum(calls) == MAX_CHUNKS * CHUNK_CHARS
        calls.clear()
        big_chat = [{"role": "user", "content": "w" * 1_000_000}] * 4
        cc = request_chunks(None, None, big_chat)
        assert len(calls) == MAX_CHUNKS
        calls.clear()
        request_chunks(None, list(range(1_000_000)), None)
        assert len(calls) == MAX_CHUNKS
    assert c.total == 1_000_000 and len(c.hashes) == MAX_CHUNKS
    assert cc.total == 4 * (1_000_000 + 2 + len("user"))


def test_longest_match_finds_the_held_prefix() -> None:
    hashes = text_chunks("abcdefgh" * 1000).hashes
    for k in (0, 1, 5, len(hashes) - 1, len(hashes)):
        assert longest_match(hashes, set(hashes[:k])) == k
