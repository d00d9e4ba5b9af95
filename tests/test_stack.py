"""The stack runners against the real servers, and `meterproof stack` end to end."""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
import pytest
import redis
from click.testing import CliRunner
from fixtures.servers import OwnBroker
from waiting import wait_until

from meterproof.certs.bootstrap import init_pki
from meterproof.certs.cli import certs as certs_cli
from meterproof.certs.identities import ingest_identity, issue_device
from meterproof.certs.layout import IdentityFiles, PkiLayout
from meterproof.certs.tls import client_context
from meterproof.config import StackEnv
from meterproof.mosquitto.config import broker_files
from meterproof.pidfile import pid_alive, read_pid
from meterproof.stack import process, services
from meterproof.stack.broker import BrokerServer
from meterproof.stack.postgres import PostgresServer
from meterproof.stack.process import (
    LOOPBACK,
    StackError,
    claim_port,
    free_port,
    port_accepts,
    port_is_free,
)
from meterproof.stack.redis import RedisServer
from meterproof.stack.services import LocalStack, Ports

METERPROOF = str(Path(sys.executable).parent / "meterproof")


def test_postgres_keeps_rows_across_stop_and_start(postgres: PostgresServer, database_url: str):
    with psycopg.connect(database_url) as conn:
        conn.execute("CREATE TABLE kept (n int)")
        conn.execute("INSERT INTO kept SELECT generate_series(1, 100)")
    postgres.stop()
    assert not postgres.is_running()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(database_url, connect_timeout=2)
    postgres.start()
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM kept").fetchone() == (100,)


@pytest.mark.slow
def test_postgres_recovers_committed_rows_after_a_crash(
    postgres: PostgresServer, database_url: str
):
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE crashed (n int)")
        conn.execute("INSERT INTO crashed VALUES (1)")
    postgres.kill()
    assert not postgres.is_running()
    postgres.start()
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT n FROM crashed").fetchall() == [(1,)]
        assert conn.execute("SHOW fsync").fetchone() == ("on",)


def test_connections_queued_while_postgres_was_paused_do_not_hold_its_shutdown(
    tmp_path: Path,
) -> None:
    """Clients that connected while the server was paused (SIGSTOP, as a VM suspended)
    and then went quiet without closing, as psycopg leaves a timed-out attempt until
    garbage collection, with a shutdown asked for meanwhile, as Patroni demotes a primary
    it finds paused: the server answers each with a child that waits for its client's
    startup packet, and exits only once they have gone. authentication_timeout bounds
    that wait: 5 s here, 60 s by default (the same script measured 5.1 s and 60.1 s)."""
    server = PostgresServer(directory=tmp_path / "pg")
    clients: list[socket.socket] = []
    paused: list[int] = []
    shutting_down = False
    try:
        server.start()
        pid = read_pid(server.data_dir / "postmaster.pid", program="postgres")
        assert pid is not None
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text(encoding="ascii")
        paused = [pid, *map(int, children.split())]
        for each in paused:
            os.kill(each, signal.SIGSTOP)
        for _ in range(3):
            client = socket.create_connection((LOOPBACK, server.port), timeout=5)
            client.sendall(struct.pack("!ii", 8, 80877103))  # SSLRequest, then nothing
            clients.append(client)
        os.kill(pid, signal.SIGQUIT)  # an immediate shutdown, asked while it is paused
        shutting_down = True
        for each in paused:
            os.kill(each, signal.SIGCONT)
        wait_until(lambda: not pid_alive(pid), within_s=30, what="the postmaster's exit")
    finally:
        for client in clients:
            client.close()
        for each in paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(each, signal.SIGCONT)
        if shutting_down:  # it goes as soon as its clients have: not for pg_ctl to stop
            wait_until(lambda: not server.is_running(), what="the shutdown's end")
        server.remove()


