"""The user database rows of the benchmark (``make -C bench userdb``), in a tiny size: 20
allocations of 20 users in one SQLite file that coturn and tsunagu both read."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest


@pytest.fixture
def bench_databases(repo_root: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(repo_root))
    from bench import databases

    return databases


def test_sqlite_file_holds_coturns_rows(bench_databases: ModuleType, tmp_path: Path) -> None:
    with bench_databases.user_database("sqlite", tmp_path, 3, lifetime=30) as database:
        path = Path(database.coturn_args[1])
        assert database.tsunagu_args == database.coturn_args == ["-b", str(path)]
        with sqlite3.connect(path) as db:
            rows = db.execute(
                "SELECT realm, name, hmackey FROM turnusers_lt ORDER BY name"
            ).fetchall()
    # What turnadmin -k -u bench0 -r tsunagu -p bench-pw-0 prints (without its 0x).
    assert rows[0] == ("tsunagu", "bench0", "6a40864180c4bd52029482ba2d786238")
    assert [name for _, name, _ in rows] == ["bench0", "bench1", "bench2"]
    assert not path.exists()


@pytest.mark.skipif(shutil.which("turnserver") is None, reason="coturn is not installed")
def test_userdb_rows_run_on_both_servers(repo_root: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "alloc-db-sqlite",
         "--out", str(tmp_path), "--no-plot"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=90,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (result_file,) = tmp_path.glob("quick-*.json")
    results = json.loads(result_file.read_text())
    assert results["meta"]["seconds"] < 60
    records = results["records"]
    assert {(r["variant"], r["case"]) for r in records} == {
        (variant, f"alloc-db-sqlite-{when}")
        for variant in ("coturn-m1", "tsunagu")
        for when in ("cold", "cached")
    }
    for record in records:
        setup = record["result"]["setup"]
        assert setup["ready"] == 20, (record["variant"], record["case"], setup["errors"])
        assert "--users" in record["command"]
        assert record["auth"] == "sqlite"
    # Both servers read the one file, and neither has a user of its own.
    (path,) = {r["server_command"][r["server_command"].index("-b") + 1] for r in records}
    for record in records:
        assert "--user" not in record["server_command"] and "-u" not in record["server_command"]
    assert results["meta"]["databases"]["sqlite"]["users"] == 20
    assert not Path(path).exists()
    summary = results["summary"]["cases"]
    for when in ("cold", "cached"):
        ratios = summary[f"alloc-db-sqlite-{when}"]["ratios"]
        assert ratios["allocs_per_s"]["tsunagu/coturn-m1"] > 0
    markdown = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## 5b. Allocations per second, users in a user database" in markdown


def test_a_partial_run_keeps_the_other_rows(
    repo_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(repo_root))
    from bench import report

    def record(case: str, variant: str, per_second: float) -> dict[str, object]:
        return {
            "case": case,
            "figure": "alloc-db" if case.startswith("alloc-db") else "alloc",
            "variant": variant,
            "auth": "static",
            "repeat": 0,
            "command": ["probe"],
            "result": {"setup": {"per_second": per_second, "ready": 10}},
        }

    def meta(cases: list[str], started: str) -> dict[str, object]:
        return {
            "plan": "full",
            "repeats": 1,
            "started": started,
            "variants": ["coturn-m1", "tsunagu"],
            "machine": {"tsunagu_commit": started},
            "pinning": {"server_cpu": "1", "generator_cpu": "0"},
            "echo_peer": "inside the probe",
            "cases": {
                c: {"title": c, "figure": "alloc-db" if c.startswith("alloc-db") else "alloc"}
                for c in cases
            },
        }

    earlier = {
        "meta": meta(["alloc-lt", "alloc-db-redis-cold"], "first"),
        "records": [
            record("alloc-lt", "tsunagu", 1.0),
            record("alloc-db-redis-cold", "tsunagu", 2.0),
        ],
    }
    # A user database run replaces its own rows and keeps the rest, marked as earlier.
    results = {
        "meta": meta(["alloc-db-redis-cold"], "second"),
        "records": [record("alloc-db-redis-cold", "tsunagu", 3.0)],
    }
    assert report.carry_over(results, earlier) == ["alloc-lt"]
    assert [(r["case"], r["result"]["setup"]["per_second"]) for r in results["records"]] == [
        ("alloc-db-redis-cold", 3.0),
        ("alloc-lt", 1.0),
    ]
    assert results["meta"]["earlier_runs"][0]["started"] == "first"
    # A later full run without them keeps them in turn, still marked with their run.
    later = {"meta": meta(["alloc-lt"], "third"), "records": [record("alloc-lt", "tsunagu", 4.0)]}
    assert report.carry_over(later, results) == ["alloc-db-redis-cold"]
    assert later["meta"]["earlier_runs"] == [
        {**later["meta"]["earlier_runs"][0], "started": "second", "cases": ["alloc-db-redis-cold"]}
    ]
    later["summary"] = report.summarize(later)
    assert "From an earlier run" in report.markdown(later, [])
