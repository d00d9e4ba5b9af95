"""PostgreSQL with automatic failover (`stack up --ha`): three etcd members and two
PostgreSQL nodes under Patroni, on loopback, all state under RUN_DIR/ha.

Patroni keeps the leader key in etcd; the node that holds it is the primary, the other
streams from it as a synchronous standby (`synchronous_mode`), so a commit returns only
once the standby has the WAL too, and a reading acknowledged to a meter survives the
primary's loss. `primary_start_timeout: 0` makes Patroni fail over on a crash of the
primary's postmaster instead of restarting it in place, and `ttl`/`loop_wait` are short,
so the standby is promoted within seconds.

Clients need no proxy: the database URL names both nodes with
`target_session_attrs=read-write`, so libpq tries them in turn and keeps only the one that
accepts writes. Every reconnect (worker store, key and consent listeners, bridge, API)
goes through that URL and so finds the new primary by itself.

The PostgreSQL nodes run as the `postgres` user when we are root (initdb refuses root);
their folders are placed as `stack.postgres` places a cluster. The chosen ports are
recorded in RUN_DIR/ha/cluster.json: it is the record that the run dir holds a cluster.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from meterproof.pidfile import pid_alive, read_pid
from meterproof.stack.postgres import (
    AUTHENTICATION_TIMEOUT,
    DATABASE,
    ROLE,
    default_os_user,
    ensure_database,
    os_account,
    pg_bin,
    place_cluster,
)
from meterproof.stack.process import (
    LOOPBACK,
    SpawnedServer,
    StackError,
    check_ports_free,
    executable,
    free_port,
    port_accepts,
    wait_for,
)

ETCD_MEMBERS: Final = 3
PG_NODES: Final = 2
SCOPE: Final = "meterproof"
REPLICATION_ROLE: Final = "replicator"
#: The roles Patroni's REST API gives the primary.
PRIMARY_ROLES: Final = frozenset({"leader", "master", "primary"})
#: Patroni member states in which a node serves (the primary) or replays (a standby).
RUNNING_STATES: Final = frozenset({"running", "streaming"})
_HTTP_TIMEOUT_S: Final = 2.0
#: libpq's connect_timeout in the cluster's URL, per node tried.
CONNECT_TIMEOUT_S: Final = 3
#: Leader key TTL, HA loop and DCS retry: Patroni needs loop_wait + 2 * retry_timeout <=
#: ttl; a lost primary's key expires within `ttl`, a crash is seen within `loop_wait`.
_DCS: Final = {"ttl": 10, "loop_wait": 1, "retry_timeout": 4}


def _http_json(
    url: str,
    *,
    body: dict[str, Any] | None = None,
    method: str | None = None,
    timeout: float = _HTTP_TIMEOUT_S,
) -> Any:  # noqa: ANN401 - JSON
    """GET (or POST `body`, or `method` it) a loopback JSON endpoint; Patroni answers 503
    with a body too."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(  # noqa: S310 - our own http://127.0.0.1 URLs
        url, data, {"Content-Type": "application/json"}, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310
            text = answer.read()
    except urllib.error.HTTPError as exc:
        text = exc.read()
    try:
        return json.loads(text)
    except ValueError:
        return text.decode(errors="replace")


@dataclass(frozen=True, slots=True)
class HaPorts:
    """Every port of one cluster, chosen once and recorded in RUN_DIR/ha/cluster.json."""

    etcd_client: tuple[int, ...]
    etcd_peer: tuple[int, ...]
    postgres: tuple[int, ...]
    rest: tuple[int, ...]

    @classmethod
    def free(cls) -> HaPorts:
        """Drawn ports, distinct because `free_port` never hands out one twice in a while."""

        def pick(n: int) -> tuple[int, ...]:
            return tuple(free_port() for _ in range(n))

        return cls(pick(ETCD_MEMBERS), pick(ETCD_MEMBERS), pick(PG_NODES), pick(PG_NODES))

    @classmethod
    def read(cls, path: Path) -> HaPorts:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return cls(**{k: tuple(v) for k, v in raw.items()})

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self)) + "\n", encoding="utf-8")


class _Member(SpawnedServer):
    """One process of the cluster, named `<role>-<index>`, its log and pid file named after
    its program in `directory`."""

    def __init__(self, *, role: str, directory: Path, index: int, timeout: float) -> None:
        super().__init__(
            log=directory / f"{self.program}.log",
            pid_file=directory / f"{self.program}.pid",
            timeout=timeout,
        )
        self.directory = directory
        self.index = index
        self.name = f"{role}-{index}"


