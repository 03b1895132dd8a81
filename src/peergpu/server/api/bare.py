"""Helpers for the hot routes that take the bare request instead of FastAPI's dependencies.

Job submission and the inference gateway are the busiest routes of the server. They read the
bearer token, parse the body once with ``json.loads`` and validate it with the same pydantic
models, raising the same ``RequestValidationError`` FastAPI would, so clients see the same
answers; FastAPI's dependency resolution and body parsing cost a fifth of the server's CPU
per request there (``bench/gateway.py``, ``bench/submit.py``). Their OpenAPI entries are still
generated from the models (:func:`documented`).
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

_Body = TypeVar("_Body", bound=BaseModel)


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, as ``HTTPBearer`` reads it."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


async def json_body(request: Request, schema: type[_Body]) -> tuple[dict[str, Any], int, _Body]:
    """The body as sent (parsed), its size in bytes, and validated by ``schema``; a
    ``RequestValidationError`` (the app's 422, or the gateway's 400) otherwise."""
    data = await request.body()
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error", "input": {}}]
        ) from exc
    try:
        body = schema.model_validate(raw)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
        ) from exc
    return raw, len(data), body


def documented(
    schema: type[BaseModel], *, security: str, parameters: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The OpenAPI ``requestBody`` (and ``parameters``) of a route that parses its body
    itself, from its model, with the model's own definitions inlined (the document's
    components do not hold them), under the security scheme ``security``."""
    generated = schema.model_json_schema()
    definitions = generated.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(definitions[ref.removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    extra: dict[str, Any] = {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": inline(generated)}},
        },
        "security": [{security: []}],
    }
    if parameters:
        extra["parameters"] = parameters
    return extra
