"""Allocation quotas against a real ``tsunagu serve`` with default settings.

Measured before: one user holding a TURN REST secret's credentials (a new one per
allocation, as a web page hands out) took 984 allocations of a 1,000-port relay range in
0.3 s, and the next user got 508. Now the user id and the client address have quotas
whatever the credential, derived from the range: a user gets at most 128 allocations per
worker, an address at most half of each worker's ports, and someone else still gets a relay.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from support.flood import RetransmittingClient
from support.interop import relay_range, run_serve
from tsunagu.auth.rest import mint_credentials
from tsunagu.turn.quotas import DEFAULT_USER_QUOTA

pytestmark = pytest.mark.interop

SECRET = "quota-test-secret"
ATTEMPTS = 400


def allocations(server: tuple[str, int], source: str, users: list[str]) -> tuple[int, int]:
    """Allocate once per entry of ``users``, each with a freshly minted credential."""
    granted = refused = 0
    for n, user in enumerate(users):
        username, password = mint_credentials(SECRET, user, 600 + n, time.time())
        try:
            RetransmittingClient(server, (source, 0), username, password).allocate(timeout=5)
            granted += 1
        except AssertionError:
            refused += 1
    return granted, refused


def test_one_address_with_fresh_credentials_cannot_take_the_relay_range(tmp_path: Path) -> None:
    low, high = relay_range(1000)
    ports = high - low + 1
    extra = ("--min-port", str(low), "--max-port", str(high), "--static-auth-secret", SECRET)
    with run_serve(tmp_path / "serve", *extra) as server:
        address = (server.host, server.port)
        workers = server.workers
        started = time.monotonic()
        # One user id, a new credential each time: the user quota holds.
        user_granted, user_refused = allocations(address, "127.0.0.5", ["mallory"] * ATTEMPTS)
        # Then a new user id each time, from the same address: the address quota holds.
        more = [f"sock-puppet-{n}" for n in range(ATTEMPTS)]
        address_granted, address_refused = allocations(address, "127.0.0.5", more)
        elapsed = time.monotonic() - started
        # Someone else, from another address, still gets a relay.
        assert allocations(address, "127.0.0.6", ["alice"]) == (1, 0)
        figures = (
            f"one address, {2 * ATTEMPTS} fresh credentials in {elapsed:.1f} s: one user id"
            f" {user_granted} allocated / {user_refused} refused, then new user ids"
            f" {address_granted} / {address_refused}; {ports} relay ports, {workers} workers"
        )
        sys.stdout.write("\n" + figures + "\n")
        assert user_granted <= DEFAULT_USER_QUOTA * workers, figures
        assert user_granted + address_granted <= ports // 2 + workers, figures
        assert address_refused > 0, figures
    log = server.log_text()
    # Refusals are logged by cause, once per interval, naming the user id and the address.
    assert "user quota reached" in log and "user id 'mallory' already has" in log, log[-2000:]
    assert "address quota reached" in log and "address 127.0.0.5 already has" in log, log[-2000:]