class EtcdMember(_Member):
    """One member of the three-member etcd that holds Patroni's leader key."""

    program = "etcd"

    def __init__(
        self, *, directory: Path, index: int, ports: HaPorts, timeout: float = 30.0
    ) -> None:
        super().__init__(role="etcd", directory=directory, index=index, timeout=timeout)
        self.client_port = ports.etcd_client[index]
        self.peer_port = ports.etcd_peer[index]
        self._cluster = ",".join(
            f"etcd-{i}=http://{LOOPBACK}:{port}" for i, port in enumerate(ports.etcd_peer)
        )

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.client_port}"

    def start(self) -> float:
        """Ready once it listens: a member alone has no quorum, so health comes later."""
        if self.is_running():
            return 0.0
        check_ports_free(self.client_port, self.peer_port)
        self.directory.mkdir(parents=True, exist_ok=True)
        peer = f"http://{LOOPBACK}:{self.peer_port}"
        argv = [executable("etcd"), "--name", self.name, "--data-dir", str(self.directory / "data")]
        argv += ["--listen-client-urls", self.url, "--advertise-client-urls", self.url]
        argv += ["--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer]
        argv += ["--initial-cluster", self._cluster, "--initial-cluster-state", "new"]
        argv += ["--initial-cluster-token", f"{SCOPE}-{self._cluster_id()}"]
        argv += ["--enable-v2=true"]  # Patroni's `etcd` (v2) store: PatroniNode._config says why
        return self._launch(
            argv, ready=lambda: port_accepts(self.client_port), what=f"{self.name} on {self.url}"
        )

    def healthy(self) -> bool:
        """The member answers and its cluster has a quorum."""
        try:
            answer = _http_json(f"{self.url}/health")
        except OSError:
            return False
        return isinstance(answer, dict) and answer.get("health") == "true"

    def _cluster_id(self) -> str:
        """Peers of another run dir's cluster (other ports) never join this one."""
        return hashlib.sha256(self._cluster.encode()).hexdigest()[:12]


class PatroniNode(_Member):
    """Patroni and the PostgreSQL it runs, with config, log and data in `directory`."""

    program = "patroni"

    def __init__(
        self,
        *,
        directory: Path,
        index: int,
        ports: HaPorts,
        os_user: str | None,
        timeout: float = 60.0,
    ) -> None:
        super().__init__(role="pg", directory=directory, index=index, timeout=timeout)
        self.pg_port = ports.postgres[index]
        self.rest_port = ports.rest[index]
        self.os_user = os_user
        self._etcd = [f"{LOOPBACK}:{port}" for port in ports.etcd_client]

    @property
    def url(self) -> str:
        return f"postgresql://{ROLE}@{LOOPBACK}:{self.pg_port}/{DATABASE}"

    @property
    def rest_url(self) -> str:
        return f"http://{LOOPBACK}:{self.rest_port}"

    def start(self) -> float:
        """Ready once its REST API answers; the cluster waits for the roles."""
        if self.is_running():
            return 0.0
        check_ports_free(self.pg_port, self.rest_port)
        place_cluster(self.directory, self.os_user)
        # Where the user it runs as can reach it: `directory` may be a link (see the module).
        config = self.directory.resolve() / "patroni.json"  # JSON is YAML: no YAML writer
        config.write_text(json.dumps(self._config(), indent=1), encoding="utf-8")
        argv = [executable("patroni"), str(config)]
        if self.os_user is not None:
            account = os_account(self.os_user)
            os.chown(config, account.pw_uid, account.pw_gid)
            setpriv = [executable("setpriv"), f"--reuid={account.pw_uid}"]
            argv = [*setpriv, f"--regid={account.pw_gid}", "--clear-groups", "--", *argv]
        return self._launch(argv, ready=self._answers, what=f"patroni {self.name}")

    def stop(self) -> None:
        """SIGTERM to Patroni, which stops its PostgreSQL. Patroni starts the postmaster in
        a session of its own (so that it outlives Patroni), so one left by a Patroni that
        died, or that had to be killed, is stopped here too: SIGINT, PostgreSQL's fast
        shutdown."""
        try:
            super().stop()
        finally:
            self._stop_postmaster()

    def _stop_postmaster(self) -> None:
        pid = self.postmaster_pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
        wait_for(
            lambda: not pid_alive(pid),
            what=f"{self.name}: fast shutdown of the PostgreSQL its Patroni left",
            timeout=self.timeout,
            log=self.log,
        )

    def state(self) -> dict[str, Any]:
        """GET /patroni: this node's role, state and timeline ({} when it does not answer)."""
        try:
            answer = _http_json(f"{self.rest_url}/patroni")
        except OSError:
            return {}
        return answer if isinstance(answer, dict) else {}

    def cluster(self) -> list[dict[str, Any]]:
        """GET /cluster: every member as the DCS sees it."""
        answer = _http_json(f"{self.rest_url}/cluster")
        return list(answer.get("members", [])) if isinstance(answer, dict) else []

    def postmaster_pid(self) -> int | None:
        return read_pid(self.directory / "data" / "postmaster.pid", program="postgres")

    def kill_postgres(self) -> int:
        """kill -9 of this node's postmaster, as in a crash (Patroni keeps running);
        returns the pid killed."""
        pid = self.postmaster_pid()
        if pid is None:
            raise StackError(f"{self.name}: PostgreSQL is not running")
        os.kill(pid, signal.SIGKILL)
        return pid

    def freeze(self) -> None:
        """SIGSTOP of this node's PostgreSQL processes: a node that stops answering but
        keeps its connections open (a hung disk, a paused VM), the worst case of a standby
        falling behind. `thaw` lets it go on."""
        self._signal_postgres(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal_postgres(signal.SIGCONT)

    def _signal_postgres(self, sig: signal.Signals) -> None:
        pid = self.postmaster_pid()
        if pid is None:
            raise StackError(f"{self.name}: PostgreSQL is not running")
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text(encoding="ascii")
        for each in [pid, *map(int, children.split())]:
            os.kill(each, sig)

    def pause(self) -> None:
        """SIGSTOP of Patroni and its PostgreSQL, as when the machine is paused (a VM
        suspended, a partition): nothing dies, no connection is closed, nothing answers,
        and its leader key runs out after the TTL. `resume` lets it go on: Patroni finds
        the key gone and makes its PostgreSQL a standby."""
        self._signal_postgres(signal.SIGSTOP)
        self.send(signal.SIGSTOP)

    def resume(self) -> None:
        self.send(signal.SIGCONT)
        self._signal_postgres(signal.SIGCONT)

    def crash(self) -> None:
        """kill -9 of Patroni and its PostgreSQL at once, as when the machine dies: its
        leader key, if it held it, stays in etcd until its TTL runs out."""
        pid = self.postmaster_pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)  # first: nothing commits after this
        self.kill()

    def _answers(self) -> bool:
        return bool(self.state())

    def _config(self) -> dict[str, Any]:
        trust = [f"host all all {LOOPBACK}/32 trust", f"host replication all {LOOPBACK}/32 trust"]
        home = self.directory.resolve()
        return {
            "scope": SCOPE,
            "namespace": "/meterproof/",
            "name": self.name,
            "restapi": {
                "listen": f"{LOOPBACK}:{self.rest_port}",
                "connect_address": f"{LOOPBACK}:{self.rest_port}",
            },
            "etcd": {"hosts": self._etcd, "protocol": "http"},
            "bootstrap": {
                "dcs": {
                    **_DCS,
                    "maximum_lag_on_failover": 1048576,
                    "synchronous_mode": True,
                    "primary_start_timeout": 0,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "use_slots": True,
                        # pg_rewind needs hint bits in the WAL to bring a crashed primary back.
                        "parameters": {"wal_log_hints": "on", "max_wal_senders": 5},
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}],
            },
            "postgresql": {
                "listen": f"{LOOPBACK}:{self.pg_port}",
                "connect_address": f"{LOOPBACK}:{self.pg_port}",
                "data_dir": str(home / "data"),
                # Where all the server tools are: PATH may hold a few of them only.
                "bin_dir": str(Path(pg_bin("pg_controldata")).parent),
                "pgpass": str(home / "pgpass"),
                "authentication": {
                    "superuser": {"username": ROLE},
                    "replication": {"username": REPLICATION_ROLE},
                },
                "parameters": {
                    "unix_socket_directories": "",
                    "authentication_timeout": AUTHENTICATION_TIMEOUT,
                },
                "pg_hba": trust,
            },
        }


