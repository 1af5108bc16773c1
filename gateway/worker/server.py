"""The pool worker's HTTP server: OpenAI API, /load, /load/stream, /health, /ready, /metrics (aiohttp, orjson).

The engine is loaded after the port is bound (so a busy port fails fast), on a thread; until it
is ready, generation endpoints answer 503 and /ready is 503.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gateway.config import PoolConfig
from gateway.core import capabilities
from gateway.core.errors import APIError, BadRequest, InternalError, NotFound, Overloaded, RateLimited
from gateway.worker.http import error_middleware, json_response, read_json
from gateway.core.prefix import request_chunks
from gateway.core.protocol import GenerationRequest, parse_chat, parse_completion
from gateway.core.types import LoadReport
from gateway.core.wire import LOAD_HEADER, MAY_REFUSE_HEADER, PRIORITIES, PRIORITY_HEADER, TOKEN_IDS_FIELD, TOKEN_IDS_HEADER
from gateway.worker.async_engine import AsyncEngine, EngineDeadError, PoolFull
from gateway.worker.engine import Engine, RequestOutput
from gateway.worker.load_feed import LoadFeed
from gateway.worker.metrics import EngineCounters, WorkerMetrics
from gateway.worker.request import Request, SamplingParams
from gateway.core.responses_protocol import parse_embeddings, parse_responses
from gateway.worker.choices import Choices, fan_out, run_choices
from gateway.worker.embeddings import embed_request
from gateway.worker.responses_api import serve_response
from gateway.worker.responses import ResponseBuilder, usage
from gateway.worker.tokenizer import ChatTemplateError
from gateway.worker.tools import ChoiceShaper, prompt_messages
from gateway.worker.resume import resumed_ids, unwrap

log = logging.getLogger("meshgate.worker")

REQUEST_ID = web.RequestKey("request_id", str)
Outputs = AsyncGenerator[RequestOutput, None]
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
CAPABILITIES = sorted(capabilities.MESHGATE_WORKER)


class WorkerServer:
    def __init__(self, cfg: PoolConfig):
        self.cfg = cfg
        self.model_name = cfg.model.name
        self.engine: AsyncEngine | None = None
        self.created = int(time.time())
        self.metrics = WorkerMetrics(self._state)
        self.load_feed = LoadFeed(lambda: self.engine.report if self.engine is not None else LoadReport(),
                                  cfg.load_stream_interval_s, cfg.load_stream_heartbeat_s, cfg.max_load_streams,
                                  on_disconnect=self.metrics.disconnects.labels("/load/stream").inc)

    def _state(self) -> EngineCounters:
        e = self.engine
        if e is None:
            return EngineCounters(LoadReport())
        return EngineCounters(e.report, e.num_preemptions, e.num_aborted, e.num_steps)

    # -- lifecycle --------------------------------------------------------------------------
    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.max_body_bytes, middlewares=[error_middleware(self._count)])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.model)
        app.router.add_get("/health", self.health)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/load", self.load)
        app.router.add_get("/load/stream", self.load_stream)
        app.router.add_get("/metrics", self.prometheus)
        app.on_response_prepare.append(self._add_headers)
        app.on_shutdown.append(self.load_feed.on_shutdown)  # before the engine stops: the streams end first
        app.on_shutdown.append(self._stop_engine)
        return app

    async def start_engine(self, engine: Engine | None = None) -> None:
        """Load the model (off the event loop) and start the engine thread."""
        if engine is None:
            engine = await asyncio.to_thread(Engine, self.cfg.model, self.cfg.engine)
            await asyncio.to_thread(engine.warm_up)
        aengine = AsyncEngine(engine)
        aengine.start(asyncio.get_running_loop())
        self.engine = aengine

    async def _stop_engine(self, app: web.Application) -> None:
        if self.engine is not None:
            await asyncio.to_thread(self.engine.stop)

    def _count(self, request: web.Request, status: int) -> None:
        self.metrics.requests.labels(request.path, str(status)).inc()

    async def _add_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        if self.engine is not None:
            response.headers[LOAD_HEADER] = self.engine.report.to_header()
        rid = request.get(REQUEST_ID)
        if rid:
            response.headers["x-request-id"] = rid

    # -- plain endpoints --------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        if self.engine is None:
            return json_response({"status": "loading"}, 503)
        return json_response({"status": "ready", "model": self.model_name})

    async def load(self, request: web.Request) -> web.Response:
        t0 = time.perf_counter()
        report = self.engine.report if self.engine else LoadReport()
        body = report.to_dict()
        body["ready"] = self.engine is not None
        body["capabilities"] = self._capabilities()  # what gateways may route here (core/capabilities.py)
        body["handling_s"] = time.perf_counter() - t0
        return json_response(body)

    async def load_stream(self, request: web.Request) -> web.StreamResponse:
        if self.engine is None:  # no report to push yet; the gateway probes meanwhile
            raise Overloaded("the model is still loading", retry_after_s=5)
        return await self.load_feed.serve(request)

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "meshgate",
                "max_model_len": self.cfg.engine.max_model_len, "capabilities": self._capabilities()}

    def _capabilities(self) -> list[str]:
        """Everything the worker serves; embeddings only with a runner that keeps the model's
        torch modules (the TensorRT runner does not)."""
        e = self.engine
        if e is not None and getattr(e.engine.runner, "model", None) is None:
            return [c for c in CAPABILITIES if c != "embeddings"]
        return CAPABILITIES

    async def models(self, request: web.Request) -> web.Response:
        return json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        if request.match_info["model"] != self.model_name:
            raise NotFound(f"The model '{request.match_info['model']}' does not exist", param="model",
                           code="model_not_found")
        return json_response(self._model_card())

    # -- generation -------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        body, resume = unwrap(await read_json(request))
        return await self._generate(request, parse_completion(body), resume)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body, resume = unwrap(await read_json(request))
        return await self._generate(request, parse_chat(body), resume)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_responses(await read_json(request)))

    async def embeddings(self, request: web.Request) -> web.Response:
        e = parse_embeddings(await read_json(request))
        if e.model != self.model_name:
            raise NotFound(f"The model '{e.model}' does not exist", param="model", code="model_not_found")
        engine = self.engine
        if engine is None:
            raise Overloaded("the model is still loading", retry_after_s=5)
        if getattr(engine.engine.runner, "model", None) is None:
            raise BadRequest("this pool's runner does not serve embeddings", param="model",
                             code="unsupported_endpoint")
        return json_response(await embed_request(engine, e, self.cfg.engine.max_model_len, self.cfg.request_timeout_s))

    async def _generate(self, request: web.Request, g: GenerationRequest,
                        resume: dict[str, Any] | None = None) -> web.StreamResponse:
        arrival = time.monotonic()
        if g.model != self.model_name:
            raise NotFound(f"The model '{g.model}' does not exist", param="model", code="model_not_found")
        engine = self.engine
        if engine is None:
            raise Overloaded("the model is still loading", retry_after_s=5)
        ec = self.cfg.engine
        if engine.num_in_flight >= ec.max_num_seqs + ec.max_waiting:
            raise Overloaded("the pool's queue is full; retry later", retry_after_s=1)
        tok = engine.engine.tokenizer
        if g.kind in ("chat", "responses"):
            msgs = prompt_messages(g.messages or (), g.tools, g.tool_choice, tok.renders_tools)
            try:
                prompt_ids = tok.apply_chat_template(msgs, tools=_template_tools(g) if tok.renders_tools else None)
            except ChatTemplateError as e:
                raise BadRequest(str(e), param="messages") from None
        elif g.prompt_token_ids is not None:
            prompt_ids = list(g.prompt_token_ids)
            if max(prompt_ids) >= engine.engine.vocab_size:
                raise BadRequest("'prompt' holds a token id outside the vocabulary", param="prompt")
        else:
            prompt_ids = tok.encode(g.prompt or "")
        if any(t >= engine.engine.vocab_size for t, _ in g.logit_bias):
            raise BadRequest("'logit_bias' names a token id outside the vocabulary", param="logit_bias")
        max_tokens = _check_length(len(prompt_ids), g.max_tokens, ec.max_model_len,
                                   {"chat": "messages", "responses": "input"}.get(g.kind, "prompt"))
        grammar = None
        if g.response_format is not None or g.tool_choice in ("required", "function"):
            grammar = await asyncio.to_thread(engine.engine.grammars.for_request, g.response_format, g.tools,
                                              g.tool_choice, g.tool_name)
        # A continuation (another pool began this request and was cut): its tokens so far count as ours.
        resumed = resumed_ids(resume, tok, engine.engine.vocab_size)
        if resumed is not None and len(resumed) >= max_tokens:
            raise BadRequest("the continuation already holds max_tokens tokens", param="meshgate_resume")
        rid = uuid.uuid4().hex
        client_rid = request.headers.get("x-request-id", "")
        request[REQUEST_ID] = client_rid if _REQUEST_ID.match(client_rid) else rid
        req = Request(
            request_id=rid,
            prompt_token_ids=prompt_ids,
            params=SamplingParams(
                max_tokens=max_tokens, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, seed=g.seed,
                stop=g.stop, stop_token_ids=g.stop_token_ids, ignore_eos=g.ignore_eos, logprobs=g.logprobs,
                frequency_penalty=g.frequency_penalty, presence_penalty=g.presence_penalty,
                logit_bias=g.logit_bias, grammar=grammar,
            ),
            priority=PRIORITIES.get(request.headers.get(PRIORITY_HEADER, ""), 0),
            prefix_chunks=request_chunks(g.prompt, g.prompt_token_ids, g.messages),  # bounded hashing
            output_token_ids=resumed or [],
        )
        builder = ResponseBuilder(g.kind, rid, self.model_name, tok)
        deadline = asyncio.get_running_loop().time() + self.cfg.request_timeout_s
        refuse = ec.refuse_queue_wait_s if request.headers.get(MAY_REFUSE_HEADER) == "1" else None
        outputs: Choices = run_choices(engine.generate, fan_out(req, g.n), refuse)
        if refuse is not None:
            outputs = await self._admitted(outputs, deadline)
        tracker = _Timing(self.metrics, arrival)
        mode = "text" if g.kind == "completion" or g.tool_choice == "none" else (
            "auto" if g.tool_choice == "auto" else "forced")
        names = frozenset(t["name"] for t in g.tools)
        shapers = [ChoiceShaper(mode, names) for _ in range(g.n)]
        if g.kind == "responses":
            return await serve_response(request, g, outputs, tracker.token, deadline, shapers[0], rid,
                                        self.model_name, self._failure, (TimeoutError, EngineDeadError))
        if g.stream:
            return await self._stream(request, g, outputs, builder, tracker, deadline, shapers,
                                      request.headers.get(TOKEN_IDS_HEADER) == "1")
        acc = [_Choice() for _ in range(g.n)]
        try:
            async with contextlib.aclosing(outputs), asyncio.timeout_at(deadline):
                async for i, out in outputs:
                    tracker.token(out)
                    acc[i].add(out)
        except (TimeoutError, EngineDeadError) as e:
            raise self._failure(e) from None
        choices = []
        for i, (c, shaper) in enumerate(zip(acc, shapers)):
            assert c.last is not None
            shaper.feed("".join(c.text))
            _, message, reason = shaper.finish(c.last.finish_reason)
            choices.append(builder.choice(i, message, reason, c.ids, c.lps if g.logprobs is not None else None))
        return json_response(builder.full_choices(choices, _usage(acc)))

    async def _admitted(self, outputs: Choices, deadline: float) -> Choices:
        """A request that may be refused: wait for the engine's first output before any answer
        goes out (a stream's headers included), so that a full pool can still answer 429. Returns
        the same outputs, the first one included."""
        try:
            async with asyncio.timeout_at(deadline):
                first = await anext(outputs)
        except PoolFull as e:
            raise RateLimited("the pool is full; retry on another pool", retry_after_s=e.wait_s,
                              code="pool_full") from None
        except (TimeoutError, EngineDeadError) as e:
            await outputs.aclose()
            raise self._failure(e) from None
        return _prepend(first, outputs)

    def _failure(self, e: Exception) -> APIError:
        """What a client is told when its request timed out or the engine failed under it."""
        if isinstance(e, TimeoutError):
            return Overloaded(f"the request did not finish within {self.cfg.request_timeout_s:g} s")
        return InternalError(str(e))

    async def _stream(self, request: web.Request, g: GenerationRequest, outputs: Choices, builder: ResponseBuilder,
                      tracker: _Timing, deadline: float, shapers: list[ChoiceShaper],
                      with_ids: bool = False) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            await resp.prepare(request)
            await self._relay(resp, g, outputs, builder, tracker, deadline, shapers, with_ids)
        except ConnectionError:  # aiohttp's "Cannot write to closing transport" is one too
            # The gateway dropped the stream (its client left, it moved the request, it gave up on
            # a stall): routine. Closing the outputs aborts the request, so its KV is freed.
            await outputs.aclose()
            self._gone(request)
        except asyncio.CancelledError:  # aiohttp cancels the handler of a connection that closed
            self._gone(request)
            raise
        return resp

    def _gone(self, request: web.Request) -> None:
        self.metrics.disconnects.labels(request.path).inc()
        log.debug("request %s: the client went away mid-stream", request.get(REQUEST_ID))

    async def _relay(self, resp: web.StreamResponse, g: GenerationRequest, outputs: Choices,
                     builder: ResponseBuilder, tracker: _Timing, deadline: float, shapers: list[ChoiceShaper],
                     with_ids: bool) -> None:
        acc = [_Choice() for _ in range(g.n)]
        try:
            async with contextlib.aclosing(outputs), asyncio.timeout_at(deadline):
                async for i, out in outputs:
                    tracker.token(out)
                    await resp.write(self._chunks(g, builder, shapers[i], acc[i], i, out, with_ids))
            if g.include_usage and all(c.last is not None for c in acc):
                await resp.write(b"data: " + orjson.dumps(builder.usage_chunk(_usage(acc))) + b"\n\n")
        except (TimeoutError, EngineDeadError) as e:
            await resp.write(b"data: " + orjson.dumps(self._failure(e).body()) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()

    @staticmethod
    def _chunks(g: GenerationRequest, builder: ResponseBuilder, shaper: ChoiceShaper, c: _Choice, index: int,
                out: RequestOutput, with_ids: bool = False) -> bytes:
        """The SSE events for one output of choice `index`: its text (or tool call) deltas, the
        tokens not sent yet with the first of them (text held back, e.g. a partial UTF-8 char,
        keeps its tokens for later), and the finish reason with the last. with_ids: each event ends
        with the ids of the tokens it carries (TOKEN_IDS_FIELD, last, so the gateway can cut it off
        without parsing; the gateway continues a cut stream from them)."""
        first = c.last is None
        c.add(out, keep=False)
        deltas = shaper.feed(out.text) if g.kind == "chat" else ([{"content": out.text}] if out.text else [])
        reason = None
        if out.finished:
            more, _, reason = shaper.finish(out.finish_reason) if g.kind == "chat" else ([], {}, out.finish_reason)
            deltas += more
        if not deltas and (first or out.finished):
            deltas = [{"content": ""}]
        events = []
        for k, d in enumerate(deltas):
            last = k == len(deltas) - 1
            lps = c.pending_lps if g.logprobs is not None and k == 0 else None
            chunk = builder.chunk(d.get("content", ""), reason if last else None, c.pending_ids if k == 0 else [],
                                  lps, g.include_usage, first=first and k == 0, index=index,
                                  delta=d if g.kind == "chat" else None)
            if with_ids:
                chunk[TOKEN_IDS_FIELD] = c.pending_ids if k == 0 else []
            events.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
        if deltas:
            c.pending_ids, c.pending_lps = [], []
        return b"".join(events)


class _Choice:
    """What one choice produced so far."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.ids: list[int] = []
        self.lps: list[Any] = []
        self.pending_ids: list[int] = []  # streams: tokens whose text has not gone out yet
        self.pending_lps: list[Any] = []
        self.last: RequestOutput | None = None

    def add(self, out: RequestOutput, keep: bool = True) -> None:
        if keep:
            self.text.append(out.text)
            self.ids.extend(out.token_ids)
            self.lps.extend(out.logprobs)
        else:
            self.pending_ids.extend(out.token_ids)
            self.pending_lps.extend(out.logprobs)
        self.last = out


def _usage(acc: list[_Choice]) -> dict[str, Any]:
    """The prompt once, the completion tokens of every choice."""
    last = [c.last for c in acc if c.last is not None]
    return usage(last[0].num_prompt_tokens, sum(o.num_output_tokens for o in last), last[0].num_cached_tokens)


def _template_tools(g: GenerationRequest) -> list[dict[str, Any]] | None:
    """Tools as Hugging Face tool-calling templates take them."""
    if not g.tools or g.tool_choice == "none":
        return None
    return [{"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters")}}
            for t in g.tools]


