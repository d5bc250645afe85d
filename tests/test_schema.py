"""The JSON Schema and the policy reference are generated from the models and agree with them."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

from sidecar.cli import main
from sidecar.schema import json_schema, policy_reference

ROOT = Path(__file__).parent.parent


def test_the_example_config_validates_against_the_schema() -> None:
    document = yaml.safe_load((ROOT / "examples" / "sidecar.yaml").read_text())
    jsonschema.Draft202012Validator(json_schema()).validate(document)


@pytest.mark.parametrize(
    "document",
    [
        {"listen": {"hots": "x"}},
        {"upstream": {"timeouts": {"idle": "soon"}}},
        {"policies": [{"no_such_policy": {}}]},
        {"policies": [{"correlation": {"headr": "x"}}]},
        {"limits": {"max_body": "lots"}},
    ],
)
def test_the_schema_rejects_what_check_config_rejects(document: dict[str, object]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(json_schema()).validate(document)


def test_the_committed_policy_reference_is_current(capsys: pytest.CaptureFixture[str]) -> None:
    committed = (ROOT / "docs" / "policies.md").read_text()
    assert committed == policy_reference() + "\n", (
        "docs/policies.md is stale: run `ollama-sidecar schema --markdown > docs/policies.md`"
    )
    assert main(["schema", "--markdown"]) == 0
    assert capsys.readouterr().out == committed


def test_schema_command_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "ollama-sidecar config"
