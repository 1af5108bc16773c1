"""Tool calls in our worker: how tools reach the prompt, and how a choice's text becomes either
content or a tool call (whole, or streamed as OpenAI streams them).

A call is the compact JSON object {"name": <tool>, "arguments": {...}} (structured.py decodes forced
calls under that shape). Templates that render `tools` themselves (Hugging Face tool-calling
templates) get them; others, like the tiny model's, get them as a system message.
"""
from __future__ import annotations

import json
import uuid
from typing import Any

CALL_PREFIX = '{"name":'
ARGS_KEY = ',"arguments":'


def tool_instructions(tools: tuple[dict[str, Any], ...]) -> str:
    lines = ["You can call these functions. To call one, answer with only a JSON object "
             '{"name": <function name>, "arguments": <arguments object>}.']
    for t in tools:
        lines.append(json.dumps({"name": t["name"], "description": t["description"],
                                 "parameters": t["parameters"]}, separators=(",", ":")))
    return "\n".join(lines)


def prompt_messages(messages: tuple[dict[str, Any], ...], tools: tuple[dict[str, Any], ...], tool_choice: str,
                    template_renders_tools: bool) -> list[dict[str, Any]]:
    """Messages for the chat template: earlier calls written into their assistant turn as the
    model would have produced them, and the tools as a system message when the template does not
    render them itself."""
    out = []
    for m in messages:
        m = dict(m)
        calls = m.get("tool_calls")
        if calls and not template_renders_tools:
            text = "".join(CALL_PREFIX + json.dumps(c["function"]["name"]) + ARGS_KEY + c["function"]["arguments"] + "}"
                           for c in calls)
            m["content"] = (m.get("content") or "") + text
        out.append(m)
    if tools and tool_choice != "none" and not template_renders_tools:
        note = tool_instructions(tools)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + note}
        else:
            out.insert(0, {"role": "system", "content": note})
    return out


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class ChoiceShaper:
    """One choice's output as the client sees it. mode: "text" (no tools), "forced" (the text is
    a call by grammar), "auto" (a call if the model writes one, else content)."""

    def __init__(self, mode: str, tool_names: frozenset[str]):
        self.mode = mode
        self.names = tool_names
        self.text = ""
        self.sent = 0  # chars of the arguments (forced) or of the text (content) already sent
        self.call_id = new_call_id()
        self.name: str | None = None  # once the call's header went out
        self.content = mode == "text"  # decided: this choice is content

    def feed(self, delta: str) -> list[dict[str, Any]]:
        """Deltas to send for new text (possibly none while undecided)."""
        self.text += delta
        if self.content:
            return self._content()
        if self.mode == "auto":
            head = self.text.lstrip()
            if not (head.startswith(CALL_PREFIX) or CALL_PREFIX.startswith(head)):
                self.content = True
                return self._content()
            return []  # a call, maybe: held until the end, sent whole if it parses
        return self._forced(final=False)

    def finish(self, finish_reason: str | None) -> tuple[list[dict[str, Any]], dict[str, Any], str | None]:
        """(last deltas, the message's fields, the finish reason) at the end of the choice."""
        if self.content:
            return self._content(), {"content": self.text}, finish_reason
        if self.mode == "auto":
            call = parse_call(self.text, self.names)
            if call is None:
                self.content = True
                return self._content(), {"content": self.text}, finish_reason
            self.name, args = call
            header = self._call_delta(self.name, args)
            return [header], {"content": None, "tool_calls": [self.call(args)]}, "tool_calls"
        deltas = self._forced(final=True)
        name, args = self.name or "", self._args(final=True)
        reason = "tool_calls" if finish_reason == "stop" else finish_reason
        return deltas, {"content": None, "tool_calls": [self.call(args, name)]}, reason

    def call(self, args: str, name: str | None = None) -> dict[str, Any]:
        return {"id": self.call_id, "type": "function", "function": {"name": name or self.name, "arguments": args}}

    def _content(self) -> list[dict[str, Any]]:
        new, self.sent = self.text[self.sent:], len(self.text)
        return [{"content": new}] if new else []

    def _call_delta(self, name: str, args: str) -> dict[str, Any]:
        return {"tool_calls": [{"index": 0, "id": self.call_id, "type": "function",
                                "function": {"name": name, "arguments": args}}]}

    def _args(self, final: bool) -> str:
        at = self.text.find(ARGS_KEY)
        if at < 0:
            return ""
        args = self.text[at + len(ARGS_KEY):]
        if final:
            return args[:-1] if args.endswith("}") else args  # the call object's own closing brace
        return args[:-1]  # the last char may be that brace: held back until the end

    def _forced(self, final: bool) -> list[dict[str, Any]]:
        out = []
        if self.name is None:
            at = self.text.find(ARGS_KEY)
            if at < 0 and not final:
                return []
            try:
                self.name = str(json.loads(self.text[len(CALL_PREFIX):at])) if at >= 0 else ""
            except ValueError:
                self.name = ""
            out.append(self._call_delta(self.name, ""))
        args = self._args(final)
        if len(args) > self.sent:
            out.append({"tool_calls": [{"index": 0, "function": {"arguments": args[self.sent:]}}]})
            self.sent = len(args)
        return out


def parse_call(text: str, names: frozenset[str]) -> tuple[str, str] | None:
    """(name, arguments as JSON text) when text is one call of a known tool, else None."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names or not isinstance(obj.get("arguments"), dict):
        return None
    return obj["name"], json.dumps(obj["arguments"], separators=(",", ":"))
