"""audit: one line per request through a real sidecar, refusals, tokens, bodies, rotation."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, ClassVar, get_type_hints

import aiohttp
import orjson
import pytest
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo

import policies.audit
import policies.metering
from policies.audit import Audit, AuditConfig
from sidecar.app import Sidecar
from sidecar.chain import Next, PolicyContext
from sidecar.errors import SidecarError
from sidecar.exchange import Exchange, Reply
from sidecar.knobs import validate
from tests.conftest import SidecarFactory
from tests.fake_ollama import FakeOllama

assert policies.audit and policies.metering  # imported for their @register

MODEL = "llama3.2:latest"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi there"}]}
SECRET = "sk-" + "A1b2C3d4E5f6G7h8J9k0"


class RefuseConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Refuse:
    """A test policy that refuses every request with a 429, as a rate limiter would."""

    config_model: ClassVar[type[BaseModel]] = RefuseConfig

    def __init__(self, config: RefuseConfig, context: PolicyContext) -> None:
        pass

    async def __call__(self, exchange: Exchange, call_next: Next) -> Reply:
        exchange.facts["tenant"] = "team-a"
        raise SidecarError(429, "slow down", code="rate_limit_exceeded")


def audit_of(sidecar: Sidecar) -> Audit:
    assert sidecar.runtime is not None
    for name, policy in sidecar.runtime.policies:
        if name == "audit":
            assert isinstance(policy, Audit)
            return policy
    raise AssertionError("no audit policy")


def lines_of(sidecar: Sidecar, path: Path) -> list[dict[str, Any]]:
    audit_of(sidecar).sink.flush()
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


async def wait_lines(sidecar: Sidecar, path: Path, count: int) -> list[dict[str, Any]]:
    """A stream's line is written when the relay closes it, just after the client saw the end."""
    async with asyncio.timeout(5):
        while len(found := lines_of(sidecar, path)) < count:  # noqa: ASYNC110 - a file, no event
            await asyncio.sleep(0.01)
    return found


def file_audit(path: Path, **options: Any) -> dict[str, Any]:
    return {"audit": {"sink": "file", "path": str(path), **options}}


FIELDS = {
    "time",
    "request_id",
    "tenant",
    "route",
    "method",
    "model_asked",
    "model_used",
    "status",
    "stream",
    "outcome",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "tokens_estimated",
    "cost",
    "latency_ms",
    "attempts",
    "upstream",
    "cache",
    "stream_error",
}


