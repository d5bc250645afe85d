"""The real openai client, sync and async, pointed at the sidecar by base_url only."""

from __future__ import annotations

import asyncio

import openai
import pytest

from sidecar.app import Sidecar
from tests.fake_ollama import FakeOllama, Fault

MODEL = "llama3.2:latest"
MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "say hello"}
]
EXPECTED_TEXT = "Hello from the fake Ollama."


@pytest.fixture
async def client(sidecar: Sidecar) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{sidecar.url}/v1", api_key="sk-app", max_retries=0)


@pytest.fixture
def sync_client(sidecar: Sidecar) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{sidecar.url}/v1", api_key="sk-app", max_retries=0)


async def test_async_chat(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert completion.choices[0].message.content == EXPECTED_TEXT
    assert completion.usage is not None and completion.usage.completion_tokens == 6


async def test_async_chat_stream(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    pieces = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    assert "".join(pieces) == EXPECTED_TEXT


async def test_async_chat_stream_with_usage(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


async def test_async_completions_embeddings_models(client: openai.AsyncOpenAI) -> None:
    completion = await client.completions.create(model=MODEL, prompt="say hello")
    assert completion.choices[0].text == EXPECTED_TEXT
    stream = await client.completions.create(model=MODEL, prompt="say hello", stream=True)
    assert (
        "".join([chunk.choices[0].text async for chunk in stream if chunk.choices]) == EXPECTED_TEXT
    )
    embeddings = await client.embeddings.create(model="nomic-embed-text:latest", input=["a", "b"])
    assert [item.index for item in embeddings.data] == [0, 1]
    assert len(embeddings.data[0].embedding) == 8
    base64_embeddings = await client.embeddings.create(
        model="nomic-embed-text:latest", input="a", encoding_format="base64"
    )
    assert base64_embeddings.data[0].embedding
    models = [model.id async for model in client.models.list()]
    assert MODEL in models
    assert (await client.models.retrieve(MODEL)).id == MODEL


async def test_sync_client_in_a_thread(sync_client: openai.OpenAI) -> None:
    def calls() -> tuple[str | None, str, int, list[str]]:
        completion = sync_client.chat.completions.create(model=MODEL, messages=MESSAGES)
        stream = sync_client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        streamed = "".join(
            chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices
        )
        embeddings = sync_client.embeddings.create(model="nomic-embed-text:latest", input="x")
        models = [model.id for model in sync_client.models.list()]
        return completion.choices[0].message.content, streamed, len(embeddings.data), models

    content, streamed, embedding_count, models = await asyncio.to_thread(calls)
    assert content == streamed == EXPECTED_TEXT
    assert embedding_count == 1
    assert MODEL in models


async def test_errors_surface_as_the_openai_exceptions(
    client: openai.AsyncOpenAI, fake: FakeOllama
) -> None:
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="absent", messages=MESSAGES)
    fake.inject(Fault("busy"))
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert caught.value.status_code == 503


async def test_a_broken_stream_raises_in_the_client_instead_of_ending_quietly(
    client: openai.AsyncOpenAI, fake: FakeOllama
) -> None:
    fake.inject(Fault("reset_after", after_chunks=2))
    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    received: list[str] = []
    with pytest.raises(openai.APIError, match="mid-stream"):
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert received and "".join(received) != EXPECTED_TEXT


async def test_a_stream_without_done_raises_in_the_client(
    client: openai.AsyncOpenAI, fake: FakeOllama
) -> None:
    fake.inject(Fault("end_without_done", after_chunks=3))
    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError, match="final event"):
        async for _ in stream:
            pass


async def test_unreachable_upstream_is_a_clean_api_error(
    make_sidecar: object, unused_tcp_port: int
) -> None:
    sidecar = await make_sidecar(upstream_url=f"http://127.0.0.1:{unused_tcp_port}")  # type: ignore[operator]
    client = openai.AsyncOpenAI(base_url=f"{sidecar.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert caught.value.status_code == 502
    assert "cannot be reached" in caught.value.message
