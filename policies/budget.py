"""budget: token and cost budgets per tenant per period, enforced before the request.

Each tenant has a spend per period (`period: day | month` on the UTC calendar,
or `fixed` windows of `window` seconds counted from the Unix epoch) in one
store counter, `budget:{tenant}:{period id}` (`budget:team-a:2026-11`,
`budget:team-a:2026-11-05`, `budget:team-a:fixed-3600s-493000`), with the
fields `tokens` and `cost`. The key is created with a TTL that ends one hour
after its period, so an old period's spend expires by itself. With Redis
(`stores.redis_url`) the spend is shared by every replica and survives a
sidecar restart; with the memory store it is per process and starts from zero
after a restart.

Admission (before `call_next`): the request reserves an estimate, atomically
(`store.reserve`: spent + amount <= limit, then add): tokens = prompt bytes / 4
+ the request's `max_tokens` (`max_completion_tokens`, `max_output_tokens`,
`options.num_predict`), or `default_max_tokens` when it names none (0 on the
embedding routes); cost = `reserve_cost`. A tenant whose spend already reached
a limit, or whose reservation would exceed it, gets a 429 with
`type`/`code` `insufficient_quota`, as OpenAI answers a spent quota. No
`Retry-After` is sent (a budget period lasts up to a month; a client must not
sleep through it): the message says when the period resets, and the header
`x-should-retry: false` tells the OpenAI SDKs not to retry.

Reconciliation: when the answer ends (a plain answer: after `call_next`; a
stream: at its end, complete, failed or abandoned), the reservation is replaced
by the real usage in `facts["usage"]` (`total_tokens`, `cost`), put there by
`metering`. So `metering` must come AFTER (inside) `budget` in the YAML's
`policies:` list: its stream wrapper then ends first and the fact is there
when this policy's wrapper ends. Without a usage fact the reservation is kept
(it is the best figure there is), except for an answer that is not a success
(status >= 400) or an error raised before any answer: the reservation is then
given back, since the model did no work that metering could count.

Limits per tenant, first found wins: `facts["tenant_overrides"]` (the `auth`
policy's `tenants:` entry) `budget_tokens` / `budget_cost`, then this policy's
`tenants:` map, then `tokens` / `cost`. A value null means "no limit". A tenant
with neither limit costs no store call. Without `auth` the tenant is
`anonymous`.

Store outage (`StoreUnavailable`): `on_store_error: allow` (default) logs
`budget_store_error`, counts `budget_store_errors_total` and lets the request
through unreserved (its real usage is still added at the end if the store is
back by then); `deny` answers 503 `store_unavailable`. Every store call is
bounded by `stores.timeout`; nothing here waits longer or retries.

The cost reservation and the token reservation are two atomic steps on the
same key; when the second is refused the first is given back at once.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, ClassVar, Final, Literal

import structlog

from sidecar.chain import Next, PolicyContext, register
from sidecar.errors import SidecarError, StreamInterrupted
from sidecar.exchange import Exchange, Reply
from sidecar.knobs import STRICT, Duration, Field
from sidecar.replies import StreamEnd, watch_stream
from sidecar.routes import GENERATION_ROUTES
from sidecar.stores import StoreUnavailable

BUDGETED_ROUTES = frozenset(GENERATION_ROUTES)
EMBEDDING_ROUTES = frozenset({"/v1/embeddings", "/api/embed", "/api/embeddings"})
# Request fields that cap the completion, in the order they are looked for.
_MAX_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
KEY_PREFIX = "budget:"
# A period's key lives this long past the period's end, then expires by itself.
PERIOD_GRACE_S = 3600.0
ANONYMOUS = "anonymous"
OTHER = "other"
_NUMBERS = (int, float)  # exact types, the usual case; subclasses (not bool) are numbers too


def _log() -> Any:
    return structlog.get_logger("sidecar.budget")


class _Unset(enum.Enum):
    """A sentinel: null already means "no limit", so a limit left out needs a value of its own.

    An enum member, so it stays itself through the pickle that brings the
    validated config from the child process (sidecar/isolated_config.py).
    """

    INHERITED = "inherited"


# A TenantBudget limit left out of the YAML: the policy's own limit applies.
INHERITED: Final[Any] = _Unset.INHERITED


def _inherited() -> Any:
    # A factory, not a default: pydantic would try to write a default into the JSON schema.
    return INHERITED


@dataclass(frozen=True, kw_only=True)
class TenantBudget:
    """One tenant's limits; a field left out inherits the policy's, null means no limit."""

    __pydantic_config__ = STRICT

    tokens: Annotated[
        int | None,
        Field(ge=0, le=10**15, description="Tokens per period for this tenant; null: no limit."),
    ] = field(default_factory=_inherited)
    cost: Annotated[
        float | None,
        Field(ge=0, le=1e15, description="Cost per period for this tenant; null: no limit."),
    ] = field(default_factory=_inherited)


@dataclass(frozen=True, kw_only=True)
class BudgetConfig:
    __pydantic_config__ = STRICT

    period: Annotated[
        Literal["day", "month", "fixed"],
        Field(description="Budget period: UTC calendar day or month, or fixed `window`s."),
    ] = "month"
    window: Annotated[
        Duration | None,
        Field(
            ge=1,
            le=366 * 86400,
            description="With period: fixed, the window length (1h, 7d as 168h), from the Unix epoch.",
        ),
    ] = None
    tokens: Annotated[
        int | None,
        Field(ge=0, le=10**15, description="Tokens (prompt + completion) per tenant per period."),
    ] = None
    cost: Annotated[
        float | None,
        Field(ge=0, le=1e15, description="Cost (metering's prices) per tenant per period."),
    ] = None
    tenants: Annotated[
        dict[str, TenantBudget],
        Field(
            description="Per-tenant limits, by tenant name; auth's budget_tokens/budget_cost win.",
        ),
    ] = field(default_factory=dict)
    default_max_tokens: Annotated[
        int,
        Field(
            ge=0,
            le=10_000_000,
            description="Completion tokens reserved when the request names no max_tokens.",
        ),
    ] = 1024
    reserve_cost: Annotated[
        float,
        Field(
            ge=0, le=1e9, description="Cost reserved per request at admission (then reconciled)."
        ),
    ] = 0.0
    on_store_error: Annotated[
        Literal["allow", "deny"],
        Field(description="Store down: let requests through (logged, counted) or answer 503."),
    ] = "allow"
    max_tenants: Annotated[
        int,
        Field(
            ge=1, le=100_000, description="Distinct tenant metric labels; more count as 'other'."
        ),
    ] = 100

    def __post_init__(self) -> None:
        if self.period == "fixed" and self.window is None:
            raise ValueError("period: fixed needs a window (e.g. window: 1h)")
        if self.period != "fixed" and self.window is not None:
            raise ValueError("window applies only to period: fixed")


@dataclass(frozen=True, slots=True)
class Period:
    """One budget period: its id (part of the store key), start and end (Unix seconds)."""

    id: str
    start: float
    end: float

    @property
    def resets_at(self) -> str:
        return datetime.fromtimestamp(self.end, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def period_at(now: float, period: str, window: float | None = None) -> Period:
    """The period that contains `now` (Unix seconds, UTC)."""
    if period == "fixed":
        assert window is not None
        index = math.floor(now / window)
        start = index * window
        return Period(f"fixed-{window:g}s-{index}", start, start + window)
    moment = datetime.fromtimestamp(now, UTC)
    if period == "day":
        begin = datetime(moment.year, moment.month, moment.day, tzinfo=UTC)
        return Period(
            begin.strftime("%Y-%m-%d"), begin.timestamp(), (begin + timedelta(days=1)).timestamp()
        )
    begin = datetime(moment.year, moment.month, 1, tzinfo=UTC)
    after = datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=UTC)
    return Period(begin.strftime("%Y-%m"), begin.timestamp(), after.timestamp())


def _limit(value: Any) -> float | None:
    """An override's value as a limit; anything but a number >= 0 (or null) is not one."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"not a number >= 0: {value!r}")
    if not math.isfinite(value):
        return None
    return float(value)


