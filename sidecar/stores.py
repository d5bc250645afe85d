"""Shared state for policies: one small async interface, two backends.

* ``MemoryStore``: one pod. Every operation runs without an ``await`` in the middle, so it is
  atomic under asyncio. State is lost on restart.
* ``RedisStore``: every replica shares it. Every read-modify-write is ONE Lua script run with
  EVALSHA (``register_script``), so replicas never race; keys carry a TTL so idle state
  disappears by itself. Time comes from the Redis server's ``TIME`` (replicas agree) unless the
  caller passes ``now`` explicitly (tests).

Three kinds of state, in separate key spaces under the prefix (``{prefix}b:{key}`` for buckets,
``{prefix}c:{key}`` for counters), so a bucket and a counter with the same key never collide:

* token buckets: ``take`` (check-and-take), ``refund`` and ``reconcile`` (correct a
  reservation with the real cost; the level never exceeds ``burst`` but may go below zero,
  a debt that later takes wait out);
* counters: hashes of float fields, ``add`` / ``get`` / ``ttl`` / ``scan`` / ``delete_prefix``;
* budgets: ``reserve`` (spent + amount <= limit, then add) on a counter field, reconciled later
  with ``add`` and a signed correction.

Two kinds of call for the hot path:

* ``take_all`` takes from several buckets at once, all or nothing (one round trip: a request
  bucket and a token bucket together);
* ``adjust_nowait`` / ``add_nowait`` apply a correction without an ``await`` (a stream's end is
  a synchronous callback, and a task per request is costly): the memory backend applies it at
  once, the Redis backend queues it and one writer task sends everything queued in one script
  (corrections to one key summed), the next batch when that one is written. ``flush`` waits
  until the queue is written. A failed batch is reported to each operation's ``on_error``
  (with how many operations it carried), never raised.

Failures of the backend (unreachable, timed out, refusing writes) raise ``StoreUnavailable``;
the policy decides whether to fail open or closed. Every Redis call is bounded by ``timeout_s``.
"""

from __future__ import annotations

import abc
import asyncio
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import structlog

__all__ = [
    "Bucket",
    "MemoryStore",
    "OnWriteError",
    "RedisStore",
    "ReserveResult",
    "Store",
    "StoreUnavailable",
    "TakeResult",
    "open_store",
]

Clock = Callable[[], float]
# A queued write failed: (key, how many queued operations it carried, why).
OnWriteError = Callable[[str, int, "StoreUnavailable"], None]
# One bucket in ``take_all``: key, cost, rate_per_s, burst.
Bucket = tuple[str, float, float, float]

DEFAULT_PREFIX = "ollama-sidecar:"
# Relative slack when comparing float sums against a limit (0.1 + 0.2 <= 0.3 must hold, and the
# two backends must agree although Redis adds in long double).
_EPS = 1e-9
# Extra life for a bucket key past the moment it is full again (a full bucket == no key).
_BUCKET_GRACE_S = 1.0
# At most this many queued keys go to Redis in one script (a script blocks Redis while it runs).
_BATCH_KEYS = 256


def _log() -> Any:
    return structlog.get_logger("sidecar.stores")


class StoreUnavailable(Exception):
    """The shared store cannot be reached or did not answer in time."""


@dataclass(slots=True)  # not frozen: a frozen one is built through object.__setattr__ (slow)
class TakeResult:
    """Outcome of a token-bucket operation (read it, do not change it).

    ``remaining``: tokens left after the operation (negative while in debt after a reconcile).
    ``retry_after_s``: 0 when allowed; else seconds until ``cost`` would be allowed
    (``math.inf`` when ``cost > burst``, which never fits).
    ``reset_s``: seconds until the bucket is full again (OpenAI's ``x-ratelimit-reset-*``).
    """

    allowed: bool
    remaining: float
    retry_after_s: float
    reset_s: float


class ReserveResult(NamedTuple):
    """Outcome of ``reserve``: ``spent`` is the total after the reservation (or unchanged)."""

    allowed: bool
    spent: float


def _check_bucket(rate_per_s: float, burst: float) -> None:
    if not (math.isfinite(rate_per_s) and rate_per_s > 0):
        raise ValueError(f"rate_per_s must be a finite number > 0, not {rate_per_s!r}")
    if not (math.isfinite(burst) and burst > 0):
        raise ValueError(f"burst must be a finite number > 0, not {burst!r}")


def _check_finite(name: str, value: float, *, nonneg: bool = False) -> None:
    if not math.isfinite(value) or (nonneg and value < 0):
        kind = "a finite number >= 0" if nonneg else "a finite number"
        raise ValueError(f"{name} must be {kind}, not {value!r}")


def _check_fields(fields: Mapping[str, float]) -> None:
    for name, value in fields.items():
        _check_finite(f"field {name!r}", value)


