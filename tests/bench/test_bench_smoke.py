"""The benchmark, so that it cannot rot: a smoke run (no thresholds) and its report logic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


@pytest.fixture
def bench_report(repo_root: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(repo_root))
    from bench import report

    return report


@pytest.fixture
def bench_run(repo_root: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(repo_root))
    from bench import run

    return run


def test_quick_run_writes_results_and_report(repo_root: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path), "--no-plot"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (result_file,) = tmp_path.glob("quick-*.json")
    results = json.loads(result_file.read_text())
    assert results["meta"]["plan"] == "quick"
    assert results["meta"]["seconds"] < 120
    variants = set(results["meta"]["variants"])
    assert variants == {"coturn-m1", "tsunagu"}
    records = results["records"]
    assert {r["variant"] for r in records} == variants
    # Every load ran on both servers and produced a result.
    failures = [(r["variant"], r["case"], r.get("error")) for r in records if "result" not in r]
    assert not failures
    cases = {r["case"] for r in records}
    assert {"alloc-lt", "alloc-rest", "hold-10000", "binding", "udp-channel-100"} <= cases
    summary = results["summary"]["cases"]
    ratio = summary["udp-channel-100"]["ratios"]["cpu_us"]["tsunagu/coturn-m1"]
    assert ratio > 0
    assert summary["hold-10000"]["variants"]["tsunagu"]["not_relaying"]["median"] == 0
    markdown = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## Summary" in markdown and "tsunagu / coturn -m 1" in markdown
    assert "turnserver -n --no-cli" in markdown and "tsunagu probe" in markdown
    assert json.loads((tmp_path / "benchmarks.json").read_text())["meta"] == results["meta"]
    # Nothing is left running: the servers' ports were checked free before the run ended.
    assert "still busy" not in done.stderr


def _record(variant: str, case: str, figure: str, repeat: int, result: dict[str, Any]) -> Any:
    return {
        "variant": variant,
        "case": case,
        "figure": figure,
        "repeat": repeat,
        "auth": "static",
        "command": [sys.executable, "-m", "tsunagu", "probe", "127.0.0.1:1"],
        "server_command": ["turnserver", "-n"] if variant != "tsunagu" else ["tsunagu"],
        "machine": {"other_share": 0.01},
        "result": result,
    }


def _step(cpu: float, loss: float = 0.0, pps: float = 20000.0) -> dict[str, Any]:
    return {
        "offered_relayed_pps": pps,
        "relayed_pps": pps * (1 - loss),
        "loss": loss,
        "server_cpu_us_per_relayed_packet": cpu,
        "rtt_ms": {"p50": 0.2, "p99": 1.0},
    }


def test_summary_medians_spread_and_ratios(bench_report: ModuleType) -> None:
    records = [
        _record("coturn-m1", "udp-channel-100", "cpu", 0, {"steps": [_step(8.0)]}),
        _record("coturn-m1", "udp-channel-100", "cpu", 1, {"steps": [_step(10.0)]}),
        _record("coturn-m1", "udp-channel-100", "cpu", 2, {"steps": [_step(9.0)]}),
        _record("tsunagu", "udp-channel-100", "cpu", 0, {"steps": [_step(18.0)]}),
        _record("tsunagu", "udp-channel-100", "cpu", 1, {"steps": [_step(27.0)]}),
        _record("tsunagu", "udp-channel-100", "cpu", 2, {"steps": [_step(20.0)]}),
    ]
    results = {
        "meta": {"cases": {"udp-channel-100": {"title": "UDP", "figure": "cpu", "variants": []}}},
        "records": records,
    }
    summary = bench_report.summarize(results)
    case = summary["cases"]["udp-channel-100"]
    cpu = case["variants"]["tsunagu"]["cpu_us"]
    assert (cpu["median"], cpu["min"], cpu["max"], cpu["n"]) == (20.0, 18.0, 27.0, 3)
    assert case["ratios"]["cpu_us"]["tsunagu/coturn-m1"] == pytest.approx(20.0 / 9.0)
    assert "tsunagu/coturn" not in case["ratios"]["cpu_us"]


def test_capacity_is_the_highest_step_within_one_percent_loss(bench_report: ModuleType) -> None:
    steps = [
        _step(10, 0.0, 20000),
        _step(8, 0.004, 60000),
        _step(7, 0.03, 80000),
        _step(7, 0.2, 100000),
    ]
    record = _record("tsunagu", "capacity-10", "capacity", 0, {"steps": steps})
    assert bench_report._capacity(record) == pytest.approx(60000 * 0.996)
    assert bench_report._at_ladder_top(record) == 0.0
    all_good = _record("tsunagu", "capacity-10", "capacity", 0, {"steps": steps[:2]})
    assert bench_report._at_ladder_top(all_good) == 1.0
    nothing = _record("tsunagu", "capacity-10", "capacity", 0, {"steps": [_step(5, 0.5)]})
    assert bench_report._capacity(nothing) == 0.0


def test_uclient_totals_are_the_last_line(bench_run: ModuleType) -> None:
    output = (
        "1: : start_mclient: msz=2, tot_send_msgs=94, tot_recv_msgs=93, tot_send_bytes ~ 9400\n"
        "4: : start_mclient: tot_send_msgs=400, tot_recv_msgs=396\n"
        "4: : Average round trip delay 0.500000 ms; min = 0 ms, max = 3 ms\n"
    )
    parsed = bench_run.parse_uclient(output)
    assert (parsed["sent"], parsed["received"], parsed["relayed_packets"]) == (400, 396, 792)
    assert parsed["loss"] == pytest.approx(0.01)
    assert parsed["rtt_avg_ms"] == 0.5
    with pytest.raises(bench_run.BenchError):
        bench_run.parse_uclient("ERROR: Cannot complete Allocation\n")
