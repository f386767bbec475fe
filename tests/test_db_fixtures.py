"""The PostgreSQL fixtures' connect retry: transient server states are waited out, other errors raise."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from tests.db_fixtures import connect_when_ready


class Connection:
    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class FlakyEngine:
    """``connect()`` raises ``OperationalError(message)`` ``failures`` times, then connects."""

    def __init__(self, message: str, failures: int) -> None:
        self.message, self.failures, self.calls = message, failures, 0

    def connect(self) -> Any:
        self.calls += 1
        if self.calls <= self.failures:
            raise sa.exc.OperationalError("connect", {}, Exception(self.message))
        return Connection()


@pytest.mark.parametrize(
    "message",
    [
        "FATAL:  sorry, too many clients already",
        "FATAL:  remaining connection slots are reserved for roles with the SUPERUSER attribute",
        "FATAL:  the database system is in recovery mode",
        "FATAL:  the database system is starting up",
    ],
)
def test_transient_states_are_waited_out(message: str) -> None:
    engine: Any = FlakyEngine(message, failures=2)
    with connect_when_ready(engine, wait_s=10) as connection:
        assert isinstance(connection, Connection)
    assert engine.calls == 3


def test_other_errors_and_lasting_states_raise() -> None:
    refused: Any = FlakyEngine('connection failed: connection to server at "127.0.0.1", port 5432 failed', 1)
    with pytest.raises(sa.exc.OperationalError, match="port 5432"), connect_when_ready(refused):
        pass
    assert refused.calls == 1
    full: Any = FlakyEngine("FATAL:  sorry, too many clients already", failures=1000)
    with (
        pytest.raises(sa.exc.OperationalError, match="too many clients"),
        connect_when_ready(full, wait_s=0.6),
    ):
        pass
    assert 1 < full.calls < 10