def _check_reserve(amount: float, limit: float, ttl_s: float | None) -> None:
    ttl = 0.0 if ttl_s is None else ttl_s
    if not (amount >= 0 and ttl >= 0 and math.isfinite(amount + limit + ttl)):
        _check_finite("amount", amount, nonneg=True)
        _check_finite("limit", limit)
        _check_finite("ttl_s", ttl, nonneg=True)


def _fits(spent: float, amount: float, limit: float) -> bool:
    return spent + amount <= limit + _EPS * max(1.0, abs(limit))


def _check_take(cost: float, rate: float, burst: float) -> None:
    # One test for the usual case; the precise checks (and their messages) otherwise.
    if not (cost >= 0 and rate > 0 and burst > 0 and cost + rate + burst < math.inf):
        _check_bucket(rate, burst)
        _check_finite("cost", cost, nonneg=True)


def _check_buckets(buckets: Sequence[Bucket]) -> None:
    for _, cost, rate, burst in buckets:
        _check_take(cost, rate, burst)


def _check_delta(delta: float, rate: float, burst: float) -> None:
    if not (rate > 0 and burst > 0 and -math.inf < delta + rate + burst < math.inf):
        _check_bucket(rate, burst)
        _check_finite("delta", delta)


def _check_add(fields: Mapping[str, float], ttl_s: float | None) -> None:
    total = 0.0 if ttl_s is None else ttl_s
    for value in fields.values():
        total += value
    if not (math.isfinite(total) and (ttl_s is None or ttl_s >= 0)):  # one test, usually
        _check_fields(fields)
        if ttl_s is not None:
            _check_finite("ttl_s", ttl_s, nonneg=True)


# ---- Lua (Redis 7; numbers go back to Python as strings: Redis truncates Lua numbers) ----

_LUA_NOW = """
local function now_from(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function f(x) return string.format('%.17g', x) end
local function set_ttl(key, ttl_arg)
  if ttl_arg ~= '' and redis.call('PTTL', key) < 0 then
    redis.call('PEXPIRE', key, math.max(1, math.ceil(tonumber(ttl_arg) * 1000)))
  end
end
local function refill(key, now, rate, burst)
  local st = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens = tonumber(st[1])
  local ts = tonumber(st[2])
  if tokens == nil or ts == nil then return burst, now end
  if now < ts then now = ts end
  return math.min(burst, tokens + (now - ts) * rate), now
end
local function write_bucket(key, level, now, rate, burst)
  local reset = math.max(0, (burst - level) / rate)
  redis.call('HSET', key, 'tokens', f(level), 'ts', f(now))
  redis.call('PEXPIRE', key, math.ceil((reset + GRACE_S) * 1000))
  return reset
end
""".replace("GRACE_S", repr(_BUCKET_GRACE_S))

# KEYS[1] bucket; ARGV: cost, rate, burst, now ('' = server TIME), force ('1' = reconcile)
_LUA_BUCKET = (
    _LUA_NOW
    + """
local cost = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local force = ARGV[5] == '1'
local level, now = refill(KEYS[1], now_from(ARGV[4]), rate, burst)
local allowed = 0
if force then
  level = math.min(burst, level - cost)
  allowed = 1
elseif cost <= level then
  level = level - cost
  allowed = 1
end
local retry = 0
if allowed == 0 then retry = (cost - level) / rate end
local reset = math.max(0, (burst - level) / rate)
if allowed == 1 and (force or cost > 0) then
  write_bucket(KEYS[1], level, now, rate, burst)
end
return {allowed, f(level), f(retry), f(reset)}
"""
)

# KEYS: buckets; ARGV: now ('' = server TIME), then cost, rate, burst per bucket. All or
# nothing: the first bucket the cost does not fit is refused, the others are peeked.
# Returns allowed, level, retry, reset per bucket.
_LUA_TAKE_ALL = (
    _LUA_NOW
    + """
local now = now_from(ARGV[1])
local levels, nows, refused = {}, {}, 0
for i = 1, #KEYS do
  local cost = tonumber(ARGV[3 * i - 1])
  levels[i], nows[i] = refill(KEYS[i], now, tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1]))
  if refused == 0 and cost > levels[i] then refused = i end
end
local out = {}
for i = 1, #KEYS do
  local cost = tonumber(ARGV[3 * i - 1])
  local rate = tonumber(ARGV[3 * i])
  local burst = tonumber(ARGV[3 * i + 1])
  local level = levels[i]
  local allowed, retry = 1, 0
  if refused == 0 then
    level = level - cost
    if cost > 0 then write_bucket(KEYS[i], level, nows[i], rate, burst) end
  elseif refused == i then
    allowed = 0
    retry = (cost - level) / rate
  end
  local reset = math.max(0, (burst - level) / rate)
  table.insert(out, allowed)
  table.insert(out, f(level))
  table.insert(out, f(retry))
  table.insert(out, f(reset))
end
return out
"""
)

