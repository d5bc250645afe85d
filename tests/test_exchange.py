"""Exchange.add_json_field: a field written into the client's bytes, not a re-serialisation."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.errors import SidecarError
from sidecar.exchange import Exchange
from sidecar.routes import find_route


def exchange_with(body: bytes) -> Exchange:
    match = find_route("/v1/chat/completions")
    return Exchange(
        method="POST",
        route=match.route,
        path=match.upstream_path,
        query_string="",
        headers=CIMultiDictProxy(CIMultiDict()),
        body=body,
    )


@pytest.mark.parametrize(
    "body",
    [
        b"{}",
        b" \t\r\n{ }",
        b'{"model":"m"}',
        b'\n  {\n  "model": "m",\n  "messages": [{"role": "user", "content": "{\\"a\\": 1}"}]\n}\n',
        '{"model":"caf\u00e9 \u2603","n":1.5e3,"deep":{"a":[{"b":null}]}}'.encode(),
    ],
)
def test_the_field_is_added_and_the_clients_bytes_kept(body: bytes) -> None:
    exchange = exchange_with(body)
    before = orjson.loads(body)
    model = exchange.model
    exchange.add_json_field("stream_options", {"include_usage": True})
    expected: dict[str, Any] = {**before, "stream_options": {"include_usage": True}}
    assert orjson.loads(exchange.body) == expected
    assert exchange.json == expected
    assert exchange.model == model
    brace = body.index(b"{") + 1
    assert exchange.body.startswith(body[:brace])
    assert exchange.body.endswith(body[brace:])


@pytest.mark.parametrize(
    "body", [b'{"stream_options":null}', b'{"a":1,"stream_options":{"include_usage":false}}']
)
def test_a_field_the_body_has_is_not_added_twice(body: bytes) -> None:
    exchange = exchange_with(body)
    with pytest.raises(ValueError, match="stream_options"):
        exchange.add_json_field("stream_options", {"include_usage": True})
    assert exchange.body == body


def test_a_body_that_is_not_an_object_is_the_clients_400_first() -> None:
    exchange = exchange_with(b"[1, 2]")
    with pytest.raises(SidecarError) as raised:
        exchange.add_json_field("x", 1)
    assert raised.value.status == 400
