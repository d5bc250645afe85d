"""The usage ledger: metered requests added up in the shared store, and read back as a report.

Metering knows what a request cost; the ledger keeps the running totals per
month, tenant and model where every replica adds to the same numbers (Redis),
and `GET /sidecar/usage` and `ollama-sidecar usage` read them from there. The
key layout lives here alone, so writers and readers cannot drift apart.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from sidecar.observability import Metrics
from sidecar.stores import Store, StoreUnavailable

log = structlog.get_logger("sidecar.ledger")

# A month's totals are kept a little over a year, then expire by themselves.
RETENTION_S = 400 * 86400
FIELDS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "cost", "estimated")


@dataclass(slots=True)
class UsageRecord:
    """One metered request, as the ledger receives it.

    Not frozen: a frozen dataclass sets each field through object.__setattr__,
    which made building one a measurable part of metering every request.
    """

    tenant: str
    model: str
    route: str
    prompt_tokens: int
    completion_tokens: int
    estimated: bool
    cost: float
    ended: str  # complete | failed | abandoned (plain answers: complete)
    request_id: str = ""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def period_of(moment: float) -> str:
    """The calendar month (UTC) a moment belongs to, as the report names it: 2026-11."""
    return time.strftime("%Y-%m", time.gmtime(moment))


def usage_key(period: str, tenant: str, model: str) -> str:
    # The model goes last: model names contain ':' (llama3.2:latest), tenants do not.
    return f"usage:{period}:{tenant}:{model}"


class UsageLedger:
    """Adds records up in memory and writes the sums to the store every `interval`.

    One store write per tenant and model per interval, not one per request:
    under load that is a fraction of the round trips to Redis and no task per
    request. The writes never hold up a request; a store outage is logged and
    counted, and those sums are lost rather than retried forever. A crash loses
    at most the last `interval` of usage.
    """

    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        interval: float = 0.1,
    ) -> None:
        self._store = store
        self._clock = clock
        self._interval = interval
        self._pending: dict[str, dict[str, float]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._period_minute = -1
        self._period = ""
        self._keys: dict[tuple[str, str], str] = {}  # (tenant, model) -> key, this period
        self._errors = metrics.counter(
            "ledger_write_errors_total", "Usage sums the shared store could not take.", ()
        )

    def record(self, record: UsageRecord) -> None:
        period = self._current_period()
        key = self._keys.get((record.tenant, record.model))
        if key is None:
            key = usage_key(period, record.tenant, record.model)
            if len(self._keys) < 10_000:
                self._keys[(record.tenant, record.model)] = key
        sums = self._pending.get(key)
        if sums is None:
            sums = self._pending[key] = dict.fromkeys(FIELDS, 0.0)
        sums["requests"] += 1.0
        sums["prompt_tokens"] += record.prompt_tokens
        sums["completion_tokens"] += record.completion_tokens
        sums["total_tokens"] += record.total_tokens
        sums["cost"] += record.cost
        if record.estimated:
            sums["estimated"] += 1.0
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop: flush() writes it
            self._timer = loop.call_later(self._interval, self._write_soon)

    def _current_period(self) -> str:
        now = self._clock()
        minute = int(now // 60)
        if minute != self._period_minute:
            self._period_minute = minute
            period = period_of(now)
            if period != self._period:
                self._keys.clear()
            self._period = period
        return self._period

    def _write_soon(self) -> None:
        # The store's own no-wait writes: applied at once in memory; for Redis, queued
        # and sent in one script by its writer. No task of ours, no await per key.
        self._timer = None
        batch, self._pending = self._pending, {}
        for key, sums in batch.items():
            self._store.add_nowait(key, sums, RETENTION_S, self._write_failed)

    def _write_failed(self, key: str, operations: int, error: StoreUnavailable) -> None:
        self._errors.inc(operations)
        log.warning("usage_not_recorded", key=key, operations=operations, error=str(error))

    async def flush(self) -> None:
        """Write what is pending now and wait until the store has it (shutdown, tests)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pending:
            self._write_soon()
        await self._store.flush()


async def usage_report(
    store: Store, tenant: str | None = None, period: str | None = None
) -> dict[str, Any]:
    """Totals per tenant and model for one month (this one by default), optionally one tenant."""
    period = period or period_of(time.time())
    prefix = f"usage:{period}:" + (f"{tenant}:" if tenant else "")
    rows = await store.scan(prefix)
    tenants: dict[str, Any] = {}
    for key, values in sorted(rows.items()):
        _, _, row_tenant, model = key.split(":", 3)
        entry = tenants.setdefault(row_tenant, {"models": {}, "totals": dict.fromkeys(FIELDS, 0.0)})
        numbers = {name: values.get(name, 0.0) for name in FIELDS}
        entry["models"][model] = _tidy(numbers)
        for name in FIELDS:
            entry["totals"][name] += numbers[name]
    for entry in tenants.values():
        entry["totals"] = _tidy(entry["totals"])
    return {"period": period, "shared": store.shared, "tenants": tenants}


def _tidy(numbers: dict[str, float]) -> dict[str, float | int]:
    """Counts as integers, cost as a float rounded to what a price sheet shows."""
    return {
        name: round(value, 6) if name == "cost" else round(value) for name, value in numbers.items()
    }