# Queued writes. KEYS: NB buckets, then counters. ARGV: NB, now ('' = server TIME), then
# delta, rate, burst per bucket (a signed correction, as ``adjust``), then per counter:
# ttl ('' = none), how many fields, then field, increment pairs.
_LUA_BATCH = (
    _LUA_NOW
    + """
local nb = tonumber(ARGV[1])
local now = now_from(ARGV[2])
local a = 3
for i = 1, nb do
  local delta = tonumber(ARGV[a])
  local rate = tonumber(ARGV[a + 1])
  local burst = tonumber(ARGV[a + 2])
  a = a + 3
  local level, at = refill(KEYS[i], now, rate, burst)
  write_bucket(KEYS[i], math.min(burst, level - delta), at, rate, burst)
end
for i = nb + 1, #KEYS do
  local ttl = ARGV[a]
  local n = tonumber(ARGV[a + 1])
  a = a + 2
  for j = 1, n do
    redis.call('HINCRBYFLOAT', KEYS[i], ARGV[a], ARGV[a + 1])
    a = a + 2
  end
  set_ttl(KEYS[i], ttl)
end
return #KEYS
"""
)

# KEYS[1] counter hash; ARGV: ttl ('' = none), then field, increment pairs. Returns HGETALL.
_LUA_ADD = (
    _LUA_NOW
    + """
for i = 2, #ARGV, 2 do
  redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1])
end
set_ttl(KEYS[1], ARGV[1])
return redis.call('HGETALL', KEYS[1])
"""
)

# KEYS[1] counter hash; ARGV: field, amount, limit, ttl ('' = none), eps
_LUA_RESERVE = (
    _LUA_NOW
    + """
local spent = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local amount = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
if spent + amount > limit + tonumber(ARGV[5]) * math.max(1, math.abs(limit)) then
  return {0, f(spent)}
end
local total = redis.call('HINCRBYFLOAT', KEYS[1], ARGV[1], ARGV[2])
set_ttl(KEYS[1], ARGV[4])
return {1, total}
"""
)


class Store(abc.ABC):
    """The interface policies use. Keys are plain strings; the store namespaces them."""

    # -- token buckets --------------------------------------------------------------------
    @abc.abstractmethod
    async def take(
        self, key: str, cost: float, rate_per_s: float, burst: float, now: float | None = None
    ) -> TakeResult:
        """Atomically: refill at ``rate_per_s`` up to ``burst``, then take ``cost`` if it fits.

        A denied take changes nothing. A cost of 0 peeks (remaining / reset for headers).
        """

    @abc.abstractmethod
    async def adjust(
        self, key: str, delta: float, rate_per_s: float, burst: float, now: float | None = None
    ) -> TakeResult:
        """Atomically take ``delta`` more (delta > 0, may go into debt) or give ``-delta`` back
        (never above ``burst``). Always ``allowed``."""

    async def refund(
        self, key: str, amount: float, rate_per_s: float, burst: float, now: float | None = None
    ) -> TakeResult:
        """Give ``amount`` back (e.g. a request that never reached the upstream)."""
        _check_finite("amount", amount, nonneg=True)
        return await self.adjust(key, -amount, rate_per_s, burst, now)

    async def reconcile(
        self,
        key: str,
        reserved: float,
        actual: float,
        rate_per_s: float,
        burst: float,
        now: float | None = None,
    ) -> TakeResult:
        """Replace a reservation of ``reserved`` taken earlier by the real cost ``actual``."""
        _check_finite("reserved", reserved, nonneg=True)
        _check_finite("actual", actual, nonneg=True)
        return await self.adjust(key, actual - reserved, rate_per_s, burst, now)

    @abc.abstractmethod
    async def take_all(
        self, buckets: Sequence[Bucket], now: float | None = None
    ) -> tuple[TakeResult, ...]:
        """Atomically take each bucket's cost, all or nothing: one result per bucket.

        The keys must be distinct. When every cost fits, all are taken. Otherwise none is:
        the first bucket whose cost does not fit has the refusal (``allowed`` False), and
        every other bucket's result is a peek (its level, nothing taken).
        """

    @abc.abstractmethod
    def adjust_nowait(
        self,
        key: str,
        delta: float,
        rate_per_s: float,
        burst: float,
        on_error: OnWriteError | None = None,
    ) -> None:
        """``adjust`` without an ``await`` and without a result: applied at once (memory) or
        queued (Redis: written by a writer task within a loop turn or so, or by ``flush``).
        A failed write goes to ``on_error``, never to the caller; invalid numbers raise
        ``ValueError`` here, before anything is queued."""

    async def flush(self) -> None:
        """Wait until every write queued by ``*_nowait`` so far is written (or failed)."""
        return None

    @property
    def pending_writes(self) -> int:
        """Operations queued by ``*_nowait`` and not written yet."""
        return 0

    # -- counters ---------------------------------------------------------------------------
    @abc.abstractmethod
    async def add(
        self, key: str, fields: Mapping[str, float], ttl_s: float | None = None
    ) -> dict[str, float]:
        """Atomically add each field's (signed) value; return all of the key's new totals.

        ``ttl_s`` is set when the key has no TTL yet (i.e. on creation), and later adds do not
        extend it: a key named after its period (``usage:team:2025-06``) expires at a fixed time.
        """

    @abc.abstractmethod
    def add_nowait(
        self,
        key: str,
        fields: Mapping[str, float],
        ttl_s: float | None = None,
        on_error: OnWriteError | None = None,
    ) -> None:
        """``add`` without an ``await`` and without a result (see ``adjust_nowait``)."""

    @abc.abstractmethod
    async def get(self, key: str) -> dict[str, float]:
        """All fields of a counter key ({} when absent or expired)."""

    @abc.abstractmethod
    async def ttl(self, key: str) -> float | None:
        """Seconds until the counter key expires; None when absent or without TTL."""

    @abc.abstractmethod
    async def scan(self, prefix: str) -> dict[str, dict[str, float]]:
        """Every counter key starting with ``prefix`` (not atomic across keys)."""

    @abc.abstractmethod
    async def delete_prefix(self, prefix: str) -> int:
        """Delete every counter and bucket key starting with ``prefix``; return how many."""

    # -- budgets ----------------------------------------------------------------------------
    @abc.abstractmethod
    async def reserve(
        self,
        key: str,
        amount: float,
        limit: float,
        ttl_s: float | None = None,
        field: str = "spent",
    ) -> ReserveResult:
        """Atomically: if ``spent + amount <= limit`` add ``amount`` to ``field`` of counter
        ``key``. Reconcile later with ``add(key, {field: actual - amount})``."""

    # -- lifecycle ----------------------------------------------------------------------------
    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless the backend answers."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @property
    @abc.abstractmethod
    def shared(self) -> bool:
        """True when every replica sees the same state (Redis)."""


