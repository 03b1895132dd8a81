"""Error responses documented in OpenAPI, shared by the routers."""

from typing import Any

from peergpu.server.schemas.errors import ErrorBody

_DESCRIPTIONS = {
    400: "Bad request (a webhook's signature or body refused)",
    401: "Not authenticated",
    402: "Not enough credit (or a spending cap reached)",
    403: "Not allowed",
    404: "Not found (or not visible to you)",
    409: "Conflicts with the current state",
    413: "Too large",
    422: "Invalid input",
    429: "Rate limited",
    503: "A service it needs is not configured or not reachable; retry later",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorBody, "description": _DESCRIPTIONS[s]} for s in statuses}


AUTHENTICATED = errors(401, 403, 422)
