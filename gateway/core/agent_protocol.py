"""The parts of OpenAI requests agents use: tools, tool_choice, response_format, tool messages.

Validated into plain, engine-neutral shapes (the worker compiles them into grammars):
- a tool: {"name", "description", "parameters", "strict"} (Chat's {"type": "function", "function":
  {...}} and the Responses API's flat {"type": "function", "name", ...} both come to this);
- tool_choice: "none" | "auto" | "required" | "function" (with the function's name);
- response_format: None (text), {"type": "json_object"} or {"type": "json_schema", "name",
  "schema", "strict"}.
"""
from __future__ import annotations

import re
from typing import Any

from gateway.core.errors import BadRequest

MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def tool(t: Any, p: str, flat: bool = False) -> dict[str, Any]:
    """One tool definition; flat: the Responses API's shape (no nested "function")."""
    if not isinstance(t, dict) or t.get("type") != "function":
        raise BadRequest(f"'{p}' must be a function tool ({{'type': 'function', ...}})", param=p)
    f = t if flat else t.get("function")
    fp = p if flat else f"{p}.function"
    if not isinstance(f, dict):
        raise BadRequest(f"'{fp}' must be an object", param=fp)
    name = f.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise BadRequest(f"'{fp}.name' must be 1-64 letters, digits, '_' or '-'", param=f"{fp}.name")
    params = f.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise BadRequest(f"'{fp}.parameters' must be a JSON schema object", param=f"{fp}.parameters")
    desc = f.get("description")
    if desc is not None and not isinstance(desc, str):
        raise BadRequest(f"'{fp}.description' must be a string", param=f"{fp}.description")
    strict = f.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise BadRequest(f"'{fp}.strict' must be a boolean", param=f"{fp}.strict")
    return {"name": name, "description": desc or "",
            "parameters": params if params is not None else {"type": "object", "properties": {}},
            "strict": bool(strict)}


def agent_fields(tools: Any, choice: Any, fmt: dict[str, Any] | None, flat: bool = False) -> dict[str, Any]:
    """GenerationRequest's tools, tool_choice, tool_name and response_format fields."""
    if tools is None:
        tools = []
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise BadRequest(f"'tools' must be an array of up to {MAX_TOOLS} tools", param="tools")
    defs = tuple(tool(t, f"tools[{i}]", flat) for i, t in enumerate(tools))
    names = [d["name"] for d in defs]
    if len(set(names)) != len(names):
        raise BadRequest("'tools' names must be unique", param="tools")
    name = None
    if choice is None:
        kind = "auto" if defs else "none"
    elif choice in ("none", "auto", "required"):
        kind = choice
    elif isinstance(choice, dict) and choice.get("type") == "function":
        f = choice if flat else choice.get("function")
        name = f.get("name") if isinstance(f, dict) else None
        if name not in names:
            raise BadRequest("'tool_choice' names a function that is not in 'tools'", param="tool_choice")
        kind = "function"
    else:
        raise BadRequest("'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', ...}",
                         param="tool_choice")
    if kind in ("required", "function") and not defs:
        raise BadRequest(f"'tool_choice' {kind!r} needs 'tools'", param="tool_choice")
    if kind != "none" and fmt is not None:
        raise BadRequest("'response_format' cannot be combined with tools here (set tool_choice to 'none')",
                         param="response_format")
    return {"tools": defs, "tool_choice": kind, "tool_name": name, "response_format": fmt}


def response_format(rf: Any, param: str = "response_format", flat: bool = False) -> dict[str, Any] | None:
    """Chat's response_format (flat: the Responses API's text.format, whose json_schema fields sit
    beside its type)."""
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise BadRequest(f"'{param}.type' must be 'text', 'json_object' or 'json_schema'", param=param)
    js = rf if flat else rf.get("json_schema")
    if not isinstance(js, dict) or not isinstance(js.get("name"), str) or not _NAME.match(js["name"]):
        raise BadRequest(f"'{param}' json_schema needs a 'name' of 1-64 letters, digits, '_' or '-'", param=param)
    schema = js.get("schema", {})
    if not isinstance(schema, dict):
        raise BadRequest(f"'{param}' json_schema 'schema' must be an object", param=param)
    strict = js.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise BadRequest(f"'{param}' json_schema 'strict' must be a boolean", param=param)
    return {"type": "json_schema", "name": js["name"], "schema": schema, "strict": bool(strict)}


def message_extras(m: dict[str, Any], role: str, p: str) -> dict[str, Any]:
    """An assistant turn's tool_calls and a tool turn's tool_call_id, checked."""
    out: dict[str, Any] = {}
    if role == "tool":
        tid = m.get("tool_call_id")
        if not isinstance(tid, str):
            raise BadRequest(f"'{p}.tool_call_id' is required for tool messages", param=f"{p}.tool_call_id")
        out["tool_call_id"] = tid
    calls = m.get("tool_calls")
    if calls is not None and role == "assistant":
        if not isinstance(calls, list):
            raise BadRequest(f"'{p}.tool_calls' must be an array", param=f"{p}.tool_calls")
        checked = []
        for j, c in enumerate(calls):
            f = c.get("function") if isinstance(c, dict) else None
            if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not isinstance(f.get("arguments"), str):
                raise BadRequest(f"'{p}.tool_calls[{j}]' must be a function call with a name and string arguments",
                                 param=f"{p}.tool_calls")
            checked.append({"id": str(c.get("id", "")), "type": "function",
                            "function": {"name": f["name"], "arguments": f["arguments"]}})
        if checked:
            out["tool_calls"] = checked
    return out