def test_each_test_gets_an_empty_migrated_database(postgres: PostgresServer, database_url: str):
    assert database_url != postgres.url
    with psycopg.connect(database_url) as conn:
        tables = {row[0] for row in conn.execute("SELECT tablename FROM pg_tables")}
    assert "schema_migrations" in tables
    assert "kept" not in tables


def test_redis_answers_ping_across_restart_and_kill(redis_server: RedisServer):
    def ping() -> bool:
        client = redis.Redis.from_url(redis_server.url, socket_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()

    assert ping()
    redis_server.restart()
    assert ping()
    redis_server.kill()
    assert not redis_server.is_running()
    assert not port_accepts(redis_server.port)
    redis_server.start()
    assert ping()


def mqtt_connect(broker: BrokerServer, pki: PkiLayout, meter_id: str) -> mqtt.ReasonCode:
    """CONNECT over mutual TLS with a fresh device certificate; the CONNACK's reason."""
    device = issue_device(pki, meter_id)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=meter_id)
    client.tls_set(ca_certs=str(pki.ca_cert), certfile=str(device.cert), keyfile=str(device.key))
    acks: list[mqtt.ReasonCode] = []
    client.on_connect = lambda _c, _u, _f, reason, _p: acks.append(reason)
    client.connect("127.0.0.1", broker.port, keepalive=10)
    try:
        for _ in range(50):
            client.loop(timeout=0.1)
            if acks:
                return acks[0]
        raise AssertionError("no CONNACK within 5 s")
    finally:
        client.disconnect()
        client.loop(timeout=0.1)


def test_broker_accepts_a_device_across_restart_and_kill9(
    broker: BrokerServer, pki: PkiLayout, make_meter_id
):
    assert mqtt_connect(broker, pki, make_meter_id()) == 0
    broker.restart()
    assert mqtt_connect(broker, pki, make_meter_id()) == 0
    broker.kill9()
    assert not broker.is_running()
    assert not port_accepts(broker.port)
    broker.start()
    assert mqtt_connect(broker, pki, make_meter_id()) == 0


