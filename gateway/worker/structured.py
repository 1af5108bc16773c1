"""Grammars for constrained decoding: response_format (json_object, json_schema) and forced tool
calls, compiled with xgrammar.

Why xgrammar: measured on this worker's tokenizer (benchmarks/RESULTS.md, issue 14), its token
mask took ~2.5 us a sequence against ~57-170 us for llguidance (serial / its thread pool), and it
compiled a JSON schema in ~5 ms; outlines-core needs the vocabulary re-expressed as decoded
strings (wrong for byte-level BPE unless converted) and builds a full regex index per schema.
xgrammar also ships the bitmask format (int32, 32 tokens a word) that logits.py applies as one
batched tensor op on the runner's device.

A tool call is decoded as the JSON object {"name": <tool>, "arguments": <its parameters>}, compact
(no whitespace), name first: tools.py parses and streams that shape.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

import torch

from gateway.core.errors import BadRequest
from gateway.worker.tokenizer import Tokenizer

SEPARATORS = (",", ":")


@dataclass(frozen=True, slots=True)
class Grammar:
    """A compiled grammar, and the tokens never allowed under it: those holding a raw control
    byte (U+0000-U+001F). Compact JSON needs none, and xgrammar's string rule lets most of them
    through unescaped, which strict JSON parsers (Python's, pydantic's) refuse."""

    compiled: Any
    banned: torch.Tensor  # (vocab,) bool


class Grammars:
    """Compiles grammars for one tokenizer (thread-safe; compiled schemas are cached by xgrammar)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.tok = tokenizer
        self.vocab_size = vocab_size  # the logits' width (may exceed the tokenizer's)
        self._compiler: Any = None
        self._banned: torch.Tensor | None = None
        self._lock = threading.Lock()

    def _get(self) -> Any:
        with self._lock:  # built on first use: a worker that never constrains never pays for it
            if self._compiler is None:
                import xgrammar as xgr
                from transformers import PreTrainedTokenizerFast

                hf = PreTrainedTokenizerFast(tokenizer_object=self.tok._tok)  # type: ignore[no-untyped-call]
                stop = [self.tok.eos_token_id] if self.tok.eos_token_id is not None else None
                info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=self.vocab_size, stop_token_ids=stop)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
                banned = torch.zeros(self.vocab_size, dtype=torch.bool)
                for i, b in enumerate(info.decoded_vocab[:self.vocab_size]):
                    banned[i] = any(c < 0x20 for c in b)
                self._banned = banned
            return self._compiler

    def _wrap(self, compiled: Any) -> Grammar:
        assert self._banned is not None
        return Grammar(compiled, self._banned)

    def for_request(self, response_format: dict[str, Any] | None, tools: tuple[dict[str, Any], ...],
                    tool_choice: str, tool_name: str | None) -> Any:
        """The compiled grammar a request is decoded under, or None (free text). BadRequest for a
        schema that cannot be compiled."""
        if tool_choice in ("required", "function"):
            chosen = [t for t in tools if tool_choice == "required" or t["name"] == tool_name]
            return self._schema(tool_call_schema(chosen), "tools")
        if response_format is None:
            return None
        if response_format["type"] == "json_object":
            # an object (the builtin JSON grammar would allow any value), of any properties
            return self._wrap(self._get().compile_json_schema('{"type": "object"}', any_whitespace=False,
                                                              separators=SEPARATORS, strict_mode=False))
        return self._schema(response_format["schema"], "response_format")

    def _schema(self, schema: dict[str, Any], param: str) -> Any:
        try:
            return self._wrap(self._get().compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                              separators=SEPARATORS, strict_mode=True))
        except (RuntimeError, ValueError, TypeError) as e:
            raise BadRequest(f"the JSON schema in '{param}' cannot be used: {str(e).splitlines()[0][:200]}",
                             param=param) from None


def tool_call_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """{"name": one of the tools, "arguments": that tool's parameters}."""
    def one(t: dict[str, Any]) -> dict[str, Any]:
        return {"type": "object", "properties": {"name": {"const": t["name"]}, "arguments": t["parameters"]},
                "required": ["name", "arguments"], "additionalProperties": False}
    return one(tools[0]) if len(tools) == 1 else {"anyOf": [one(t) for t in tools]}


def new_matcher(grammar: Grammar) -> Any:
    import xgrammar as xgr

    return xgr.GrammarMatcher(grammar.compiled)
