"""What an upstream attempt came to, in the terms resilience policies decide on.

Retry, circuit breaker and fallback all ask the same questions of an attempt:
did the upstream fail (as opposed to the client asking for something wrong),
and did it say when to come back. One answer here keeps them consistent.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime

from sidecar.errors import SidecarError, StreamInterrupted, UpstreamError
from sidecar.exchange import Reply

# Statuses that say "the upstream is in trouble": a breaker counts them, a fallback
# tries elsewhere. (Retry is narrower: Ollama's 500 is usually deterministic.)
UPSTREAM_FAILURE_STATUSES = frozenset({500, 502, 503, 504})


def upstream_failure(reply: Reply | None, error: BaseException | None) -> str | None:
    """Why an attempt counts as an upstream failure ('5xx', 'timeout', 'connection',
    'stream'), or None when it does not (success, 4xx, a client that went away,
    a refusal the sidecar made itself such as an open breaker)."""
    if error is not None:
        if isinstance(error, UpstreamError):
            return "timeout" if error.status == 504 else "connection"
        if isinstance(error, StreamInterrupted):
            return "timeout" if error.code == "upstream_timeout" else "stream"
        return None
    if reply is not None and reply.status in UPSTREAM_FAILURE_STATUSES:
        return "5xx"
    return None


def is_model_not_found(reply: Reply) -> bool:
    """Ollama's 404 for a model it does not have (fallbacks try the next model)."""
    return reply.status == 404 and b"not found" in reply.body


def is_sidecar_refusal(error: BaseException) -> bool:
    """An answer a policy made without asking the upstream (open breaker, full queue)."""
    return isinstance(error, SidecarError) and not isinstance(error, UpstreamError)


def retry_after_seconds(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), if present and sane."""
    value = headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = moment.timestamp() - (time.time() if now is None else now)
    if seconds != seconds or seconds < 0:  # NaN or in the past
        return 0.0 if seconds == seconds else None
    return seconds
