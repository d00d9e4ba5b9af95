"""Wallet links and consents against a real PostgreSQL: what is accepted, and every bad
input refused with its reason, recorded, and leaving the state as it was."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from consent_harness import Ed25519Wallet, EvmWallet, Wallet, link, meter_kid, owner_grant
from ingest_harness import provision

from meterproof.certs.layout import PkiLayout
from meterproof.consent import repository as consents
from meterproof.consent.model import Refusal, Scope
from meterproof.consent.policy import live_audience, may_see
from meterproof.registry import wallets
from meterproof.registry.errors import RefusedError
from meterproof.schemas.reading import b64url
from meterproof.schemas.signatures import PrivateKey
from meterproof.schemas.timestamps import wall_ms

Conn = psycopg.Connection[Any]
ALL = frozenset(Scope)


@pytest.fixture
def conn(database_url: str) -> Iterator[Conn]:
    with psycopg.connect(database_url, autocommit=True) as connection:
        yield connection


@pytest.fixture
def meters(pki: PkiLayout, database_url: str) -> dict[str, PrivateKey]:
    """Two registered meters of this test, with their reading keys."""
    suffix = database_url.rsplit("/", 1)[1][-8:]
    ids = [f"cons-{name}-{suffix}" for name in ("a", "b")]
    return {meter_id: provision(pki, database_url, meter_id) for meter_id in ids}


def _state(conn: Conn) -> tuple[Any, ...]:
    """Everything a refused change must leave as it was."""
    return tuple(
        conn.execute(query).fetchall()
        for query in (
            "SELECT meter_id, account_id, unlinked_at FROM wallet_links ORDER BY id",
            "SELECT meter_id, owner_wallet FROM meters ORDER BY meter_id",
            "SELECT id FROM consents ORDER BY id",
            "SELECT consent, event FROM consent_events WHERE event <> 'refused' ORDER BY id",
            "SELECT name, status FROM integrators ORDER BY name",
        )
    )


def _refusals(conn: Conn, table: str) -> list[str]:
    if table == "security_events":
        query = "SELECT detail->>'reason' FROM security_events WHERE type LIKE '%%_refused'"
    else:
        query = "SELECT reason FROM consent_events WHERE event = 'refused'"
    return [r[0] for r in conn.execute(query).fetchall()]


def _refused(conn: Conn, code: str, table: str, attempt: Callable[[], object]) -> None:
    before = _state(conn)
    with pytest.raises(RefusedError) as caught:
        attempt()
    assert caught.value.code == code, caught.value
    assert _state(conn) == before
    assert _refusals(conn, table)[-1] == code


# -- wallet links -----------------------------------------------------------------------


@pytest.mark.parametrize("make", [EvmWallet.new, Ed25519Wallet.new], ids=["eip155", "solana"])
def test_a_wallet_is_linked_with_both_proofs_and_relinking_keeps_history(
    conn: Conn, meters: dict[str, PrivateKey], make: Callable[[], Wallet]
) -> None:
    (meter_a, key_a), _ = meters.items()
    first, second = make(), make()

    made = link(conn, meter_a, key_a, first)
    assert (made.meter_id, made.account, made.unlinked_at) == (meter_a, str(first.account), None)
    assert wallets.meters_of_wallet(conn, first.account) == [meter_a]
    link(conn, meter_a, key_a, second)

    history = wallets.link_history(conn, meter_a)
    assert [h.account for h in history] == [str(second.account), str(first.account)]
    assert history[1].unlink_reason == "relinked"
    assert history[0].unlinked_at is None
    owner = conn.execute("SELECT owner_wallet FROM meters WHERE meter_id = %s", (meter_a,))
    assert owner.fetchone() == (str(second.account),)  # future mints go to the new owner
    assert wallets.meters_of_wallet(conn, first.account) == []

    wallets.unlink_wallet(conn, meter_a, by="operator", reason="sold the house")
    owner = conn.execute("SELECT owner_wallet FROM meters WHERE meter_id = %s", (meter_a,))
    assert owner.fetchone() == (None,)


def _link_attempt(
    conn: Conn,
    meter_id: str,
    wallet: Wallet,
    *,
    wallet_signs: Callable[[str], str] | None = None,
    meter_signs: Callable[[bytes], bytes],
    kid: str | None = None,
    challenge_meter: str | None = None,
) -> Callable[[], object]:
    challenge = wallets.issue_link_challenge(conn, challenge_meter or meter_id, wallet.account)
    sign = wallet_signs or wallet.sign
    return lambda: wallets.link_wallet(
        conn,
        meter_id=meter_id,
        account=wallet.account,
        challenge_id=challenge.id,
        wallet_signature=sign(challenge.document),
        meter_kid=kid or meter_kid(conn, meter_id),
        meter_signature=b64url(meter_signs(challenge.document.encode())),
    )


def test_forged_wallet_proofs_are_refused(conn: Conn, meters: dict[str, PrivateKey]) -> None:
    (meter_a, key_a), (meter_b, key_b) = meters.items()
    wallet, thief = EvmWallet.new(), EvmWallet.new()
    checks = {
        # signed by another wallet than the one named
        "bad_wallet_signature": _link_attempt(
            conn, meter_a, wallet, wallet_signs=thief.sign, meter_signs=key_a.sign
        ),
        # the wallet signed, but the meter's confirmation comes from another meter's key
        "bad_meter_signature": _link_attempt(conn, meter_a, wallet, meter_signs=key_b.sign),
        # a key id the meter does not have
        "unknown_kid": _link_attempt(conn, meter_a, wallet, meter_signs=key_a.sign, kid="nokey"),
        # a challenge issued for meter B, used for meter A
        "wrong_challenge": _link_attempt(
            conn, meter_a, wallet, meter_signs=key_a.sign, challenge_meter=meter_b
        ),
    }
    for code, attempt in checks.items():
        _refused(conn, code, "security_events", attempt)


def test_a_replayed_or_expired_challenge_is_refused(
    conn: Conn, meters: dict[str, PrivateKey]
) -> None:
    (meter_a, key_a), _ = meters.items()
    wallet = Ed25519Wallet.new()
    attempt = _link_attempt(conn, meter_a, wallet, meter_signs=key_a.sign)
    attempt()  # linked
    wallets.unlink_wallet(conn, meter_a, by="operator", reason="test")
    _refused(conn, "challenge_used", "security_events", attempt)  # the same proofs again

    stale = _link_attempt(conn, meter_a, wallet, meter_signs=key_a.sign)
    conn.execute(
        "UPDATE wallet_challenges SET issued_at = now() - interval '1 hour',"
        " expires_at = now() - interval '1 minute' WHERE used_at IS NULL"
    )
    _refused(conn, "challenge_expired", "security_events", stale)


def test_linking_an_unknown_meter_is_refused(conn: Conn) -> None:
    account = EvmWallet.new().account
    _refused(conn, "unknown_meter", "security_events",
             lambda: wallets.issue_link_challenge(conn, "nobody", account))  # fmt: skip


# -- consents ---------------------------------------------------------------------------


def _integrator(conn: Conn, name: str = "acme") -> str:
    consents.add_integrator(conn, name, cert_serial="1f")
    return name


def _request(meter_id: str | None = None, **changes: Any) -> consents.GrantRequest:
    values: dict[str, Any] = {
        "integrator": "acme",
        "meter_id": meter_id,
        "account": None,
        "scopes": frozenset({Scope.LIVE, Scope.HISTORY}),
        "data_from": datetime(2026, 1, 1, tzinfo=UTC),
        "data_to": None,
        "expires_at": None,
        **changes,
    }
    return consents.GrantRequest(**values)


def test_an_owner_grants_and_revokes_with_the_linked_wallet(
    conn: Conn, meters: dict[str, PrivateKey]
) -> None:
    (meter_a, key_a), (meter_b, _) = meters.items()
    owner = EvmWallet.new()
    link(conn, meter_a, key_a, owner)
    _integrator(conn)

    made = owner_grant(conn, _request(meter_a), owner)
    assert (made.status, made.granted_by) == ("active", str(owner.account))
    view = consents.load_view(conn)
    now = wall_ms()
    assert may_see("acme", meter_a, now, Scope.LIVE, view=view, now_ms=now).consent == made.id
    assert may_see("acme", meter_b, now, Scope.LIVE, view=view, now_ms=now).refusal == (
        Refusal.NO_CONSENT
    )
    assert may_see("acme", meter_a, now, Scope.LEDGER, view=view, now_ms=now).refusal == (
        Refusal.SCOPE
    )

    challenge = consents.request_revoke(conn, made.id, owner.account)
    ended = consents.revoke(
        conn,
        made.id,
        signer=owner.account,
        challenge_id=challenge.id,
        signature=owner.sign(challenge.document),
    )
    assert ended.status == "revoked"
    assert [e["event"] for e in ended.events] == ["granted", "revoked"]
    view = consents.load_view(conn)
    assert may_see("acme", meter_a, now, Scope.LIVE, view=view, now_ms=now).refusal == (
        Refusal.NO_CONSENT
    )
    _refused(conn, "already_ended", "consent_events",
             lambda: consents.revoke(conn, made.id, operator_reason="again"))  # fmt: skip


def test_bad_grants_are_refused_recorded_and_change_nothing(
    conn: Conn, meters: dict[str, PrivateKey]
) -> None:
    (meter_a, key_a), (meter_b, key_b) = meters.items()
    owner, stranger = EvmWallet.new(), Ed25519Wallet.new()
    link(conn, meter_a, key_a, owner)
    link(conn, meter_b, key_b, stranger)
    _integrator(conn)
    consents.add_integrator(conn, "gone", cert_serial="2f")
    consents.revoke_integrator(conn, "gone", reason="contract ended")

    def forged() -> object:  # signed by some other wallet than the one named
        challenge = consents.request_grant(conn, _request(meter_a), owner.account)
        return consents.grant(conn, _request(meter_a), signer=owner.account,
                              challenge_id=challenge.id,
                              signature=EvmWallet.new().sign(challenge.document))  # fmt: skip

    def mismatch() -> object:
        challenge = consents.request_grant(conn, _request(meter_a), owner.account)
        wider = _request(meter_a, scopes=ALL)
        return consents.grant(conn, wider, signer=owner.account, challenge_id=challenge.id,
                              signature=owner.sign(challenge.document))  # fmt: skip

    def not_owner() -> object:  # the stranger's wallet signs for meter A, which it does not own
        return owner_grant(conn, _request(meter_a), stranger)

    checks: dict[str, Callable[[], object]] = {
        "bad_signature": forged,
        "document_mismatch": mismatch,
        "not_owner": not_owner,
        "unknown_integrator": lambda: consents.grant(
            conn, _request(meter_a, integrator="nobody"), operator_reason="test"
        ),
        "integrator_revoked": lambda: consents.grant(
            conn, _request(meter_a, integrator="gone"), operator_reason="test"
        ),
        "unknown_meter": lambda: consents.grant(conn, _request("no-such"), operator_reason="t"),
        "invalid_period": lambda: consents.grant(
            conn,
            _request(meter_a, data_to=datetime(2025, 1, 1, tzinfo=UTC)),
            operator_reason="test",
        ),
        "no_authority": lambda: consents.grant(conn, _request(meter_a)),
    }
    for code, attempt in checks.items():
        _refused(conn, code, "consent_events", attempt)


def test_a_replayed_consent_signature_and_an_overlapping_grant_are_refused(
    conn: Conn, meters: dict[str, PrivateKey]
) -> None:
    (meter_a, key_a), _ = meters.items()
    owner = Ed25519Wallet.new()
    link(conn, meter_a, key_a, owner)
    _integrator(conn)
    request = _request(meter_a, scopes=frozenset({Scope.HISTORY}))
    challenge = consents.request_grant(conn, request, owner.account)
    signature = owner.sign(challenge.document)
    made = consents.grant(
        conn, request, signer=owner.account, challenge_id=challenge.id, signature=signature
    )
    consents.revoke(conn, made.id, operator_reason="owner asked by phone")
    _refused(conn, "challenge_used", "consent_events", lambda: consents.grant(
        conn, request, signer=owner.account, challenge_id=challenge.id, signature=signature
    ))  # fmt: skip

    consents.grant(conn, _request(meter_a), operator_reason="support case 1")
    overlapping = _request(meter_a, scopes=frozenset({Scope.LIVE}),
                           data_from=datetime(2026, 6, 1, tzinfo=UTC))  # fmt: skip
    _refused(conn, "overlapping_consent", "consent_events",
             lambda: owner_grant(conn, overlapping, owner))  # fmt: skip
    # Another scope, or a disjoint period, does not overlap.
    owner_grant(conn, _request(meter_a, scopes=frozenset({Scope.LEDGER})), owner)


def test_a_wallet_wide_consent_follows_the_current_links(
    conn: Conn, meters: dict[str, PrivateKey]
) -> None:
    (meter_a, key_a), (meter_b, key_b) = meters.items()
    owner, buyer = EvmWallet.new(), EvmWallet.new()
    link(conn, meter_a, key_a, owner)
    link(conn, meter_b, key_b, owner)
    _integrator(conn)
    owner_grant(conn, _request(None, account=owner.account), owner)
    now = wall_ms()

    def allowed(meter_id: str) -> bool:
        view = consents.load_view(conn)
        return may_see("acme", meter_id, now, Scope.HISTORY, view=view, now_ms=now).allowed

    assert allowed(meter_a)
    assert allowed(meter_b)
    link(conn, meter_b, key_b, buyer)  # meter B changes hands
    assert allowed(meter_a)
    assert not allowed(meter_b)


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def test_a_buyers_consent_shows_nothing_of_the_sellers_time(
    conn: Conn, meters: dict[str, PrivateKey]
) -> None:
    """The buyer links the meter and grants from 2020, for the meter (acme) and for all
    its meters (beta): neither sees a reading of the seller's time."""
    (meter_a, key_a), _ = meters.items()
    seller, buyer = EvmWallet.new(), Ed25519Wallet.new()
    link(conn, meter_a, key_a, seller)
    sold = _ms(link(conn, meter_a, key_a, buyer).linked_at)
    early = datetime(2020, 1, 1, tzinfo=UTC)
    _integrator(conn)
    _integrator(conn, "beta")
    owner_grant(conn, _request(meter_a, data_from=early), buyer)
    owner_grant(conn, _request(None, integrator="beta", account=buyer.account, data_from=early),
                buyer)  # fmt: skip
    view = consents.load_view(conn)
    now = wall_ms()
    times = {"2020": _ms(early), "sold-1ms": sold - 1, "sold+1ms": sold + 1, "now": now}
    for name in ("acme", "beta"):
        seen = {at: may_see(name, meter_a, ts, Scope.HISTORY, view=view, now_ms=now).refusal
                for at, ts in times.items()}  # fmt: skip
        assert seen == {"2020": Refusal.PERIOD, "sold-1ms": Refusal.PERIOD,
                        "sold+1ms": None, "now": None}, name  # fmt: skip


