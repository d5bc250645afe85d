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
from sidecar.upstream import Upstream

log = structlog.get_logger("sidecar.runtime")


@dataclass(slots=True, eq=False)
class Runtime:
    settings: Settings
    upstream: Upstream
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
    reuse_upstream: Upstream | None = None,
) -> Runtime:
    """Start an upstream client (or keep `reuse_upstream` when its settings are unchanged),
    instantiate the configured policies and start those that need it."""
    if reuse_upstream is not None and reuse_upstream.settings == settings.upstream:
        upstream = reuse_upstream
    else:
        upstream = Upstream(settings.upstream, metrics, deadlines)
        await upstream.start()
    context = PolicyContext(settings=settings, metrics=metrics)
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
        if upstream is not reuse_upstream:
            await upstream.close()
        raise
    return Runtime(
        settings=settings,
        upstream=upstream,
        chain=build_chain([policy for _, policy in policies], upstream.send),
        policies=policies,
        allowed_management=frozenset(settings.management.allow),
    )


async def close_runtime(runtime: Runtime, keep_upstream: bool = False) -> None:
    """Close the policies (last first), then the upstream client unless a newer runtime uses it."""
    if runtime.closed:
        return
    runtime.closed = True
    await _close_policies(runtime.policies)
    if not keep_upstream:
        await runtime.upstream.close()


async def _close_policies(policies: list[tuple[str, Policy]]) -> None:
    for name, policy in reversed(policies):
        close = getattr(policy, "close", None)
        if close is not None:
            try:
                await close()
            except Exception:
                log.exception("policy_close_failed", policy=name)