async def test_plain_and_stream_each_one_line(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    path = tmp_path / "audit.log"
    sidecar = await make_sidecar([{"correlation": {}}, file_audit(path)])
    async with http.post(
        f"{sidecar.url}/v1/chat/completions", json=CHAT, headers={"x-request-id": "req-plain"}
    ) as response:
        assert response.status == 200
        await response.read()
    [plain] = lines_of(sidecar, path)
    assert set(plain) == FIELDS
    assert plain["time"].endswith("Z") and "T" in plain["time"]
    assert plain["request_id"] == "req-plain"
    assert plain["tenant"] == "anonymous"
    assert plain["route"] == "/v1/chat/completions" and plain["method"] == "POST"
    assert plain["model_asked"] == MODEL and plain["model_used"] == MODEL
    assert plain["status"] == 200 and plain["stream"] is False and plain["outcome"] == "complete"
    assert plain["latency_ms"] > 0
    assert plain["prompt_tokens"] is None  # nothing metered this request

    async with http.post(f"{sidecar.url}/api/chat", json={**CHAT, "stream": True}) as response:
        assert response.status == 200
        await response.read()
    lines = await wait_lines(sidecar, path, 2)
    assert len(lines) == 2
    stream = lines[1]
    assert set(stream) == FIELDS
    assert stream["route"] == "/api/chat" and stream["stream"] is True
    assert stream["status"] == 200 and stream["outcome"] == "complete"
    await asyncio.sleep(0.05)
    assert len(lines_of(sidecar, path)) == 2  # exactly one line per request


async def test_refusal_inside_is_audited(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    path = tmp_path / "audit.log"
    sidecar = await make_sidecar([file_audit(path), {"tests.test_audit:Refuse": {}}])
    async with http.post(f"{sidecar.url}/v1/chat/completions", json=CHAT) as response:
        assert response.status == 429
        assert (await response.json())["error"]["code"] == "rate_limit_exceeded"
    [line] = lines_of(sidecar, path)
    assert line["status"] == 429 and line["outcome"] == "refused"
    assert line["tenant"] == "team-a" and line["model_asked"] == MODEL


async def test_tokens_and_cost_from_metering(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    path = tmp_path / "audit.log"
    prices = {"llama3.2": {"prompt": 1e6, "completion": 2e6}}
    sidecar = await make_sidecar([file_audit(path), {"metering": {"prices": prices}}])
    async with http.post(f"{sidecar.url}/v1/chat/completions", json=CHAT) as response:
        usage = (await response.json())["usage"]
    async with http.post(
        f"{sidecar.url}/v1/chat/completions", json={**CHAT, "stream": True}
    ) as response:
        await response.read()
    plain, stream = await wait_lines(sidecar, path, 2)
    for line in (plain, stream):
        assert line["prompt_tokens"] == usage["prompt_tokens"]
        assert line["completion_tokens"] == usage["completion_tokens"]
        assert line["total_tokens"] == usage["total_tokens"]
        assert line["tokens_estimated"] is False
        assert line["cost"] == usage["prompt_tokens"] * 1.0 + usage["completion_tokens"] * 2.0
    assert stream["stream"] is True and stream["outcome"] == "complete"


async def test_bodies_absent_by_default_present_and_redacted_when_asked(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession, fake: FakeOllama, tmp_path: Path
) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"my key is {SECRET} and Bearer abcdefghijklmn"}],
    }
    plain_path = tmp_path / "plain.log"
    sidecar = await make_sidecar([file_audit(plain_path)])
    async with http.post(
        f"{sidecar.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": "Bearer sk-topsecretvalue1234567890"},
    ) as response:
        await response.read()
    [line] = lines_of(sidecar, plain_path)
    assert "request_body" not in line and "completion" not in line
    assert b"topsecret" not in plain_path.read_bytes()

    path = tmp_path / "bodies.log"
    sidecar = await make_sidecar(
        [file_audit(path, include_bodies=True, redact=[*policies.audit.DEFAULT_REDACT, "hi+"])]
    )
    async with http.post(
        f"{sidecar.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": "Bearer sk-topsecretvalue1234567890"},
    ) as response:
        answer = await response.json()
    async with http.post(
        f"{sidecar.url}/api/generate", json={"model": MODEL, "prompt": "x", "stream": True}
    ) as response:
        await response.read()
    plain, stream = await wait_lines(sidecar, path, 2)
    raw = path.read_bytes()
    assert SECRET.encode() not in raw and b"abcdefghijklmn" not in raw
    assert b"topsecret" not in raw  # the Authorization header is never written
    assert "[REDACTED]" in plain["request_body"] and MODEL in plain["request_body"]
    assert plain["completion"] == answer["choices"][0]["message"]["content"]
    assert stream["completion"] == "".join(fake.chunks)
    assert orjson.loads(stream["request_body"]) == {"model": MODEL, "prompt": "x", "stream": True}