def test_a_sellers_consent_ends_at_the_sale(conn: Conn, meters: dict[str, PrivateKey]) -> None:
    """The seller's open-ended consent keeps the seller's time and shows nothing of the
    buyer's, stored or live."""
    (meter_a, key_a), _ = meters.items()
    seller, buyer = EvmWallet.new(), EvmWallet.new()
    bought = _ms(link(conn, meter_a, key_a, seller).linked_at)
    _integrator(conn)
    owner_grant(conn, _request(meter_a), seller)
    sold = _ms(link(conn, meter_a, key_a, buyer).linked_at)
    view = consents.load_view(conn)
    now = wall_ms()
    times = {"bought-1ms": bought - 1, "bought+1ms": bought + 1, "sold-1ms": sold - 1,
             "sold+1ms": sold + 1, "now": now}  # fmt: skip
    seen = {at: may_see("acme", meter_a, ts, Scope.HISTORY, view=view, now_ms=now).refusal
            for at, ts in times.items()}  # fmt: skip
    assert seen == {"bought-1ms": Refusal.PERIOD, "bought+1ms": None, "sold-1ms": None,
                    "sold+1ms": Refusal.PERIOD, "now": Refusal.PERIOD}  # fmt: skip
    assert live_audience(meter_a, now, view, now) == []


