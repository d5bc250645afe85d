"""What one config builds: the upstream client, the policies and the chain between them.

A reload builds a new Runtime beside the running one and swaps it in for new
requests; a request keeps the Runtime it started on to its end, and a retired
Runtime is closed once its last request has finished. Nothing a request holds
changes under it.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from sidecar.chain import Next, Policy, PolicyContext, build_chain
from sidecar.config import Settings
from sidecar.deadlines import DeadlineWatch
from sidecar.observability import Metrics
from sidecar.stores import Store, open_store
from sidecar.upstream import Upstream

log = structlog.get_logger("sidecar.runtime")


@dataclass(slots=True, eq=False)
class Runtime:
    settings: Settings
    upstream: Upstream
    store: Store
    chain: Next
    policies: list[tuple[str, Policy]]
    allowed_management: frozenset[str]
    # Requests running on this runtime, and whether a newer one has replaced it.
    active: int = 0
    retired: bool = False
    closed: bool = False


async def build_runtime(
    settings: Settings,
    metrics: Metrics,
    deadlines: DeadlineWatch,
    previous: Runtime | None = None,
) -> Runtime:
    """Start an upstream client and a store (or keep the previous runtime's when their
    settings are unchanged), instantiate the configured policies and start them."""
    if previous is not None and previous.upstream.settings == settings.upstream:
        upstream = previous.upstream
    else:
        upstream = Upstream(settings.upstream, metrics, deadlines)
        await upstream.start()
    if previous is not None and previous.settings.stores == settings.stores:
        store = previous.store
    else:
        stores = settings.stores
        store = open_store(stores.redis_url, stores.prefix, timeout_s=stores.timeout)
    context = PolicyContext(settings=settings, metrics=metrics, store=store)
    policies: list[tuple[str, Policy]] = []
    try:
        for entry in settings.policies:
            policy = entry.factory(entry.options, context)
            start = getattr(policy, "start", None)
            if start is not None:
                await start()
            policies.append((entry.name, policy))
    except BaseException:
        await _close_policies(policies)
        if previous is None or upstream is not previous.upstream:
            await upstream.close()
        if previous is None or store is not previous.store:
            await store.close()
        raise
    return Runtime(
        settings=settings,
        upstream=upstream,
        store=store,
        chain=build_chain([policy for _, policy in policies], upstream.send),
        policies=policies,
        allowed_management=frozenset(settings.management.allow),
    )


async def close_runtime(runtime: Runtime, current: Runtime | None = None) -> None:
    """Close the policies (last first), then the upstream client and the store unless
    `current` (the runtime that replaced this one) still uses them."""
    if runtime.closed:
        return
    runtime.closed = True
    await _close_policies(runtime.policies)
    if current is None or runtime.upstream is not current.upstream:
        await runtime.upstream.close()
    if current is None or runtime.store is not current.store:
        await runtime.store.close()


async def _close_policies(policies: list[tuple[str, Policy]]) -> None:
    for name, policy in reversed(policies):
        close = getattr(policy, "close", None)
        if close is not None:
            try:
                await close()
            except Exception:
                log.exception("policy_close_failed", policy=name)