def test_a_busy_port_is_refused_before_starting(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = RedisServer(directory=tmp_path, port=taken.getsockname()[1])
        with pytest.raises(StackError, match="already in use"):
            server.start()
    assert not server.is_running()


def test_free_ports_lie_below_the_range_outgoing_connections_use():
    """A connection's own port can never be the one a server is about to bind."""
    ceiling = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    with socket.socket() as outgoing:
        outgoing.bind(("127.0.0.1", 0))  # where the kernel puts a connection's end
        assert outgoing.getsockname()[1] >= ceiling
    ports = [free_port() for _ in range(50)]
    assert all(20_000 <= port < ceiling and port_is_free(port) for port in ports)


def test_a_number_beyond_the_ports_is_not_a_free_port():
    """A second broker's port is derived from the first's (+ 10); near the top of the
    range that is no port, and `stack up` must pick a free one instead of failing."""
    assert not port_is_free(65_535 + 10)


def test_free_ports_do_not_follow_a_seeded_random():
    """Hypothesis seeds `random` in every test process alike; the ports must differ."""
    drawn = []
    for _ in range(2):
        random.seed(17)
        drawn.append([free_port() for _ in range(5)])
    assert drawn[0] != drawn[1]


def test_a_failed_start_quotes_the_server_log(tmp_path: Path):
    port, admin_port = free_port(), free_port()
    files = broker_files(tmp_path)
    files.directory.mkdir()
    files.conf.write_text(
        f"listener {port} 127.0.0.1\ncafile {tmp_path}/missing.crt\n"
        f"certfile {tmp_path}/missing.crt\nkeyfile {tmp_path}/missing.key\n"
    )
    server = BrokerServer(files, port=port, admin_port=admin_port)
    with pytest.raises(StackError, match=r"(?s)the process exited.*missing\.crt"):
        server.start()
    assert not server.is_running()


class _NeverReadyRedis(RedisServer):
    """A real redis-server whose readiness probe never passes (a server that hangs)."""

    def _pong(self) -> bool:
        return False


def test_a_server_that_never_gets_ready_is_not_left_running(tmp_path: Path):
    server = _NeverReadyRedis(directory=tmp_path, timeout=0.5)
    with pytest.raises(StackError, match="not ready after"):
        server.start()
    assert not server.pid_file.exists()
    assert not server.is_running()
    assert port_is_free(server.port)  # nothing listens there any more


@pytest.mark.slow
def test_a_postgres_start_that_fails_once_the_server_runs_stops_it(tmp_path: Path):
    """pg_ctl saw the server start, then making the database fails (pg_hba.conf here
    turns every connection away): the server is stopped again, not left on its port."""
    server = PostgresServer(directory=tmp_path / "postgres")
    try:
        server.start()
        server.stop()
        (server.data_dir / "pg_hba.conf").write_text("host all all 127.0.0.1/32 reject\n")
        with pytest.raises(psycopg.OperationalError, match="rejects connection"):
            server.start()
        assert not server.is_running()
        assert port_is_free(server.port)
    finally:
        server.remove()


def tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return {row[0] for row in conn.execute("SELECT tablename FROM pg_tables")}


@pytest.mark.slow
def test_a_cluster_under_a_folder_only_we_may_enter_starts_and_keeps_its_data(tmp_path: Path):
    """As root the cluster runs as `postgres`, which cannot enter a 0700 folder of root's
    (a clone in /root): it must live elsewhere, linked from the run dir. Run as anyone
    else, the folder is ours and the cluster stays in it."""
    tmp_path.chmod(0o700)
    server = PostgresServer(directory=tmp_path / "run" / "postgres")
    try:
        server.start()
        with psycopg.connect(server.url) as conn:
            conn.execute("CREATE TABLE kept (n int)")
        server.restart()
        assert "kept" in tables(server.url)
        home = server.home
        if server.os_user is None:
            assert home == server.directory
        else:
            assert server.directory.is_symlink()
            assert tmp_path not in home.parents
            assert home.stat().st_uid == pwd.getpwnam(server.os_user).pw_uid
    finally:
        server.remove()
    assert not home.exists()
    assert not server.directory.is_symlink()
    assert not server.directory.exists()


@pytest.mark.slow
def test_a_deleted_run_dir_takes_its_cluster_with_it(tmp_path: Path):
    """`make clean` deletes the run dir: the next cluster for that path starts empty, even
    when the old one lived outside the run dir."""
    tmp_path.chmod(0o700)
    directory = tmp_path / "run" / "postgres"
    first = PostgresServer(directory=directory)
    first.start()
    with psycopg.connect(first.url) as conn:
        conn.execute("CREATE TABLE kept (n int)")
    first.stop()
    shutil.rmtree(tmp_path / "run")
    second = PostgresServer(directory=directory, port=first.port)
    try:
        second.start()
        assert "kept" not in tables(second.url)
    finally:
        second.remove()


@pytest.mark.slow
def test_a_cluster_that_cannot_start_says_why_in_one_line(tmp_path: Path):
    server = PostgresServer(directory=tmp_path / "postgres")
    try:
        server.start()
        server.stop()
        with (server.data_dir / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("shared_buffers = plenty\n")
        with pytest.raises(StackError) as failed:
            server.start()
    finally:
        server.remove()
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith("pg_ctl failed")
    assert f"{server.log} says: " in message
    assert "contains errors" in message


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    """In a folder only we may enter: as root, the cluster then lives outside it."""
    tmp_path.chmod(0o700)
    yield tmp_path / "run"
    LocalStack(run_dir=tmp_path / "run").down(purge=True)  # after a failed test, too


def stack(*args: str | Path, path: str | None = None) -> subprocess.CompletedProcess[str]:
    environ = dict(os.environ) if path is None else {**os.environ, "PATH": path}
    return subprocess.run(
        [METERPROOF, "stack", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=environ,
    )


def free_ports() -> dict[str, int]:
    """A distinct free port for each of `stack up`'s port options."""
    options = ("--mqtt-port", "--mqtt-admin-port", "--pg-port", "--redis-port")
    ports: set[int] = set()
    while len(ports) < len(options):
        ports.add(free_port())
    return dict(zip(options, sorted(ports), strict=True))


def as_options(ports: dict[str, int]) -> list[str]:
    return [str(part) for item in ports.items() for part in item]


@pytest.mark.slow
def test_stack_up_status_down(run_dir: Path):
    ports = free_ports()
    pki_root = run_dir.parent / "pki"
    up = stack("up", "--run-dir", run_dir, "--pki-root", pki_root, *as_options(ports))
    assert up.returncode == 0, up.stderr
    assert f"source {run_dir}/stack.env" in up.stdout

    env = StackEnv.read(run_dir / "stack.env")
    assert env.run_dir == run_dir
    assert env.pki_root == pki_root
    assert env.mqtt_port == ports["--mqtt-port"]
    assert env.mqtt_admin_port == ports["--mqtt-admin-port"]
    assert env.database_url == f"postgresql://meterproof@127.0.0.1:{ports['--pg-port']}/meterproof"
    assert env.redis_url == f"redis://127.0.0.1:{ports['--redis-port']}/0"
    assert PkiLayout(pki_root).ca_cert.exists()
    with psycopg.connect(env.database_url) as conn:
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() != (0,)

    again = stack("up", "--run-dir", run_dir)
    assert again.returncode == 0, again.stderr
    assert "already up" in again.stdout
    assert StackEnv.read(run_dir / "stack.env") == env
    status = stack("status", "--run-dir", run_dir)
    assert status.returncode == 0, status.stdout
    assert [line.split()[:2] for line in status.stdout.splitlines()] == [
        ["postgres", "up"],
        ["redis", "up"],
        ["mosquitto", "up"],
    ]

    pids = [
        read_pid(run_dir / "postgres/data/postmaster.pid", program="postgres"),
        read_pid(run_dir / "redis/redis.pid", program="redis-server"),
        read_pid(run_dir / "mosquitto/mosquitto.pid", program="mosquitto"),
    ]
    assert None not in pids
    down = stack("down", "--run-dir", run_dir)
    assert down.returncode == 0, down.stderr
    assert not any(pid_alive(pid) for pid in pids if pid is not None)
    assert not any(port_accepts(port) for port in ports.values())
    assert stack("status", "--run-dir", run_dir).returncode == 1
    again = stack("down", "--run-dir", run_dir)
    assert (again.returncode, again.stdout) == (0, "nothing was running\n")


@pytest.mark.slow
def test_stack_up_stops_what_it_started_when_a_server_fails(run_dir: Path):
    ports = free_ports()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports["--redis-port"]))
        taken.listen()
        up = stack(
            "up", "--run-dir", run_dir, "--pki-root", run_dir.parent / "pki", *as_options(ports)
        )
    assert up.returncode == 1
    in_use = f"Error: port {ports['--redis-port']} on 127.0.0.1 is already in use"
    assert up.stderr.splitlines() == [in_use]
    assert not port_accepts(ports["--pg-port"])  # PostgreSQL had started first
    status = stack("status", "--run-dir", run_dir)
    assert status.returncode == 1
    assert [line.split()[1] for line in status.stdout.splitlines()] == ["down"] * 3


@pytest.mark.slow
def test_stack_up_interrupted_while_migrating_stops_what_it_started(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    """Ctrl-C (KeyboardInterrupt) once every server runs: it goes on up, and the servers
    `up` started are stopped again, as on any failure."""

    def interrupted(database_url: str) -> list[str]:
        raise KeyboardInterrupt

    monkeypatch.setattr(services, "migrate", interrupted)
    ports = free_ports()
    local = LocalStack(run_dir=run_dir, pki_root=run_dir.parent / "pki")
    wanted = Ports(
        mqtt=ports["--mqtt-port"],
        mqtt_admin=ports["--mqtt-admin-port"],
        postgres=ports["--pg-port"],
        redis=ports["--redis-port"],
    )
    with pytest.raises(KeyboardInterrupt):
        local.up(wanted)
    assert [(s.name, s.running) for s in local.status()] == [
        ("postgres", False),
        ("redis", False),
        ("mosquitto", False),
    ]
    assert not any(port_accepts(port) for port in ports.values())


@pytest.mark.slow
def test_a_missing_server_binary_is_one_line_and_nothing_is_left_running(
    run_dir: Path, tmp_path: Path
):
    ports = free_ports()
    empty = tmp_path / "bin"
    empty.mkdir()
    up = stack(
        "up", "--run-dir", run_dir, "--pki-root", tmp_path / "pki", *as_options(ports),
        path=str(empty),
    )  # fmt: skip
    assert up.returncode == 1
    assert up.stderr.splitlines() == [
        "Error: redis-server not found on PATH; `make system-packages` installs it"
    ]
    assert not any(port_accepts(port) for port in ports.values())


@pytest.mark.slow
def test_stack_render_prepares_compose_without_starting(run_dir: Path):
    ports = free_ports()
    rendered = stack(
        "render", "--run-dir", run_dir, "--pki-root", run_dir.parent / "pki", *as_options(ports)
    )
    assert rendered.returncode == 0, rendered.stderr
    compose = dict(
        line.split("=", 1) for line in (run_dir / "compose.env").read_text().splitlines()
    )
    assert compose["METERPROOF_RUN_DIR"] == str(run_dir)
    assert compose["METERPROOF_MQTT_PORT"] == str(ports["--mqtt-port"])
    assert compose["METERPROOF_PG_PORT"] == str(ports["--pg-port"])
    assert compose["METERPROOF_REDIS_PORT"] == str(ports["--redis-port"])
    assert (run_dir / "mosquitto" / "mosquitto.conf").exists()
    assert StackEnv.read(run_dir / "stack.env").mqtt_port == ports["--mqtt-port"]
    assert not any(port_accepts(port) for port in ports.values())


def test_issuing_a_worker_identity_reloads_the_running_brokers_acl(
    own_broker: Callable[..., OwnBroker], tmp_path: Path, make_meter_id
):
    """The broker grants rights by CN from its rendered ACL: `certs issue-service` renders
    it again and sends SIGHUP, so the new worker may read readings at once. A PKI and
    broker of its own: the session's hand their ingest identities to other tests."""
    pki = PkiLayout(tmp_path / "pki")
    init_pki(pki, ca_key="ec-p384", ingest_workers=1)
    own = own_broker(pki)
    broker = own.server
    new = ingest_identity(1)
    result = CliRunner().invoke(
        certs_cli,
        ["--pki-root", str(pki.root), "issue-service", "ingest",
         "--instances", "2", "--stack-env", str(own.env.run_dir / "stack.env")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"issued: {new}" in result.output
    assert "reloaded" in result.output
    assert f"user {new}\n" in broker.files.acl.read_text()

    meter_id = make_meter_id()
    issue_device(pki, meter_id)
    worker, meter = _client(pki, pki.service(new)), _client(pki, pki.device(meter_id))
    got: list[bytes] = []
    subacks: list[list[mqtt.ReasonCode]] = []
    worker.on_message = lambda _c, _u, message: got.append(message.payload)
    worker.on_subscribe = lambda _c, _u, _mid, reasons, _p: subacks.append(reasons)
    try:
        for client in (worker, meter):
            client.connect("127.0.0.1", broker.port)
            client.loop_start()
        worker.subscribe("meters/+/readings", qos=1)
        wait_until(lambda: subacks, what="the broker acknowledges the subscription")
        meter.publish(f"meters/{meter_id}/readings", b"r", qos=1).wait_for_publish(5)
        wait_until(lambda: got, what="the new worker receives the reading")
        assert got == [b"r"]
    finally:
        for client in (worker, meter):
            client.disconnect()
            client.loop_stop()


def _client(pki: PkiLayout, files: IdentityFiles) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.tls_set_context(client_context(cert=files.cert, key=files.key, ca_cert=pki.ca_cert))
    return client


def test_a_run_dir_keeps_the_brokers_it_was_prepared_with(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = LocalStack(run_dir=run_dir, pki_root=tmp_path / "pki", brokers=3).prepare(Ports())
    assert len(env.brokers()) == len(env.admin_ports()) == 3
    ports = {port for _, port in env.brokers()} | set(env.admin_ports())
    assert len(ports) == 6  # a listener each, none shared
    for index in range(3):
        assert broker_files(run_dir, index).conf.exists()
    # Asked again without a count, the run dir's record decides: `down` finds all three.
    again = LocalStack(run_dir=run_dir)
    assert again.broker_count == 3
    assert [b.port for b in again.brokers(again.recorded())] == [p for _, p in env.brokers()]


@pytest.fixture
def claims(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A claims file of the test's own, so its hundreds of draws do not crowd the
    machine's for the other test processes."""
    path = tmp_path / "claims.json"
    monkeypatch.setattr(process, "_CLAIMS", path)
    return path


@pytest.mark.usefixtures("claims")
def test_a_drawn_port_is_not_drawn_again_while_its_claim_holds():
    """Hundreds of draws, none twice: at random alone, 400 draws among the ~12,800 ports
    below the ephemeral range repeat one with a probability above 99 %."""
    ports = [free_port() for _ in range(400)]
    assert len(set(ports)) == len(ports)


def test_two_processes_drawing_at_once_never_draw_the_same_port(claims: Path):
    """What failed a clean-clone run: a drawn port was taken by another test process's
    server before the drawing test's own server started on it."""
    start = time.time() + 2  # both draw in the same second, after their imports
    draw = (
        "import pathlib, sys, time\n"
        "from meterproof.stack import process\n"
        "process._CLAIMS = pathlib.Path(sys.argv[2])\n"
        "time.sleep(max(0.0, float(sys.argv[1]) - time.time()))\n"
        "print(*(process.free_port() for _ in range(200)))\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", draw, str(start), str(claims)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    first, second = ({int(p) for p in proc.communicate(timeout=60)[0].split()} for proc in procs)
    assert len(first) == len(second) == 200
    assert not first & second


@pytest.mark.parametrize("unusable", ["a missing folder", "a symbolic link"])
def test_draws_stay_distinct_when_the_claims_file_cannot_be_used(
    unusable: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A link is not followed: in /tmp anyone could point it at a file of root's."""
    target = tmp_path / "not-ours"
    target.write_text("kept")
    claims = tmp_path / "no-such-folder" / "claims.json"
    if unusable == "a symbolic link":
        claims = tmp_path / "claims.json"
        claims.symlink_to(target)
    monkeypatch.setattr(process, "_CLAIMS", claims)
    ports = [free_port() for _ in range(400)]
    assert len(set(ports)) == len(ports)
    assert target.read_text() == "kept"


@pytest.mark.usefixtures("claims")
def test_a_claimed_or_listening_port_cannot_be_claimed():
    port = free_port()  # claimed by the draw
    assert not claim_port(port)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert not claim_port(taken.getsockname()[1])


@pytest.mark.usefixtures("claims")
def test_a_second_broker_does_not_take_a_port_another_process_claimed(tmp_path: Path):
    """Its ports are the first's + 10 the first time, unless someone drew that port."""
    mqtt, admin = free_port(), free_port()
    claim_port(mqtt + 10)  # as another process drawing it for its own server would
    local = LocalStack(run_dir=tmp_path / "run", pki_root=tmp_path / "pki", brokers=2)
    env = local.prepare(Ports(mqtt=mqtt, mqtt_admin=admin), ingest_workers=1)
    ports = [port for _, port in env.brokers()] + list(env.admin_ports())
    assert ports[0] == mqtt
    assert ports[1] != mqtt + 10
    assert len(set(ports)) == 4