def test_expiry_is_enforced_at_once_and_recorded_by_the_sweep(
    conn: Conn, meters: dict[str, PrivateKey]
) -> None:
    (meter_a, _), _ = meters.items()
    _integrator(conn)
    expires = datetime.now(UTC) + timedelta(seconds=2)
    made = consents.grant(conn, _request(meter_a, expires_at=expires), operator_reason="trial")
    view = consents.load_view(conn)
    before, after = wall_ms(), int(expires.timestamp() * 1000)
    assert may_see("acme", meter_a, before, Scope.LIVE, view=view, now_ms=before).allowed
    assert may_see("acme", meter_a, before, Scope.LIVE, view=view, now_ms=after).refusal == (
        Refusal.EXPIRED
    )
    assert consents.record_expiries(conn) == 0  # not yet
    conn.execute(
        "SELECT pg_sleep(greatest(0, extract(epoch FROM %s::timestamptz - now())) + 0.1)",
        (expires,),
    )
    assert consents.record_expiries(conn) == 1
    assert consents.record_expiries(conn) == 0
    shown = consents.show(conn, made.id)
    assert shown is not None
    assert shown.status == "expired"
    assert [e["event"] for e in shown.events] == ["granted", "expired"]


def test_consents_and_their_events_are_append_only(
    conn: Conn, meters: dict[str, PrivateKey]
) -> None:
    (meter_a, _), _ = meters.items()
    _integrator(conn)
    made = consents.grant(conn, _request(meter_a), operator_reason="test")
    for statement in (
        "UPDATE consents SET scopes = '{ledger}' WHERE id = %s",
        "DELETE FROM consent_events WHERE consent = %s",
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(statement, (made.id,))


def test_the_expiry_sweep_wakes_no_cache_when_nothing_expired(
    conn: Conn, database_url: str, meters: dict[str, PrivateKey]
) -> None:
    """Workers sweep every few seconds; a sweep that records nothing must not make every
    worker reload its view."""
    (meter_a, _), _ = meters.items()
    _integrator(conn)
    consents.grant(conn, _request(meter_a), operator_reason="open-ended")
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {consents.CHANNEL}")
        assert consents.record_expiries(conn) == 0
        assert list(listener.notifies(timeout=0.5)) == []
        consents.revoke_integrator(conn, "acme", reason="test")
        assert [n.channel for n in listener.notifies(timeout=2, stop_after=1)] == [consents.CHANNEL]
