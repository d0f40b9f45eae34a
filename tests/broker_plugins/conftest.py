from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.helpers import Conn


@pytest.fixture
def clients() -> Iterator[Callable[[Conn], Conn]]:
    """Track paho connections; each is closed when the test ends, pass or fail."""
    opened: list[Conn] = []

    def track(conn: Conn) -> Conn:
        opened.append(conn)
        return conn

    yield track
    for conn in opened:
        conn.close()
