"""``tsunagu probe nat`` behind real NATs, in network namespaces this test creates.

The lab (tests/support/natlab.py): ``tsunagu serve --rfc5780`` on 198.18.0.1 and
198.18.0.2 in an "internet" namespace, a router namespace with nftables ``masquerade``
(endpoint-independent mapping: a "cone"; with a ``dnat`` of all inbound UDP to the client, a
full cone) or ``masquerade fully-random`` (symmetric) that drops unsolicited input as home
routers do, and the client behind it, where the probe runs
(``ip netns exec``).

Neither router hairpins or lets in an answer from an address or port the client has not sent
to. The cone router's UDP mappings last 3 s (``nf_conntrack_udp_timeout`` in its namespace),
which the lifetime test must find between 2 s and 4 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from support.natlab import PORT, SERVER, WAN, nat_lab, serve_in

pytestmark = pytest.mark.interop


def probe_in(ns: str, *argv: str, timeout: float = 90.0) -> tuple[int, str, float]:
    started = time.monotonic()
    done = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "tsunagu", "probe", "nat", *argv],
        capture_output=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    elapsed = time.monotonic() - started
    return done.returncode, done.stdout.decode() + done.stderr.decode(), elapsed


def probe_json_in(ns: str, *argv: str) -> tuple[int, dict[str, Any], float]:
    status, out, elapsed = probe_in(ns, *argv, "--json")
    try:
        report: dict[str, Any] = json.loads(out)
    except json.JSONDecodeError:
        raise AssertionError(f"not JSON (status {status}): {out}") from None
    return status, report, elapsed


def test_cone_nat_is_endpoint_independent_mapping(tmp_path: Path) -> None:
    with nat_lab(tmp_path, "cone") as (inet, _, cli), serve_in(inet, tmp_path):
        url = f"stun:{SERVER}:{PORT}"
        status, report, elapsed = probe_json_in(cli, url, "--timeout", "1.5", "--lifetime-max", "8")
        human_status, out, _ = probe_in(cli, url, "--timeout", "1.5")
    figures = report["results"][0]["figures"]
    verdict = report["verdict"]
    assert status == 0 and human_status == 0, (status, human_status, out)
    assert verdict["code"] == "nat-cone", verdict
    assert figures["mapping"] == "endpoint-independent", figures
    assert figures["filtering"] == "address-and-port-dependent", figures
    assert figures["mapped"].startswith(f"{WAN}:") and figures["local"].startswith("10.77.0.2:")
    assert figures["hairpinning"] is False, figures
    lifetime = figures["lifetime"]
    assert lifetime["alive_s"] == 2.0 and lifetime["expired_s"] == 4.0, lifetime
    # Test I, II, III of mapping and two filtering tests costing 1.5 s each, 8 s of lifetime.
    assert elapsed < 30, f"the probe took {elapsed:.1f} s"
    assert "verdict: Endpoint-independent mapping, address-and-port-dependent filtering" in out
    assert "not with peers behind a symmetric NAT" in out, out


def test_symmetric_nat_is_address_and_port_dependent_mapping(tmp_path: Path) -> None:
    with nat_lab(tmp_path, "symmetric") as (inet, _, cli), serve_in(inet, tmp_path):
        url = f"stun:{SERVER}:{PORT}"
        status, report, elapsed = probe_json_in(cli, url, "--timeout", "1.5")
        human_status, out, _ = probe_in(cli, url, "--timeout", "1.5")
    figures = report["results"][0]["figures"]
    verdict = report["verdict"]
    assert status == 0 and human_status == 0, (status, human_status, out)
    assert verdict["code"] == "nat-symmetric", verdict
    assert figures["mapping"] == "address-and-port-dependent", figures
    assert figures["filtering"] == "address-and-port-dependent", figures
    assert figures["hairpinning"] is False, figures
    mapping = report["results"][0]["steps"][1]
    assert mapping["name"] == "mapping" and mapping["mapped_ii"] != figures["mapped"], mapping
    assert elapsed < 20, f"the probe took {elapsed:.1f} s"
    assert "verdict: Symmetric NAT (address-and-port-dependent mapping" in out, out
    assert "calls from here need TURN" in out, out


def test_full_cone_nat_is_endpoint_independent_mapping_and_filtering(tmp_path: Path) -> None:
    with nat_lab(tmp_path, "full-cone") as (inet, _, cli), serve_in(inet, tmp_path):
        status, report, elapsed = probe_json_in(cli, f"stun:{SERVER}:{PORT}", "--timeout", "1.5")
    figures = report["results"][0]["figures"]
    verdict = report["verdict"]
    assert status == 0, (status, verdict)
    assert verdict["code"] == "nat-cone", verdict
    assert figures["mapping"] == "endpoint-independent", figures
    assert figures["filtering"] == "endpoint-independent", figures
    assert figures["mapped"].startswith(f"{WAN}:"), figures
    assert verdict["sentence"].startswith("Endpoint-independent mapping and filtering"), verdict
    # Only the hairpinning test waits (the router does not hairpin): about one timeout.
    assert figures["hairpinning"] is False, figures
    assert elapsed < 15, f"the probe took {elapsed:.1f} s"
