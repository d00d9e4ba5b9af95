"""The local stack as one unit: PKI, broker config and the three servers under one run dir.

`stack.env` in the run dir records where each server listens. Ports default to the
recorded ones (the conventional ones the first time) when free, else to free ones, so
shells that sourced the file keep working across `down` and `up`.

With `ha`, the database is `stack.ha.HaCluster` (etcd, two PostgreSQL nodes under
Patroni) in RUN_DIR/ha instead of one PostgreSQL, and stack.env's database URL names both
nodes; and there are HA_BROKERS brokers (RUN_DIR/mosquitto, RUN_DIR/mosquitto-1, ...)
rendered from the same PKI, listed in order in stack.env's METERPROOF_MQTT_BROKERS (their
admin listeners in METERPROOF_MQTT_ADMIN_PORTS). A run dir keeps the kind it was first
brought up with: the cluster's record (RUN_DIR/ha/cluster.json) makes later `up`,
`status` and `down` use the cluster.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol
from urllib.parse import urlsplit

from meterproof.certs.bootstrap import DEFAULT_INGEST_WORKERS, init_pki
from meterproof.certs.layout import PkiLayout
from meterproof.config import DEFAULT_PKI_ROOT, StackEnv, format_brokers, new_share_group
from meterproof.db.migrate import migrate
from meterproof.mosquitto.config import broker_files, render
from meterproof.stack.broker import BrokerServer
from meterproof.stack.ha import HaCluster, describe
from meterproof.stack.postgres import PostgresServer
from meterproof.stack.process import LOOPBACK, StackError, claim_port, free_port, port_is_free
from meterproof.stack.redis import RedisServer

#: Brokers of `stack up --ha`: a meter whose broker is lost moves to the other.
HA_BROKERS: Final = 2


class Server(Protocol):
    """What every runner offers (local process here, container in the test fixtures)."""

    @property
    def name(self) -> str: ...
    @property
    def url(self) -> str: ...
    def start(self) -> float: ...
    def stop(self) -> None: ...
    def kill(self) -> None: ...
    def restart(self) -> float: ...
    def is_running(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Ports:
    """Requested ports; None means the recorded one if free, else any free one."""

    mqtt: int | None = None
    mqtt_admin: int | None = None
    postgres: int | None = None
    redis: int | None = None


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    name: str
    running: bool
    address: str


class LocalStack:
    """The servers of one run dir; `pki_root` defaults to the recorded one, then certs/out."""

    def __init__(
        self, *, run_dir: Path, pki_root: Path | None = None, ha: bool = False, brokers: int = 1
    ) -> None:
        """`ha` asks for the Patroni cluster; a run dir that holds one uses it anyway.

        `brokers` asks for that many brokers (at least HA_BROKERS with `ha`); a run dir
        keeps as many as it recorded. Workers subscribe on each; which broker a meter uses
        is the meter's choice (`stack up --ha`: the first, then the next on failure; the
        sharded benchmark: a hash of its id).
        """
        self.run_dir = run_dir.absolute()
        self.env_file = self.run_dir / "stack.env"
        self.compose_env_file = self.run_dir / "compose.env"
        self.ha_dir = self.run_dir / "ha"
        self.ha = ha or HaCluster.record(self.ha_dir).exists()
        recorded = self.recorded()
        self.layout = PkiLayout((pki_root or recorded.pki_root).absolute())
        self.broker_count = max(brokers, HA_BROKERS if self.ha else 1, len(recorded.brokers()))

    def recorded(self) -> StackEnv:
        """The addresses last written here, or the defaults when there are none."""
        if self.env_file.exists():
            return StackEnv.read(self.env_file)
        return StackEnv.defaults(run_dir=self.run_dir, pki_root=DEFAULT_PKI_ROOT)

    def servers(self, env: StackEnv) -> tuple[PostgresServer, RedisServer, BrokerServer]:
        """The single-PostgreSQL stack's servers, in start order (the first broker only:
        `brokers` has them all); stop in reverse."""
        return (
            PostgresServer(directory=self.run_dir / "postgres", port=_url_port(env.database_url)),
            RedisServer(directory=self.run_dir / "redis", port=_url_port(env.redis_url)),
            BrokerServer(
                broker_files(self.run_dir), port=env.mqtt_port, admin_port=env.mqtt_admin_port
            ),
        )

    def brokers(self, env: StackEnv) -> list[BrokerServer]:
        """Every broker of `env`, in the clients' order (the first is `servers(env)[2]`)."""
        return [
            BrokerServer(broker_files(self.run_dir, i), port=port, admin_port=admin)
            for i, ((_, port), admin) in enumerate(
                zip(env.brokers(), env.admin_ports(), strict=True)
            )
        ]

    def database(self, env: StackEnv) -> PostgresServer | HaCluster:
        """The cluster when `ha` (recorded on free ports the first time), else the single
        PostgreSQL."""
        return HaCluster.create(self.ha_dir) if self.ha else self.servers(env)[0]

    def _running_order(self, env: StackEnv) -> list[Server]:
        """What `up`, `down` and `status` walk: the database chosen above, Redis, brokers."""
        return [self.database(env), self.servers(env)[1], *self.brokers(env)]

    def status(self) -> list[ServiceStatus]:
        """One line per process; a cluster's PostgreSQL nodes say which one is primary."""
        statuses = []
        for server in self._running_order(self.recorded()):
            if isinstance(server, HaCluster):
                statuses += [ServiceStatus(*row) for row in describe(server)]
            else:
                statuses.append(ServiceStatus(server.name, server.is_running(), _address(server)))
        return statuses

    def prepare(self, ports: Ports, *, ingest_workers: int = DEFAULT_INGEST_WORKERS) -> StackEnv:
        """Everything but starting: ports, PKI (created if missing, with at least
        `ingest_workers` worker identities), broker files, env files. A running broker
        reloads the ACL, so identities issued now may connect at once.

        The workers' share-group secret is generated the first time and kept after.
        `compose.env` carries the same choices for `docker compose --env-file`.
        """
        single = PostgresServer(directory=self.run_dir / "postgres")
        if self.ha and not HaCluster.record(self.ha_dir).exists() and single.is_running():
            raise StackError(f"the single PostgreSQL of {self.run_dir} runs: `stack down` first")
        env = self._choose_ports(ports)
        init_pki(self.layout, ingest_workers=ingest_workers)
        for index, broker in enumerate(self.brokers(env)):
            render(
                run_dir=self.run_dir,
                pki=self.layout,
                tls_port=broker.port,
                admin_port=broker.admin_port,
                index=index,
            )
            if broker.is_running():
                broker.reload()
        env.write(self.env_file)
        self.compose_env_file.write_text(_compose_env(env), encoding="utf-8")
        return env

    def up(
        self, ports: Ports, *, ingest_workers: int = DEFAULT_INGEST_WORKERS
    ) -> tuple[StackEnv, dict[str, float]]:
        """Prepare, start what is not running, migrate; return the seconds each start took.

        If anything fails, or the call is interrupted (Ctrl-C), what this call started is
        stopped again: of a cluster that was partly running, only the members it started.
        """
        env = self.prepare(ports, ingest_workers=ingest_workers)
        servers = self._running_order(env)
        started: list[Server] = []
        seconds: dict[str, float] = {}
        try:
            for server in servers:
                if not server.is_running():
                    seconds[server.name] = server.start()
                    started.append(server)
            migrate(servers[0].url)
        except BaseException:
            for running in reversed(started):
                _stop_started(running)
            raise
        return env, seconds

    def down(self, *, purge: bool = False) -> list[str]:
        """Stop every running server (pids from the run dir); return what was stopped.

        `purge` also deletes PostgreSQL's data, which may live outside the run dir, so
        deleting the run dir afterwards leaves nothing behind.
        """
        stopped = []
        database = self.database(self.recorded())
        servers = self._running_order(self.recorded())
        for server in reversed(servers):
            if server.is_running() or (isinstance(server, HaCluster) and server.partly_running()):
                server.stop()
                stopped.append(server.name)
        if purge:
            database.remove()
        return stopped

    def _choose_ports(self, wanted: Ports) -> StackEnv:
        recorded = self.recorded()
        _, redis_, broker = self.servers(recorded)
        postgres = self.database(recorded)
        taken: set[int] = set()

        def choose(name: str, asked: int | None, previous: int, running: bool) -> int:
            if running and asked not in (None, previous):
                raise StackError(f"{name} runs on port {previous}; `stack down` to change it")
            if running or (asked is None and previous not in taken and port_is_free(previous)):
                port = previous
            else:
                port = asked or _free_port_not_in(taken)
            taken.add(port)
            return port

        broker_up = broker.is_running()
        mqtt = choose("mosquitto", wanted.mqtt, recorded.mqtt_port, broker_up)
        admin = choose("mosquitto admin", wanted.mqtt_admin, recorded.mqtt_admin_port, broker_up)
        brokers, admins = [(LOOPBACK, mqtt)], [admin]
        previous = self.brokers(recorded)
        for i in range(1, self.broker_count):
            # The recorded ports of broker i, or the first broker's + 10 * i the first time.
            known = previous[i] if i < len(previous) else None
            up = known is not None and known.is_running()
            tls_port = known.port if known else _claimed_or_free(mqtt + 10 * i)
            admin_port = known.admin_port if known else _claimed_or_free(admin + 10 * i)
            brokers.append((LOOPBACK, choose(f"mosquitto-{i}", None, tls_port, up)))
            admins.append(choose(f"mosquitto-{i} admin", None, admin_port, up))
        read_url = None
        if isinstance(postgres, HaCluster):
            if wanted.postgres is not None:
                raise StackError("--pg-port does not apply to the cluster: its ports are free ones")
            database_url, read_url = postgres.url, postgres.read_url
        else:
            pg = choose("postgres", wanted.postgres, postgres.port, postgres.is_running())
            database_url = PostgresServer(directory=postgres.directory, port=pg).url
        rd = choose("redis", wanted.redis, redis_.port, redis_.is_running())
        return StackEnv.defaults(
            run_dir=self.run_dir,
            pki_root=self.layout.root,
            mqtt_port=mqtt,
            mqtt_admin_port=admin,
            mqtt_brokers=format_brokers(tuple(brokers)) if len(brokers) > 1 else None,
            mqtt_admin_ports=",".join(map(str, admins)) if len(admins) > 1 else None,
            database_url=database_url,
            database_read_url=read_url,
            redis_url=RedisServer(directory=redis_.directory, port=rd).url,
            share_group=recorded.share_group or new_share_group(),
        )