def reservation_tokens(exchange: Exchange, default_max_tokens: int) -> int:
    """Prompt bytes / 4 plus the completion cap the request names (or the default)."""
    prompt = max(1, len(exchange.body) // 4)
    if exchange.route.name in EMBEDDING_ROUTES:
        return prompt
    document = exchange.json
    completion: Any = None
    if isinstance(document, dict):
        for name in _MAX_FIELDS:
            completion = document.get(name)
            if completion is not None:
                break
        if completion is None:
            options = document.get("options")
            if isinstance(options, dict):
                completion = options.get("num_predict")
    if isinstance(completion, bool) or not isinstance(completion, int) or completion <= 0:
        completion = default_max_tokens
    return prompt + int(completion)


class _Labels:
    """At most `limit` distinct tenant labels; the rest are counted as 'other'."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self.limit:
            return OTHER
        self._seen.add(value)
        return value


class _Ratio:
    """The value `budget_used_ratio` shows for one tenant label (read when scraped)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0


class _Tenant:
    """What is worked out once per tenant (and its auth overrides), not per request."""

    __slots__ = ("cost_limit", "key", "overrides", "period_id", "ratio", "token_limit")

    def __init__(self, overrides: Any, token_limit: float | None, cost_limit: float | None) -> None:
        self.overrides = overrides  # auth's immutable mapping: the same object, the same limits
        self.token_limit = token_limit
        self.cost_limit = cost_limit
        self.period_id = ""
        self.key = ""  # the store key of `period_id`
        self.ratio: _Ratio | None = None


# Tenants whose limits are kept worked out; past this many the cache starts over.
_MAX_KNOWN_TENANTS = 10_000
_NO_PERIOD = Period("", 0.0, 0.0)


@dataclass(slots=True)
class _Held:
    """What one request reserved, to be reconciled when its answer ends."""

    key: str
    ttl_s: float
    tokens: float
    cost: float
    reserved: bool  # False: the store was down at admission (allow), nothing was taken


@register("budget")
class Budget:
    """Refuses a tenant whose period budget is spent; reconciles reservations with metering."""

    config_model: ClassVar[type[Any]] = BudgetConfig

    def __init__(self, config: BudgetConfig, context: PolicyContext) -> None:
        self.config = config
        self.store = context.store
        # Wall clock (Unix seconds) for the UTC calendar; PolicyContext.clock is monotonic.
        # Tests replace it to cross a period boundary without waiting.
        self.now: Callable[[], float] = time.time
        self._labels = _Labels(config.max_tenants)
        self._tenants: dict[str, _Tenant] = {}
        self._ratios: dict[str, _Ratio] = {}  # by tenant label
        self._period = _NO_PERIOD  # the last period seen, reused while `now` is inside it
        # Limits seen per tenant (from auth's overrides), for usage_detail; bounded.
        self._seen: dict[str, tuple[float | None, float | None]] = {}
        self._store_errors_seen = 0
        metrics = context.metrics
        self._rejections = metrics.counter(
            "budget_rejections_total",
            "Requests refused because the tenant's budget for the period is spent.",
            ("tenant",),
        )
        self._used = metrics.gauge(
            "budget_used_ratio",
            "Share of the tenant's period budget spent, as last seen at admission (the larger "
            "of tokens and cost).",
            ("tenant",),
        )
        self._store_errors = metrics.counter(
            "budget_store_errors_total",
            "Budget store operations that failed (store unreachable or timed out).",
            (),
        )

    # --- limits ---------------------------------------------------------------------

    def limits_for(
        self, tenant: str, overrides: Mapping[str, Any] | None = None
    ) -> tuple[float | None, float | None]:
        """(tokens, cost) limits of `tenant`: auth's overrides, then `tenants:`, then defaults."""
        tokens: float | None = None if self.config.tokens is None else float(self.config.tokens)
        cost: float | None = self.config.cost
        entry = self.config.tenants.get(tenant)
        if entry is not None:
            if entry.tokens is not INHERITED:
                tokens = None if entry.tokens is None else float(entry.tokens)
            if entry.cost is not INHERITED:
                cost = entry.cost
        if overrides:
            for name in ("budget_tokens", "budget_cost"):
                if name in overrides:
                    try:
                        value = _limit(overrides[name])
                    except ValueError as exc:
                        _log().warning(
                            "budget_override_ignored", tenant=tenant, field=name, error=str(exc)
                        )
                        continue
                    if name == "budget_tokens":
                        tokens = value
                    else:
                        cost = value
        return tokens, cost

    def period(self, now: float | None = None) -> Period:
        return period_at(self.now() if now is None else now, self.config.period, self.config.window)

    # --- the request path -------------------------------------------------------------

    async def __call__(self, exchange: Exchange, call_next: Next) -> Reply:
        if exchange.route.name not in BUDGETED_ROUTES:
            return await call_next(exchange)
        facts = exchange.facts
        tenant = str(facts.get("tenant") or ANONYMOUS)
        overrides = facts.get("tenant_overrides")
        known = self._tenants.get(tenant)
        if known is None or known.overrides is not overrides:
            known = self._know(tenant, overrides)
        token_limit, cost_limit = known.token_limit, known.cost_limit
        if token_limit is None and cost_limit is None:
            return await call_next(exchange)
        now = self.now()
        period = self._period
        if not period.start <= now < period.end:
            period = self._period = self.period(now)
        if known.period_id != period.id:
            known.period_id = period.id
            known.key = f"{KEY_PREFIX}{tenant}:{period.id}"
        held = _Held(
            key=known.key,
            ttl_s=max(1.0, period.end - now) + PERIOD_GRACE_S,
            tokens=float(reservation_tokens(exchange, self.config.default_max_tokens))
            if token_limit is not None
            else 0.0,
            cost=self.config.reserve_cost if cost_limit is not None else 0.0,
            reserved=True,
        )
        try:
            refusal = await self._reserve(held, known, tenant, period)
        except StoreUnavailable as exc:
            self._store_error("reserve", tenant, exc)
            if self.config.on_store_error == "deny":
                raise SidecarError(
                    503,
                    "the budget store is unavailable; the request was not sent",
                    code="store_unavailable",
                    error_type="api_error",
                ) from None
            held.reserved = False
            held.tokens = held.cost = 0.0
        else:
            if refusal is not None:
                self._rejections.labels(self._labels(tenant)).inc()
                raise refusal
        try:
            reply = await call_next(exchange)
        except Exception:
            self._reconcile(exchange, held, failed=True)
            raise
        if reply.chunks is None:
            self._reconcile(exchange, held, failed=reply.status >= 400)
            return reply

        def ended(how: StreamEnd, error: StreamInterrupted | None) -> None:
            self._reconcile(exchange, held, failed=False)

        return watch_stream(reply, ended)

    def _know(self, tenant: str, overrides: Any) -> _Tenant:
        """Work out a tenant's limits (once per tenant and overrides object)."""
        token_limit, cost_limit = self.limits_for(
            tenant, overrides if isinstance(overrides, Mapping) else None
        )
        if overrides and (tenant in self._seen or len(self._seen) < self.config.max_tenants):
            self._seen[tenant] = (token_limit, cost_limit)
        if len(self._tenants) >= _MAX_KNOWN_TENANTS:
            self._tenants.clear()
        known = self._tenants[tenant] = _Tenant(overrides, token_limit, cost_limit)
        return known

    def _ratio(self, tenant: str) -> _Ratio:
        """The gauge value of the tenant's label; the gauge reads it when scraped."""
        label = self._labels(tenant)
        ratio = self._ratios.get(label)
        if ratio is None:
            ratio = self._ratios[label] = _Ratio()
            self._used.labels(label).set_function(lambda: ratio.value)
        return ratio

    async def _reserve(
        self, held: _Held, known: _Tenant, tenant: str, period: Period
    ) -> SidecarError | None:
        """Take the reservation; a refusal to raise when it does not fit, else None."""
        store = self.store
        token_limit, cost_limit = known.token_limit, known.cost_limit
        used = 0.0
        if token_limit is not None:
            result = await store.reserve(held.key, held.tokens, token_limit, held.ttl_s, "tokens")
            used = _share(result.spent, token_limit)
            if not result.allowed:
                self._set_used(known, tenant, max(used, 1.0))
                return self._refusal(
                    tenant, "tokens", token_limit, result.spent, held.tokens, period
                )
        if cost_limit is not None:
            try:
                result = await store.reserve(held.key, held.cost, cost_limit, held.ttl_s, "cost")
            except StoreUnavailable:
                if held.tokens:
                    await self._give_back(held, tokens_only=True)
                raise
            used = max(used, _share(result.spent, cost_limit))
            # A zero reservation fits a budget that is exactly spent: spent must stay below.
            spent_out = held.cost == 0 and result.spent >= cost_limit
            if not result.allowed or spent_out:
                if held.cost and result.allowed:
                    await store.add(held.key, {"cost": -held.cost})
                if held.tokens:
                    await self._give_back(held, tokens_only=True)
                self._set_used(known, tenant, max(used, 1.0))
                return self._refusal(tenant, "cost", cost_limit, result.spent, held.cost, period)
        self._set_used(known, tenant, used)
        return None

    def _set_used(self, known: _Tenant, tenant: str, used: float) -> None:
        ratio = known.ratio
        if ratio is None:
            ratio = known.ratio = self._ratio(tenant)
        ratio.value = used

    async def _give_back(self, held: _Held, *, tokens_only: bool = False) -> None:
        fields = (
            {"tokens": -held.tokens}
            if tokens_only
            else {"tokens": -held.tokens, "cost": -held.cost}
        )
        await self.store.add(held.key, {k: v for k, v in fields.items() if v})

    def _refusal(
        self, tenant: str, kind: str, limit: float, spent: float, amount: float, period: Period
    ) -> SidecarError:
        unit = "tokens" if kind == "tokens" else "cost"
        if spent >= limit:
            why = f"the {unit} budget of tenant {tenant!r} for this period is spent ({spent:g} of {limit:g})"
        else:
            why = (
                f"this request would exceed the {unit} budget of tenant {tenant!r} "
                f"({spent:g} of {limit:g} spent, {amount:g} needed)"
            )
        return SidecarError(
            429,
            f"You exceeded your current quota: {why}; it resets at {period.resets_at}.",
            code="insufficient_quota",
            error_type="insufficient_quota",
            headers={"x-should-retry": "false"},
        )

    # --- reconciliation ----------------------------------------------------------------

    def _reconcile(self, exchange: Exchange, held: _Held, *, failed: bool) -> None:
        """Replace the reservation with the real usage; never raises, never waits.

        Called where an answer ends, a stream's end included (a synchronous callback): the
        store applies the correction at once (memory) or queues it (Redis, written within
        a loop turn or so, `flush` waits for it); a failed write reaches `_write_failed`.
        """
        usage = exchange.facts.get("usage")
        fields: dict[str, float] = {}
        if type(usage) is dict or isinstance(usage, Mapping):
            total = _figure(usage.get("total_tokens"))
            if total is not None and total - held.tokens:
                fields["tokens"] = total - held.tokens
            cost = _figure(usage.get("cost"))
            if cost is not None and cost - held.cost:
                fields["cost"] = cost - held.cost
        elif failed and held.reserved:
            if held.tokens:
                fields["tokens"] = -held.tokens
            if held.cost:
                fields["cost"] = -held.cost
        if not fields:
            return
        try:
            self.store.add_nowait(held.key, fields, held.ttl_s, self._write_failed)
        except Exception:  # the relay's clean-up must never break on a budget
            _log().exception("budget_reconcile_failed", key=held.key)

    def _write_failed(self, key: str, operations: int, exc: StoreUnavailable) -> None:
        self._store_errors.inc(operations)
        self._store_errors_seen += operations
        _log().warning(
            "budget_store_error",
            operation="reconcile",
            key=key,
            operations=operations,
            on_store_error=self.config.on_store_error,
            error=str(exc),
        )

    def _store_error(self, operation: str, tenant: str, exc: BaseException) -> None:
        self._store_errors.inc()
        self._store_errors_seen += 1
        _log().warning(
            "budget_store_error",
            operation=operation,
            tenant=tenant,
            on_store_error=self.config.on_store_error,
            error=str(exc),
        )

    async def flush(self) -> None:
        """Wait for the reconciliations still on their way to the store."""
        await self.store.flush()

    async def close(self) -> None:
        await self.flush()

    # --- what it shows -------------------------------------------------------------------

    async def usage_detail(self, tenant: str | None) -> dict[str, dict[str, Any]]:
        """Budget left this period, per tenant: `tenant` alone, or every tenant known here.

        Known: the `tenants:` map, tenants whose overrides this process has seen, and
        every tenant with a spend this period in the store (a Redis store: any replica's).
        Limits of a tenant only found in the store are the policy's defaults. Raises
        `StoreUnavailable` when the store is down.
        """
        await self.store.flush()  # this process's reconciliations first
        period = self.period()
        suffix = f":{period.id}"
        spent: dict[str, dict[str, float]] = {}
        if tenant is not None:
            names = [tenant]
            spent[tenant] = await self.store.get(f"{KEY_PREFIX}{tenant}{suffix}")
        else:
            found = await self.store.scan(KEY_PREFIX)
            for key, fields in found.items():
                if key.endswith(suffix):
                    spent[key[len(KEY_PREFIX) : -len(suffix)]] = fields
            names = sorted(set(self.config.tenants) | set(self._seen) | set(spent))
        detail: dict[str, dict[str, Any]] = {}
        for name in names:
            token_limit, cost_limit = self._seen.get(name) or self.limits_for(name)
            fields = spent.get(name, {})
            spent_tokens = round(fields.get("tokens", 0.0))
            spent_cost = fields.get("cost", 0.0)
            detail[name] = {
                "limit_tokens": None if token_limit is None else round(token_limit),
                "spent_tokens": spent_tokens,
                "left_tokens": None
                if token_limit is None
                else max(0, round(token_limit) - spent_tokens),
                "limit_cost": cost_limit,
                "spent_cost": spent_cost,
                "left_cost": None if cost_limit is None else max(0.0, cost_limit - spent_cost),
                "period": period.id,
                "resets_at": period.resets_at,
            }
        return detail

    def readiness(self) -> dict[str, Any]:
        """The configuration in short, and how many store errors this process saw."""
        return {
            "period": self.config.period,
            "window": self.config.window,
            "current_period": self.period().id,
            "tokens": self.config.tokens,
            "cost": self.config.cost,
            "tenants": len(self.config.tenants),
            "on_store_error": self.config.on_store_error,
            "store": "redis" if self.store.shared else "memory",
            "store_errors": self._store_errors_seen,
        }


def _figure(value: Any) -> float | None:
    """A usage figure as a float; None when it is not a number (a bool is not one)."""
    if type(value) in _NUMBERS or (isinstance(value, int | float) and not isinstance(value, bool)):
        return float(value)
    return None


def _share(spent: float, limit: float) -> float:
    """Spent as a share of the limit; a zero limit is all spent."""
    return spent / limit if limit > 0 else 1.0
