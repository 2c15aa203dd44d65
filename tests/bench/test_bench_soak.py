"""The memory soak (``make -C bench soak``), shorter: waves of allocations under RTP-like
load, and tsunagu's RSS (every worker) after each wave within 5 % of the first wave's."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

ALLOCATIONS = 600
WAVES = 4
# Seconds of traffic per wave: waves of about 23 s, so that the server's answers kept 40 s
# for retransmissions (bounded, but not gone when a wave ends) span about one wave.
HOLD = 20.0
INTERVAL_MS = 100.0
LIMIT = 1.05


@pytest.fixture
def bench_soak(repo_root: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(repo_root))
    from bench import soak

    return soak


@pytest.mark.skipif(shutil.which("turnutils_peer") is None, reason="coturn is not installed")
def test_rss_after_each_wave_stays_within_five_percent_of_the_first(
    repo_root: Path, tmp_path: Path
) -> None:
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.soak",
            *("--allocations", str(ALLOCATIONS), "--waves", str(WAVES)),
            *("--hold", str(HOLD), "--interval-ms", str(INTERVAL_MS)),
            *("--limit", str(LIMIT), "--duration", "400", "--out", str(tmp_path)),
        ],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=280,
    )
    seconds = time.monotonic() - started
    output = done.stdout[-4000:] + done.stderr[-4000:]
    (result_file,) = tmp_path.glob("soak-*.json")
    results = json.loads(result_file.read_text())
    waves = results["waves"]
    assert len(waves) == WAVES, output
    expected_messages = ALLOCATIONS * HOLD * 1000 / INTERVAL_MS
    for wave in waves:
        # Every allocation was made, traffic really went through the relay both ways, and
        # the server counted no allocation left before its memory was read.
        assert wave["allocations_created"] == ALLOCATIONS, output
        assert wave["sent"] >= 0.95 * expected_messages, output
        assert wave["received"] >= 0.95 * wave["sent"], output
        assert wave["relayed_packets"] == 2 * wave["received"], output
        assert wave["allocations_left"] == 0, output
        assert wave["rss_kib"] > 10_000, output
    assert results["meta"]["server_processes"] == len(waves[0]["rss_kib_per_process"]) >= 1
    baseline = waves[0]["rss_kib"]
    ratios = [wave["rss_kib"] / baseline for wave in waves[1:]]
    assert max(ratios) <= LIMIT, f"RSS / wave 1: {[round(r, 3) for r in ratios]}\n{output}"
    assert done.returncode == 0, output
    assert "ratio" in done.stdout and f"{ALLOCATIONS:,}" in done.stdout
    assert seconds < 240, f"the short soak took {seconds:.0f} s"


def test_verdict_catches_growth_and_missing_traffic(bench_soak: ModuleType) -> None:
    """The driver's own pass/fail, on made-up waves: a test that could not fail is none."""
    options = bench_soak.Options(
        allocations=10,
        waves=3,
        duration=60,
        hold=1,
        interval_ms=100,
        size=172,
        limit=1.05,
        setup_window=8,
    )

    def wave(number: int, rss: int, received: int = 100) -> dict[str, object]:
        return {
            "wave": number,
            "allocations_created": 10,
            "setup_errors": {},
            "sent": 100,
            "received": received,
            "loss": 1 - received / 100,
            "allocations_left": 0,
            "rss_kib": rss,
        }

    assert bench_soak.verdict([wave(1, 100_000), wave(2, 105_000)], options) == []
    (problem,) = bench_soak.verdict([wave(1, 100_000), wave(2, 105_001)], options)
    assert "wave 2" in problem and "1.050" in problem
    (problem,) = bench_soak.verdict([wave(1, 100_000), wave(2, 90_000, received=0)], options)
    assert "0 of 100 messages" in problem


def test_section_replaces_itself_in_the_report(bench_soak: ModuleType) -> None:
    waves = [
        {
            "wave": n,
            "allocations_created": 10,
            "relayed_packets": 200,
            "loss": 0.0,
            "rss_kib": 100_000 + n,
            "rss_ratio": 1.0,
            "cpu_s": {"server": 1.0, "generator": 0.5},
        }
        for n in (1, 2)
    ]
    results = {
        "meta": {
            "options": {
                "allocations": 10,
                "interval_ms": 100.0,
                "hold": 1.0,
                "size": 172,
                "limit": 1.05,
            },
            "server_processes": 2,
            "cores": 2,
            "seconds": 60.0,
            "started": "now",
            "tsunagu_commit": "abc",
            "echo_peer": "turnutils_peer",
        },
        "idle_rss_kib": 90_000,
        "waves": waves,
        "summary": {
            "waves": 2,
            "baseline_rss_kib": 100_001,
            "max_ratio_after_first": 1.0,
            "relayed_packets": 400,
            "allocations_created": 20,
            "generator_busy": 0.2,
            "passed": True,
            "problems": [],
        },
    }
    report = "# B\n\n## 7. Other\n\ntext\n\n## Limits of these figures\n\n- x\n"
    once = bench_soak.insert_section(report, bench_soak.section(results))
    assert once.index(bench_soak.SECTION_TITLE) < once.index("## Limits")
    assert "## 7. Other\n\ntext\n\n" + bench_soak.SECTION_TITLE in once
    twice = bench_soak.insert_section(once, bench_soak.section(results))
    assert twice == once and twice.count(bench_soak.SECTION_TITLE) == 1