def _stop_started(server: Server) -> None:
    """Undo a `start` of `server`: of a cluster, only the members that start started."""
    if isinstance(server, HaCluster):
        server.stop_started()
    else:
        server.stop()


def _compose_env(env: StackEnv) -> str:
    """Variables compose.yaml interpolates: same ports and paths, and who owns the files."""
    values = {
        "METERPROOF_RUN_DIR": env.run_dir,
        "METERPROOF_PKI_ROOT": env.pki_root,
        "METERPROOF_MQTT_PORT": env.mqtt_port,
        "METERPROOF_PG_PORT": _url_port(env.database_url),
        "METERPROOF_REDIS_PORT": _url_port(env.redis_url),
        "METERPROOF_UID": os.geteuid(),
        "METERPROOF_GID": os.getegid(),
    }
    return "".join(f"{key}={value}\n" for key, value in values.items())


def _claimed_or_free(port: int) -> int:
    """`port` if this process may claim it (see `claim_port`), else a drawn one."""
    return port if claim_port(port) else free_port()


def _free_port_not_in(taken: set[int]) -> int:
    while (port := free_port()) in taken:
        pass
    return port


def _url_port(url: str) -> int:
    """The port of the URL's first host (a cluster's URL names every node)."""
    parts = urlsplit(url)
    first = parts._replace(netloc=parts.netloc.split(",")[0])
    port = first.port
    if port is None:
        raise StackError(f"no port in {url!r}")
    return port


def _address(server: Server) -> str:
    if isinstance(server, BrokerServer):
        return f"{server.url} (admin mqtt://{LOOPBACK}:{server.admin_port})"
    return server.url
