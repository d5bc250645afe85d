"""Request deadlines on one shared, coarse clock instead of a timer per request.

`asyncio.timeout` arms a loop timer on entry and disarms it on exit; under
uvloop each is a libuv timer handle to create, start, stop and close, and a
relayed stream would re-arm one for every idle wait. Proxy timeouts are
seconds to minutes, so checking every in-flight deadline a few times a second
is exact enough and costs one timer for all requests together.
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class Deadline:
    """A reusable guard: `with deadline:` runs its body until loop time `when`.

    Past it the body sees a TimeoutError, as under `asyncio.timeout`. `move`
    re-arms it for free, so a stream can keep one and enter it for each wait.
    """

    __slots__ = ("_watch", "expired", "task", "when")

    def __init__(self, watch: DeadlineWatch, when: float) -> None:
        self._watch = watch
        self.when = when
        self.expired = False
        self.task: asyncio.Task[object] | None = None

    def move(self, when: float) -> None:
        self.when = when

    def __enter__(self) -> Deadline:
        self.task = asyncio.current_task()
        assert self.task is not None, "a deadline needs a running task"
        self.expired = False
        self._watch._enter(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._watch._exit(self)
        if exc_type is asyncio.CancelledError and self.expired:
            assert self.task is not None
            if self.task.uncancel() == 0:
                raise TimeoutError from exc


class DeadlineWatch:
    """Cancels a section whose deadline passed, within `tick` seconds of it.

    The cancellation can only land inside the section: the check runs on the
    loop, so it finds a registered task suspended at an await in its section,
    and a section unregisters itself before it returns.
    """

    def __init__(self, tick: float = 0.05) -> None:
        self._tick = tick
        self._active: set[Deadline] = set()
        self._timer: asyncio.TimerHandle | None = None

    def deadline(self, when: float) -> Deadline:
        return Deadline(self, when)

    def _enter(self, deadline: Deadline) -> None:
        self._active.add(deadline)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._tick, self._check)

    def _exit(self, deadline: Deadline) -> None:
        self._active.discard(deadline)

    def _check(self) -> None:
        self._timer = None
        if not self._active:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for deadline in self._active:
            if not deadline.expired and deadline.when <= now and deadline.task is not None:
                deadline.expired = True
                deadline.task.cancel()
        self._timer = loop.call_later(self._tick, self._check)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
