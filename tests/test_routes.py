"""Route matching: no spelling of a blocked route reaches it; unknown paths are 404."""

from __future__ import annotations

import pytest

from sidecar.errors import SidecarError
from sidecar.routes import check_access, find_route, normalise_path

NOTHING_ALLOWED: frozenset[str] = frozenset()


@pytest.mark.parametrize(
    "raw",
    [
        "/api/pull",
        "//api/pull",
        "/api//pull",
        "/api/pull/",
        "/API/PULL",
        "/api/pull.",
        "/api/pull..",
        "/api/pull%20",
        "/api/./pull",
        "/v1/../api/pull",
        "/api/x/../pull",
        "/../../api/pull",
        "/api%2Fpull",
        "/api%2fpull",
        "%2Fapi%2Fpull",
        "/api/%70ull",
        "/Api/Pull/.",
    ],
)
def test_every_spelling_of_a_management_route_is_blocked(raw: str) -> None:
    match = find_route(raw)
    assert match.upstream_path == "/api/pull"
    with pytest.raises(SidecarError) as caught:
        check_access(match, "POST", NOTHING_ALLOWED)
    assert caught.value.status == 403
    assert caught.value.code == "route_blocked"


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        ("/api/delete", "delete"),
        ("/api/create", "create"),
        ("/api/copy", "copy"),
        ("/api/push", "push"),
        ("/api/blobs/sha256:abc", "blobs"),
        ("/api/blobs/../blobs/sha256:abc", "blobs"),
    ],
)
def test_management_routes_need_an_explicit_allow(raw: str, name: str) -> None:
    match = find_route(raw)
    method = sorted(match.route.methods)[0]
    with pytest.raises(SidecarError):
        check_access(match, method, NOTHING_ALLOWED)
    check_access(match, method, frozenset({name}))


def test_a_double_encoded_slash_is_not_decoded_twice() -> None:
    with pytest.raises(SidecarError) as caught:
        find_route("/api%252Fpull")
    assert caught.value.status == 404


@pytest.mark.parametrize(
    "raw", ["/", "/v1", "/v1/chat", "/api/pulls", "/v2/chat/completions", "/metrics2"]
)
def test_unknown_paths_are_404(raw: str) -> None:
    if raw == "/":
        assert find_route(raw).route.name == "/"
        return
    with pytest.raises(SidecarError) as caught:
        find_route(raw)
    assert caught.value.status == 404
    assert caught.value.code == "unknown_route"


@pytest.mark.parametrize(
    "raw", ["/v1/chat%00/completions", "/api/chat%0d%0aX: y", "/api\\pull", "/api/%ff"]
)
def test_control_characters_and_bad_encodings_are_400(raw: str) -> None:
    with pytest.raises(SidecarError) as caught:
        find_route(raw)
    assert caught.value.status == 400


def test_wrong_method_is_405_with_allow() -> None:
    with pytest.raises(SidecarError) as caught:
        check_access(find_route("/v1/chat/completions"), "GET", NOTHING_ALLOWED)
    assert caught.value.status == 405
    assert caught.value.headers == {"Allow": "POST"}


def test_model_ids_keep_their_case_and_slashes() -> None:
    match = find_route("/v1/models/hf.co/Org/Model-GGUF:Q4_K_M")
    assert match.route.name == "/v1/models/{model}"
    assert match.upstream_path == "/v1/models/hf.co/Org/Model-GGUF:Q4_K_M"
    assert find_route("/v1/models/llama3.2%3Alatest").upstream_path == "/v1/models/llama3.2:latest"


def test_normalise_keeps_case_for_parameters() -> None:
    assert normalise_path("//V1//Models/./A") == ("/v1/models/a", "/V1/Models/A")
