"""auth: client keys, each mapped to a tenant; a missing or wrong key is a 401.

Clients send their key as OpenAI clients do, `Authorization: Bearer <key>`, or
as Anthropic-shaped clients do, `x-api-key: <key>` (when both are present the
Authorization header is the one checked). The configured keys are kept only as
SHA-256 digests: a request's key is hashed first and the digest looked up, so
no configured key is ever compared as plaintext and the time taken does not
depend on how much of a key was right. A header value whose key was found is
then remembered with its tenant (at most 1,024 values, all forgotten whenever
the keys change, so a removed key stops working at once): a returning client
costs one dict lookup, not a hash. Neither header reaches the upstream.

Keys come from up to three sources, merged (the same key for two tenants is an
error):

- `keys` in the YAML: `[{key_sha256: <64 hex>, tenant: team-a}]`, or
  `{key: <plaintext>, tenant: ...}`, which is hashed when the YAML is loaded
  and never kept;
- `keys_env`: the name of an environment variable whose value is a YAML (or
  JSON) list of the same shape, read when the policy is built (start, reload);
- `keys_file`: a file with a YAML list of the same shape, typically a mounted
  Kubernetes Secret. Secrets change independently of the ConfigMap, so on a
  request, at most every `file_check_interval`, the file is `os.stat`-ed
  (through the kubelet's symlinks) and re-read when it changed; a file that
  became unreadable or invalid is logged and counted, and the last good keys
  stay in force.

The tenant goes to `exchange.facts["tenant"]` (what ratelimit, metering and
budgets key on), the tenant's free-form `tenants:` entry (read-only) to
`facts["tenant_overrides"]`, and how the request was admitted ("key",
"anonymous" or "header") to `facts["auth"]`.

`allow_anonymous: true` lets requests without any key through as tenant
`anonymous` (a wrong key is still a 401). With it, `tenant_header` names a
header the tenant is then taken from: anyone who can reach the sidecar can set
it, so use it only where every client is trusted (a pod-local listener, say).
A request that carries a key is always the key's tenant; the header is ignored.

`upstream_api_key_env` names an environment variable (read at build) holding a
key for the upstream (an Ollama behind an authenticating gateway); it is sent
as `Authorization: Bearer ...` on every upstream request.

Keys never appear in logs, metrics or error messages. Failures are counted in
`ollama_sidecar_auth_failures_total{reason="missing"|"invalid"}`, key-file
re-reads in `ollama_sidecar_auth_key_reloads_total{result="applied"|"rejected"}`.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Annotated, Any, ClassVar

import structlog
import yaml
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.chain import Next, PolicyContext, register
from sidecar.errors import SidecarError
from sidecar.exchange import Exchange, Reply
from sidecar.knobs import STRICT, AfterValidator, BeforeValidator, Duration, Field, validate

log = structlog.get_logger("sidecar.auth")

ANONYMOUS = "anonymous"
MIN_KEY_LENGTH = 16
MAX_KEY_LENGTH = 4096

TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
_TENANT = re.compile(TENANT_PATTERN)
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
_HEADER_NAME = r"^[A-Za-z0-9-]{1,64}$"
_NO_OVERRIDES: Mapping[str, Any] = MappingProxyType({})
# Header values remembered with their tenant (see Auth.__init__); more empty the table.
_SEEN_MAX = 1024

MISSING_MESSAGE = "missing API key: send it as `Authorization: Bearer <key>` or `x-api-key: <key>`"
INVALID_MESSAGE = "invalid API key"
# RFC 9110 §11.6.1: a 401 says which scheme it wants.
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="ollama-sidecar"'}


def key_digest(key: str) -> bytes:
    """SHA-256 of a key as it arrives in a header (aiohttp decodes odd bytes as surrogates)."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def _hash_plaintext(data: Any) -> Any:
    """A key entry given as `{key, tenant}` as `{key_sha256, tenant}`."""
    # `key:` is a convenience: it is replaced by its digest here, so the
    # plaintext is never stored, and no message below repeats it.
    if not isinstance(data, dict) or "key" not in data:
        return data
    if "key_sha256" in data:
        raise ValueError("give either `key` or `key_sha256`, not both")
    data = dict(data)
    key = data.pop("key")
    if not isinstance(key, str):
        raise ValueError("`key` must be a string")
    if not MIN_KEY_LENGTH <= len(key) <= MAX_KEY_LENGTH:
        raise ValueError(f"`key` must be {MIN_KEY_LENGTH} to {MAX_KEY_LENGTH} characters long")
    if any(character.isspace() for character in key):
        raise ValueError("`key` must not contain whitespace")
    data["key_sha256"] = key_digest(key).hex()
    return data


