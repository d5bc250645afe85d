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


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One metered request, as the ledger receives it."""

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
    """Adds each record to the store without holding up the request it belongs to.

    The write runs as a task of its own; a store outage is logged and counted,
    and never fails or slows the request.
    """

    def __init__(
        self, store: Store, metrics: Metrics, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._clock = clock
        self._pending: set[asyncio.Task[None]] = set()
        self._errors = metrics.counter(
            "ledger_write_errors_total", "Usage records the shared store could not take.", ()
        )

    def record(self, record: UsageRecord) -> None:
        fields = {
            "requests": 1.0,
            "prompt_tokens": float(record.prompt_tokens),
            "completion_tokens": float(record.completion_tokens),
            "total_tokens": float(record.total_tokens),
            "cost": record.cost,
            "estimated": 1.0 if record.estimated else 0.0,
        }
        key = usage_key(period_of(self._clock()), record.tenant, record.model)
        try:
            task = asyncio.get_running_loop().create_task(self._write(key, fields))
        except RuntimeError:
            return  # no loop: nothing in this process can be waiting for it
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _write(self, key: str, fields: dict[str, float]) -> None:
        try:
            await self._store.add(key, fields, ttl_s=RETENTION_S)
        except StoreUnavailable as error:
            self._errors.inc()
            log.warning("usage_not_recorded", key=key, error=str(error))

    async def flush(self) -> None:
        """Wait for the writes still under way (shutdown, tests)."""
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)


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
