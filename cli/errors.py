"""The one place where errors become what an operator reads: one line and an exit code.

Every command group is a `Group`, so an expected failure never ends in a traceback,
whichever group a caller invokes; a bug still does.
"""

from __future__ import annotations

import click

from meterproof.errors import InputError, MeterproofError, UnavailableError, first_line


class _BadInput(click.ClickException):
    exit_code = InputError.exit_code


class _TryLater(click.ClickException):
    exit_code = UnavailableError.exit_code


_BY_EXIT_CODE: dict[int, type[click.ClickException]] = {
    1: click.ClickException,
    _BadInput.exit_code: _BadInput,
    _TryLater.exit_code: _TryLater,
}


def one_line(exc: Exception) -> click.ClickException:
    """- ours (`MeterproofError`): its message and exit code (2 bad input, 75 a dependency
      that did not answer, else 1);
    - an operating-system error about a path the user typed (too long, not a folder,
      permission denied): bad input, not a bug;
    - a database error that no adapter translated: the server's first line.
    """
    if isinstance(exc, MeterproofError):
        return _BY_EXIT_CODE[exc.exit_code](first_line(exc))
    if isinstance(exc, OSError):
        where = "" if exc.filename is None else f": {str(exc.filename)[:80]!r}"
        return click.ClickException(f"{exc.strerror or exc}{where}")
    import psycopg

    kind = "unreachable" if isinstance(exc, psycopg.OperationalError) else "error"
    return click.ClickException(f"database {kind}: {first_line(exc)}")


class Group(click.Group):
    """A command group whose expected failures end as `one_line` says."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except (MeterproofError, OSError) as exc:
            raise one_line(exc) from None
        except Exception as exc:
            import psycopg  # only on the error path: `--help` stays instant

            if not isinstance(exc, psycopg.Error):
                raise
            raise one_line(exc) from None
