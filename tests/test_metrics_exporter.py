"""The metrics exporter without a server: one worker's figures from a driver, the merge of
several workers' parts, the text format (checked by promtool when it is installed), the
readiness answer, and the admin request that carries a scrape to the other workers."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tsunagu.admin.metrics import PER_USER_LIMIT, Exporter, render
from tsunagu.admin.server import RequestError, parse_request


def part(worker: int, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "worker": worker,
        "process": {"process_cpu_seconds_total": 1.5, "process_resident_memory_bytes": 1e6},
        "draining": False,
        "allocations": {"udp ipv4": 2, "tcp ipv4+ipv6": 1},
        "created": {"udp ipv4": 5, "tcp ipv4+ipv6": 1},
        "ended": 3,
        "relayed": {"udp": [10, 1000, 20, 2000, 1]},
        "responses": {"200": 7, "401": 4},
        "refusals": {"wrong password": 2, "stale nonce": 1},
        "drops": {"no permission": 3},
        "failures": {"tls handshake failed": 1},
        "bindings": 9,
        "native": {"relayed": 30, "bindings": 11},
        "user_database": {
            "kind": "sqlite",
            "reachable": True,
            "lookups": 4,
            "lookups_failed": 1,
            "cached_users": 2,
        },
        "users": None,
    }
    base.update(extra)
    return base


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_workers_are_summed_and_process_figures_kept_apart() -> None:
    text = render([part(0), part(1)], [0, 1, 2], {"rooms": 1, "people": 2, "refused": {}})
    found = samples(text)
    assert found[("tsunagu_worker_up", (("worker", "1"),))] == 1
    assert found[("tsunagu_worker_up", (("worker", "2"),))] == 0
    # No restarts given: 0 for every worker.
    assert found[("tsunagu_worker_restarts_total", (("worker", "2"),))] == 0
    assert found[("tsunagu_allocations", (("family", "ipv4"), ("transport", "udp")))] == 4
    created = ("tsunagu_allocations_created_total", (("family", "ipv4"), ("transport", "udp")))
    assert found[created] == 10
    key = ("tsunagu_relayed_bytes_total", (("direction", "to_client"), ("transport", "udp")))
    assert found[key] == 4000
    assert found[("tsunagu_responses_total", (("code", "401"),))] == 8
    assert found[("tsunagu_refusals_total", (("cause", "wrong password"),))] == 4
    assert found[("tsunagu_stun_binding_requests_total", (("path", "native"),))] == 22
    assert found[("process_cpu_seconds_total", (("worker", "0"),))] == 1.5
    assert found[("process_cpu_seconds_total", (("worker", "1"),))] == 1.5
    assert found[("tsunagu_userdb_lookups_total", (("kind", "sqlite"),))] == 8
    assert found[("tsunagu_signaling_people", ())] == 2
    assert not any(name.startswith("tsunagu_user_") for name, _ in found)


def test_per_user_labels_are_bounded() -> None:
    users = {f"user{n}": [1, n, n] for n in range(PER_USER_LIMIT + 5)}
    found = samples(render([part(0, users=users)], [0], None))
    named = {dict(labels)["user"] for name, labels in found if name == "tsunagu_user_allocations"}
    assert len(named) == PER_USER_LIMIT + 1
    assert "other" in named and f"user{PER_USER_LIMIT + 4}" in named and "user0" not in named
    assert found[("tsunagu_user_allocations", (("user", "other"),))] == 5


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (prometheus) not installed")
def test_promtool_accepts_the_text() -> None:
    users = {"alice": [1, 10, 20]}
    text = render([part(0, users=users), part(1)], [0, 1], {"rooms": 0, "refused": {"x": 1}})
    done = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30
    )
    assert done.returncode == 0, done.stderr.decode()


def test_readiness_names_its_reasons() -> None:
    reasons: list[str] = []
    exporter = Exporter(None, lambda: reasons)
    assert exporter.readiness()[0] == 200
    reasons.append("redis user database unreachable")
    status, body = exporter.readiness()
    assert status == 503 and b"redis user database unreachable" in body
    reasons.clear()
    exporter.stopping = True
    assert exporter.readiness() == (503, b'{"ready": false, "reasons": ["stopping"]}\n')


def test_a_scrape_without_turn_has_this_process_and_signaling() -> None:
    exporter = Exporter(None, list)
    exporter.hub = lambda: {
        "rooms": 3,
        "people": 5,
        "connections": 6,
        "held": 4096,
        "refused": {},
    }
    found = samples(asyncio.run(exporter.scrape()))
    assert found[("tsunagu_signaling_rooms", ())] == 3
    assert found[("tsunagu_signaling_held_bytes", ())] == 4096
    assert ("process_cpu_seconds_total", (("worker", "0"),)) in found
    assert not any(name.startswith("tsunagu_allocations") for name, _ in found)


def test_the_metrics_request() -> None:
    assert parse_request(b'{"command": "metrics"}') == {"command": "metrics"}
    assert parse_request(b'{"command": "metrics", "per_user": true}')["per_user"] is True
    with pytest.raises(RequestError, match="per_user"):
        parse_request(b'{"command": "metrics", "per_user": 1}')
    with pytest.raises(RequestError, match="takes no user"):
        parse_request(b'{"command": "metrics", "user": "alice"}')


def test_scrapes_at_once_ask_the_workers_once() -> None:
    calls = 0

    async def gather() -> tuple[list[dict[str, Any]], list[int]]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return [part(0)], [0]

    async def main() -> list[bytes]:
        exporter = Exporter(gather, list)
        texts = await asyncio.gather(*(exporter.scrape() for _ in range(10)))
        texts.append(await exporter.scrape())
        return texts

    texts = asyncio.run(main())
    assert calls == 2 and len(set(texts)) == 1


def test_worker_restarts_are_counted_per_worker() -> None:
    found = samples(render([part(0), part(1)], [0, 1, 2], None, {2: 3}))
    restarts = {
        labels[0][1]: value
        for (name, labels), value in found.items()
        if name == "tsunagu_worker_restarts_total"
    }
    assert restarts == {"0": 0, "1": 0, "2": 3}
