"""The shared deadline clock behaves like asyncio.timeout where it matters."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.deadlines import DeadlineWatch


async def test_a_section_past_its_deadline_gets_timeout_error() -> None:
    watch = DeadlineWatch(tick=0.01)
    loop = asyncio.get_running_loop()
    never = asyncio.Event()
    with pytest.raises(TimeoutError), watch.deadline(loop.time() + 0.02):
        await never.wait()
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    # The task is usable afterwards: no cancellation is left pending.
    await asyncio.sleep(0)
    watch.close()


async def test_a_section_that_finishes_in_time_is_untouched() -> None:
    watch = DeadlineWatch(tick=0.01)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    loop.call_soon(done.set)
    with watch.deadline(loop.time() + 10):
        await done.wait()
    assert not watch._active
    watch.close()


async def test_moving_a_deadline_keeps_a_busy_section_alive() -> None:
    watch = DeadlineWatch(tick=0.01)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[int] = asyncio.Queue()

    async def producer() -> None:
        for index in range(5):
            await asyncio.sleep(0.015)
            queue.put_nowait(index)

    task = asyncio.create_task(producer())
    received = []
    with watch.deadline(loop.time() + 0.03) as deadline:
        for _ in range(5):
            received.append(await queue.get())
            deadline.move(loop.time() + 0.03)
    await task
    assert received == [0, 1, 2, 3, 4]
    watch.close()


async def test_an_outside_cancel_stays_a_cancel() -> None:
    watch = DeadlineWatch(tick=0.01)
    loop = asyncio.get_running_loop()
    started = asyncio.Event()

    async def section() -> None:
        with watch.deadline(loop.time() + 10):
            started.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(section())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    watch.close()


async def test_many_sections_expire_independently() -> None:
    watch = DeadlineWatch(tick=0.01)
    loop = asyncio.get_running_loop()

    async def section(delay: float, work: float) -> str:
        try:
            with watch.deadline(loop.time() + delay):
                await asyncio.sleep(work)
            return "done"
        except TimeoutError:
            return "timeout"

    results = await asyncio.gather(
        section(0.02, 0.2), section(1.0, 0.03), section(0.02, 0.2), section(1.0, 0.0)
    )
    assert list(results) == ["timeout", "done", "timeout", "done"]
    watch.close()
