"""One structlog configuration for every meterproof process: on stderr, readable lines on a
terminal and JSON lines otherwise (a file, a pipe, a log collector)."""

from __future__ import annotations

import logging
import sys

import structlog

#: What every line carries, whether structlog or a library's `logging` call wrote it.
_STAMPS: list[structlog.typing.Processor] = [
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg] # a TextIO stream
    """The `sys.stderr` of the moment each line is written, as structlog's print logger
    uses: a test runner swaps it between commands."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure_logging(*, level: str = "INFO", json: bool | None = None) -> None:
    """Idempotent; called once by the command root before any work starts. `json` None:
    JSON unless stderr is a terminal."""
    if json is None:
        json = not sys.stderr.isatty()
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    # The same list, refilled: a logger bound earlier holds it (`cache_logger_on_first_use`),
    # so a second call reaches loggers already in use, and so does structlog's
    # `capture_logs`, which swaps the current list's contents.
    processors = structlog.get_config()["processors"]
    processors[:] = [
        structlog.contextvars.merge_contextvars,
        *_STAMPS,
        structlog.processors.format_exc_info,
        renderer,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    _route_libraries(renderer, max(numeric, logging.WARNING))


def _route_libraries(renderer: structlog.typing.Processor, level: int) -> None:
    """Libraries (psycopg's pool, uvicorn, asyncio) log through `logging`, whose fallback
    prints bare messages: a JSON collector would get lines it cannot parse. Their lines go
    through the same renderer instead, from WARNING up as before (their INFO is chatter)."""
    handler = _Stderr()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*_STAMPS, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Stderr)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
