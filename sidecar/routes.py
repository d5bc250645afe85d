"""Which paths the sidecar relays, and how a path is normalised before matching.

Only a route in this table reaches the upstream, and the path sent upstream is
the table's canonical spelling, never the client's: `//api/%2Fpull.` can not
sneak past a block because no spelling of the client's is ever forwarded.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import quote, unquote

from sidecar.errors import SidecarError


@dataclass(frozen=True, slots=True)
class Route:
    """A relayed route: its name (the canonical path) and what the sidecar knows of it."""

    name: str
    methods: frozenset[str]
    json_body: bool = False
    stream_default: bool = False
    # The marker a complete stream of this route ends with; None: no marker to check.
    stream_end: str | None = None
    # Set for Ollama's management API: the name `management.allow` uses.
    management: str | None = None


def _route(
    name: str,
    *methods: str,
    json_body: bool = False,
    stream_default: bool = False,
    stream_end: str | None = None,
    management: str | None = None,
) -> Route:
    return Route(name, frozenset(methods), json_body, stream_default, stream_end, management)


# What the markers mean is in streams.py: "[DONE]" for OpenAI SSE, "done" for
# native NDJSON, "event:NAME" for SSE streams that close with a named event.
ROUTES: dict[str, Route] = {
    route.name: route
    for route in (
        _route("/v1/chat/completions", "POST", json_body=True, stream_end="[DONE]"),
        _route("/v1/completions", "POST", json_body=True, stream_end="[DONE]"),
        _route("/v1/embeddings", "POST", json_body=True),
        _route("/v1/responses", "POST", json_body=True, stream_end="event:response.completed"),
        _route("/v1/messages", "POST", json_body=True, stream_end="event:message_stop"),
        _route("/v1/models", "GET"),
        _route("/api/chat", "POST", json_body=True, stream_default=True, stream_end="done"),
        _route("/api/generate", "POST", json_body=True, stream_default=True, stream_end="done"),
        _route("/api/embed", "POST", json_body=True),
        _route("/api/embeddings", "POST", json_body=True),
        _route("/api/show", "POST", json_body=True),
        _route("/api/tags", "GET"),
        _route("/api/ps", "GET"),
        _route("/api/version", "GET"),
        _route("/", "GET", "HEAD"),
        _route("/api/pull", "POST", json_body=True, stream_default=True, management="pull"),
        _route("/api/push", "POST", json_body=True, stream_default=True, management="push"),
        _route("/api/create", "POST", json_body=True, stream_default=True, management="create"),
        _route("/api/copy", "POST", json_body=True, management="copy"),
        _route("/api/delete", "DELETE", json_body=True, management="delete"),
    )
}

# Routes with a parameter after a fixed prefix.
MODEL_ROUTE = _route("/v1/models/{model}", "GET")
BLOBS_ROUTE = _route("/api/blobs/{digest}", "HEAD", "POST", management="blobs")

MANAGEMENT_NAMES = ("pull", "push", "create", "copy", "delete", "blobs")

# The routes on which Ollama runs a model: they take its scheduler's slots and
# spend tokens, so limits, budgets and metering count them and nothing else.
GENERATION_ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
)
ROUTE_NAMES = (*ROUTES, MODEL_ROUTE.name, BLOBS_ROUTE.name)


@dataclass(frozen=True, slots=True)
class Match:
    """A matched route and the exact path to send upstream."""

    route: Route
    upstream_path: str


_EXACT: dict[str, Match] = {name: Match(route, name) for name, route in ROUTES.items()}


def normalise_path(raw_path: str) -> tuple[str, str]:
    """Decode and canonicalise a raw request path.

    Returns (the lower-cased canonical path used for matching, the decoded path
    with its case kept, for parameters such as model names). `%2F`, `//`, `.`,
    `..`, trailing dots and slashes all collapse, so a spelling can only match
    the route it really means.
    """
    decoded = unquote(raw_path, errors="strict")
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in decoded) or "\\" in decoded:
        raise SidecarError(400, "the request path contains control characters", code="invalid_path")
    segments: list[str] = []
    for segment in decoded.split("/"):
        # Windows-style and shell-style spellings of the same name: "pull." and "pull ".
        segment = segment.rstrip(". ") if segment not in (".", "..") else segment
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    kept = "/" + "/".join(segments)
    return kept.lower(), kept


def find_route(raw_path: str) -> Match:
    """The route a raw path means, or the SidecarError that answers it (400, 404)."""
    exact = _EXACT.get(raw_path)
    if exact is not None:
        # Spelled exactly as the table spells it: normalising would change nothing.
        return exact
    try:
        canonical, kept = normalise_path(raw_path)
    except UnicodeDecodeError:
        raise SidecarError(
            400, "the request path is not valid UTF-8", code="invalid_path"
        ) from None
    route = ROUTES.get(canonical)
    upstream_path = canonical
    if route is None:
        if canonical.startswith("/v1/models/"):
            route = MODEL_ROUTE
            # Model names keep their case and may contain "/" (hf.co/org/model:tag).
            upstream_path = "/v1/models/" + quote(kept[len("/v1/models/") :], safe="/:@")
        elif canonical.startswith("/api/blobs/"):
            route = BLOBS_ROUTE
            upstream_path = "/api/blobs/" + quote(kept[len("/api/blobs/") :], safe=":")
        else:
            raise SidecarError(
                404,
                f"no such route: {canonical}; the sidecar relays Ollama's "
                "OpenAI-compatible /v1 routes and its native /api routes",
                code="unknown_route",
            )
    return Match(route, upstream_path)


def check_access(match: Match, method: str, allowed_management: frozenset[str]) -> None:
    """Refuse a blocked management route (403) or a method the route lacks (405)."""
    route = match.route
    if route.management is not None and route.management not in allowed_management:
        raise SidecarError(
            403,
            f"{match.upstream_path} is Ollama's management API ({route.management}) and this sidecar "
            f"does not allow it; add '{route.management}' to management.allow to permit it",
            code="route_blocked",
        )
    if method not in route.methods:
        allowed = ", ".join(sorted(route.methods))
        raise SidecarError(
            405,
            f"method {method} is not allowed on {route.name}; use {allowed}",
            code="method_not_allowed",
            headers={"Allow": allowed},
        )


_NamesT = TypeVar("_NamesT", bound=Collection[str])


def known_routes(names: _NamesT) -> _NamesT:
    """`names` as given when each is a route the sidecar serves: a config check, since a
    misspelt route in a list of routes would silently never apply."""
    unknown = sorted(set(names) - set(ROUTE_NAMES))
    if unknown:
        raise ValueError(
            f"unknown route(s) {', '.join(unknown)}; routes are: {', '.join(ROUTE_NAMES)}"
        )
    return names
