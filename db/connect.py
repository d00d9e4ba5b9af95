"""Connecting to PostgreSQL without leaving a failed attempt open.

psycopg 3.3 raises a failed connection attempt's error with a traceback through its own
`connect`, whose frame still holds the attempt (its socket open) and the error itself: a
reference cycle that only Python's garbage collector breaks, and an idle process may not
run it for a minute. Meanwhile the server keeps a child for the attempt, and a server
that was paused answers each queued attempt with one once it resumes; a shutdown waits
for them (docs/reliability.md, "Why a resumed primary was slow to rejoin"). Raising the
error without that traceback frees the attempt at once; the frames of ours that the
error then passes through are kept.
"""

from __future__ import annotations

import psycopg
from psycopg.abc import ConnParam
from psycopg.conninfo import make_conninfo
from psycopg.rows import TupleRow


def connect_sync(
    url: str, *, autocommit: bool = False, **params: ConnParam
) -> psycopg.Connection[TupleRow]:
    """`psycopg.connect`, whose failure leaves no socket open."""
    try:
        return psycopg.connect(make_conninfo(url, **params), autocommit=autocommit)
    except psycopg.Error as exc:
        raise exc.with_traceback(None) from None


async def connect_async(
    url: str, *, autocommit: bool = False, **params: ConnParam
) -> psycopg.AsyncConnection[TupleRow]:
    """`psycopg.AsyncConnection.connect`, whose failure leaves no socket open."""
    try:
        conninfo = make_conninfo(url, **params)
        return await psycopg.AsyncConnection.connect(conninfo, autocommit=autocommit)
    except psycopg.Error as exc:
        raise exc.with_traceback(None) from None