async def _prepend(first: Any, rest: AsyncGenerator[Any, None]) -> AsyncGenerator[Any, None]:
    """`first`, then the rest; closing it closes `rest` (which aborts an unfinished request)."""
    try:
        yield first
        async for out in rest:
            yield out
    finally:
        await rest.aclose()


class _Timing:
    """Per-request latency metrics, fed with each engine output."""

    def __init__(self, metrics: WorkerMetrics, arrival: float):
        self.m = metrics
        self.arrival = arrival
        self.last: float | None = None

    def token(self, out: RequestOutput) -> None:
        now = time.monotonic()
        if self.last is None:
            self.m.ttft.observe(now - self.arrival)
            self.m.cached_tokens.inc(out.num_cached_tokens)
        else:
            self.m.itl.observe(now - self.last)
        self.last = now
        self.m.generation_tokens.inc(len(out.token_ids))
        if out.finished:
            self.m.e2e.observe(now - self.arrival)
            self.m.prompt_tokens.inc(out.num_prompt_tokens)


def _check_length(num_prompt: int, max_tokens: int | None, max_model_len: int, param: str) -> int:
    if num_prompt >= max_model_len or (max_tokens is not None and num_prompt + max_tokens > max_model_len):
        asked = f"{num_prompt + (max_tokens or 0)} tokens ({num_prompt} in the prompt, {max_tokens or 0} in the completion)"
        raise BadRequest(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested {asked}. "
            "Please reduce the length of the prompt or the completion.",
            param=param, code="context_length_exceeded",
        )
    return max_tokens if max_tokens is not None else max_model_len - num_prompt
