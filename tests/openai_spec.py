"""OpenAI's published image-API schemas (a pinned excerpt) as ``jsonschema`` validators.

``tests/openai_images_schemas.json`` holds the schemas unchanged, with their source (repository,
commit, file, API version). The document is OpenAPI, whose ``nullable: true`` is not JSON
Schema: ``validator`` turns each such schema into ``anyOf: [schema, null]`` (OpenAPI 3.0's
meaning) before validating; nothing else is changed.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

PINNED = Path(__file__).with_name("openai_images_schemas.json")


@cache
def document() -> dict[str, Any]:
    return json.loads(PINNED.read_text())


def _nullable(node: Any) -> Any:
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _nullable(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


def schema(name: str) -> dict[str, Any]:
    """The named component schema, as published."""
    return document()["components"]["schemas"][name]


def request_fields() -> dict[str, dict[str, Any]]:
    """Every property of ``CreateImageRequest``: the request fields a client may send."""
    return schema("CreateImageRequest")["properties"]


@cache
def validator(name: str) -> Any:
    """A Draft 2020-12 validator for ``#/components/schemas/<name>`` (references resolved)."""
    import jsonschema

    components = _nullable(copy.deepcopy(document()["components"]))
    root = {"$ref": f"#/components/schemas/{name}", "components": components}
    jsonschema.Draft202012Validator.check_schema(root)
    return jsonschema.Draft202012Validator(root, format_checker=jsonschema.FormatChecker())


def errors(name: str, instance: Any) -> list[str]:
    """Every violation of schema ``name`` by ``instance``, as ``path: message`` lines (empty: valid)."""
    found = sorted(validator(name).iter_errors(instance), key=lambda e: list(e.absolute_path))
    return ["/".join(str(p) for p in e.absolute_path) + f": {e.message}" for e in found]
