"""OpenAI's OpenAPI spec (shared/data/openai-openapi, outside the repo) for conformance tests:
its operations, and jsonschema validators that resolve $refs within the document."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import referencing
import yaml
from referencing.jsonschema import DRAFT202012

SPEC_PATH = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "openai-openapi" / "openapi.yaml"
SPEC_URI = "urn:openai-openapi"


def _to_json_schema(node: Any) -> Any:
    """OpenAPI's `nullable: true` (a 3.0 keyword the 3.1 spec still uses) as JSON Schema 2020-12."""
    if isinstance(node, list):
        return [_to_json_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _to_json_schema(v) for k, v in node.items() if not (k == "nullable" and isinstance(v, bool))}
    if node.get("nullable") is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


class Spec:
    """The spec's operations and schemas, with validators that resolve $refs within the document."""

    def __init__(self, raw: dict[str, Any]):
        self.raw = raw
        self.ops = {op["operationId"]: (path, method, op) for path, item in raw["paths"].items()
                    for method, op in item.items() if isinstance(op, dict) and "operationId" in op}
        resource = DRAFT202012.create_resource(_to_json_schema(raw))
        self.registry = referencing.Registry().with_resource(SPEC_URI, resource)

    def url(self, base: str, operation_id: str, **params: str) -> str:
        return base + "/v1" + self.ops[operation_id][0].format(**params)

    def response_schema(self, operation_id: str, media: str = "application/json") -> dict[str, Any]:
        return self.ops[operation_id][2]["responses"]["200"]["content"][media]["schema"]

    def request_schema(self, operation_id: str) -> dict[str, Any]:
        return self.ops[operation_id][2]["requestBody"]["content"]["application/json"]["schema"]

    def errors(self, schema: dict[str, Any], instance: Any) -> list[str]:
        schema = {"$ref": SPEC_URI + schema["$ref"]} if set(schema) == {"$ref"} else schema
        v = jsonschema.Draft202012Validator(schema, registry=self.registry)
        return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}"
                for e in v.iter_errors(instance)]

    def check(self, schema: dict[str, Any], instance: Any, what: str = "") -> None:
        errs = self.errors(schema, instance)
        assert not errs, f"{what} does not conform to {schema.get('$ref', 'the schema')}:\n" + "\n".join(errs) + \
            "\n" + json.dumps(instance)[:2000]

    def schema(self, name: str) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{name}"}

    def schema_copy(self, name: str) -> dict[str, Any]:
        """A named schema to edit, its $refs made absolute so that they still resolve."""
        def absolute(node: Any) -> Any:
            if isinstance(node, dict):
                return {k: SPEC_URI + v if k == "$ref" and v.startswith("#") else absolute(v) for k, v in node.items()}
            return [absolute(v) for v in node] if isinstance(node, list) else node
        return absolute(_to_json_schema(self.raw["components"]["schemas"][name]))

    def request_properties(self, operation_id: str) -> dict[str, Any]:
        """Every request property the spec names for an operation, through allOf and $ref."""
        schemas = self.raw["components"]["schemas"]
        props: dict[str, Any] = {}
        stack = [schemas[self.request_schema(operation_id)["$ref"].rsplit("/", 1)[1]]]
        while stack:
            s = stack.pop()
            props.update(s.get("properties", {}))
            stack += [schemas[sub["$ref"].rsplit("/", 1)[1]] if "$ref" in sub else sub for sub in s.get("allOf", [])]
        return props


def load_spec() -> Spec | None:
    """The spec, or None where shared/ does not hold it."""
    if not SPEC_PATH.is_file():
        return None
    with SPEC_PATH.open(encoding="utf-8") as f:
        return Spec(yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))