# ---- memory -------------------------------------------------------------------------------


class MemoryStore(Store):
    """One pod's state in dicts. ``clock`` (default ``time.monotonic``) drives TTLs and the
    buckets' time when ``now`` is not given; tests inject a fake one."""

    _SWEEP_EVERY = 4096

    def __init__(self, clock: Clock | None = None) -> None:
        self._clock: Clock = clock or time.monotonic
        self._buckets: dict[str, tuple[float, float, float]] = {}  # key -> tokens, ts, expires
        self._counters: dict[str, dict[str, float]] = {}
        self._expires: dict[str, float] = {}  # counter key -> expiry on the clock
        self._writes = 0

    @property
    def shared(self) -> bool:
        return False

    def _tick(self) -> None:
        self._writes += 1
        if not self._writes % self._SWEEP_EVERY:
            self._sweep()

    def _sweep(self) -> None:
        t = self._clock()
        for k in [k for k, (_, _, exp) in self._buckets.items() if exp <= t]:
            del self._buckets[k]
        for k in [k for k, exp in self._expires.items() if exp <= t]:
            self._counters.pop(k, None)
            del self._expires[k]

    def _step(
        self, key: str, cost: float, rate: float, burst: float, now: float | None, force: bool
    ) -> TakeResult:
        """The bucket arithmetic (the Lua functions above are a line-by-line copy of it).

        Refill at `rate` up to `burst`, then: `force` (a correction) takes a signed `cost`
        and never goes above `burst`; otherwise `cost` is taken only when it fits. A refusal
        and a 0-cost peek write nothing.
        """
        clock = self._clock()
        at = clock if now is None else now
        table = self._buckets
        entry = table.get(key)
        if entry is None:
            level = burst
        elif entry[2] <= clock:  # expired: full again
            del table[key]
            level = burst
        else:
            tokens, ts, _ = entry
            if at < ts:
                at = ts  # never go back in time (clock skew between callers passing `now`)
            level = tokens + (at - ts) * rate
            if level > burst:
                level = burst
        if force:
            level -= cost
            if level > burst:
                level = burst
        elif cost <= level:
            level -= cost
        else:
            retry = math.inf if cost > burst else (cost - level) / rate
            return TakeResult(False, level, retry, max(0.0, (burst - level) / rate))
        reset = max(0.0, (burst - level) / rate)
        if force or cost > 0:
            table[key] = (level, at, clock + reset + _BUCKET_GRACE_S)
            self._writes += 1
            if not self._writes % self._SWEEP_EVERY:
                self._sweep()
        return TakeResult(True, level, 0.0, reset)

    async def take(
        self, key: str, cost: float, rate_per_s: float, burst: float, now: float | None = None
    ) -> TakeResult:
        _check_take(cost, rate_per_s, burst)
        return self._step(key, cost, rate_per_s, burst, now, False)

    async def adjust(
        self, key: str, delta: float, rate_per_s: float, burst: float, now: float | None = None
    ) -> TakeResult:
        _check_delta(delta, rate_per_s, burst)
        return self._step(key, delta, rate_per_s, burst, now, True)

    async def take_all(
        self, buckets: Sequence[Bucket], now: float | None = None
    ) -> tuple[TakeResult, ...]:
        # The hot path of a rate limit: _check_take and _step, inline, in one pass that
        # takes as it goes and puts back what it took if a later bucket refuses.
        clock = self._clock()
        at = clock if now is None else now
        table = self._buckets
        results: list[TakeResult] = []
        taken: list[tuple[str, tuple[float, float, float] | None]] = []
        for key, cost, rate, burst in buckets:
            if not (cost >= 0 and rate > 0 and burst > 0 and cost + rate + burst < math.inf):
                self._put_back(taken)
                _check_take(cost, rate, burst)  # raises, with the reason
            entry = table.get(key)
            if entry is None or entry[2] <= clock:  # none, or expired: full
                level, used = burst, at
            else:
                tokens, ts, _ = entry
                used = at if at > ts else ts
                level = tokens + (used - ts) * rate
                if level > burst:
                    level = burst
            if cost > level:
                self._put_back(taken)
                return self._refuse(buckets, len(results), at)
            level -= cost
            reset = (burst - level) / rate
            if cost > 0:
                taken.append((key, entry))
                table[key] = (level, used, clock + reset + _BUCKET_GRACE_S)
                self._writes += 1
                if not self._writes % self._SWEEP_EVERY:
                    self._sweep()
            results.append(TakeResult(True, level, 0.0, reset if reset > 0 else 0.0))
        return tuple(results)

    def _put_back(self, taken: list[tuple[str, tuple[float, float, float] | None]]) -> None:
        for key, entry in reversed(taken):
            if entry is None:
                self._buckets.pop(key, None)
            else:
                self._buckets[key] = entry

    def _refuse(self, buckets: Sequence[Bucket], refused: int, at: float) -> tuple[TakeResult, ...]:
        """``take_all``'s answer when bucket ``refused`` does not fit: that refusal, and a
        peek at every other bucket (nothing taken)."""
        return tuple(
            self._step(key, cost if i == refused else 0.0, rate, burst, at, False)
            for i, (key, cost, rate, burst) in enumerate(buckets)
        )

    def adjust_nowait(
        self,
        key: str,
        delta: float,
        rate_per_s: float,
        burst: float,
        on_error: OnWriteError | None = None,
    ) -> None:
        _check_delta(delta, rate_per_s, burst)
        self._step(key, delta, rate_per_s, burst, None, True)

    def _live(self, key: str) -> dict[str, float] | None:
        exp = self._expires.get(key)
        if exp is not None and exp <= self._clock():
            del self._expires[key]
            self._counters.pop(key, None)
            return None
        return self._counters.get(key)

    def _set_ttl(self, key: str, ttl_s: float | None) -> None:
        if ttl_s is not None and key not in self._expires:
            self._expires[key] = self._clock() + ttl_s

    def _add(self, key: str, fields: Mapping[str, float], ttl_s: float | None) -> dict[str, float]:
        current = self._live(key)
        if not fields:
            return current or {}
        if current is None:
            current = self._counters[key] = {}
        for name, value in fields.items():
            current[name] = current.get(name, 0.0) + float(value)
        self._set_ttl(key, ttl_s)
        self._tick()
        return current

    async def add(
        self, key: str, fields: Mapping[str, float], ttl_s: float | None = None
    ) -> dict[str, float]:
        _check_add(fields, ttl_s)
        return dict(self._add(key, fields, ttl_s))

    def add_nowait(
        self,
        key: str,
        fields: Mapping[str, float],
        ttl_s: float | None = None,
        on_error: OnWriteError | None = None,
    ) -> None:
        _check_add(fields, ttl_s)
        self._add(key, fields, ttl_s)

    async def get(self, key: str) -> dict[str, float]:
        return dict(self._live(key) or {})

    async def ttl(self, key: str) -> float | None:
        if self._live(key) is None:
            return None
        exp = self._expires.get(key)
        return None if exp is None else exp - self._clock()

    async def scan(self, prefix: str) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for key in [k for k in self._counters if k.startswith(prefix)]:
            live = self._live(key)
            if live is not None:
                out[key] = dict(live)
        return out

    async def delete_prefix(self, prefix: str) -> int:
        gone = [k for k in self._counters if k.startswith(prefix)]
        for k in gone:
            del self._counters[k]
            self._expires.pop(k, None)
        buckets = [k for k in self._buckets if k.startswith(prefix)]
        for k in buckets:
            del self._buckets[k]
        return len(gone) + len(buckets)

    async def reserve(
        self,
        key: str,
        amount: float,
        limit: float,
        ttl_s: float | None = None,
        field: str = "spent",
    ) -> ReserveResult:
        _check_reserve(amount, limit, ttl_s)
        current = self._live(key)
        spent = current.get(field, 0.0) if current else 0.0
        if not _fits(spent, amount, limit):
            return ReserveResult(False, spent)
        if current is None:  # no await anywhere: atomic
            current = self._counters[key] = {}
        total = current[field] = spent + float(amount)
        self._set_ttl(key, ttl_s)
        self._tick()
        return ReserveResult(True, total)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._buckets.clear()
        self._counters.clear()
        self._expires.clear()


