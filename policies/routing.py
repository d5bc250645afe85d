"""routing: model aliases, model fallbacks and several upstreams with priority failover.

An app written against OpenAI model names keeps them (`gpt-4o-mini` answers as
`llama3.2`); a model that is missing or failing falls back to the next one; an
upstream that is down or shedding load hands over to the next by priority. All
of it happens before the first byte reaches the client: once a stream has
started, the client gets that stream or its explicit error.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar
from urllib.parse import quote

import orjson
import structlog

from sidecar.chain import Next, PolicyContext, register
from sidecar.config import UpstreamUrl
from sidecar.errors import SidecarError, StreamInterrupted, UpstreamError
from sidecar.exchange import Exchange, Reply
from sidecar.knobs import STRICT, Field
from sidecar.outcomes import UPSTREAM_FAILURE_STATUSES, is_model_not_found
from sidecar.replies import discard, peek_first_chunk

log = structlog.get_logger("sidecar.routing")

# Refusals other policies make for one upstream that another upstream may not share.
_HAND_OVER_CODES = frozenset({"circuit_open", "concurrency_limit"})
MODEL_ROUTE = "/v1/models/{model}"


@dataclass(frozen=True, kw_only=True)
class UpstreamTarget:
    __pydantic_config__ = STRICT

    name: Annotated[
        str, Field(min_length=1, max_length=64, description="Name in metrics, logs and breakers.")
    ]
    url: Annotated[UpstreamUrl, Field(description="Base URL of this Ollama (http:// or https://).")]
    priority: Annotated[
        int, Field(ge=0, le=100, description="Lower is tried first; ties share by weight.")
    ] = 0
    weight: Annotated[
        float, Field(gt=0, le=1000, description="Share of requests among equal priorities.")
    ] = 1.0


@dataclass(frozen=True, kw_only=True)
class RoutingConfig:
    __pydantic_config__ = STRICT

    aliases: Annotated[
        dict[str, str], Field(description="Client model name -> model Ollama serves.")
    ] = field(default_factory=dict)
    fallbacks: Annotated[
        dict[str, list[str]],
        Field(description="Model -> models to try next, in order, before the first byte."),
    ] = field(default_factory=dict)
    upstreams: Annotated[
        list[UpstreamTarget],
        Field(
            description="Upstreams by priority; empty: the one in upstream.url, named 'default'."
        ),
    ] = field(default_factory=list)
    list_aliases: Annotated[
        bool, Field(description="Show aliases as models in GET /v1/models.")
    ] = True

    def __post_init__(self) -> None:
        for alias, target in self.aliases.items():
            seen = [alias]
            while target in self.aliases:
                if target in seen:
                    raise ValueError(f"aliases loop: {' -> '.join([*seen, target])}")
                seen.append(target)
                target = self.aliases[target]
        names = [upstream.name for upstream in self.upstreams]
        if len(set(names)) != len(names):
            raise ValueError("upstream names must be unique")
        for model, chain in self.fallbacks.items():
            if model in chain:
                raise ValueError(f"fallbacks for {model!r} name the model itself")


@dataclass(frozen=True, slots=True)
class _Candidate:
    model: str | None
    upstream: str
    target: str | None


@register("routing")
class Routing:
    """Rewrites aliased models, then tries (model, upstream) candidates until one answers."""

    config_model: ClassVar[type[Any]] = RoutingConfig

    def __init__(self, config: RoutingConfig, context: PolicyContext) -> None:
        self.aliases = {alias: self._resolve(config.aliases, alias) for alias in config.aliases}
        self.fallbacks = config.fallbacks
        self.list_aliases = config.list_aliases
        self.upstreams = list(config.upstreams)
        self._random = random.Random()
        # The common case, one upstream (or none: upstream.url): no order to draw, so a
        # model without fallbacks has one candidate, known now.
        self._single: tuple[str, str | None] | None = None
        if not self.upstreams:
            self._single = ("default", None)
        elif len(self.upstreams) == 1:
            self._single = (self.upstreams[0].name, self.upstreams[0].url)
        self._fallbacks_used = context.metrics.counter(
            "fallbacks_total",
            "Requests answered by another model or upstream than the first.",
            ("kind",),
        )

    @staticmethod
    def _resolve(aliases: dict[str, str], name: str) -> str:
        while name in aliases:
            name = aliases[name]
        return name

    async def __call__(self, exchange: Exchange, call_next: Next) -> Reply:
        route = exchange.route.name
        if route == "/v1/models":
            return await self._list_models(exchange, call_next)
        if route == MODEL_ROUTE:
            return await self._one_model(exchange, call_next)
        model = exchange.model if exchange.route.json_body else None
        if model is not None:
            aliased = self.aliases.get(model)
            if aliased is not None:
                self._set_model(exchange, aliased)
                model = aliased
        single = self._single
        if single is not None and (model is None or model not in self.fallbacks):
            exchange.target = single[1]
            exchange.facts["upstream"] = single[0]
            reply = await call_next(exchange)
            if model is not None:
                exchange.response_headers["x-sidecar-model"] = model
            return reply
        candidates = self._candidates(model)
        if len(candidates) == 1:
            candidate = candidates[0]
            exchange.target = candidate.target
            exchange.facts["upstream"] = candidate.upstream
            reply = await call_next(exchange)
            if model is not None:
                exchange.response_headers["x-sidecar-model"] = model
            return reply
        return await self._try_in_turn(exchange, call_next, candidates)

    def _candidates(self, model: str | None) -> list[_Candidate]:
        models: list[str | None] = [model]
        if model is not None:
            models += self.fallbacks.get(model, [])
        upstreams = self._upstream_order()
        return [_Candidate(each, name, target) for each in models for name, target in upstreams]

    def _upstream_order(self) -> list[tuple[str, str | None]]:
        """By priority; within one priority a weighted random order (Efraimidis-Spirakis)."""
        if not self.upstreams:
            return [("default", None)]
        keyed = sorted(
            self.upstreams,
            key=lambda up: (up.priority, -(self._random.random() ** (1.0 / up.weight))),
        )
        return [(up.name, up.url) for up in keyed]

    async def _try_in_turn(
        self, exchange: Exchange, call_next: Next, candidates: list[_Candidate]
    ) -> Reply:
        last_reply: Reply | None = None
        last_error: BaseException | None = None
        first_model = candidates[0].model
        for index, candidate in enumerate(candidates):
            final = index == len(candidates) - 1
            if candidate.model is not None and candidate.model != exchange.model:
                self._set_model(exchange, candidate.model)
            exchange.target = candidate.target
            exchange.facts["upstream"] = candidate.upstream
            if last_reply is not None:
                await discard(last_reply)
                last_reply = None
            try:
                reply = await call_next(exchange)
                if not final and reply.chunks is not None and reply.status == 200:
                    reply = await peek_first_chunk(reply)
            except (UpstreamError, StreamInterrupted) as error:
                last_error = error
                log.info(
                    "route_failed_over",
                    upstream=candidate.upstream,
                    model=candidate.model,
                    reason=getattr(error, "code", "error"),
                )
                continue
            except SidecarError as error:
                if error.code in _HAND_OVER_CODES and not final:
                    last_error = error
                    continue
                raise
            if not final and (
                reply.status in UPSTREAM_FAILURE_STATUSES or is_model_not_found(reply)
            ):
                last_reply = reply
                log.info(
                    "route_failed_over",
                    upstream=candidate.upstream,
                    model=candidate.model,
                    status=reply.status,
                )
                continue
            if candidate.model != first_model:
                self._fallbacks_used.labels("model").inc()
            if index and candidate.model == first_model:
                self._fallbacks_used.labels("upstream").inc()
            if candidate.model is not None:
                exchange.response_headers["x-sidecar-model"] = candidate.model
            return reply
        if last_reply is not None:
            return last_reply
        assert last_error is not None
        if isinstance(last_error, StreamInterrupted):
            # Every candidate broke before its first chunk: nothing was sent yet,
            # so the client can still get a plain error instead of a stream.
            raise UpstreamError(502, last_error.message, code=last_error.code) from None
        raise last_error

    def _set_model(self, exchange: Exchange, model: str) -> None:
        document = dict(exchange.json)
        key = "model" if "model" in document or "name" not in document else "name"
        document[key] = model
        exchange.set_json(document)

    async def _list_models(self, exchange: Exchange, call_next: Next) -> Reply:
        """GET /v1/models with the aliases added, each shown as the model it stands for."""
        reply = await call_next(exchange)
        if not self.list_aliases or not self.aliases or reply.status != 200 or reply.chunks:
            return reply
        try:
            document = orjson.loads(reply.body)
        except orjson.JSONDecodeError:
            return reply
        if not isinstance(document, dict):
            return reply
        models: list[Any] = document.get("data") or []
        by_id = {entry.get("id"): entry for entry in models if isinstance(entry, dict)}
        for alias, target in self.aliases.items():
            if alias in by_id:
                continue
            base = by_id.get(target) or by_id.get(f"{target}:latest")
            if base is None:
                continue  # an alias of a model Ollama does not have lists nothing
            models.append({**base, "id": alias})
        document["data"] = models
        reply.body = orjson.dumps(document)
        return reply

    async def _one_model(self, exchange: Exchange, call_next: Next) -> Reply:
        """GET /v1/models/{alias} answers for the model behind the alias, under the alias's name."""
        requested = exchange.path[len("/v1/models/") :]
        alias = next((name for name in self.aliases if quote(name, safe="/:@") == requested), None)
        if alias is None:
            return await call_next(exchange)
        exchange.path = "/v1/models/" + quote(self.aliases[alias], safe="/:@")
        reply = await call_next(exchange)
        if reply.status == 200 and reply.chunks is None:
            try:
                document = orjson.loads(reply.body)
            except orjson.JSONDecodeError:
                return reply
            if isinstance(document, dict):
                document["id"] = alias
                reply.body = orjson.dumps(document)
        return reply

    def readiness(self) -> dict[str, Any]:
        return {
            "upstreams": [
                {"name": up.name, "url": up.url, "priority": up.priority, "weight": up.weight}
                for up in self.upstreams
            ]
            or [{"name": "default"}],
            "aliases": len(self.aliases),
            "fallbacks": len(self.fallbacks),
        }
