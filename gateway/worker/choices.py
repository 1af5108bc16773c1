"""A request's n choices: run as n engine requests and merged into one stream of (index, output).

The first choice goes alone until its first output (its prompt is then prefilled and its full
blocks registered), so the other n-1 find the prompt's KV blocks in the prefix cache instead of
computing them again.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncGenerator, Callable
from typing import Any

from gateway.worker.engine import RequestOutput
from gateway.worker.request import Request

Choices = AsyncGenerator[tuple[int, RequestOutput], None]
Generate = Callable[..., AsyncGenerator[RequestOutput, None]]


def fan_out(req: Request, n: int) -> list[Request]:
    """n requests for n choices of one; each its own seed (seed + index) so that seeded choices
    still differ."""
    if n == 1:
        return [req]
    out = []
    for i in range(n):
        p = req.params
        if p.seed is not None:
            p = dataclasses.replace(p, seed=(p.seed + i) % (2**64))
        out.append(Request(request_id=f"{req.request_id}-{i}", prompt_token_ids=list(req.prompt_token_ids),
                           params=p, priority=req.priority))
    return out


async def run_choices(generate: Generate, reqs: list[Request], refuse_above_s: float | None) -> Choices:
    """(choice index, output) as they come. The first request alone may be refused (PoolFull
    raised before anything is yielded); closing this aborts every request still running."""
    first_gen = generate(reqs[0], refuse_above_s=refuse_above_s)
    async with contextlib.aclosing(first_gen):
        first = await anext(first_gen)
        yield 0, first
        if len(reqs) == 1:
            async for out in first_gen:
                yield 0, out
            return
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue(maxsize=64 * len(reqs))
        gens = [first_gen] + [generate(r) for r in reqs[1:]]

        async def pump(i: int, gen: AsyncGenerator[RequestOutput, None]) -> None:
            try:
                if i > 0 or not first.finished:
                    async for out in gen:
                        await queue.put((i, out))
                await queue.put((i, None))
            except Exception as e:  # the engine failed under it: the client hears of it
                await queue.put((i, e))

        tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
        try:
            running = len(gens)
            while running:
                i, item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for g in gens[1:]:
                await g.aclose()