def _lower(value: str) -> str:
    return value.lower()


@dataclass(frozen=True, kw_only=True)
class KeyEntry:
    """One client key: its SHA-256 (or the key itself, hashed at load) and its tenant.

    Wherever entries are validated, `_hash_plaintext` runs first (a
    BeforeValidator on the entry's type), so `{key, tenant}` is accepted too.
    """

    __pydantic_config__ = STRICT

    key_sha256: Annotated[
        str,
        AfterValidator(_lower),
        Field(
            pattern=r"^[0-9a-fA-F]{64}$",
            description="SHA-256 of the key, 64 hex digits (`printf %s KEY | sha256sum`).",
        ),
    ]
    tenant: Annotated[
        str,
        Field(
            pattern=TENANT_PATTERN,
            description="Tenant the key belongs to: 1-63 of A-Z a-z 0-9 . _ -, starting alphanumeric.",
        ),
    ]


def _tenant_names(value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    bad = sorted(name for name in value if not _TENANT.match(name))
    if bad:
        raise ValueError(
            f"invalid tenant name(s) {', '.join(map(repr, bad))}: "
            "1-63 of A-Z a-z 0-9 . _ -, starting alphanumeric"
        )
    return value


@dataclass(frozen=True, kw_only=True)
class AuthConfig:
    __pydantic_config__ = STRICT

    keys: Annotated[
        tuple[Annotated[KeyEntry, BeforeValidator(_hash_plaintext)], ...],
        Field(
            max_length=100_000,
            description="Client keys in the YAML: {key_sha256, tenant}, or {key, tenant} (hashed at load).",
        ),
    ] = ()
    keys_env: Annotated[
        str | None,
        Field(
            pattern=_ENV_NAME,
            description="Environment variable holding more keys, a YAML/JSON list of the same shape.",
        ),
    ] = None
    keys_file: Annotated[
        str | None,
        Field(
            min_length=1,
            max_length=4096,
            description="File (a mounted Secret) holding more keys, a YAML list; re-read on change.",
        ),
    ] = None
    file_check_interval: Annotated[
        Duration,
        Field(
            ge=0.05,
            le=3600,
            description="Longest time between two checks (one os.stat, on a request) of keys_file.",
        ),
    ] = 5.0
    tenants: Annotated[
        dict[str, dict[str, Any]],
        AfterValidator(_tenant_names),
        Field(
            description="Per-tenant overrides (limits, budgets) other policies read, by tenant name.",
        ),
    ] = field(default_factory=dict)
    allow_anonymous: Annotated[
        bool, Field(description="Let requests without a key through as tenant `anonymous`.")
    ] = False
    tenant_header: Annotated[
        str | None,
        Field(
            pattern=_HEADER_NAME,
            description="With allow_anonymous, take a keyless request's tenant from this header (trusted networks only).",
        ),
    ] = None
    upstream_api_key_env: Annotated[
        str | None,
        Field(
            pattern=_ENV_NAME,
            description="Environment variable with a key sent upstream as `Authorization: Bearer`.",
        ),
    ] = None

    def __post_init__(self) -> None:
        if not self.keys and self.keys_env is None and self.keys_file is None:
            raise ValueError("auth needs at least one key source: keys, keys_env or keys_file")
        if self.tenant_header is not None and not self.allow_anonymous:
            raise ValueError(
                "tenant_header applies only to requests without a key: set allow_anonymous: true"
            )
        merge_keys({}, self.keys, "keys")


def merge_keys(
    into: dict[bytes, str], entries: tuple[KeyEntry, ...] | list[KeyEntry], source: str
) -> dict[bytes, str]:
    """Add `entries` to a digest → tenant table; one key for two tenants is an error."""
    for entry in entries:
        digest = bytes.fromhex(entry.key_sha256)
        tenant = into.setdefault(digest, entry.tenant)
        if tenant != entry.tenant:
            raise ValueError(
                f"{source}: one key is given for two tenants ({tenant} and {entry.tenant})"
            )
    return into


def parse_key_list(text: str, source: str) -> list[KeyEntry]:
    """A YAML (or JSON) list of {key_sha256|key, tenant}; errors name the entry, never the key."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError:
        # The YAML error would quote the offending line, which may hold a key.
        raise ValueError(f"{source}: not valid YAML") from None
    if document is None:
        return []
    # Imports pydantic, on this path only: keys_env and keys_file are read where
    # the policy is built and when keys_file changes, not on every request.
    from pydantic import ValidationError

    try:
        entries: list[KeyEntry] = validate(
            list[Annotated[KeyEntry, BeforeValidator(_hash_plaintext)]], document
        )
    except ValidationError as exc:
        problems = []
        for detail in exc.errors(include_url=False, include_input=False, include_context=False):
            where = "".join(
                f"[{part}]" if isinstance(part, int) else f".{part}" for part in detail["loc"]
            )
            message = detail["msg"].removeprefix("Value error, ")
            if detail["type"] == "unexpected_keyword_argument":
                # A dataclass's wording for it; the YAML has no keyword arguments.
                message = "Extra inputs are not permitted"
            problems.append(f"{source}{where}: {message}")
        raise ValueError("; ".join(problems)) from None
    return entries


def _read_key_file(path: str) -> tuple[bytes, list[KeyEntry]]:
    try:
        with open(path, "rb") as file:
            raw = file.read(16 * 1024**2 + 1)
    except OSError as exc:
        raise ValueError(f"keys_file: cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > 16 * 1024**2:
        raise ValueError(f"keys_file: {path} is larger than 16 MiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"keys_file: {path} is not UTF-8 text") from None
    return hashlib.sha256(raw).digest(), parse_key_list(text, "keys_file")


def _file_signature(path: str) -> tuple[int, int, int, int] | None:
    try:
        stat = os.stat(path)  # follows the Secret's ..data symlink
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size)


@register("auth")
class Auth:
    """Check the client's key, name its tenant, keep both keys away from the upstream."""

    config_model: ClassVar[type[Any]] = AuthConfig

    def __init__(self, config: AuthConfig, context: PolicyContext) -> None:
        self.clock = context.clock
        self.allow_anonymous = config.allow_anonymous
        self.tenant_header = config.tenant_header
        self.forward_authorization = context.settings.upstream.forward_authorization
        self.overrides: dict[str, Mapping[str, Any]] = {
            tenant: MappingProxyType(dict(values)) for tenant, values in config.tenants.items()
        }
        base = merge_keys({}, config.keys, "keys")
        if config.keys_env is not None:
            value = os.environ.get(config.keys_env)
            if value is None:
                raise ValueError(
                    f"auth.keys_env: the environment variable {config.keys_env} is not set"
                )
            merge_keys(base, parse_key_list(value, f"keys_env {config.keys_env}"), "keys_env")
        self._base_keys = base
        # Tenants by the header value a client presented (Authorization, or x-api-key
        # without one), so a known client costs a dict lookup, not a SHA-256. Only
        # keys found are kept, at most _SEEN_MAX header values, and the table is
        # emptied whenever the keys change: a removed key stops working at once.
        self._by_authorization: dict[str, str] = {}
        self._by_api_key: dict[str, str] = {}
        self.keys = base
        self.upstream_authorization: str | None = None
        if config.upstream_api_key_env is not None:
            upstream_key = os.environ.get(config.upstream_api_key_env, "").strip()
            if not upstream_key or not upstream_key.isprintable():
                raise ValueError(
                    f"auth.upstream_api_key_env: the environment variable "
                    f"{config.upstream_api_key_env} is not set, empty or not printable"
                )
            self.upstream_authorization = f"Bearer {upstream_key}"
        failures = context.metrics.counter(
            "auth_failures_total", "Requests refused by auth, by reason.", ("reason",)
        )
        self._missing = failures.labels("missing")
        self._invalid = failures.labels("invalid")
        reloads = context.metrics.counter(
            "auth_key_reloads_total", "Re-reads of auth.keys_file after it changed.", ("result",)
        )
        self._reload_applied = reloads.labels("applied")
        self._reload_rejected = reloads.labels("rejected")
        self.keys_file = config.keys_file
        self.file_check_interval = config.file_check_interval
        self._next_check = 0.0
        self._file_signature: tuple[int, int, int, int] | None = None
        self._file_hash = b""
        if self.keys_file is not None:
            self._file_signature = _file_signature(self.keys_file)
            self._file_hash, entries = _read_key_file(self.keys_file)
            self.keys = merge_keys(dict(base), entries, "keys_file")
            self._next_check = self.clock() + self.file_check_interval
        if not self.keys:
            log.warning(
                "auth_no_keys",
                reason="no client key is configured yet; every keyed request is refused",
            )

    @property
    def keys(self) -> dict[bytes, str]:
        """The client keys in force: digest → tenant."""
        return self._keys

    @keys.setter
    def keys(self, keys: dict[bytes, str]) -> None:
        self._keys = keys
        self._by_authorization.clear()
        self._by_api_key.clear()

    def _refresh_keys_file(self, now: float) -> None:
        """Re-read keys_file if its stat changed; a bad file keeps the last good keys."""
        assert self.keys_file is not None
        self._next_check = now + self.file_check_interval
        signature = _file_signature(self.keys_file)
        if signature == self._file_signature:
            return
        self._file_signature = signature
        try:
            content_hash, entries = _read_key_file(self.keys_file)
            if content_hash == self._file_hash:
                return
            keys = merge_keys(dict(self._base_keys), entries, "keys_file")
        except ValueError as exc:
            self._reload_rejected.inc()
            log.warning("auth_keys_file_rejected", error=str(exc), keeping=len(self.keys))
            return
        self._file_hash = content_hash
        self.keys = keys
        self._reload_applied.inc()
        log.info("auth_keys_file_reloaded", keys=len(keys))

    def _refuse(self, missing: bool) -> SidecarError:
        if missing:
            self._missing.inc()
            return SidecarError(401, MISSING_MESSAGE, code="invalid_api_key", headers=_CHALLENGE)
        self._invalid.inc()
        return SidecarError(401, INVALID_MESSAGE, code="invalid_api_key", headers=_CHALLENGE)

    def __call__(self, exchange: Exchange, call_next: Next) -> Awaitable[Reply]:
        # Not a coroutine: auth has nothing to do with the reply, so it hands back
        # the next step's awaitable (a refusal raises as the caller awaits it).
        if self.keys_file is not None:
            now = self.clock()
            if now >= self._next_check:
                self._refresh_keys_file(now)
        headers = exchange.headers
        authorization = headers.get("Authorization")
        api_key = headers.get("x-api-key")
        facts = exchange.facts
        if authorization is not None:
            tenant = self._by_authorization.get(authorization)
            if tenant is None:
                scheme, _, token = authorization.strip().partition(" ")
                key = token.strip() if scheme.lower() == "bearer" else ""
                tenant = self._tenant_of(key, self._by_authorization, authorization)
        elif api_key is not None:
            tenant = self._by_api_key.get(api_key)
            if tenant is None:
                tenant = self._tenant_of(api_key.strip(), self._by_api_key, api_key)
        else:
            if not self.allow_anonymous:
                raise self._refuse(missing=True)
            tenant = ANONYMOUS
            facts["auth"] = "anonymous"
            if self.tenant_header is not None:
                claimed = headers.get(self.tenant_header)
                if claimed is not None:
                    if not _TENANT.match(claimed):
                        raise SidecarError(
                            400,
                            f"the {self.tenant_header} header is not a valid tenant name",
                            code="invalid_tenant",
                        )
                    tenant = claimed
                    facts["auth"] = "header"
        if authorization is not None or api_key is not None:
            facts["auth"] = "key"
            if api_key is not None or (authorization is not None and self.forward_authorization):
                # The core forwards x-api-key (and Authorization when configured to):
                # the sidecar's key must not leave the pod.
                trimmed = CIMultiDict(headers)
                trimmed.popall("x-api-key", None)
                trimmed.popall("Authorization", None)
                exchange.headers = CIMultiDictProxy(trimmed)
        facts["tenant"] = tenant
        facts["tenant_overrides"] = self.overrides.get(tenant, _NO_OVERRIDES)
        if self.upstream_authorization is not None:
            exchange.upstream_headers["Authorization"] = self.upstream_authorization
        return call_next(exchange)

    def _tenant_of(self, key: str, seen: dict[str, str], presented: str) -> str:
        """The tenant of a key (hashed, then looked up), remembered by its header value."""
        # Hash first, then look up: the lookup's timing depends on the digest, never
        # on how much of a plaintext key matched.
        found = self._keys.get(key_digest(key)) if key else None
        if found is None:
            raise self._refuse(missing=False)
        if len(seen) >= _SEEN_MAX:
            seen.clear()
        seen[presented] = found
        return found
