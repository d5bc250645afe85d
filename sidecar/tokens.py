"""Offline token estimates, for when the upstream does not say how many tokens it used.

The upstream's own counts are always preferred; these are for a stream cut short
or a client gone before the usage arrived. Counting uses quicktok (`quicktok-v1`
on PyPI: exact tiktoken-compatible BPE with its vocabularies shipped in the wheel,
so nothing is downloaded at run time). Its `llama3` encoding is the default:
closer to what Ollama's common models use than OpenAI's cl100k. Without quicktok
installed the estimate falls back to one token per four bytes of UTF-8.

An estimate is an estimate: a different model family tokenises differently, and
the chat template's own tokens are approximated by a fixed cost per message.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterable
from typing import Any, Literal, Protocol

import orjson

Encoding = Literal["llama3", "qwen3", "cl100k_base", "o200k_base"]

# Template tokens a chat template adds around each message (llama3: header start,
# role, header end, blank line, end of turn) and once for the answer's header.
PER_MESSAGE_TOKENS = 4
PER_CHAT_TOKENS = 3


class _Counts(Protocol):
    def count(self, text: str) -> int: ...


class TokenCounter:
    """Counts tokens of text with one encoding.

    The vocabulary (and numpy with it) costs some 50 MB of memory, and counts
    are needed only when the upstream gave none (a stream cut short, a client
    gone), so it is loaded in a thread the first time a count is asked for;
    until then counts are UTF-8 bytes / 4, and say so in `method`.
    """

    def __init__(self, encoding: Encoding = "llama3") -> None:
        self.encoding = encoding
        self._tokenizer: _Counts | None = None
        self._loaded = False
        self._loading = False
        self._lock = threading.Lock()

    @property
    def method(self) -> str:
        """How the last counts were made: `quicktok:<encoding>` or `bytes/4`."""
        return f"quicktok:{self.encoding}" if self._tokenizer is not None else "bytes/4"

    def load_in_background(self) -> None:
        """Start loading the vocabulary in a thread of its own, once."""
        with self._lock:
            if self._loaded or self._loading:
                return
            self._loading = True
        threading.Thread(target=self.load, name="tokenizer-load", daemon=True).start()

    def load(self) -> None:
        """Load the vocabulary (a fraction of a second); safe to call from a thread."""
        if self._loaded:
            return
        with self._lock:
            if not self._loaded:
                self._tokenizer = _open(self.encoding)
                self._loaded = True

    def count(self, text: str) -> int:
        if not text:
            return 0
        if not self._loaded:
            self.load_in_background()
        if self._tokenizer is not None:
            return int(self._tokenizer.count(text))
        return (len(text.encode("utf-8", "replace")) + 3) // 4


def _open(encoding: str) -> _Counts | None:
    """quicktok's tokenizer for `encoding`, or None when quicktok is not installed."""
    try:
        quicktok: Any = importlib.import_module("quicktok")
        tokenizer: _Counts = quicktok.get_encoding(encoding)
    except (ImportError, OSError, ValueError, KeyError):
        return None
    return tokenizer


def prompt_tokens(counter: TokenCounter, document: Any) -> int:
    """An estimate of the prompt of any generation or embedding request body."""
    if not isinstance(document, dict):
        return 0
    total = 0
    messages = document.get("messages")
    if isinstance(messages, list):
        total += PER_CHAT_TOKENS
        for message in messages:
            total += PER_MESSAGE_TOKENS
            if isinstance(message, dict):
                total += counter.count(_text_of(message.get("content")))
                for call in message.get("tool_calls") or ():
                    total += counter.count(orjson.dumps(call).decode())
    for key in ("system", "instructions", "prompt", "suffix"):
        total += counter.count(_text_of(document.get(key)))
    inputs = document.get("input")
    if isinstance(inputs, list) and inputs and all(isinstance(item, dict) for item in inputs):
        # /v1/responses: a list of messages.
        for item in inputs:
            total += PER_MESSAGE_TOKENS + counter.count(_text_of(item.get("content")))
    else:
        total += counter.count(_text_of(inputs))
    tools = document.get("tools")
    if isinstance(tools, list) and tools:
        total += counter.count(orjson.dumps(tools).decode())
    return total


def _text_of(value: Any) -> str:
    """The text of a content value: a string, a list of strings, or of content parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(_text_of(item) for item in value)
    if isinstance(value, dict):
        text = value.get("text")
        return text if isinstance(text, str) else ""
    return ""


def completion_text(chunks: Iterable[bytes], stream_format: str | None) -> str:
    """The generated text in a (partial) stream's bytes, SSE or NDJSON, any of Ollama's shapes."""
    data = b"".join(chunks)
    pieces: list[str] = []
    if stream_format == "ndjson":
        payloads = data.split(b"\n")
    else:
        payloads = [line[5:].strip() for line in data.split(b"\n") if line.startswith(b"data:")]
    for payload in payloads:
        if not payload.strip() or payload == b"[DONE]":
            continue
        try:
            document = orjson.loads(payload)
        except orjson.JSONDecodeError:
            continue  # the line the stream was cut in, or garbage
        if isinstance(document, dict):
            _collect_text(document, pieces)
    return "".join(pieces)


def _collect_text(document: dict[str, Any], pieces: list[str]) -> None:
    # Native /api/chat and /api/generate (thinking counts as generated tokens).
    message = document.get("message")
    if isinstance(message, dict):
        for key in ("thinking", "content"):
            _add(pieces, message.get(key))
        for call in message.get("tool_calls") or ():
            pieces.append(orjson.dumps(call).decode())
    for key in ("thinking", "response"):
        _add(pieces, document.get(key))
    # /v1/chat/completions (delta) and /v1/completions (text).
    choices = document.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            _add(pieces, choice.get("text"))
            delta = choice.get("delta")
            if isinstance(delta, dict):
                for key in ("reasoning", "reasoning_content", "content"):
                    _add(pieces, delta.get(key))
                for call in delta.get("tool_calls") or ():
                    pieces.append(orjson.dumps(call).decode())
    # /v1/responses (`response.output_text.delta`) and /v1/messages (`content_block_delta`).
    delta = document.get("delta")
    if isinstance(delta, str) and str(document.get("type", "")).endswith(".delta"):
        pieces.append(delta)
    elif isinstance(delta, dict):
        for key in ("text", "thinking", "partial_json"):
            _add(pieces, delta.get(key))


def _add(pieces: list[str], value: Any) -> None:
    if isinstance(value, str) and value:
        pieces.append(value)
