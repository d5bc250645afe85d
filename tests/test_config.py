"""Config: units, defaults, every problem reported with its YAML path, env and CLI overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.cli import main
from sidecar.config import ConfigError, Settings, load_settings, parse_settings
from sidecar.schema import Option, options_of
from sidecar.units import parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("2s", 2.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        (3, 3.0),
        ("7", 7.0),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "2 days", "-1s", "s", True, None, [1]])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"), [("32MiB", 32 * 1024**2), ("1KB", 1000), ("512kib", 524288), (10, 10)]
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


def test_no_file_gives_the_embedded_default() -> None:
    settings = load_settings(None, environ={})
    assert settings.listen.host == "127.0.0.1"
    assert settings.listen.port == 11435
    assert settings.upstream.url == "http://127.0.0.1:11434"
    assert [policy.name for policy in settings.policies] == ["correlation"]
    assert settings.limits.max_body == 32 * 1024**2
    assert settings.upstream.timeouts.first_byte == 300


def test_every_problem_is_reported_with_its_yaml_path() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings(
            {
                "listen": {"port": 70000, "hots": "x"},
                "upstream": {"url": "ftp://nowhere", "timeouts": {"idle": "soon"}},
                "limits": {"max_body": "lots"},
                "management": {"allow": ["pull", "format-disk"]},
                "policies": [
                    {"correlation": {"headr": "X"}},
                    {"no_such_policy": {}},
                    {"a": {}, "b": {}},
                ],
            }
        )
    paths = {path for path, _ in caught.value.problems}
    assert paths == {
        "listen.port",
        "listen.hots",
        "upstream.url",
        "upstream.timeouts.idle",
        "limits.max_body",
        "management.allow[1]",
        "policies[0].correlation.headr",
        "policies[1]",
        "policies[2]",
    }
    messages = dict(caught.value.problems)
    assert messages["listen.hots"] == "unknown setting"
    assert "unknown policy 'no_such_policy'" in messages["policies[1]"]
    assert "correlation" in messages["policies[1]"]


def test_policies_keep_their_order_and_an_empty_list_is_pass_through() -> None:
    assert parse_settings({"policies": []}).policies == ()
    settings = parse_settings({"policies": ["correlation", {"correlation": None}]})
    assert [policy.name for policy in settings.policies] == ["correlation", "correlation"]


def test_a_policy_can_be_named_as_module_colon_class() -> None:
    settings = parse_settings({"policies": [{"policies.correlation:Correlation": {}}]})
    assert settings.policies[0].name == "policies.correlation:Correlation"
    with pytest.raises(ConfigError, match="cannot load policy"):
        parse_settings({"policies": [{"no.such.module:Thing": {}}]})
    with pytest.raises(ConfigError, match="is not a policy"):
        parse_settings({"policies": [{"sidecar.units:parse_size": {}}]})


def test_environment_overrides_the_file_and_flags_override_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text("listen: {port: 9000}\nupstream: {url: http://10.0.0.1:11434}\n")
    environ = {"SIDECAR_CONFIG": str(config), "SIDECAR_PORT": "9001", "SIDECAR_LOG_LEVEL": "debug"}
    settings = load_settings(None, environ=environ)
    assert settings.listen.port == 9001
    assert settings.upstream.url == "http://10.0.0.1:11434"
    assert settings.logging.level == "debug"
    settings = load_settings(
        None, environ=environ, overrides={("listen", "port"): 9002, ("listen", "host"): None}
    )
    assert settings.listen.port == 9002
    assert settings.listen.host == "127.0.0.1"


def test_bad_environment_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, environ={"SIDECAR_PORT": "eighty"})
    assert caught.value.problems[0][0] == "listen.port"


def test_check_config_prints_every_problem_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("listen:\n  port: 0.5\npolicies:\n  - retry_forever: {}\n")
    assert main(["check-config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "listen.port:" in out
    assert "policies[0]: unknown policy 'retry_forever'" in out


def test_check_config_valid_file_exits_0_with_a_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "good.yaml"
    config.write_text("upstream:\n  url: http://127.0.0.1:1234/\n  timeouts: {first_byte: 2m}\n")
    assert main(["check-config", str(config)]) == 0
    out = capsys.readouterr().out.strip()
    assert out.endswith(
        "ok: listen 127.0.0.1:11435, upstream http://127.0.0.1:1234, 1 policy: correlation"
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("listen: [1, 2\n", "line 2"),
        ("- just\n- a list\n", "the top level must be a mapping"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_unreadable_yaml_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | bytes, expected: str
) -> None:
    config = tmp_path / "broken.yaml"
    if isinstance(content, bytes):
        config.write_bytes(content)
    else:
        config.write_text(content)
    assert main(["check-config", str(config)]) == 1
    assert expected in capsys.readouterr().out


def test_missing_file_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "/nonexistent/sidecar.yaml"]) == 1
    assert "cannot read" in capsys.readouterr().out


def test_empty_file_is_the_default(tmp_path: Path) -> None:
    config = tmp_path / "empty.yaml"
    config.write_text("")
    assert load_settings(config, environ={}).summary().endswith("1 policy: correlation")


def test_example_config_is_valid() -> None:
    example = Path(__file__).parent.parent / "examples" / "sidecar.yaml"
    settings = load_settings(example, environ={})
    assert settings.policies


def _fields(model: type[Any], prefix: str = "") -> list[tuple[str, Option]]:
    found = []
    for option in options_of(model):
        found.append((prefix + option.name, option))
        if isinstance(option.annotation, type) and dataclasses.is_dataclass(option.annotation):
            found.extend(_fields(option.annotation, f"{prefix}{option.name}."))
    return found


def test_every_setting_has_a_description_and_a_default() -> None:
    for path, option in _fields(Settings):
        assert option.description, f"{path} has no one-line help"
        assert not option.required, f"{path} has no default"


def test_the_example_shows_every_setting() -> None:
    example = (Path(__file__).parent.parent / "examples" / "sidecar.yaml").read_text()
    document = yaml.safe_load(example)
    for path, _ in _fields(Settings):
        node: Any = document
        for part in path.split("."):
            assert isinstance(node, dict) and part in node, f"examples/sidecar.yaml lacks {path}"
            node = node[part]


def test_third_party_policies_load_from_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib.metadata import EntryPoint

    from sidecar import chain

    entry = EntryPoint("tagger", "policies.correlation:Correlation", chain.ENTRY_POINT_GROUP)
    monkeypatch.setattr(
        chain, "entry_points", lambda group: [entry] if group == entry.group else []
    )
    settings = parse_settings({"policies": [{"tagger": {"header": "X-Trace"}}]})
    from policies.correlation import Correlation

    assert settings.policies[0].factory is Correlation


def test_route_timeouts_name_known_routes_and_inherit_the_rest() -> None:
    settings = parse_settings(
        {"upstream": {"route_timeouts": {"/api/embed": {"first_byte": "30s"}}}}
    )
    embed = settings.upstream.timeouts_for("/api/embed")
    assert embed.first_byte == 30
    assert embed.idle == settings.upstream.timeouts.idle
    assert settings.upstream.timeouts_for("/api/chat") == settings.upstream.timeouts
    with pytest.raises(ConfigError) as caught:
        parse_settings({"upstream": {"route_timeouts": {"/api/nope": {"idle": "1s"}}}})
    assert caught.value.problems[0][0] == "upstream.route_timeouts"
    assert "unknown route" in caught.value.problems[0][1]
