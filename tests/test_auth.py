"""auth: client keys → tenants, 401s in each dialect, keys kept out of the upstream and the logs."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from pydantic import BaseModel, ConfigDict

import policies.auth  # registers "auth"
from sidecar.chain import Next, PolicyContext
from sidecar.cli import main
from sidecar.config import ConfigError, parse_settings
from sidecar.errors import SidecarError
from sidecar.exchange import Exchange, Reply
from sidecar.knobs import validate
from sidecar.observability import Metrics
from sidecar.routes import find_route
from tests.conftest import JsonLogs, SidecarFactory, settings_for
from tests.fake_ollama import FakeOllama

KEY_A = "sk-team-a-0123456789abcdef"
KEY_B = "sk-team-b-fedcba9876543210"
KEY_C = "sk-team-c-from-the-secret-1"
WRONG = "sk-wrong-0000000000000000"
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
NATIVE_CHAT = {**CHAT, "stream": False}


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class TenantEchoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TenantEcho:
    """Test policy placed after auth: shows the facts auth left in response headers."""

    config_model: ClassVar[type[BaseModel]] = TenantEchoConfig

    def __init__(self, config: TenantEchoConfig, context: PolicyContext) -> None:
        pass

    async def __call__(self, exchange: Exchange, call_next: Next) -> Reply:
        exchange.response_headers["X-Test-Tenant"] = str(exchange.facts.get("tenant"))
        exchange.response_headers["X-Test-Auth"] = str(exchange.facts.get("auth"))
        exchange.response_headers["X-Test-Overrides"] = orjson.dumps(
            dict(exchange.facts.get("tenant_overrides", {}))
        ).decode()
        return await call_next(exchange)


ECHO: dict[str, Any] = {"tests.test_auth:TenantEcho": {}}


def chain(**auth: Any) -> list[Any]:
    options = {"keys": [{"key_sha256": sha(KEY_A), "tenant": "team-a"}], **auth}
    return [{"correlation": {}}, {"auth": options}, ECHO]


async def chat(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], Any]:
    async with http.post(f"{url}/v1/chat/completions", json=CHAT, headers=headers) as response:
        return response.status, dict(response.headers), await response.json()


async def test_a_bearer_key_is_admitted_as_its_tenant_with_its_overrides(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(
        chain(tenants={"team-a": {"requests_per_minute": 10}, "team-b": {}})
    )
    status, headers, body = await chat(http, sidecar.url, {"Authorization": f"Bearer {KEY_A}"})
    assert status == 200, body
    assert headers["X-Test-Tenant"] == "team-a"
    assert headers["X-Test-Auth"] == "key"
    assert orjson.loads(headers["X-Test-Overrides"]) == {"requests_per_minute": 10}
    assert body["choices"][0]["message"]["content"]
    # The scheme is case-insensitive, surrounding blanks are ignored.
    status, headers, _ = await chat(http, sidecar.url, {"Authorization": f"bearer  {KEY_A} "})
    assert status == 200
    # The client's key never reaches the upstream.
    assert all("authorization" not in request.headers for request in fake.requests)


async def test_x_api_key_works_and_is_not_forwarded(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(chain())
    body = {"model": "llama3.2", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    async with http.post(
        f"{sidecar.url}/v1/messages", json=body, headers={"x-api-key": KEY_A}
    ) as response:
        assert response.status == 200, await response.text()
        assert response.headers["X-Test-Tenant"] == "team-a"
    status, headers, _ = await chat(http, sidecar.url, {"x-api-key": KEY_A})
    assert status == 200 and headers["X-Test-Tenant"] == "team-a"
    for request in fake.requests:
        assert "x-api-key" not in request.headers
        assert KEY_A not in str(dict(request.headers))


async def test_forward_authorization_still_keeps_the_sidecar_key_here(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(chain(), upstream={"forward_authorization": True})
    status, _, _ = await chat(http, sidecar.url, {"Authorization": f"Bearer {KEY_A}"})
    assert status == 200
    assert "authorization" not in fake.requests[-1].headers


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing"),
        ({"Authorization": f"Bearer {WRONG}"}, "invalid"),
        ({"Authorization": "Bearer "}, "invalid"),
        ({"Authorization": "Bearer"}, "invalid"),
        ({"Authorization": f"Basic {KEY_A}"}, "invalid"),
        ({"Authorization": KEY_A}, "invalid"),
        ({"Authorization": f"Bearer {KEY_A}x"}, "invalid"),
        ({"Authorization": f"Bearer {KEY_A[:-1]}"}, "invalid"),
        ({"x-api-key": WRONG}, "invalid"),
        ({"x-api-key": ""}, "invalid"),
        # The Authorization header is the one checked when both are sent.
        ({"Authorization": f"Bearer {WRONG}", "x-api-key": KEY_A}, "invalid"),
    ],
)
async def test_missing_or_wrong_keys_are_401_in_openai_shape(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    headers: dict[str, str],
    reason: str,
) -> None:
    sidecar = await make_sidecar(chain())
    status, response_headers, body = await chat(http, sidecar.url, headers)
    assert status == 401
    assert body["error"]["type"] == "authentication_error"
    assert body["error"]["code"] == "invalid_api_key"
    assert body["error"]["param"] is None
    expected = "missing API key" if reason == "missing" else "invalid API key"
    assert body["error"]["message"].startswith(expected)
    assert KEY_A not in body["error"]["message"] and WRONG not in body["error"]["message"]
    assert response_headers["WWW-Authenticate"].startswith("Bearer")
    assert "X-Request-ID" in response_headers  # correlation ran first
    assert "X-Test-Tenant" not in response_headers
    assert fake.requests == []  # the upstream was never asked
    metrics = sidecar.metrics.render().decode()
    assert f'ollama_sidecar_auth_failures_total{{reason="{reason}"}} 1.0' in metrics


async def test_native_routes_get_a_native_401(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(chain())
    async with http.post(f"{sidecar.url}/api/chat", json=NATIVE_CHAT) as response:
        assert response.status == 401
        assert await response.json() == {"error": policies.auth.MISSING_MESSAGE}
    async with http.post(
        f"{sidecar.url}/api/chat", json=NATIVE_CHAT, headers={"Authorization": f"Bearer {WRONG}"}
    ) as response:
        assert response.status == 401
        assert await response.json() == {"error": "invalid API key"}
    async with http.post(
        f"{sidecar.url}/api/chat", json=NATIVE_CHAT, headers={"Authorization": f"Bearer {KEY_A}"}
    ) as response:
        assert response.status == 200
        assert response.headers["X-Test-Tenant"] == "team-a"
    assert len(fake.requests) == 1


async def test_probes_and_metrics_need_no_key(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(chain())
    for path in ("/healthz", "/readyz", "/metrics"):
        async with http.get(f"{sidecar.url}{path}") as response:
            assert response.status == 200, path


async def test_the_upstream_api_key_is_injected(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "upstream-secret-123")
    sidecar = await make_sidecar(chain(upstream_api_key_env="TEST_UPSTREAM_KEY"))
    status, _, _ = await chat(http, sidecar.url, {"Authorization": f"Bearer {KEY_A}"})
    assert status == 200
    assert fake.requests[-1].headers.getall("Authorization") == ["Bearer upstream-secret-123"]


async def test_an_unset_upstream_key_variable_keeps_the_sidecar_from_starting(
    make_sidecar: SidecarFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TEST_UPSTREAM_KEY", raising=False)
    with pytest.raises(ValueError, match="TEST_UPSTREAM_KEY is not set"):
        await make_sidecar(chain(upstream_api_key_env="TEST_UPSTREAM_KEY"))


async def test_plaintext_keys_in_yaml_are_hashed_at_load(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    settings = parse_settings({"policies": [{"auth": {"keys": [{"key": KEY_B, "tenant": "b"}]}}]})
    options = settings.policies[0].options
    assert KEY_B not in repr(options) and KEY_B.encode() not in orjson.dumps(options)
    assert asdict(options)["keys"] == ({"key_sha256": sha(KEY_B), "tenant": "b"},)
    sidecar = await make_sidecar([{"auth": {"keys": [{"key": KEY_B, "tenant": "team-b"}]}}, ECHO])
    status, headers, _ = await chat(http, sidecar.url, {"Authorization": f"Bearer {KEY_B}"})
    assert status == 200 and headers["X-Test-Tenant"] == "team-b"


@pytest.mark.parametrize(
    "value",
    [
        f"- {{key: {KEY_B}, tenant: team-b}}\n- {{key_sha256: {sha(KEY_C)}, tenant: team-c}}\n",
        orjson.dumps(
            [{"key": KEY_B, "tenant": "team-b"}, {"key_sha256": sha(KEY_C), "tenant": "team-c"}]
        ).decode(),
    ],
    ids=["yaml", "json"],
)
async def test_keys_from_an_environment_variable(
    make_sidecar: SidecarFactory,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    value: str,
) -> None:
    monkeypatch.setenv("TEST_SIDECAR_KEYS", value)
    sidecar = await make_sidecar(chain(keys_env="TEST_SIDECAR_KEYS"))
    for key, tenant in ((KEY_A, "team-a"), (KEY_B, "team-b"), (KEY_C, "team-c")):
        status, headers, _ = await chat(http, sidecar.url, {"Authorization": f"Bearer {key}"})
        assert status == 200 and headers["X-Test-Tenant"] == tenant


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "TEST_SIDECAR_KEYS is not set"),
        ("[unclosed", "not valid YAML"),
        ("{key: x}", "keys_env TEST_SIDECAR_KEYS: Input should be a valid list"),
        (f"- {{key: {KEY_B}}}", "keys_env TEST_SIDECAR_KEYS[0].tenant: Field required"),
        (f"- {{key: {KEY_A}, tenant: other}}", "one key is given for two tenants"),
    ],
)
async def test_a_bad_key_variable_keeps_the_sidecar_from_starting_without_showing_keys(
    make_sidecar: SidecarFactory,
    monkeypatch: pytest.MonkeyPatch,
    value: str | None,
    expected: str,
) -> None:
    if value is None:
        monkeypatch.delenv("TEST_SIDECAR_KEYS", raising=False)
    else:
        monkeypatch.setenv("TEST_SIDECAR_KEYS", value)
    with pytest.raises(ValueError, match=re.escape(expected)) as caught:
        await make_sidecar(chain(keys_env="TEST_SIDECAR_KEYS"))
    assert KEY_A not in str(caught.value) and KEY_B not in str(caught.value)


def kubernetes_secret(root: Path, text: str, version: int) -> Path:
    """Lay out a mounted Secret the way the kubelet does: ..data -> a timestamped dir."""
    data = root / f"..2026_11_25_{version}"
    data.mkdir()
    (data / "keys.yaml").write_text(text)
    link = root / "..data_tmp"
    link.symlink_to(data.name)
    os.replace(link, root / "..data")
    visible = root / "keys.yaml"
    if not visible.is_symlink():
        visible.symlink_to("..data/keys.yaml")
    return visible


async def test_a_secret_update_is_picked_up_and_a_broken_one_ignored(
    make_sidecar: SidecarFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    json_logs: JsonLogs,
) -> None:
    path = kubernetes_secret(tmp_path, f"- {{key: {KEY_B}, tenant: team-b}}\n", 1)
    sidecar = await make_sidecar(chain(keys_file=str(path), file_check_interval="50ms"))

    async def tenant_of(key: str) -> str | None:
        status, headers, _ = await chat(http, sidecar.url, {"Authorization": f"Bearer {key}"})
        return headers["X-Test-Tenant"] if status == 200 else None

    assert await tenant_of(KEY_A) == "team-a"  # the YAML's keys and the file's merge
    assert await tenant_of(KEY_B) == "team-b"
    assert await tenant_of(KEY_C) is None

    # The Secret rotates: team-b's key is gone, team-c's is new.
    kubernetes_secret(tmp_path, f"- {{key_sha256: {sha(KEY_C)}, tenant: team-c}}\n", 2)
    await asyncio.sleep(0.06)
    assert await tenant_of(KEY_C) == "team-c"
    assert await tenant_of(KEY_B) is None
    assert await tenant_of(KEY_A) == "team-a"

    # A broken Secret keeps the last good keys in force.
    kubernetes_secret(tmp_path, f"- {{key: {KEY_B}, tenant: 'bad tenant!'}}\n", 3)
    await asyncio.sleep(0.06)
    assert await tenant_of(KEY_C) == "team-c"
    assert await tenant_of(KEY_B) is None
    metrics = sidecar.metrics.render().decode()
    assert 'ollama_sidecar_auth_key_reloads_total{result="applied"} 1.0' in metrics
    assert 'ollama_sidecar_auth_key_reloads_total{result="rejected"} 1.0' in metrics
    logged = b"\n".join(orjson.dumps(line) for line in json_logs())
    assert b"auth_keys_file_rejected" in logged
    assert KEY_B.encode() not in logged


async def test_the_keys_file_is_checked_at_most_every_interval(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(f"- {{key: {KEY_B}, tenant: team-b}}\n")
    sidecar = await make_sidecar(chain(keys_file=str(path), file_check_interval="1h"))
    path.write_text(f"- {{key: {KEY_C}, tenant: team-c}}\n")
    status, _, _ = await chat(http, sidecar.url, {"Authorization": f"Bearer {KEY_C}"})
    assert status == 401  # not looked at again within the hour
    status, _, _ = await chat(http, sidecar.url, {"Authorization": f"Bearer {KEY_B}"})
    assert status == 200


async def test_a_missing_keys_file_keeps_the_sidecar_from_starting(
    make_sidecar: SidecarFactory, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="keys_file: cannot read"):
        await make_sidecar(chain(keys_file=str(tmp_path / "absent.yaml")))


async def test_anonymous_requests_and_a_trusted_tenant_header(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(chain(allow_anonymous=True, tenant_header="X-Tenant"))
    status, headers, _ = await chat(http, sidecar.url)
    assert status == 200
    assert (headers["X-Test-Tenant"], headers["X-Test-Auth"]) == ("anonymous", "anonymous")
    status, headers, _ = await chat(http, sidecar.url, {"X-Tenant": "team-z"})
    assert (headers["X-Test-Tenant"], headers["X-Test-Auth"]) == ("team-z", "header")
    # A key wins over the header, and a wrong key is still refused.
    status, headers, _ = await chat(
        http, sidecar.url, {"X-Tenant": "team-z", "Authorization": f"Bearer {KEY_A}"}
    )
    assert headers["X-Test-Tenant"] == "team-a"
    status, _, _ = await chat(http, sidecar.url, {"Authorization": f"Bearer {WRONG}"})
    assert status == 401
    status, _, body = await chat(http, sidecar.url, {"X-Tenant": "no/such thing"})
    assert status == 400 and body["error"]["code"] == "invalid_tenant"


async def test_no_key_appears_in_any_log_line(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession, json_logs: JsonLogs
) -> None:
    sidecar = await make_sidecar(chain())
    for headers in (
        {"Authorization": f"Bearer {KEY_A}"},
        {"Authorization": f"Bearer {WRONG}"},
        {"x-api-key": WRONG},
        {"x-api-key": KEY_A},
        {},
    ):
        await chat(http, sidecar.url, headers)
    lines = json_logs()
    assert [line["status"] for line in lines if line.get("event") == "request"] == [
        200,
        401,
        401,
        200,
        401,
    ]
    logged = b"\n".join(orjson.dumps(line) for line in lines)
    metrics = sidecar.metrics.render()
    for secret in (KEY_A, WRONG, sha(KEY_A), sha(WRONG)):
        assert secret.encode() not in logged
        assert secret.encode() not in metrics


@pytest.mark.parametrize(
    ("options", "path", "message"),
    [
        ({}, "policies[0].auth", "at least one key source"),
        (
            {"keys": [{"key_sha256": "abc", "tenant": "t"}]},
            "policies[0].auth.keys[0].key_sha256",
            "String should match pattern",
        ),
        (
            {"keys": [{"key_sha256": sha(KEY_A), "tenant": "no spaces"}]},
            "policies[0].auth.keys[0].tenant",
            "String should match pattern",
        ),
        ({"keys": [{"key": "short", "tenant": "t"}]}, "policies[0].auth.keys[0]", "16 to 4096"),
        (
            {"keys": [{"key": KEY_A, "key_sha256": sha(KEY_A), "tenant": "t"}]},
            "policies[0].auth.keys[0]",
            "not both",
        ),
        (
            {"keys": [{"key": KEY_A, "tenant": "a"}, {"key": KEY_A, "tenant": "b"}]},
            "policies[0].auth",
            "one key is given for two tenants",
        ),
        ({"keys_env": "1-BAD"}, "policies[0].auth.keys_env", "String should match pattern"),
        (
            {"keys_env": "K", "tenant_header": "X-Tenant"},
            "policies[0].auth",
            "set allow_anonymous: true",
        ),
        (
            {"keys_env": "K", "tenants": {"bad name": {}}},
            "policies[0].auth.tenants",
            "invalid tenant name(s) 'bad name'",
        ),
        (
            {"keys_env": "K", "file_check_interval": "0s"},
            "policies[0].auth.file_check_interval",
            "greater than or equal",
        ),
        ({"keys_env": "K", "keys_fiel": "/x"}, "policies[0].auth.keys_fiel", "unknown setting"),
    ],
)
def test_config_problems_are_reported_with_their_yaml_path(
    options: dict[str, Any], path: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings({"policies": [{"auth": options}]})
    problems = caught.value.problems
    assert any(where == path and message in text for where, text in problems), problems
    assert all(KEY_A not in text for _, text in problems)


def test_check_config_lists_auth_problems_without_the_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        "policies:\n"
        "  - auth:\n"
        "      keys:\n"
        f"        - {{key: {KEY_A}, tenant: 'team a'}}\n"
        "        - {key_sha256: nothex, tenant: team-b}\n"
        "      tenant_header: X-Tenant\n"
    )
    assert main(["check-config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "policies[0].auth.keys[0].tenant:" in out
    assert "policies[0].auth.keys[1].key_sha256:" in out
    assert KEY_A not in out and sha(KEY_A) not in out
    config.write_text(
        f"policies:\n  - auth: {{keys: [{{key_sha256: {sha(KEY_A)}, tenant: team-a}}]}}\n"
    )
    assert main(["check-config", str(config)]) == 0
    assert "1 policy: auth" in capsys.readouterr().out


async def test_only_digests_are_kept_and_a_reload_swaps_the_keys(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(chain())
    assert sidecar.runtime is not None
    (auth,) = [policy for name, policy in sidecar.runtime.policies if name == "auth"]
    assert isinstance(auth, policies.auth.Auth)
    assert auth.keys == {hashlib.sha256(KEY_A.encode()).digest(): "team-a"}
    replaced = settings_for(
        fake.url,
        [{"auth": {"keys": [{"key": KEY_B, "tenant": "team-b"}]}}, ECHO],
    )
    assert await sidecar.apply(replaced)
    status, _, _ = await chat(http, sidecar.url, {"Authorization": f"Bearer {KEY_A}"})
    assert status == 401
    status, headers, _ = await chat(http, sidecar.url, {"Authorization": f"Bearer {KEY_B}"})
    assert status == 200 and headers["X-Test-Tenant"] == "team-b"


def direct_auth(**options: Any) -> policies.auth.Auth:
    """An Auth policy built outside a sidecar, called directly in the tests below."""
    settings = settings_for("http://127.0.0.1:9", [])
    config = validate(
        policies.auth.AuthConfig,
        {"keys": [{"key_sha256": sha(KEY_A), "tenant": "team-a"}], **options},
    )
    return policies.auth.Auth(config, PolicyContext(settings=settings, metrics=Metrics()))


async def admitted(auth: policies.auth.Auth, headers: dict[str, str]) -> str | None:
    """The tenant auth gives a request with `headers`, None when it is refused."""
    match = find_route("/v1/chat/completions")
    exchange = Exchange(
        method="POST",
        route=match.route,
        path=match.upstream_path,
        query_string="",
        headers=CIMultiDictProxy(CIMultiDict(headers)),
        body=orjson.dumps(CHAT),
    )

    async def answer(exchange: Exchange) -> Reply:
        return Reply(200, CIMultiDict())

    try:
        await auth(exchange, answer)
    except SidecarError as error:
        assert error.status == 401
        return None
    return str(exchange.facts["tenant"])


async def test_a_known_header_value_is_not_hashed_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    auth = direct_auth()
    hashed: list[str] = []
    digest = policies.auth.key_digest

    def counting(key: str) -> bytes:
        hashed.append(key)
        return digest(key)

    monkeypatch.setattr(policies.auth, "key_digest", counting)
    for _ in range(3):
        assert await admitted(auth, {"Authorization": f"Bearer {KEY_A}"}) == "team-a"
        assert await admitted(auth, {"x-api-key": KEY_A}) == "team-a"
    assert len(hashed) == 2  # once per header it came in
    # A wrong key is never remembered: each one is hashed and refused.
    for _ in range(2):
        assert await admitted(auth, {"Authorization": f"Bearer {WRONG}"}) is None
        assert await admitted(auth, {"x-api-key": WRONG}) is None
    assert len(hashed) == 6
    # What Authorization carries is not an x-api-key value, nor the other way round.
    assert await admitted(auth, {"x-api-key": f"Bearer {KEY_A}"}) is None
    assert await admitted(auth, {"Authorization": KEY_A}) is None


async def test_remembered_header_values_are_bounded_and_forgotten_with_the_keys() -> None:
    auth = direct_auth()
    # Header values that differ only in padding all carry KEY_A.
    for padding in range(policies.auth._SEEN_MAX + 10):
        header = f"Bearer {KEY_A}" + " " * padding
        assert await admitted(auth, {"Authorization": header}) == "team-a"
    assert 0 < len(auth._by_authorization) <= policies.auth._SEEN_MAX
    assert await admitted(auth, {"Authorization": f"Bearer {KEY_A}"}) == "team-a"
    assert await admitted(auth, {"x-api-key": KEY_A}) == "team-a"
    # The keys change (a Secret rotated): team-a's key stops working at once.
    auth.keys = {hashlib.sha256(KEY_B.encode()).digest(): "team-b"}
    assert await admitted(auth, {"Authorization": f"Bearer {KEY_A}"}) is None
    assert await admitted(auth, {"x-api-key": KEY_A}) is None
    assert await admitted(auth, {"Authorization": f"Bearer {KEY_B}"}) == "team-b"
