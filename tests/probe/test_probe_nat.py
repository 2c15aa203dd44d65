"""``tsunagu probe nat`` (RFC 5780) against real servers on loopback.

On loopback there is no NAT: against ``tsunagu serve --rfc5780`` listening on 127.0.0.1 and
127.0.0.2, and against coturn given the same two listening IPs (it turns RFC 5780 on by
itself then), the probe must find no NAT, endpoint-independent filtering, a request to its
own mapped address arriving, and a mapping that outlives the lifetime test. A server without
RFC 5780 (tsunagu without ``--rfc5780``, coturn with ``--no-rfc5780``) gives no OTHER-ADDRESS:
the verdict says that filtering cannot be told, and what can.
Behind real NATs: tests/probe/test_probe_nat_lab.py.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.interop import HOST, Coturn, ServeProcess, free_port, run_coturn, run_serve
from tsunagu.cli import main

pytestmark = pytest.mark.interop

HOST2 = "127.0.0.2"


def probe(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["probe", "nat", *argv])
    return status, out.getvalue()


def probe_json(*argv: str) -> tuple[int, dict[str, Any]]:
    status, out = probe(*argv, "--json")
    report: dict[str, Any] = json.loads(out)
    assert status == (0 if report["verdict"]["ok"] else 1), (status, report["verdict"])
    return status, report


@pytest.fixture(scope="module")
def rfc5780(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    with run_serve(tmp_path_factory.mktemp("nat"), "--rfc5780", hosts=(HOST, HOST2)) as server:
        yield server


@pytest.fixture(scope="module")
def coturn5780(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coturn]:
    extra = ("--listening-ip", HOST2, "--alt-listening-port", str(free_port()))
    with run_coturn(tmp_path_factory.mktemp("coturn-nat"), *extra) as server:
        yield server


def _assert_open(report: dict[str, Any], alternate: str) -> None:
    verdict = report["verdict"]
    figures = report["results"][0]["figures"]
    assert verdict["code"] == "nat-none", verdict
    assert "No NAT: this host has a public address" in verdict["sentence"], verdict
    assert figures["rfc5780"] is True, figures
    assert figures["mapping"] == "none", figures
    assert figures["filtering"] == "endpoint-independent", figures
    assert figures["hairpinning"] is True, figures
    assert figures["mapped"] == figures["local"], figures
    assert figures["other_address"] == alternate, figures


def test_tsunagu_rfc5780_no_nat_open_and_hairpinning(rfc5780: ServeProcess) -> None:
    status, report = probe_json(f"stun:{HOST}:{rfc5780.port}", "--timeout", "2")
    assert status == 0
    _assert_open(report, f"{HOST2}:{rfc5780.alt_port}")
    names = [step["name"] for step in report["results"][0]["steps"]]
    assert names == ["binding", "mapping", "filtering", "hairpinning"], names


def test_human_output_and_binding_lifetime(rfc5780: ServeProcess) -> None:
    url = f"stun:{HOST}:{rfc5780.port}"
    status, out = probe(url, "--lifetime-max", "2", "--timeout", "2")
    assert status == 0, out
    lines = out.splitlines()
    assert lines[0] == f"NAT behaviour (RFC 5780) via {url}?transport=udp", out
    steps = [line.split()[1] for line in lines[1:] if line.startswith("  ok ")]
    assert steps == ["binding", "mapping", "filtering", "hairpinning", "lifetime"], out
    assert "a mapping lives at least 2 s" in out, out
    assert f"the answer from {HOST2}:{rfc5780.alt_port} came in" in out, out
    assert "verdict: No NAT: this host has a public address" in out, out
    _, report = probe_json(url, "--lifetime-max", "2", "--no-hairpinning")
    figures = report["results"][0]["figures"]
    assert figures["lifetime"] == {"alive_s": 2.0, "expired_s": None, "max_s": 2.0}, figures
    assert figures["hairpinning"] is None, figures


def test_coturn_with_two_listening_ips(coturn5780: Coturn) -> None:
    status, report = probe_json(f"stun:{HOST}:{coturn5780.port}", "--timeout", "2")
    assert status == 0
    other = report["results"][0]["figures"]["other_address"]
    assert other is not None and other.startswith(f"{HOST2}:"), report
    _assert_open(report, other)


def test_a_server_without_rfc5780_cannot_tell_filtering(tmp_path: Path) -> None:
    with run_serve(tmp_path) as server:
        status, report = probe_json(f"stun:{HOST}:{server.port}", "--timeout", "2")
        human_status, out = probe(f"stun:{HOST}:{server.port}", "--timeout", "2")
    assert status == 1 and human_status == 1, out
    verdict = report["verdict"]
    figures = report["results"][0]["figures"]
    assert verdict["code"] == "nat-undetermined", verdict
    assert "cannot tell how this NAT maps and filters" in verdict["sentence"], verdict
    assert "this host is not behind a NAT" in verdict["sentence"], verdict
    assert figures["other_address"] is None and figures["rfc5780"] is False, figures
    assert figures["mapping"] == "none" and figures["filtering"] is None, figures
    assert figures["hairpinning"] is True, figures
    assert "verdict: The server stun:" in out and "--rfc5780" in out, out


def test_coturn_without_rfc5780(tmp_path: Path) -> None:
    extra = ("--listening-ip", HOST2, "--no-rfc5780")
    with run_coturn(tmp_path, *extra) as server:
        status, report = probe_json(f"stun:{HOST}:{server.port}", "--timeout", "2")
    assert status == 1
    assert report["verdict"]["code"] == "nat-undetermined", report["verdict"]
    figures = report["results"][0]["figures"]
    assert figures["other_address"] is None and figures["filtering"] is None, figures


def test_only_udp_urls() -> None:
    status, out = probe(f"stun:{HOST}:3478?transport=tcp")
    assert status == 2, (status, out)
