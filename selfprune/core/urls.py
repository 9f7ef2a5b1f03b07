"""A server's URL as it may be written down: credentials cut out, kept in this process's memory.

The run configuration cuts them where it is built (it is a flow parameter, so Prefect stores it,
and best.json, cache keys and messages copy it); the oracle's transport sends them to that server
and nowhere else. Both need this, so it lives below both.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from .errors import UserError


@dataclass(frozen=True)
class Credentials:
    """What :func:`public_url` cut from a base URL, to send to its server and nowhere else."""

    user: str | None
    password: str | None
    query: tuple[tuple[str, str], ...]


_CUT: dict[str, Credentials] = {}  # public URL -> what was cut from it; this process's memory only


def public_url(url: str) -> str:
    """``url`` without user, password, query and fragment, which are remembered for
    :func:`credentials`; a :class:`UserError` unless it is an http(s) URL with a host."""
    parts = urlsplit(url.strip())
    try:
        port = parts.port
    except ValueError:  # not a number, or out of range
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:  # quoted in part: it may hold a secret
        raise UserError(f"--base-url must be an http(s) URL of an OpenAI-compatible server, such as "
                        f"http://127.0.0.1:8000/v1 (got scheme {parts.scheme!r}, host {parts.hostname!r})")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    public = urlunsplit((parts.scheme, host + (f":{port}" if port else ""), parts.path, "", ""))
    if parts.username is not None or parts.password is not None or parts.query:
        user, password = (unquote(part) if part is not None else None for part in (parts.username, parts.password))
        _CUT[public] = Credentials(user, password, tuple(parse_qsl(parts.query, keep_blank_values=True)))
    return public


def credentials(public: str | None) -> Credentials | None:
    """What was cut from the base URL ``public`` in this process, if anything."""
    return _CUT.get(public) if public else None
