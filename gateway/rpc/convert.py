"""Between gRPC messages and the OpenAI bodies the gateway forwards; errors to gRPC status codes.

Pure functions: the server (server.py) does the I/O. A request becomes the OpenAI body it stands
for, so that gateway.core.protocol validates it exactly as it validates an HTTP request.
"""
from __future__ import annotations

from typing import Any

import grpc
import orjson

from gateway.core.errors import APIError, BadRequest
from gateway.rpc import meshgate_pb2 as pb

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"

# HTTP status -> gRPC code, as gRPC's own HTTP mapping and OpenAI's error statuses suggest.
_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# An error event inside a stream has no HTTP status of its own: its OpenAI type stands for one.
_TYPE_STATUS = {"invalid_request_error": 400, "authentication_error": 401, "not_found_error": 404,
                "rate_limit_error": 429, "service_unavailable": 503, "internal_error": 500,
                "upstream_error": 502}


class UpstreamError(APIError):
    """The pool failed or answered something the gateway cannot read (the HTTP front's 502)."""

    status = 502
    type = "upstream_error"


def grpc_code(status: int) -> grpc.StatusCode:
    if status in _CODES:
        return _CODES[status]
    return grpc.StatusCode.INVALID_ARGUMENT if status < 500 else grpc.StatusCode.INTERNAL


# -- requests ---------------------------------------------------------------------------------
def request_body(req: pb.GenerateRequest, stream: bool) -> tuple[str, dict[str, Any]]:
    """The OpenAI path and body that `req` stands for (not yet validated: see core.protocol)."""
    chat = len(req.messages) > 0
    if chat == req.HasField("prompt"):
        raise BadRequest("give either 'messages' (chat) or 'prompt' (completion), not both or neither",
                         param="messages")
    body: dict[str, Any] = {"model": req.model}
    if chat:
        body["messages"] = [{"role": m.role, "content": m.content} for m in req.messages]
    else:
        body["prompt"] = req.prompt
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
        if req.HasField(name):
            body[name] = getattr(req, name)
    if req.stop:
        body["stop"] = list(req.stop)
    if req.stop_token_ids:
        body["stop_token_ids"] = list(req.stop_token_ids)
    if req.ignore_eos:
        body["ignore_eos"] = True
    for name in ("frequency_penalty", "presence_penalty", "prompt_cache_key", "user"):
        if req.HasField(name):
            body[name] = getattr(req, name)
    for name in ("tools", "tool_choice", "response_format", "logit_bias"):
        text = getattr(req, name + "_json")
        if text:
            try:
                body[name] = orjson.loads(text)
            except orjson.JSONDecodeError:
                raise BadRequest(f"'{name}_json' is not valid JSON", param=f"{name}_json") from None
    _logprobs(req, body, chat)
    if stream:
        body["stream"] = True
        if req.include_usage:
            body["stream_options"] = {"include_usage": True}
    return (CHAT_PATH if chat else COMPLETIONS_PATH), body


def _logprobs(req: pb.GenerateRequest, body: dict[str, Any], chat: bool) -> None:
    """The proto has chat's pair (logprobs, top_logprobs); completions take one number instead."""
    if chat:
        if req.HasField("logprobs"):
            body["logprobs"] = req.logprobs
        if req.HasField("top_logprobs"):
            body["top_logprobs"] = req.top_logprobs
    elif req.logprobs:
        body["logprobs"] = req.top_logprobs if req.HasField("top_logprobs") else 0
    elif req.HasField("top_logprobs"):
        raise BadRequest("'top_logprobs' requires 'logprobs' to be true", param="top_logprobs")


# -- answers ----------------------------------------------------------------------------------
def whole_response(body: dict[str, Any]) -> pb.GenerateResponse:
    """A non-streamed chat.completion or text_completion body as one message."""
    msg: pb.GenerateResponse = _fill(pb.GenerateResponse(id=_str(body.get("id")), model=_str(body.get("model"))),
                                     body, "message")
    return msg


def stream_response(event: dict[str, Any]) -> pb.GenerateStreamResponse | None:
    """One stream chunk as a message; None for a chunk that carries nothing (a role-only delta)."""
    msg: pb.GenerateStreamResponse = _fill(pb.GenerateStreamResponse(id=_str(event.get("id")),
                                                                     model=_str(event.get("model"))), event, "delta")
    if not (msg.text or msg.finish_reason or msg.logprobs or msg.tool_calls or msg.HasField("usage")):
        return None
    return msg


