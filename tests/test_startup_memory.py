"""Start-up memory: a config imports the policy modules it names and no others.

Each built-in policy's module (and what it imports) costs resident memory for
the life of the process; issue 7 caps the sidecar's peak RSS. These run in a
fresh interpreter, since the test process has imported every policy already.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import orjson
import pytest

import policies
from sidecar import chain
from sidecar.config import ConfigError, load_settings, parse_settings
from sidecar.isolated_config import load_settings_isolated

ROOT = Path(__file__).resolve().parent.parent


def imported_after(code: str) -> set[str]:
    """The modules a fresh interpreter has imported after running `code`."""
    script = (
        textwrap.dedent(code)
        + "\nimport sys, orjson\nprint(orjson.dumps(sorted(sys.modules)).decode())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return set(orjson.loads(result.stdout.splitlines()[-1]))


def policy_modules(modules: set[str]) -> set[str]:
    return {name for name in modules if name.startswith("policies.")}


def test_a_config_imports_only_the_policies_it_names(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text("policies:\n  - correlation: {}\n  - retry: {}\n", encoding="utf-8")
    modules = imported_after(
        f"""
        from sidecar.config import load_settings
        settings = load_settings({str(config)!r}, environ={{}})
        assert [policy.name for policy in settings.policies] == ["correlation", "retry"]
        import sidecar.app
        """
    )
    assert policy_modules(modules) == {"policies.correlation", "policies.retry"}
    # What the policies left out would have brought with them.
    assert not {"aiocache", "redis", "opentelemetry"} & modules


def test_the_running_sidecar_never_imports_pydantic_or_yaml(tmp_path: Path) -> None:
    # Settings come validated from a child process (sidecar/isolated_config.py);
    # the serving process only imports the modules that run the chain.
    config = tmp_path / "sidecar.yaml"
    config.write_text("policies: [correlation, metering, circuit_breaker, retry]\n")
    modules = imported_after(
        f"""
        from sidecar.isolated_config import load_settings_isolated
        settings = load_settings_isolated({str(config)!r})
        assert [policy.name for policy in settings.policies] == [
            "correlation", "metering", "circuit_breaker", "retry"
        ]
        assert settings.policies[1].options.__class__.__name__ == "MeteringConfig"
        import sidecar.app, sidecar.cli, sidecar.reload, sidecar.runtime
        """
    )
    assert not {"pydantic", "pydantic_core", "yaml", "importlib.metadata"} & modules


def test_every_builtin_policy_module_imports_without_pydantic() -> None:
    # A config model is a plain dataclass; pydantic reads it only when validating.
    modules = imported_after(
        "import policies\n"
        + "".join(f"import {module}\n" for module in policies.BUILTIN_MODULES.values())
    )
    assert policy_modules(modules) == set(policies.BUILTIN_MODULES.values())
    assert not {"pydantic", "pydantic_core"} & modules


def test_a_bad_config_comes_back_from_the_child_with_every_problem(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text("listen: {port: -1}\npolicies: [{retry: {attempts: 0}}, {nope: {}}]\n")
    with pytest.raises(ConfigError) as caught:
        load_settings_isolated(config)
    paths = [path for path, _ in caught.value.problems]
    assert paths == ["listen.port", "policies[0].retry.attempts", "policies[1]"]


def test_the_child_validates_what_the_parent_would(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        "upstream: {timeouts: {connect: 250ms}, route_timeouts: {/api/embed: {total: 5m}}}\n"
        "policies: [correlation, {retry: {attempts: 2, base: 50ms}}, {metering: {}}]\n"
    )
    overrides: dict[tuple[str, ...], Any] = {("listen", "port"): 0}
    assert load_settings_isolated(config, overrides=overrides) == load_settings(
        config, environ=os.environ, overrides=overrides
    )


def test_importing_the_policies_package_imports_no_policy() -> None:
    modules = imported_after("import policies")
    assert policy_modules(modules) == set()


def test_schema_and_an_unknown_name_still_see_every_builtin() -> None:
    modules = imported_after(
        """
        from sidecar.chain import builtin_policy_names
        assert len(builtin_policy_names()) == 13
        """
    )
    assert policy_modules(modules) == set(policies.BUILTIN_MODULES.values())


def test_the_registry_names_every_policy_module_under_its_registered_name() -> None:
    files = {path.stem for path in (ROOT / "policies").glob("*.py")} - {"__init__"}
    assert {module.removeprefix("policies.") for module in policies.BUILTIN_MODULES.values()} == (
        files
    )
    for name, module in policies.BUILTIN_MODULES.items():
        factory = chain.find_policy(name)
        assert factory.__module__ == module, f"{name!r} is registered by {factory.__module__}"
    assert set(policies.BUILTIN_MODULES) <= set(chain.builtin_policy_names())


def test_a_policy_module_is_an_attribute_of_the_package() -> None:
    modules = imported_after(
        """
        import policies
        assert policies.correlation.__name__ == "policies.correlation"
        try:
            policies.no_such_policy
        except AttributeError:
            pass
        else:
            raise AssertionError("an unknown attribute must raise AttributeError")
        """
    )
    assert policy_modules(modules) == {"policies.correlation"}


def test_a_builtin_module_that_cannot_be_imported_is_a_config_problem(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Imported when first named, possibly on a reload: the watcher must get a
    # ConfigError (and keep the running config), not an ImportError.
    monkeypatch.setitem(policies.BUILTIN_MODULES, "broken_policy", "policies.no_such_module")
    with pytest.raises(ConfigError) as caught:
        parse_settings({"policies": [{"broken_policy": {}}]})
    ((path, message),) = caught.value.problems
    assert path == "policies[0]"
    assert message.startswith("cannot load policy 'broken_policy': ")
