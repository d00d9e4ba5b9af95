"""Redis on loopback: a cache in front of PostgreSQL, so nothing is persisted by default."""

from __future__ import annotations

from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from meterproof.stack.process import (
    LOOPBACK,
    SpawnedServer,
    check_ports_free,
    executable,
    free_port,
)


class RedisServer(SpawnedServer):
    """One `redis-server` whose pid file, log and working dir live in `directory`.

    `stop()` is SIGTERM: with no save points Redis exits at once and writes nothing.
    """

    name = "redis"
    program = "redis-server"

    def __init__(self, *, directory: Path, port: int | None = None, timeout: float = 10.0) -> None:
        super().__init__(
            log=directory / "redis.log", pid_file=directory / "redis.pid", timeout=timeout
        )
        self.directory = directory
        self.port = port or free_port()

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self) -> float:
        if self.is_running():
            return 0.0
        check_ports_free(self.port)
        self.directory.mkdir(parents=True, exist_ok=True)
        argv = [executable("redis-server"), "--port", str(self.port), "--bind", LOOPBACK]
        argv += ["--dir", str(self.directory), "--save", "", "--appendonly", "no"]
        return self._launch(argv, ready=self._pong, what=f"redis on port {self.port}")

    def _pong(self) -> bool:
        client = redis.Redis(
            host=LOOPBACK, port=self.port, socket_timeout=0.5, retry=Retry(NoBackoff(), 0)
        )
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()