def _fill(msg: Any, body: dict[str, Any], content_key: str) -> Any:
    """Text, finish reason, logprobs and usage of a body's first choice into msg. content_key:
    "message" (whole chat answers) or "delta" (chat chunks); completions carry `text`."""
    choice = _first_choice(body)
    if choice is not None:
        part = choice.get(content_key)
        msg.text = _str(part.get("content") if isinstance(part, dict) else choice.get("text"))
        msg.finish_reason = _str(choice.get("finish_reason"))
        msg.logprobs.extend(token_logprobs(choice.get("logprobs")))
        if isinstance(part, dict):
            msg.tool_calls.extend(tool_calls(part.get("tool_calls")))
    use = body.get("usage")
    if isinstance(use, dict):
        msg.usage.CopyFrom(usage(use))
    return msg


def tool_calls(calls: Any) -> list[pb.ToolCall]:
    """A message's (or a delta's) tool_calls."""
    out = []
    for i, c in enumerate(calls if isinstance(calls, list) else ()):
        if not isinstance(c, dict):
            continue
        fn = c.get("function")
        f: dict[str, Any] = fn if isinstance(fn, dict) else {}
        index = c.get("index", i)
        out.append(pb.ToolCall(index=index if isinstance(index, int) and index >= 0 else i, id=_str(c.get("id")),
                               name=_str(f.get("name")), arguments=_str(f.get("arguments"))))
    return out


def usage(use: dict[str, Any]) -> pb.Usage:
    details = use.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return pb.Usage(prompt_tokens=use.get("prompt_tokens") or 0, completion_tokens=use.get("completion_tokens") or 0,
                    total_tokens=use.get("total_tokens") or 0, cached_tokens=cached or 0)


def token_logprobs(lp: Any) -> list[pb.TokenLogprob]:
    """Chat's logprobs.content list, or the completions' parallel arrays, as one shape."""
    if not isinstance(lp, dict):
        return []
    if "content" in lp:
        return [pb.TokenLogprob(token=t["token"], logprob=_float(t["logprob"]),
                                top_logprobs=[pb.TopLogprob(token=a["token"], logprob=_float(a["logprob"]))
                                              for a in t.get("top_logprobs") or ()])
                for t in lp["content"] or ()]
    tokens, values = lp.get("tokens") or [], lp.get("token_logprobs") or []
    tops = lp.get("top_logprobs") or [None] * len(tokens)
    return [pb.TokenLogprob(token=t, logprob=_float(v),
                            top_logprobs=[pb.TopLogprob(token=a, logprob=_float(av)) for a, av in (top or {}).items()])
            for t, v, top in zip(tokens, values, tops)]


def _first_choice(body: dict[str, Any]) -> dict[str, Any] | None:
    choices = body.get("choices")
    # the proto has no `n`: one choice is all there is
    return choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None


def _str(v: Any) -> str:
    return v if isinstance(v, str) else ""


def _float(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) else float("nan")  # JSON has no -inf: it comes as null


# -- the pool's bytes -------------------------------------------------------------------------
class EventReader:
    """Splits a pool's SSE bytes, cut anywhere by the network, into the payloads of `data:` events."""

    def __init__(self) -> None:
        self._buf = b""
        self.done = False  # saw `data: [DONE]`

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buf += chunk
        if b"\r" in self._buf:  # SSE allows CRLF; a CR/LF pair split across chunks joins here
            self._buf = self._buf.replace(b"\r\n", b"\n")
        *events, self._buf = self._buf.split(b"\n\n")
        out = []
        for ev in events:
            data = [line[5:].removeprefix(b" ") for line in ev.split(b"\n") if line.startswith(b"data:")]
            if not data:
                continue  # a comment or keep-alive
            payload = b"\n".join(data)
            if payload == b"[DONE]":
                self.done = True
            else:
                out.append(payload)
        return out


def load_json(raw: bytes) -> dict[str, Any]:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UpstreamError("the pool's answer is not valid JSON") from None
    if not isinstance(obj, dict):
        raise UpstreamError("the pool's answer is not a JSON object")
    return obj


def pool_error(body: dict[str, Any], status: int | None) -> APIError:
    """The pool's OpenAI error (an error answer, or an error event mid-stream) as the client's error.
    Servers differ: {"error": {...}}, {"error": "text"}, or vLLM's flat {"message", "type", "code": 400}."""
    err = body.get("error", body)
    if not isinstance(err, dict):
        err = {"message": str(err)}
    code = err.get("code")
    if status is None:
        status = code if isinstance(code, int) and 400 <= code < 600 else _TYPE_STATUS.get(_str(err.get("type")), 502)
    e = APIError(_str(err.get("message")) or "the pool failed the request",
                 param=err.get("param") if isinstance(err.get("param"), str) else None,
                 code=None if code is None else str(code))
    e.status = status
    e.type = _str(err.get("type")) or "upstream_error"
    return e