class HaCluster:
    """The etcd members and PostgreSQL nodes of one run dir, as one database server
    (`stack.services.Server`): `url` reaches whichever node is primary."""

    name = "postgres-ha"

    def __init__(self, *, directory: Path, ports: HaPorts, os_user: str | None = None) -> None:
        self.directory = directory.absolute()
        self.ports = ports
        user = os_user or default_os_user()
        self.etcd = [
            EtcdMember(directory=self.directory / f"etcd-{i}", index=i, ports=ports)
            for i in range(ETCD_MEMBERS)
        ]
        self.nodes = [
            PatroniNode(directory=self.directory / f"pg-{i}", index=i, ports=ports, os_user=user)
            for i in range(PG_NODES)
        ]
        #: What the last `start` started (`stop_started`).
        self._started: list[_Member] = []

    @staticmethod
    def record(directory: Path) -> Path:
        return directory / "cluster.json"

    @classmethod
    def recorded(cls, directory: Path) -> HaCluster | None:
        """The cluster recorded in `directory`, or None if it holds none."""
        record = cls.record(directory)
        return cls(directory=directory, ports=HaPorts.read(record)) if record.exists() else None

    @classmethod
    def create(cls, directory: Path) -> HaCluster:
        """The recorded cluster, or a new one on free ports, recorded now."""
        found = cls.recorded(directory)
        if found is not None:
            return found
        ports = HaPorts.free()
        ports.write(cls.record(directory))
        return cls(directory=directory, ports=ports)

    @property
    def url(self) -> str:
        return self.database_url(DATABASE)

    @property
    def read_url(self) -> str:
        """The reads that may lag (`database_read_url`): both nodes, and libpq (here
        psycopg) takes one in recovery while there is one, else the primary."""
        return self.database_url(DATABASE, sessions="prefer-standby")

    def database_url(self, database: str, *, sessions: str = "read-write") -> str:
        """Both nodes; libpq keeps the first that accepts writes (see the module), or with
        `sessions="prefer-standby"` one in recovery while there is one. The timeout is per
        host: a node whose machine is gone (no refusal, no answer) costs a client that
        long, not the kernel's minutes of TCP retries."""
        hosts = ",".join(f"{LOOPBACK}:{node.pg_port}" for node in self.nodes)
        query = f"target_session_attrs={sessions}&connect_timeout={CONNECT_TIMEOUT_S}"
        return f"postgresql://{ROLE}@{hosts}/{database}?{query}"

    def start(self) -> float:
        """Start what is not running, wait for a primary with a synchronous standby, make
        sure the database exists; return the seconds taken. If that fails, what this call
        started is stopped again (what ran before is left as it was)."""
        began = time.monotonic()
        self._started = []

        def start_all(members: Sequence[_Member]) -> None:
            for member in members:
                if not member.is_running():
                    self._started.append(member)
                    member.start()

        try:
            start_all(self.etcd)
            self._wait(lambda: all(m.healthy() for m in self.etcd), "etcd quorum")
            start_all(self.nodes)
            self.wait_replicated()
            ensure_database(self.database_url("postgres"))
        except BaseException:
            self.stop_started()
            raise
        return time.monotonic() - began

    def stop_started(self) -> None:
        """Stop again the members the last `start` started, leaving those that ran before
        it as they were: what a start that failed, or a `stack up` that failed after it,
        undoes."""
        started, self._started = self._started, []
        self._stop(started)

    def stop(self) -> None:
        """Every node and etcd member, in `_stop`'s order."""
        self._stop([*self.nodes, *self.etcd])

    def _stop(self, members: Sequence[_Member]) -> None:
        """Patroni stops its PostgreSQL on SIGTERM; the standby first, so the primary
        does not fail over to it, then etcd. One that fails to stop (killed after its
        timeout) does not keep the others running: the first failure is raised after."""
        nodes = [node for node in self.nodes if node in members]
        ordered = sorted(nodes, key=lambda n: n.state().get("role") in PRIMARY_ROLES)
        failures: list[StackError] = []
        for member in [*ordered, *(m for m in reversed(self.etcd) if m in members)]:
            try:
                member.stop()
            except StackError as exc:
                failures.append(exc)
        if failures:
            raise failures[0]

    def kill(self) -> None:
        """Every process of the cluster killed at once, as in a power cut."""
        for node in self.nodes:
            node.crash()
        for member in self.etcd:
            member.kill()

    def restart(self) -> float:
        self.stop()
        return self.start()

    def is_running(self) -> bool:
        return all(node.is_running() for node in self.nodes) and all(
            member.is_running() for member in self.etcd
        )

    def partly_running(self) -> bool:
        """Some process of the cluster runs (one may have been killed), a PostgreSQL that
        a dead Patroni left running included: `stack down` stops that too, and says so."""
        return any(server.is_running() for server in [*self.etcd, *self.nodes]) or any(
            node.postmaster_pid() is not None for node in self.nodes
        )

    def remove(self) -> None:
        """Stop, then delete every node's data (which may live outside the run dir)."""
        self.stop()
        for node in self.nodes:
            if node.directory.is_symlink():
                shutil.rmtree(node.directory.resolve(), ignore_errors=True)
        shutil.rmtree(self.directory, ignore_errors=True)

    def members(self) -> list[dict[str, Any]]:
        """Patroni's view of the cluster from the first node that answers."""
        for node in self.nodes:
            try:
                members = node.cluster()
            except OSError:
                continue
            if members:
                return members
        return []

    def primary(self) -> PatroniNode | None:
        """The node that is primary and running, if any."""
        for node in self.nodes:
            state = node.state()
            if state.get("role") in PRIMARY_ROLES and state.get("state") == "running":
                return node
        return None

    def standby(self) -> PatroniNode | None:
        primary = self.primary()
        return next((n for n in self.nodes if primary is not None and n is not primary), None)

    def wait_replicated(self, timeout: float = 90.0) -> float:
        """Until one node is primary and every other one streams as its sync standby."""

        def replicated() -> bool:
            roles = sorted(
                m.get("role", "") for m in self.members() if m.get("state") in RUNNING_STATES
            )
            return len(roles) == PG_NODES and self.primary() is not None and "sync_standby" in roles

        return self._wait(replicated, "a primary and its synchronous standby", timeout)

    def switchover(self, candidate: PatroniNode | None = None) -> PatroniNode:
        """A planned switchover through the primary's REST API; returns the new primary."""
        primary = self.primary()
        if primary is None:
            raise StackError("no primary to switch over from")
        target = candidate or next(n for n in self.nodes if n is not primary)
        # Patroni answers once the candidate is promoted, or says why it was not.
        body = {"leader": primary.name, "candidate": target.name}
        answer = _http_json(f"{primary.rest_url}/switchover", body=body, timeout=60)
        if not isinstance(answer, str) or "switched over" not in answer.lower():
            raise StackError(f"switchover to {target.name}: Patroni said {answer!r}")
        self._wait(lambda: self.primary() is target, f"{target.name} to serve as primary")
        return target

    @contextlib.contextmanager
    def maintenance(self) -> Iterator[None]:
        """Patroni's maintenance mode (`patronictl pause`) while inside: no failover, and
        a standby's WAL replay paused by hand stays paused. Outside it Patroni resumes a
        paused replay at its next loop (`loop_wait`, 1 s here), for PostgreSQL 14+'s own
        pause on a changed parameter."""
        self._set_maintenance(on=True)
        try:
            yield
        finally:
            self._set_maintenance(on=False)

    def _set_maintenance(self, *, on: bool) -> None:
        node = self.primary() or self.nodes[0]
        _http_json(f"{node.rest_url}/config", body={"pause": on}, method="PATCH")
        self._wait(
            lambda: all(bool(n.state().get("pause")) is on for n in self.nodes),
            f"every node {'in' if on else 'out of'} maintenance mode",
        )

    def _wait(self, ready: Callable[[], bool], what: str, timeout: float = 90.0) -> float:
        log = self.nodes[0].log if self.nodes[0].directory.exists() else self.etcd[0].log
        return wait_for(ready, what=what, timeout=timeout, log=log, alive=self._alive)

    def _alive(self) -> bool:
        return all(
            server.pid() is not None
            for server in [*self.etcd, *self.nodes]
            if server.pid_file.exists()
        )


def describe(cluster: HaCluster) -> Sequence[tuple[str, bool, str]]:
    """One (name, up, address and role) per process, for `stack status`."""
    roles = {m.get("name"): m for m in cluster.members()}
    rows: list[tuple[str, bool, str]] = [
        (m.name, m.is_running(), f"{m.url} {'healthy' if m.healthy() else 'no quorum'}")
        for m in cluster.etcd
    ]
    for node in cluster.nodes:
        member = roles.get(node.name, {})
        role = member.get("role", "-")
        role = "PRIMARY" if role in PRIMARY_ROLES else role.replace("_", " ")
        detail = f"{role} {member.get('state', 'unknown')}, lag {member.get('lag', '-')}"
        rows.append((node.name, node.is_running(), f"{node.url} (rest {node.rest_url}) {detail}"))
    return rows
