"""Console tokens and the HTTP listener's request limits."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jitp import errors
from jitp.console import auth
from jitp.observability.http import MAX_BODY, HttpListener, Request, Response
from jitp.trust import Role

KEY = b"k" * 32
NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def test_a_token_names_its_holder_and_role_until_it_expires() -> None:
    token = auth.make_token(KEY, name="alice", role=Role.OPERATOR, expires=NOW + timedelta(hours=1))
    assert auth.check_token(KEY, token, now=NOW) == ("alice", Role.OPERATOR)
    with pytest.raises(errors.Forbidden, match="expired"):
        auth.check_token(KEY, token, now=NOW + timedelta(hours=2))
    with pytest.raises(errors.Forbidden, match="not a valid"):
        auth.check_token(b"x" * 32, token, now=NOW)  # another node's key
    with pytest.raises(errors.InvalidRequest):
        auth.make_token(KEY, name="dev", role=Role.DEVICE, expires=NOW)


@given(st.integers(min_value=0, max_value=200), st.characters(codec="ascii"))
def test_any_changed_character_invalidates_a_token(position: int, replacement: str) -> None:
    token = auth.make_token(KEY, name="bob", role=Role.AUDITOR, expires=NOW + timedelta(hours=1))
    i = position % len(token)
    forged = token[:i] + replacement + token[i + 1 :]
    if forged == token:
        return
    try:
        name, role = auth.check_token(KEY, forged, now=NOW)
    except errors.Forbidden:
        return
    # base64's padding bits can absorb a change of the last character: then it is the same token
    assert (name, role) == ("bob", Role.AUDITOR)


def test_the_key_file_is_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "keys" / auth.KEY_FILE
    key = auth.ensure_key(path)
    assert len(key) == 32 and path.stat().st_mode & 0o777 == 0o600
    assert auth.ensure_key(path) == key


def test_the_listener_bounds_the_body_and_routes_by_prefix() -> None:
    async def echo(request: Request) -> Response:
        return Response(200, f"{request.method} {request.path} {request.form()}".encode())

    async def go() -> list[bytes]:
        listener = HttpListener({}, {"/console": echo})
        port = await listener.start("127.0.0.1", 0)
        answers = []
        for raw in (
            b"POST /console/do HTTP/1.1\r\nContent-Length: 7\r\n\r\na=1&b=2",
            b"POST /console/do HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1),
            b"GET /other HTTP/1.1\r\n\r\n",
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw)
            answers.append(await reader.read())
            writer.close()
        await listener.close()
        return answers

    ok, too_big, missing = asyncio.run(go())
    assert ok.startswith(b"HTTP/1.1 200") and ok.endswith(b"POST /console/do {'a': '1', 'b': '2'}")
    assert too_big.startswith(b"HTTP/1.1 413") and missing.startswith(b"HTTP/1.1 404")