# ---- redis --------------------------------------------------------------------------------


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _floats(flat: list[Any] | dict[str, Any]) -> dict[str, float]:
    if isinstance(flat, dict):
        return {str(k): float(v) for k, v in flat.items()}
    return {str(flat[i]): float(flat[i + 1]) for i in range(0, len(flat), 2)}


class _Queued:
    """One key's queued writes: a bucket correction or counter increments, summed, and who
    asked for them (to report a failure to)."""

    __slots__ = ("delta", "fields", "ttl_s", "waiting")

    def __init__(self, ttl_s: float | None) -> None:
        self.delta = 0.0
        self.fields: dict[str, float] = {}
        self.ttl_s = ttl_s
        self.waiting: dict[OnWriteError | None, int] = {}  # on_error -> operations

    def asked(self, on_error: OnWriteError | None) -> None:
        self.waiting[on_error] = self.waiting.get(on_error, 0) + 1

    def failed(self, key: str, error: StoreUnavailable) -> None:
        for on_error, count in self.waiting.items():
            if on_error is None:
                _log().warning("store_write_lost", key=key, operations=count, error=str(error))
                continue
            try:
                on_error(key, count, error)
            except Exception:
                _log().exception("store_on_error_failed", key=key)


class RedisStore(Store):
    """State in Redis, shared by every replica. Construct with ``open_store``."""

    def __init__(
        self,
        url: str,
        prefix: str = DEFAULT_PREFIX,
        *,
        timeout_s: float = 1.0,
        max_connections: int = 64,
    ) -> None:
        _check_finite("timeout_s", timeout_s, nonneg=True)
        # Imported here, not at the top: redis-py loads OpenTelemetry whenever it is
        # installed, and a sidecar without Redis should not pay for either.
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import RedisError

        self._failures: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
        self._prefix = prefix
        self._timeout_s = timeout_s
        self._url = url
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,  # waiting for a free pooled connection
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            decode_responses=True,
            retry=Retry(NoBackoff(), 0),  # no hidden retries: the caller's budget is timeout_s
            health_check_interval=30,
        )
        self._client = aioredis.Redis(connection_pool=pool)
        self._bucket_script = self._client.register_script(_LUA_BUCKET)
        self._add_script = self._client.register_script(_LUA_ADD)
        self._reserve_script = self._client.register_script(_LUA_RESERVE)
        self._take_all_script = self._client.register_script(_LUA_TAKE_ALL)
        self._batch_script = self._client.register_script(_LUA_BATCH)
        # Writes queued by *_nowait: bucket corrections by (key, rate, burst), counter
        # increments by key; one writer task at a time sends them.
        self._queued_buckets: dict[tuple[str, float, float], _Queued] = {}
        self._queued_counters: dict[str, _Queued] = {}
        self._queued = 0
        self._writer: asyncio.Task[None] | None = None

    @property
    def shared(self) -> bool:
        return True

    @property
    def prefix(self) -> str:
        return self._prefix

    def _b(self, key: str) -> str:
        return f"{self._prefix}b:{key}"

    def _c(self, key: str) -> str:
        return f"{self._prefix}c:{key}"

    async def _run(self, what: str, op: Callable[[], Any]) -> Any:
        """Run one Redis round trip (or a few) under the timeout; map failures."""
        try:
            async with asyncio.timeout(self._timeout_s):
                return await op()
        except self._failures as exc:
            raise StoreUnavailable(
                f"redis {what} failed ({type(exc).__name__}: {exc or 'timed out'})"
            ) from exc

    async def _bucket(
        self, key: str, cost: float, rate: float, burst: float, now: float | None, force: bool
    ) -> TakeResult:
        args = [repr(float(cost)), repr(float(rate)), repr(float(burst))]
        args += ["" if now is None else repr(float(now)), "1" if force else "0"]
        raw = await self._run("take", lambda: self._bucket_script(keys=[self._b(key)], args=args))
        allowed = int(raw[0]) == 1
        retry = float(raw[2])
        if not allowed and cost > burst:
            retry = math.inf
        return TakeResult(allowed, float(raw[1]), retry, float(raw[3]))

    async def take(
        self, key: str, cost: float, rate_per_s: float, burst: float, now: float | None = None
    ) -> TakeResult:
        _check_take(cost, rate_per_s, burst)
        return await self._bucket(key, cost, rate_per_s, burst, now, False)

    async def adjust(
        self, key: str, delta: float, rate_per_s: float, burst: float, now: float | None = None
    ) -> TakeResult:
        _check_delta(delta, rate_per_s, burst)
        return await self._bucket(key, delta, rate_per_s, burst, now, True)

    async def take_all(
        self, buckets: Sequence[Bucket], now: float | None = None
    ) -> tuple[TakeResult, ...]:
        _check_buckets(buckets)
        args = ["" if now is None else repr(float(now))]
        for _, cost, rate, burst in buckets:
            args += [repr(float(cost)), repr(float(rate)), repr(float(burst))]
        keys = [self._b(bucket[0]) for bucket in buckets]
        raw = await self._run("take", lambda: self._take_all_script(keys=keys, args=args))
        results = []
        for i, (_, cost, _, burst) in enumerate(buckets):
            allowed = int(raw[4 * i]) == 1
            retry = math.inf if not allowed and cost > burst else float(raw[4 * i + 2])
            results.append(TakeResult(allowed, float(raw[4 * i + 1]), retry, float(raw[4 * i + 3])))
        return tuple(results)

    def adjust_nowait(
        self,
        key: str,
        delta: float,
        rate_per_s: float,
        burst: float,
        on_error: OnWriteError | None = None,
    ) -> None:
        _check_delta(delta, rate_per_s, burst)
        queued = self._queued_buckets.get((key, rate_per_s, burst))
        if queued is None:
            queued = self._queued_buckets[(key, rate_per_s, burst)] = _Queued(None)
        # Corrections to one bucket add up: taking first, then giving back, is one of the
        # orders the separate writes could have landed in (a give-back stops at burst).
        queued.delta += delta
        queued.asked(on_error)
        self._queue()

    async def add(
        self, key: str, fields: Mapping[str, float], ttl_s: float | None = None
    ) -> dict[str, float]:
        _check_add(fields, ttl_s)
        if not fields:
            return await self.get(key)
        args: list[str] = ["" if ttl_s is None else repr(float(ttl_s))]
        for name, value in fields.items():
            args += [name, repr(float(value))]
        raw = await self._run("add", lambda: self._add_script(keys=[self._c(key)], args=args))
        return _floats(raw)

    def add_nowait(
        self,
        key: str,
        fields: Mapping[str, float],
        ttl_s: float | None = None,
        on_error: OnWriteError | None = None,
    ) -> None:
        _check_add(fields, ttl_s)
        queued = self._queued_counters.get(key)
        if queued is None:
            queued = self._queued_counters[key] = _Queued(ttl_s)
        elif queued.ttl_s is None:
            queued.ttl_s = ttl_s  # the first TTL asked for is the one a key without one gets
        sums = queued.fields
        for name, value in fields.items():
            sums[name] = sums.get(name, 0.0) + float(value)
        queued.asked(on_error)
        self._queue()

    # -- the writer of queued writes --------------------------------------------------------

    def _queue(self) -> None:
        self._queued += 1
        if self._writer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (shutting down): the next flush writes it
                return
            self._writer = loop.create_task(self._write_queued())

    @property
    def pending_writes(self) -> int:
        return self._queued

    async def _write_queued(self) -> None:
        """Write what is queued, then what was queued meanwhile, until nothing is."""
        try:
            while self._queued_buckets or self._queued_counters:
                buckets, self._queued_buckets = self._queued_buckets, {}
                counters, self._queued_counters = self._queued_counters, {}
                self._queued = 0
                await self._write_batch(buckets, counters)
        finally:
            self._writer = None

    async def _write_batch(
        self, buckets: dict[tuple[str, float, float], _Queued], counters: dict[str, _Queued]
    ) -> None:
        writes: list[tuple[str, float | None, float | None, _Queued]] = [
            (key, rate, burst, queued) for (key, rate, burst), queued in buckets.items()
        ]
        writes += [(key, None, None, queued) for key, queued in counters.items()]
        failure: StoreUnavailable | None = None
        for start in range(0, len(writes), _BATCH_KEYS):
            chunk = writes[start : start + _BATCH_KEYS]
            if failure is None:
                failure = await self._write_chunk(chunk)
            if failure is not None:  # the rest is not tried: the store is down
                for key, _, _, queued in chunk:
                    queued.failed(key, failure)

    async def _write_chunk(
        self, chunk: list[tuple[str, float | None, float | None, _Queued]]
    ) -> StoreUnavailable | None:
        """One script for up to _BATCH_KEYS keys, buckets first (``_LUA_BATCH``)."""
        keys: list[str] = []
        head: list[str] = []
        tail: list[str] = []
        for key, rate, burst, queued in chunk:
            if rate is not None:
                keys.append(self._b(key))
                head += [repr(queued.delta), repr(float(rate)), repr(float(burst or 0))]
        nb = len(keys)
        for key, rate, _, queued in chunk:
            if rate is None:
                keys.append(self._c(key))
                tail.append("" if queued.ttl_s is None else repr(float(queued.ttl_s)))
                tail.append(str(len(queued.fields)))
                for name, value in queued.fields.items():
                    tail += [name, repr(value)]
        args = [str(nb), "", *head, *tail]
        try:
            await self._run("write", lambda: self._batch_script(keys=keys, args=args))
        except StoreUnavailable as exc:
            return exc
        except Exception as exc:  # never raised to a caller: it reaches on_error like an outage
            return StoreUnavailable(f"redis write failed ({type(exc).__name__}: {exc})")
        return None

    async def flush(self) -> None:
        while True:
            if self._writer is None:
                if not (self._queued_buckets or self._queued_counters):
                    return
                self._writer = asyncio.get_running_loop().create_task(self._write_queued())
            await asyncio.wait({self._writer})  # not cancelled if flush is

    async def get(self, key: str) -> dict[str, float]:
        raw = await self._run("get", lambda: self._client.hgetall(self._c(key)))
        return _floats(raw)

    async def ttl(self, key: str) -> float | None:
        ms = int(await self._run("ttl", lambda: self._client.pttl(self._c(key))))
        return None if ms < 0 else ms / 1000.0

    async def _keys(self, pattern: str) -> list[str]:
        async def collect() -> list[str]:
            return [k async for k in self._client.scan_iter(match=pattern, count=500)]

        result: list[str] = await self._run("scan", collect)
        return result

    async def scan(self, prefix: str) -> dict[str, dict[str, float]]:
        base = self._c("")
        keys = await self._keys(_glob_escape(base + prefix) + "*")
        if not keys:
            return {}

        async def fetch() -> list[Any]:
            async with self._client.pipeline(transaction=False) as pipe:
                for k in keys:
                    pipe.hgetall(k)
                return await pipe.execute()

        values = await self._run("scan", fetch)
        return {k[len(base) :]: _floats(v) for k, v in zip(keys, values, strict=True) if v}

    async def delete_prefix(self, prefix: str) -> int:
        keys = await self._keys(_glob_escape(self._c("") + prefix) + "*")
        keys += await self._keys(_glob_escape(self._b("") + prefix) + "*")
        if not keys:
            return 0

        async def unlink() -> int:
            deleted = 0
            for i in range(0, len(keys), 500):
                deleted += int(await self._client.unlink(*keys[i : i + 500]))
            return deleted

        result: int = await self._run("delete", unlink)
        return result

    async def reserve(
        self,
        key: str,
        amount: float,
        limit: float,
        ttl_s: float | None = None,
        field: str = "spent",
    ) -> ReserveResult:
        _check_reserve(amount, limit, ttl_s)
        args = [field, repr(float(amount)), repr(float(limit))]
        args += ["" if ttl_s is None else repr(float(ttl_s)), repr(_EPS)]
        raw = await self._run(
            "reserve", lambda: self._reserve_script(keys=[self._c(key)], args=args)
        )
        return ReserveResult(int(raw[0]) == 1, float(raw[1]))

    async def ping(self) -> None:
        await self._run("ping", self._client.ping)

    async def close(self) -> None:
        await self.flush()
        await self._client.aclose(close_connection_pool=True)

    def __repr__(self) -> str:
        return f"RedisStore(prefix={self._prefix!r})"


def open_store(
    redis_url: str | None,
    prefix: str = DEFAULT_PREFIX,
    *,
    timeout_s: float = 1.0,
    max_connections: int = 64,
    clock: Clock | None = None,
) -> Store:
    """A ``RedisStore`` for a ``redis://`` / ``rediss://`` / ``unix://`` URL, else a
    ``MemoryStore``. Nothing connects yet: the first operation (or ``ping``) does."""
    if redis_url:
        return RedisStore(redis_url, prefix, timeout_s=timeout_s, max_connections=max_connections)
    return MemoryStore(clock=clock)
