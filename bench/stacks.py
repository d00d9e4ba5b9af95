"""A bench's private stack: its servers on free ports of their own and its meters
registered, for every bench that starts one (drain, load, limits, API)."""

from __future__ import annotations

import psycopg

from meterproof.certs import issue_bulk
from meterproof.certs.layout import PkiLayout
from meterproof.config import StackEnv
from meterproof.registry import repository
from meterproof.registry.model import NewKey, NewMeter
from meterproof.stack.process import StackError, free_port
from meterproof.stack.services import LocalStack, Ports


def provision_meters(pki: PkiLayout, database_url: str, count: int) -> dict[str, bytes]:
    ids = [f"bench-{i:05d}" for i in range(count)]
    issued = issue_bulk(pki, [i for i in ids if not pki.device(i).cert.exists()])
    meters = [NewMeter(d.record.name, NewKey.parse("EdDSA", d.public_key_pem)) for d in issued]
    with psycopg.connect(database_url, autocommit=True) as conn:
        repository.register(conn, meters)
    return {i: pki.device(i).signing_key.read_bytes() for i in ids}


def _private_ports() -> Ports:
    taken: set[int] = set()
    while len(taken) < 4:
        taken.add(free_port())
    mqtt, admin, pg, rd = sorted(taken)
    return Ports(mqtt=mqtt, mqtt_admin=admin, postgres=pg, redis=rd)


def up_on_free_ports(stack: LocalStack, *, ingest_workers: int, tries: int = 3) -> StackEnv:
    """Start `stack` on free ports, never the conventional ones (a developer's stack may
    hold those). A free port can still be taken before its server starts (seconds later,
    after initdb: an outgoing connection on this shared machine may get it as its
    ephemeral port), so a start that finds its port taken is tried again on new ports."""
    for _ in range(tries - 1):
        try:
            return stack.up(_private_ports(), ingest_workers=ingest_workers)[0]
        except StackError:
            stack.down()
    return stack.up(_private_ports(), ingest_workers=ingest_workers)[0]
