"""The oracle server boundary: which key a server gets, and how long and how much one request may
take (what of its URL is written down: :mod:`selfprune.core.urls`).

A search runs for days and may talk to a server someone else runs, so nothing secret is recorded
and nothing the server sends is trusted:

* **Keys** (:func:`api_key`). ``$OPENAI_API_KEY`` goes only to the OpenAI API (no base URL, or one
  whose host is api.openai.com). Any other server gets the key of the variable named for it
  (``--api-key-env NAME``), else the placeholder "EMPTY" that local servers (vLLM, Ollama,
  llama.cpp) take.
* **URLs** (:func:`selfprune.core.urls.public_url`). Credentials written into a base URL
  (``user:pw@``, a query such as ``?api_key=``, a fragment) are cut from it where the configuration
  is built: the config is a flow parameter, so Prefect stores it, and best.json, cache keys and
  messages copy it. What was cut stays in this process's memory only
  (:func:`selfprune.core.urls.credentials`) and still reaches the server: the user and password as
  HTTP basic auth, the query on every request. A process that did not build the config (a
  deployment's worker) has none of it: give such a server its key with ``--api-key-env``.
* **Bounds** (:func:`bounded_client`, :func:`request_bounds`). Every socket read and write of a
  request waits at most until the request's deadline, so ``--oracle-timeout`` bounds the whole
  request (a server sending a byte a second cannot hold it longer), and at most ``max_bytes`` are
  read: a reply past that is refused, never stored. Compressed bodies are refused too (identity is
  asked for), so the bound holds on what is decoded.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

import httpcore
import httpx

OPENAI_HOST = "api.openai.com"
OPENAI_URL = f"https://{OPENAI_HOST}/v1"
PLACEHOLDER_KEY = "EMPTY"  # what local OpenAI-compatible servers accept when they check no key
MAX_REPLY_BYTES = 4 << 20  # a reply of a few thousand tokens is a few tens of kB


def is_openai(base_url: str | None) -> bool:
    """The OpenAI API itself: no base URL, or one whose host is api.openai.com."""
    return base_url is None or (urlsplit(base_url).hostname or "").lower() == OPENAI_HOST


def api_key(base_url: str | None, api_key_env: str | None) -> str:
    """The key for the server at ``base_url``: ``$api_key_env`` when one is named for it, else
    ``$OPENAI_API_KEY`` for the OpenAI API only, else the placeholder. Empty when the variable
    meant for it is unset (the caller says which)."""
    if api_key_env:
        return os.environ.get(api_key_env, "")
    return os.environ.get("OPENAI_API_KEY", "") if is_openai(base_url) else PLACEHOLDER_KEY


def missing_key(base_url: str | None, api_key_env: str | None) -> str | None:
    """Why the server at ``base_url`` would get no key (the variable meant for it is unset, named
    with the fix), or None: a check that needs no request, made before a run and at the first call."""
    if api_key(base_url, api_key_env):
        return None
    return f"no API key for the oracle at {base_url or OPENAI_URL}: set ${api_key_env or 'OPENAI_API_KEY'}" + (
        "" if api_key_env else ", or point the oracle at a local OpenAI-compatible server (vLLM, Ollama) with its base URL")


class ReplyRefused(httpx.RequestError):
    """A reply refused before it was read whole: past ``max_bytes``, or compressed. An httpx
    request error, so that every version of the openai client wraps it in ``APIConnectionError``."""


@dataclass
class _Bounds:
    deadline: float  # time.monotonic() past which no read or write waits
    max_bytes: int
    read: int = 0


_BOUNDS: ContextVar[_Bounds | None] = ContextVar("selfprune_oracle_request_bounds", default=None)


@contextmanager
def request_bounds(seconds: float, max_bytes: int = MAX_REPLY_BYTES) -> Iterator[None]:
    """Requests of a :func:`bounded_client` inside the block end within ``seconds`` of its start
    (httpcore's timeout errors) and read at most ``max_bytes`` (:class:`ReplyRefused`)."""
    token = _BOUNDS.set(_Bounds(time.monotonic() + seconds, max_bytes))
    try:
        yield
    finally:
        _BOUNDS.reset(token)


def _left(timeout: float | None, error: type[Exception]) -> float | None:
    """The wait allowed now: ``timeout`` cut to what is left of the request's deadline."""
    bounds = _BOUNDS.get()
    if bounds is None:
        return timeout
    left = bounds.deadline - time.monotonic()
    if left <= 0:
        raise error("the request's deadline passed")
    return left if timeout is None else min(timeout, left)


class _BoundedStream(httpcore.NetworkStream):
    """A connection whose reads and writes keep to the current request's bounds."""

    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data = self._stream.read(max_bytes, _left(timeout, httpcore.ReadTimeout))
        bounds = _BOUNDS.get()
        if bounds is not None:
            bounds.read += len(data)
            if bounds.read > bounds.max_bytes:
                raise ReplyRefused(f"the reply is larger than {bounds.max_bytes} bytes")
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _BoundedStream(self._stream.start_tls(ssl_context, server_hostname,
                                                     _left(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str):
        return self._stream.get_extra_info(info)


class _BoundedBackend(httpcore.NetworkBackend):
    """httpcore's network backend, with every connection bounded (:class:`_BoundedStream`)."""

    def __init__(self, backend: httpcore.NetworkBackend) -> None:
        self._backend = backend

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options=None) -> httpcore.NetworkStream:
        return _BoundedStream(self._backend.connect_tcp(host, port, _left(timeout, httpcore.ConnectTimeout),
                                                        local_address, socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options=None) -> httpcore.NetworkStream:
        return _BoundedStream(self._backend.connect_unix_socket(path, _left(timeout, httpcore.ConnectTimeout),
                                                                socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def _identity_only(response: httpx.Response) -> None:
    """Refuse a compressed body: ``max_bytes`` bounds what is read, not what it would decode to."""
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ReplyRefused(f"the reply is compressed ({encoding}) though identity was asked for")


def _proxy(url: str) -> str | None:
    """The proxy the environment names for ``url`` (``HTTPS_PROXY``..., minus ``NO_PROXY``)."""
    parts = urlsplit(url)
    if proxy_bypass(parts.hostname or ""):
        return None
    proxies = getproxies()
    return proxies.get(parts.scheme) or proxies.get("all")


def bounded_client(url: str, timeout: float, auth: tuple[str, str] | None = None) -> httpx.Client:
    """An httpx client for the server at ``url`` whose requests keep to :func:`request_bounds`.

    Its transport is httpx's own (proxies from the environment included), with the network backend
    of its connection pool wrapped: httpx has no public hook for that, and only there does every
    read, of the status line and headers as of the body, pass through one place."""
    transport = httpx.HTTPTransport(proxy=_proxy(url))
    pool = transport._pool
    pool._network_backend = _BoundedBackend(pool._network_backend)
    return httpx.Client(transport=transport, trust_env=False, timeout=timeout, auth=auth,
                        headers={"accept-encoding": "identity"}, event_hooks={"response": [_identity_only]})
