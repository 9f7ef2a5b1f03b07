"""The network side of the LLM oracles: a :data:`~.chat.Transport` through the official ``openai``
client (:func:`openai_transport`), and :func:`read_completion`, which reads its untrusted replies.
"""

from __future__ import annotations

import json
import logging
import math
import time

from ..core.urls import credentials
from .chat import ChatRequest, OracleUnavailable, Reply, Transport
from .endpoint import MAX_REPLY_BYTES, OPENAI_URL, ReplyRefused, api_key, bounded_client, missing_key, request_bounds

logger = logging.getLogger("selfprune.oracle")


def _token_count(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def read_completion(body: bytes) -> Reply:
    """The reply in a chat-completion body, read without trusting it: never raises.

    A body that is not one (HTML, invalid UTF-8, JSON nested past Python's recursion limit, no
    ``choices[0].message`` with a text ``content``) is ``Reply(None, error=why)``; a ``usage`` that
    is not counts is zero tokens."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:
        return Reply(None, error=f"the body is not JSON ({type(e).__name__})")
    choices = data.get("choices") if isinstance(data, dict) else None
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = choice.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(message, dict) or not isinstance(content, (str, type(None))):
        return Reply(None, error="the body is not a chat completion (no choices[0].message with a text content)")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    finish = choice.get("finish_reason")
    return Reply(content or "", finish if isinstance(finish, str) else None,
                 _token_count(usage.get("prompt_tokens")), _token_count(usage.get("completion_tokens")))


def openai_transport(
    base_url: str | None, api_key_env: str | None = None, timeout: float = 60.0, max_retries: int = 4,
    max_bytes: int = MAX_REPLY_BYTES,
) -> Transport:
    """A transport through the official ``openai`` client, for OpenAI or any compatible server.

    ``base_url`` is the public URL (:func:`selfprune.core.urls.public_url`). The client is
    built on the first call, so a run whose every call is already cached needs neither key nor server.

    * **Keys** (:func:`selfprune.llm.endpoint.api_key`): ``$OPENAI_API_KEY`` for the OpenAI API
      only; another server gets ``$api_key_env`` when one is named, else the placeholder "EMPTY".
      Credentials cut from the base URL go to its server (basic auth, the query on every request).
    * **Reply shape.** The request's :meth:`ChatRequest.response_formats` are tried in order; one a
      server rejects (HTTP 400/422, or a 500 that names the format) is not sent to that server and
      model again: the working form is found once and remembered.
    * **Bounded.** ``max_tokens`` is sent; a reply cut at it (``finish_reason == "length"``) is
      invalid to the oracle (re-asked, never waited out). Each request ends within ``timeout``
      seconds, whole: one not answered by then (a trickled one too) returns ``Reply(None)``. At most
      ``max_bytes`` are read.
    * **Untrusted replies.** A body past ``max_bytes``, compressed, or not a chat completion
      (:func:`read_completion`) is ``Reply(None, error=why)``: an invalid reply, with a warning.
    * **Timeouts are not re-sent.** A server still generating would only queue the copy (llama.cpp
      keeps generating for a client that gave up): the oracle falls back for that step.
    * **Transient failures** (connection errors, 408/409/429/5xx) are retried ``max_retries`` times
      with backoff (the server's ``retry-after`` when it gives a finite one). What remains, and
      401/403/404 at once, becomes :class:`OracleUnavailable`, whose message never holds a secret.
    """
    import openai  # here, not at the top: importing it is slow and only this oracle needs it

    where = base_url or OPENAI_URL
    cut = credentials(base_url)
    secrets = [s for s in (cut.password, *(value for _, value in cut.query)) if s] if cut else []
    state: dict = {"client": None, "format": {}}

    def client() -> openai.OpenAI:
        if state["client"] is None:
            missing = missing_key(base_url, api_key_env)
            if missing:
                raise OracleUnavailable(missing)
            key = api_key(base_url, api_key_env)
            secrets.append(key)
            auth = (cut.user or "", cut.password or "") if cut and (cut.user or cut.password) else None
            state["client"] = openai.OpenAI(
                api_key=key, base_url=where, timeout=timeout, max_retries=0,
                default_query=dict(cut.query) if cut and cut.query else None,
                http_client=bounded_client(where, timeout, auth))
        return state["client"]

    def scrub(text: str) -> str:
        """At most 300 characters of a server's message, on one line, with no secret of ours in it."""
        for secret in secrets:
            text = text.replace(secret, "***")
        return " ".join(text.split())[:300]

    def rejects_format(e: openai.APIStatusError) -> bool:
        return e.status_code in (400, 422) or (e.status_code == 500 and any(
            word in str(e.message).lower() for word in ("json", "schema", "response_format", "grammar")))

    def backoff(attempt: int, e: Exception) -> None:
        headers = getattr(getattr(e, "response", None), "headers", None) or {}
        try:
            wait = float(headers["retry-after-ms"]) / 1000 if "retry-after-ms" in headers else float(headers["retry-after"])
        except (KeyError, ValueError):
            wait = math.nan
        time.sleep(min(max(wait, 0.0), 30.0) if math.isfinite(wait) else 0.5 * 2**attempt)

    def unreadable(why: str) -> Reply:
        logger.warning("the oracle at %s sent a reply that could not be read (%s); it counts as invalid", where, why)
        return Reply(None, error=why)

    def call(kwargs: dict) -> Reply:
        """One request, with retries of transient failures."""
        for attempt in range(max_retries + 1):
            last = attempt == max_retries
            try:
                with request_bounds(timeout, max_bytes):
                    body = client().chat.completions.with_raw_response.create(**kwargs).http_response.content
                reply = read_completion(body)
                return reply if reply.error is None else unreadable(reply.error)
            except openai.APITimeoutError:
                return Reply(None)
            except openai.APIConnectionError as e:
                if isinstance(e.__cause__, ReplyRefused):
                    return unreadable(str(e.__cause__))
                if last:
                    raise OracleUnavailable(
                        f"oracle at {where} could not be reached ({max_retries + 1} tries): start the server or fix "
                        "the oracle base URL"
                    ) from None
                backoff(attempt, e)
            except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
                raise OracleUnavailable(
                    f"oracle at {where} refused the API key (HTTP {e.status_code}): set a valid key in "
                    f"${api_key_env or 'OPENAI_API_KEY'}" + ("" if api_key_env else " (or name its variable with --api-key-env)")
                ) from None
            except openai.NotFoundError:
                raise OracleUnavailable(
                    f"oracle at {where} does not serve model {kwargs['model']!r} (HTTP 404): "
                    "check the model name after 'openai:' and the base URL"
                ) from None
            except openai.APIStatusError as e:
                if "response_format" in kwargs and rejects_format(e):
                    raise
                if last or e.status_code not in (408, 409, 429) and e.status_code < 500:
                    raise OracleUnavailable(
                        f"oracle at {where} answered HTTP {e.status_code} ({scrub(str(e.message))}); transient errors "
                        f"were retried {max_retries} times: check the server's log and the request limits, or retry later"
                    ) from None
                backoff(attempt, e)
            except openai.APIError as e:
                raise OracleUnavailable(
                    f"oracle at {where} sent an unusable response ({scrub(str(e))}): check that it speaks "
                    "the OpenAI chat-completions API"
                ) from None
        raise AssertionError("unreachable")

    def send(request: ChatRequest) -> Reply:
        kwargs: dict = dict(model=request.model, messages=request.api_messages(), temperature=request.temperature,
                            seed=request.seed)
        if request.max_tokens:
            kwargs["max_tokens"] = request.max_tokens
        formats = request.response_formats()
        remembered = (request.model, len(formats))
        for i in range(state["format"].get(remembered, 0), len(formats)):
            fmt = formats[i]
            try:
                reply = call(kwargs | ({"response_format": fmt} if fmt else {}))
            except openai.APIStatusError:  # this server rejects that form: try the next, and remember
                continue
            state["format"][remembered] = i
            return reply
        raise AssertionError("unreachable: the last form (none) is never rejected")

    return send
