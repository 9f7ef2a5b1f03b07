"""The oracle call as a Prefect task, cached by its exact request.

A resumed run replays the recorded replies instead of asking again, so it follows the same
search path. The key holds backend (with the public base URL), model, prompt, temperature, seed and
attempt, never the API key, which the transport reads from the environment at call time (named by
``api_key_env``), nor the credentials cut from the base URL, which stay in this process's memory
(:mod:`selfprune.llm.endpoint`). A reply without text (late, or unreadable) is stored like any
other, but the search flow asks again rather than replay it (``flows/evolution.cached_transport``).
"""

from __future__ import annotations

from functools import lru_cache

from selfprune.engine import identity
from selfprune.llm.chat import ChatRequest, Transport
from selfprune.llm.transport import openai_transport
from selfprune.tasks.caching import cached_task


@lru_cache(maxsize=8)
def _transport(base_url: str | None, timeout: float, max_retries: int, api_key_env: str | None) -> Transport:
    """One client per server and process (it remembers, e.g., that a server refuses JSON mode)."""
    return openai_transport(base_url, api_key_env, timeout=timeout, max_retries=max_retries)


@cached_task(key_fn=identity.oracle_call, version="3", task_run_name="oracle-call")
def oracle_call(request: dict, base_url: str | None = None, timeout: float = 120.0, max_retries: int = 4,
                api_key_env: str | None = None) -> dict:
    """Send one chat request and return its :class:`Reply` as a dict. The search flow replays an
    answered reply from the cache but asks again where the cached one has no text (late, unreadable)."""
    return _transport(base_url, timeout, max_retries, api_key_env)(ChatRequest.from_dict(request)).to_dict()