async def test_body_cap(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    path = tmp_path / "audit.log"
    sidecar = await make_sidecar([file_audit(path, include_bodies=True, max_body_bytes=40)])
    long = {"model": MODEL, "prompt": "word " * 200 + SECRET, "stream": False}
    async with http.post(f"{sidecar.url}/api/generate", json=long) as response:
        await response.read()
    [line] = lines_of(sidecar, path)
    assert line["request_body"].endswith("…[truncated]")
    assert len(line["request_body"].removesuffix("…[truncated]").encode()) <= 40


async def test_file_rotation(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    path = tmp_path / "audit.log"
    sidecar = await make_sidecar([file_audit(path, max_bytes=1024, backups=2)])
    for _ in range(12):
        async with http.get(f"{sidecar.url}/api/tags") as response:
            await response.read()
        audit_of(sidecar).sink.flush()  # one write per line: rotation checks each
    files = sorted(p.name for p in tmp_path.iterdir())  # noqa: ASYNC240
    assert files == ["audit.log", "audit.log.1", "audit.log.2"]
    total = 0
    for name in files:
        data = (tmp_path / name).read_bytes()
        assert 0 < len(data) <= 1024
        lines = data.splitlines()
        assert all(orjson.loads(line)["route"] == "/api/tags" for line in lines)
        total += len(lines)
    assert total < 12  # the oldest went beyond `backups`
    assert audit_of(sidecar).lines_written == 12


async def test_rotation_within_one_batch(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    written: list[int] = []
    sink = policies.audit.LineSink(
        str(path),
        max_bytes=256,
        backups=3,
        interval=60,
        max_buffer=1 << 20,
        on_written=written.append,
        on_error=lambda error, lines: pytest.fail(str(error)),
    )
    sink.open()
    for index in range(10):
        sink.write(b"x" * 90 + str(index).encode())
    sink.close()
    assert written == [10]
    for name in ("a.log", "a.log.1", "a.log.2", "a.log.3"):
        assert 0 < len((tmp_path / name).read_bytes()) <= 256
    assert (tmp_path / "a.log").read_bytes().endswith(b"9\n")


async def test_client_gone_mid_stream_is_abandoned(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    path = tmp_path / "audit.log"
    sidecar = await make_sidecar([file_audit(path), {"metering": {}}])
    hold = asyncio.Event()

    async def gate(index: int) -> None:
        if index >= 2:
            await hold.wait()

    fake.between_chunks = gate
    response = await http.post(f"{sidecar.url}/v1/chat/completions", json={**CHAT, "stream": True})
    await response.content.readuntil(b"\n\n")
    await response.content.readuntil(b"\n\n")
    response.close()  # the client hangs up while the upstream is still generating
    [line] = await wait_lines(sidecar, path, 1)
    hold.set()
    assert line["outcome"] == "abandoned" and line["status"] == 499
    assert line["stream"] is True
    assert line["tokens_estimated"] is True  # metering estimated the cut stream first


async def test_lines_wait_for_the_timer_and_are_flushed_on_close(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    path = tmp_path / "audit.log"
    sidecar = await make_sidecar([file_audit(path, flush_interval=60)])
    async with http.get(f"{sidecar.url}/api/tags") as response:
        await response.read()
    assert path.read_bytes() == b""  # buffered, not written per request
    await sidecar.stop(grace=0)
    [line] = [orjson.loads(raw) for raw in path.read_bytes().splitlines()]
    assert line["route"] == "/api/tags"


async def test_short_interval_flushes_by_itself(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    path = tmp_path / "audit.log"
    sidecar = await make_sidecar([file_audit(path, flush_interval="20ms")])
    async with http.get(f"{sidecar.url}/api/tags") as response:
        await response.read()
    async with asyncio.timeout(5):
        while not path.read_bytes():  # noqa: ASYNC110 - the timer writes a file, no event
            await asyncio.sleep(0.01)
    async with http.get(f"{sidecar.url}/metrics") as response:
        text = await response.text()
    assert "ollama_sidecar_audit_lines_total 1.0" in text
    assert "ollama_sidecar_audit_write_errors_total 0.0" in text


async def test_stdout_sink(
    make_sidecar: SidecarFactory,
    http: aiohttp.ClientSession,
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    sidecar = await make_sidecar([{"audit": {}}])
    async with http.get(f"{sidecar.url}/api/tags") as response:
        await response.read()
    audit_of(sidecar).sink.flush()
    out = capsysbinary.readouterr().out
    lines = [orjson.loads(raw) for raw in out.splitlines() if b'"model_asked"' in raw]
    assert [line["route"] for line in lines] == ["/api/tags"]


async def test_write_error_is_counted_not_raised(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    path = tmp_path / "audit.log"
    sidecar = await make_sidecar([file_audit(path)])
    audit = audit_of(sidecar)
    assert audit.sink._file is not None
    audit.sink._file.close()  # the disk went away under us
    async with http.get(f"{sidecar.url}/api/tags") as response:
        assert response.status == 200
    audit.sink.flush()
    assert audit.lines_lost == 1
    async with http.get(f"{sidecar.url}/metrics") as response:
        assert "ollama_sidecar_audit_write_errors_total 1.0" in await response.text()


async def test_unwritable_path_fails_the_start(
    make_sidecar: SidecarFactory, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=r"audit\.path: cannot open .*missing"):
        await make_sidecar([file_audit(tmp_path / "missing" / "audit.log")])


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"sink": "file"}, "needs a `path`"),
        ({"path": "/tmp/x"}, "only used with sink: file"),
        ({"redact": ["("]}, "not a valid regex"),
        ({"redact": ["a*"]}, "matches the empty string"),
        ({"max_bytes": 10, "sink": "file", "path": "/tmp/x"}, "greater than or equal"),
        ({"colour": "blue"}, "Unexpected keyword argument"),
    ],
)
def test_config_is_validated(options: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        validate(AuditConfig, options)


def test_every_field_is_described() -> None:
    for name, hint in get_type_hints(AuditConfig, include_extras=True).items():
        metadata = getattr(hint, "__metadata__", ())
        assert any(isinstance(meta, FieldInfo) and meta.description for meta in metadata), name
