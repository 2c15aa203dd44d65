"""The web port's connection gate: per-address and total caps, and the fair share."""

from __future__ import annotations

import pytest

from tsunagu.signaling.gate import Caps, ConnectionGate, web_connection_budget


@pytest.mark.parametrize("open_files", [256, 1024, 20_000, 65_536, 1 << 20])
def test_the_web_gets_a_quarter_of_the_descriptors(open_files: int) -> None:
    budget = web_connection_budget(open_files)
    assert 64 <= budget <= 8192
    assert budget <= max(64, open_files // 4), f"{budget} of {open_files} descriptors"


def test_one_address_is_capped_and_released() -> None:
    gate = ConnectionGate(Caps(total=100, per_address=3, crowded_at=100, crowded_per_address=1))
    assert [gate.admit("a") for _ in range(4)] == [None, None, None, "address"]
    assert gate.admit("b") is None and gate.count == 4 and gate.refused == 1
    gate.release("a")
    assert gate.admit("a") is None
    for _ in range(3):
        gate.release("a")
    assert "a" not in gate.held and gate.count == 1


@pytest.mark.parametrize("total", [256, 2500, 4096, 5000, 8192])
def test_64_addresses_cannot_lock_a_newcomer_out(total: int) -> None:
    caps = Caps.fair(total, 256)
    gate = ConnectionGate(caps)
    # Each of 64 addresses opens as many connections as it is let in, round after round.
    progress = True
    while progress:
        progress = False
        for host in range(64):
            if gate.admit(f"10.0.0.{host}") is None:
                progress = True
    held = gate.count
    assert held < total, f"64 addresses hold all {held} of {total} slots"
    assert gate.admit("192.0.2.1") is None, f"a newcomer was refused with {held} of {total} held"
    # Even a newcomer arriving with several people gets a few connections in.
    assert all(gate.admit("192.0.2.1") is None for _ in range(caps.crowded_per_address - 1))


def test_a_busy_nat_address_is_served_while_the_gate_is_not_crowded() -> None:
    gate = ConnectionGate(Caps.fair(2500, 128))
    assert all(gate.admit("198.51.100.1") is None for _ in range(128)), "60 people behind a NAT"
    assert gate.admit("198.51.100.1") == "address"


def test_total_cap_holds() -> None:
    gate = ConnectionGate(Caps.fair(320, 256))
    admitted = sum(gate.admit(f"10.0.{i // 256}.{i % 256}") is None for i in range(1000))
    assert admitted == 320 and gate.admit("192.0.2.1") == "total"
