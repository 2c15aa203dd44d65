"""Turn benchmark records into figures: medians, spread, ratios, a Markdown page and plots."""

from __future__ import annotations

import importlib
import shlex
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Record = dict[str, Any]
LOSS_LIMIT = 0.01
VARIANT_ORDER = ("coturn-m1", "coturn", "tsunagu", "tsunagu-py", "tsunagu-w2")
LABELS = {
    "coturn-m1": "coturn -m 1",
    "coturn": "coturn (default threads)",
    "tsunagu": "tsunagu",
    "tsunagu-py": "tsunagu, Python relay path",
    "tsunagu-w2": "tsunagu --workers 2",
}
# (numerator, denominator, column title)
RATIOS = (
    ("tsunagu", "coturn-m1", "tsunagu / coturn -m 1"),
    ("tsunagu", "coturn", "tsunagu / coturn"),
    ("tsunagu-py", "coturn-m1", "Python path / coturn -m 1"),
    ("tsunagu-w2", "coturn", "tsunagu -w 2 / coturn"),
)


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    better: str  # "lower" or "higher"
    extract: Callable[[Record], float | None]
    digits: int = 1
    ratio: bool = True  # False for context (how busy the generator was, ...)


def _result(record: Record) -> dict[str, Any]:
    result = record.get("result")
    return result if isinstance(result, dict) else {}


def _step(record: Record) -> dict[str, Any]:
    steps = _result(record).get("steps") or []
    return steps[0] if steps else {}


def _get(data: dict[str, Any], *path: str) -> float | None:
    value: Any = data
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, int | float) else None


def _percent(value: float | None) -> float | None:
    return None if value is None else value * 100


def _capacity(record: Record) -> float | None:
    steps = _result(record).get("steps") or []
    good = [s["relayed_pps"] for s in steps if s.get("loss", 1.0) <= LOSS_LIMIT]
    return max(good) if good else (0.0 if steps else None)


def _capacity_step(record: Record) -> dict[str, Any]:
    steps = _result(record).get("steps") or []
    good = [s for s in steps if s.get("loss", 1.0) <= LOSS_LIMIT]
    return max(good, key=lambda s: s["relayed_pps"]) if good else {}


def _cpu_at(offered: float) -> Callable[[Record], float | None]:
    """Server CPU per relayed packet at one step of a rate ladder, if it got that far."""

    def extract(record: Record) -> float | None:
        for step in _result(record).get("steps") or []:
            if step.get("offered_relayed_pps") == offered and step.get("loss", 1) <= LOSS_LIMIT:
                return _get(step, "server_cpu_us_per_relayed_packet")
        return None

    return extract


def _at_ladder_top(record: Record) -> float | None:
    """1 when no step of the ladder lost more than 1 %: capacity is a lower bound."""
    steps = _result(record).get("steps") or []
    if not steps:
        return None
    return 1.0 if all(s.get("loss", 1.0) <= LOSS_LIMIT for s in steps) else 0.0


def _setup_generator_busy(record: Record) -> float | None:
    cpu = _get(_result(record), "setup", "generator_cpu_s")
    seconds = _get(_result(record), "setup", "seconds")
    return None if cpu is None or not seconds else cpu / seconds


def _hold_rss_per_allocation(record: Record) -> float | None:
    result = _result(record)
    ready = _get(result, "setup", "ready")
    before = _get(result, "setup", "server_rss_before")
    held = _get(result, "hold", "server_rss_bytes")
    if not ready or before is None or held is None:
        return None
    return (held - before) / ready


def _not_relaying(record: Record) -> float | None:
    result = _result(record)
    requested = _get(result, "setup", "requested")
    relaying = _get(result, "verify", "relaying")
    if requested is None or relaying is None:
        return None
    return requested - relaying


def _database_cpu_per_allocation(record: Record) -> float | None:
    """CPU of the PostgreSQL or Redis server (all its processes) over the whole load, per
    allocation made; SQLite runs inside the server under test and is counted there."""
    if record.get("auth") not in ("postgresql", "redis"):
        return None
    cpu = _get(record.get("machine") or {}, "database_cpu_s")
    ready = _get(_result(record), "setup", "ready")
    return None if cpu is None or not ready else cpu / ready


def _relay_metrics() -> list[Metric]:
    return [
        Metric(
            "cpu_us",
            "server CPU-s per million relayed packets",
            "CPU-s/M",
            "lower",
            lambda r: _get(_step(r), "server_cpu_us_per_relayed_packet"),
            2,
        ),
        Metric("loss", "loss", "%", "lower", lambda r: _percent(_get(_step(r), "loss")), 2),
        Metric("rtt_p50", "RTT p50", "ms", "lower", lambda r: _get(_step(r), "rtt_ms", "p50"), 3),
        Metric("rtt_p99", "RTT p99", "ms", "lower", lambda r: _get(_step(r), "rtt_ms", "p99"), 2),
        Metric(
            "relayed_pps",
            "relayed packets/s",
            "pps",
            "higher",
            lambda r: _get(_step(r), "relayed_pps"),
            0,
        ),
    ]


FIGURES: dict[str, list[Metric]] = {
    "cpu": _relay_metrics(),
    "rtp": _relay_metrics(),
    "capacity": [
        Metric("capacity_pps", "relayed packets/s at loss <= 1 %", "pps", "higher", _capacity, 0),
        Metric(
            "cpu_us_at_capacity",
            "server CPU-s per million relayed, at that load",
            "CPU-s/M",
            "lower",
            lambda r: _get(_capacity_step(r), "server_cpu_us_per_relayed_packet"),
            2,
        ),
        Metric(
            "cpu_us_at_80k",
            "server CPU-s per million relayed, at 80k relayed pps offered",
            "CPU-s/M",
            "lower",
            _cpu_at(80000),
            2,
        ),
        Metric(
            "rtt_p99_at_capacity",
            "RTT p99 at that load",
            "ms",
            "lower",
            lambda r: _get(_capacity_step(r), "rtt_ms", "p99"),
            2,
        ),
        Metric(
            "generator_busy",
            "load generator busy at that load",
            "share of a core",
            "lower",
            lambda r: _get(_capacity_step(r), "generator_busy"),
            2,
            ratio=False,
        ),
        Metric(
            "ladder_top",
            "no step lost > 1 % (lower bound)",
            "1 = yes",
            "lower",
            _at_ladder_top,
            0,
            ratio=False,
        ),
    ],
    "alloc": [
        Metric(
            "allocs_per_s",
            "allocations/s (401, Allocate, CreatePermission, ChannelBind)",
            "1/s",
            "higher",
            lambda r: _get(_result(r), "setup", "per_second"),
            0,
        ),
        Metric(
            "cpu_ms_per_alloc",
            "server CPU per allocation",
            "ms",
            "lower",
            lambda r: (
                None
                if (v := _get(_result(r), "setup", "server_cpu_us_per_allocation")) is None
                else v / 1000
            ),
            3,
        ),
        Metric(
            "rss_per_alloc",
            "server RSS growth per allocation",
            "KB",
            "lower",
            lambda r: (
                None
                if (v := _get(_result(r), "setup", "server_rss_bytes_per_allocation")) is None
                else v / 1000
            ),
            1,
        ),
        Metric(
            "failed",
            "failed allocations",
            "count",
            "lower",
            lambda r: _get(_result(r), "setup", "failed"),
            0,
        ),
        Metric(
            "generator_busy",
            "load generator busy",
            "share of a core",
            "lower",
            _setup_generator_busy,
            2,
            ratio=False,
        ),
    ],
    "alloc-db": [
        Metric(
            "allocs_per_s",
            "allocations/s (401, Allocate, CreatePermission, ChannelBind)",
            "1/s",
            "higher",
            lambda r: _get(_result(r), "setup", "per_second"),
            0,
        ),
        Metric(
            "cpu_ms_per_alloc",
            "server CPU per allocation",
            "ms",
            "lower",
            lambda r: (
                None
                if (v := _get(_result(r), "setup", "server_cpu_us_per_allocation")) is None
                else v / 1000
            ),
            3,
        ),
        Metric(
            "db_cpu_ms_per_alloc",
            "database server CPU per allocation (whole load)",
            "ms",
            "lower",
            lambda r: None if (v := _database_cpu_per_allocation(r)) is None else v * 1000,
            3,
            ratio=False,
        ),
        Metric(
            "latency_p50",
            "time to set one allocation up, median",
            "ms",
            "lower",
            lambda r: _get(_result(r), "setup", "latency_ms", "p50"),
            1,
        ),
        Metric(
            "failed",
            "failed allocations",
            "count",
            "lower",
            lambda r: _get(_result(r), "setup", "failed"),
            0,
        ),
        Metric(
            "generator_busy",
            "load generator busy",
            "share of a core",
            "lower",
            _setup_generator_busy,
            2,
            ratio=False,
        ),
    ],
    "hold": [
        Metric(
            "rss_per_alloc",
            "server RSS per allocation, held",
            "KB",
            "lower",
            lambda r: None if (v := _hold_rss_per_allocation(r)) is None else v / 1000,
            1,
        ),
        Metric(
            "held_rss_mb",
            "server RSS with all allocations",
            "MB",
            "lower",
            lambda r: (
                None if (v := _get(_result(r), "hold", "server_rss_bytes")) is None else v / 1e6
            ),
            1,
        ),
        Metric(
            "not_relaying",
            "allocations not relaying after the hold",
            "count",
            "lower",
            _not_relaying,
            0,
        ),
        Metric(
            "allocs_per_s",
            "allocations/s while filling",
            "1/s",
            "higher",
            lambda r: _get(_result(r), "setup", "per_second"),
            0,
        ),
    ],
    "binding": [
        Metric(
            "binding_per_s",
            "Binding requests/s answered (closed loop, 64 in flight)",
            "1/s",
            "higher",
            lambda r: _get(_result(r), "binding", "per_second"),
            0,
        ),
        Metric(
            "cpu_us_per_request",
            "server CPU-s per million requests",
            "CPU-s/M",
            "lower",
            lambda r: _get(_result(r), "binding", "server_cpu_us_per_request"),
            2,
        ),
        Metric(
            "generator_busy",
            "load generator busy",
            "share of a core",
            "lower",
            lambda r: _get(_result(r), "binding", "generator_busy"),
            2,
            ratio=False,
        ),
    ],
    "uclient": [
        Metric(
            "cpu_us",
            "server CPU-s per million relayed packets (whole run)",
            "CPU-s/M",
            "lower",
            lambda r: _get(_result(r), "server_cpu_us_per_relayed_packet"),
            2,
        ),
        Metric("loss", "loss", "%", "lower", lambda r: _percent(_get(_result(r), "loss")), 2),
        Metric(
            "rtt_avg",
            "RTT mean (1 ms resolution)",
            "ms",
            "lower",
            lambda r: _get(_result(r), "rtt_avg_ms"),
            2,
        ),
    ],
}


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": values,
    }


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Medians and spread per case, variant and metric; ratios against coturn."""
    records: list[Record] = results["records"]
    meta_cases: dict[str, Any] = results["meta"]["cases"]
    cases: dict[str, Any] = {}
    for key, info in meta_cases.items():
        metrics = FIGURES.get(info["figure"], [])
        mine = [
            r for r in records if r["case"] == key and "result" in r and not r.get("superseded")
        ]
        if not mine:
            continue
        variants: dict[str, Any] = {}
        for variant in sorted({r["variant"] for r in mine}):
            rows = [r for r in mine if r["variant"] == variant]
            per_metric: dict[str, Any] = {}
            for metric in metrics:
                values = [v for r in rows if (v := metric.extract(r)) is not None]
                if values:
                    per_metric[metric.key] = _stats(values)
            others = [r["machine"]["other_share"] for r in rows if r.get("machine")]
            others = [v for v in others if v is not None]
            if others:
                per_metric["other_share"] = _stats(others)
            variants[variant] = per_metric
        ratios: dict[str, Any] = {}
        for metric in metrics:
            if not metric.ratio:
                continue
            for ours_name, theirs_name, _ in RATIOS:
                ours = variants.get(ours_name, {}).get(metric.key)
                theirs = variants.get(theirs_name, {}).get(metric.key)
                if ours is None or theirs is None or not theirs["median"]:
                    continue
                ratio = ours["median"] / theirs["median"]
                ratios.setdefault(metric.key, {})[f"{ours_name}/{theirs_name}"] = ratio
        cases[key] = {
            "title": info["title"],
            "figure": info["figure"],
            "variants": variants,
            "ratios": ratios,
        }
    return {"cases": cases, "ladders": _ladders(records), "errors": _errors(records)}


def _ladders(records: list[Record]) -> dict[str, Any]:
    """Capacity ladders: per case and variant, medians per offered rate."""
    out: dict[str, Any] = {}
    for record in records:
        if record.get("figure") != "capacity" or "result" not in record:
            continue
        if record.get("superseded"):
            continue
        by_rate = out.setdefault(record["case"], {}).setdefault(record["variant"], {})
        for step in _result(record).get("steps") or []:
            rate = step["offered_relayed_pps"]
            slot = by_rate.setdefault(rate, {"loss": [], "relayed_pps": [], "cpu_us": []})
            slot["loss"].append(step["loss"])
            slot["relayed_pps"].append(step["relayed_pps"])
            if step.get("server_cpu_us_per_relayed_packet") is not None:
                slot["cpu_us"].append(step["server_cpu_us_per_relayed_packet"])
    ladders: dict[str, Any] = {}
    for case, variants in out.items():
        for variant, by_rate in variants.items():
            points = []
            for rate in sorted(by_rate):
                slot = by_rate[rate]
                points.append(
                    {
                        "offered_relayed_pps": rate,
                        "loss": statistics.median(slot["loss"]),
                        "relayed_pps": statistics.median(slot["relayed_pps"]),
                        "cpu_us": statistics.median(slot["cpu_us"]) if slot["cpu_us"] else None,
                        "n": len(slot["loss"]),
                    }
                )
            ladders.setdefault(case, {})[variant] = points
    return ladders


def _errors(records: list[Record]) -> list[str]:
    out = []
    for record in records:
        if record.get("superseded"):
            continue
        problem = record.get("error") or record.get("skipped")
        setup_errors = _result(record).get("setup", {}).get("errors")
        if setup_errors:
            problem = (problem + "; " if problem else "") + f"setup errors {setup_errors}"
        if problem:
            out.append(f"{record['variant']} {record['case']} #{record['repeat'] + 1}: {problem}")
    return out


def one_line(record: Record) -> str:
    """A short progress line for one record."""
    if "error" in record and "result" not in record:
        return "ERROR " + record["error"].splitlines()[-1][:120]
    if "skipped" in record:
        return "skipped: " + record["skipped"]
    figure = record["figure"]
    result = _result(record)
    parts = []
    for metric in FIGURES.get(figure, [])[:3]:
        value = metric.extract(record)
        if value is not None:
            parts.append(f"{metric.key}={value:.{metric.digits}f}")
    if figure == "capacity":
        steps = result.get("steps") or []
        parts.append(
            "ladder "
            + " ".join(f"{s['relayed_pps'] / 1000:.0f}k/{s['loss'] * 100:.1f}%" for s in steps)
        )
    other = record.get("machine", {}).get("other_share")
    if other is not None:
        parts.append(f"other={other * 100:.0f}%")
    if "error" in record:
        parts.append("ERROR " + record["error"][:80])
    return " ".join(parts)


# --- Markdown --------------------------------------------------------------------------------

_SECTION_TITLES = [
    ("cpu", "1. Server CPU per relayed packet"),
    ("capacity", "2. Highest relayed packets/s with loss <= 1 %"),
    ("rtp", "3. RTP-like load"),
    ("rtt", "4. Round-trip time through the relay"),
    ("alloc", "5. Allocations per second"),
    ("alloc-db", "5b. Allocations per second, users in a user database"),
    ("hold", "6. Many allocations held"),
    ("binding", "7. STUN Binding requests per second"),
    ("uclient", "The same with coturn's load generator (turnutils_uclient + turnutils_peer)"),
]

# The headline figures: (figure number, case, metric[, title instead of the case's]).
_HEADLINES = [
    ("1", "udp-channel-100", "cpu_us"),
    ("1", "udp-channel-1000", "cpu_us"),
    ("1", "udp-indication-100", "cpu_us"),
    ("1", "tcp-channel-100", "cpu_us"),
    ("1", "tls-channel-100", "cpu_us"),
    (
        "1",
        "capacity-10",
        "cpu_us_at_80k",
        "UDP ChannelData, 100 B, 10 allocations, 80k relayed pps",
    ),
    ("2", "capacity-1", "capacity_pps"),
    ("2", "capacity-10", "capacity_pps"),
    ("2", "capacity-100", "capacity_pps"),
    ("3", "rtp-100", "cpu_us"),
    ("3", "rtp-100", "loss"),
    ("3", "rtp-500", "cpu_us"),
    ("3", "rtp-500", "loss"),
    ("4", "udp-channel-100", "rtt_p50"),
    ("4", "udp-channel-100", "rtt_p99"),
    ("5", "alloc-lt", "allocs_per_s"),
    ("5", "alloc-rest", "allocs_per_s"),
    ("5", "alloc-lt", "cpu_ms_per_alloc"),
    *(
        ("5b", f"alloc-db-{kind}-{when}", metric)
        for kind in ("sqlite", "postgresql", "redis")
        for metric in ("allocs_per_s", "cpu_ms_per_alloc")
        for when in ("cold", "cached")
    ),
    ("6", "hold-10000", "rss_per_alloc"),
    ("6", "hold-10000", "not_relaying"),
    ("7", "binding", "binding_per_s"),
    ("7", "binding", "cpu_us_per_request"),
    ("–", "uclient-udp-channel-100", "cpu_us"),
]


def _ratio_columns(variants: list[str]) -> list[tuple[str, str]]:
    """(key in the ratios, column title) for the ratios these variants allow."""
    return [(f"{a}/{b}", title) for a, b, title in RATIOS if a in variants and b in variants]


def _metric(figure: str, key: str) -> Metric | None:
    return next((m for m in FIGURES.get(figure, []) if m.key == key), None)


def _headline_table(summary: dict[str, Any], variants: list[str]) -> list[str]:
    columns = _ratio_columns(variants)
    header = ["#", "Load", "Figure", *[LABELS.get(v, v) for v in variants]]
    header += [title for _, title in columns]
    header.append("better")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for number, key, metric_key, *title in _HEADLINES:
        case = summary["cases"].get(key)
        if case is None:
            continue
        metric = _metric(case["figure"], metric_key)
        if metric is None:
            continue
        cells = [case["variants"].get(v, {}).get(metric.key) for v in variants]
        if all(c is None for c in cells):
            continue
        ratios = case["ratios"].get(metric.key, {})
        row = [number, title[0] if title else case["title"], f"{metric.label} ({metric.unit})"]
        row += [_cell(c, metric.digits) for c in cells]
        row += [_ratio(ratios.get(key)) for key, _ in columns]
        row.append(metric.better)
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "–"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _cell(stats: dict[str, Any] | None, digits: int) -> str:
    if stats is None:
        return "–"
    if stats["n"] == 1:
        return _fmt(stats["median"], digits)
    return (
        f"{_fmt(stats['median'], digits)} "
        f"<sub>({_fmt(stats['min'], digits)}–{_fmt(stats['max'], digits)})</sub>"
    )


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"**{value:.2f}**"


def _table(
    summary: dict[str, Any], figure: str, variants: list[str], only: list[str] | None = None
) -> list[str]:
    lines = []
    columns = _ratio_columns(variants)
    header = ["Load", "Figure", *[LABELS.get(v, v) for v in variants]]
    header += [title for _, title in columns]
    header.append("better")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    metric_figure = "cpu" if figure == "rtt" else figure
    for key, case in summary["cases"].items():
        if case["figure"] != metric_figure:
            continue
        if figure == "rtt" and key != "udp-channel-100":
            continue
        for metric in FIGURES[metric_figure]:
            if only is not None and metric.key not in only:
                continue
            if figure != "rtt" and metric_figure == "cpu" and metric.key.startswith("rtt"):
                continue
            cells = [case["variants"].get(v, {}).get(metric.key) for v in variants]
            if all(c is None for c in cells):
                continue
            ratios = case["ratios"].get(metric.key, {})
            row = [
                case["title"],
                f"{metric.label} ({metric.unit})",
                *[_cell(c, metric.digits) for c in cells],
                *[_ratio(ratios.get(key)) for key, _ in columns],
            ]
            row.append(metric.better)
            lines.append("| " + " | ".join(row) + " |")
        others = [case["variants"].get(v, {}).get("other_share") for v in variants]
        if any(o is not None for o in others) and figure != "rtt":
            row = [case["title"], "CPU used by other processes on the machine (% of all cores)"]
            row += ["–" if o is None else _cell({**o, **_scaled(o, 100)}, 0) for o in others]
            row += [""] * len(columns)
            row.append("(noise)")
            lines.append("| " + " | ".join(row) + " |")
    return lines


def _scaled(stats: dict[str, Any], factor: float) -> dict[str, Any]:
    return {k: stats[k] * factor for k in ("median", "min", "max")}


def _pin(cpu: str | None) -> str:
    return "" if cpu is None else f"taskset -c {cpu} "


def server_key(variant: str, auth: str) -> str:
    return f"{variant} ({auth})"


def _commands(results: dict[str, Any]) -> list[str]:
    """One command line per case and server kind, as run (ports and pids vary per run)."""
    seen: dict[tuple[str, str], list[str]] = {}
    servers: dict[str, list[str]] = dict(results["meta"].get("server_commands", {}))
    for record in results["records"]:
        key = (record["case"], record["variant"])
        if key not in seen and record.get("command"):
            seen[key] = record["command"]
        if record.get("server_command"):
            servers.setdefault(
                server_key(record["variant"], record["auth"]), record["server_command"]
            )
    pinning = results["meta"].get("pinning", {})
    server_pin = _pin(pinning.get("server_cpu"))
    load_pin = _pin(pinning.get("generator_cpu"))
    lines = ["Servers (each started fresh for every session):", ""]
    lines.append("```sh")
    for name, command in servers.items():
        lines.append(f"# {name}")
        lines.append(server_pin + shlex.join(_relative(command)))
    lines.append("```")
    lines.append("")
    lines.append(
        "Loads (the same for every server; with `--server-pid` the probe reads the server's "
        "CPU time):"
    )
    lines.append("")
    lines.append("```sh")
    done: set[str] = set()
    for (case, variant), command in seen.items():
        if case in done or not variant.startswith("tsunagu"):
            continue
        done.add(case)
        lines.append(f"# {case}")
        lines.append(load_pin + shlex.join(_relative(command)))
    lines.append("```")
    return lines


def _relative(command: list[str]) -> list[str]:
    out = []
    for part in command:
        if part == sys.executable or part.endswith("/python") or part.endswith("/python3"):
            out.append(".venv/bin/python")
        elif "/tsunagu-bench-" in part:
            out.append("$WORKDIR/" + part.rsplit("/", 1)[-1])
        else:
            out.append(part)
    return out


def _notes(summary: dict[str, Any]) -> list[str]:
    """Where a figure is a bound rather than a measurement, said in words."""
    notes = []
    for case in summary["cases"].values():
        for variant, metrics in case["variants"].items():
            label = LABELS.get(variant, variant)
            busy = metrics.get("generator_busy")
            if busy is not None and busy["median"] >= 0.85:
                notes.append(
                    f"{case['title']}: the load generator was busy {busy['median'] * 100:.0f} % "
                    f"of its core with {label}, so {label}'s rate there is a lower bound."
                )
            top = metrics.get("ladder_top")
            if top is not None and top["median"] >= 1:
                notes.append(
                    f"{case['title']}: {label} lost no more than 1 % even at the top of the "
                    "ladder, so its capacity is a lower bound."
                )
            other = metrics.get("other_share")
            if other is not None and other["median"] > 0.15:
                notes.append(
                    f"{case['title']}: other programs used {other['median'] * 100:.0f} % of the "
                    f"machine while {label} ran (median); treat that figure with care."
                )
    return notes


def _run_info(meta: dict[str, Any]) -> dict[str, Any]:
    machine = meta.get("machine", {})
    return {
        "plan": meta.get("plan"),
        "repeats": meta.get("repeats"),
        "started": meta.get("started"),
        "seconds": meta.get("seconds"),
        "cpu": machine.get("cpu"),
        "tsunagu_commit": machine.get("tsunagu_commit"),
        "coturn": machine.get("coturn"),
    }


def carry_over(results: dict[str, Any], earlier: dict[str, Any]) -> list[str]:
    """Add to ``results`` the rows of ``earlier`` (the report it replaces) that this run did
    not measure, so that a run of some loads (the opt-in user database rows, say) updates
    the report without dropping the rest; meta["earlier_runs"] says where each came from.
    Returns the cases carried over."""
    meta = results["meta"]
    old_meta = earlier.get("meta", {})
    if old_meta.get("plan") != meta.get("plan"):
        return []
    ran = {r["case"] for r in results["records"]}
    old_records = earlier.get("records", [])
    measured = {r["case"] for r in old_records}
    older = old_meta.get("earlier_runs", [])
    from_older = {case for part in older for case in part["cases"]}
    parts = [
        {**_run_info(old_meta), "cases": [c for c in old_meta["cases"] if c not in from_older]},
        *older,
    ]
    kept = []
    for part in parts:
        cases = [c for c in part["cases"] if c not in ran and c in measured]
        if cases:
            kept.append({**part, "cases": cases})
    carried = [case for part in kept for case in part["cases"]]
    if not carried:
        return []
    results["records"] = results["records"] + [r for r in old_records if r["case"] in carried]
    cases = {c: old_meta["cases"][c] for c in old_meta["cases"] if c in carried}
    meta["cases"] = {**cases, **meta["cases"]}
    variants = set(meta["variants"]) | set(old_meta.get("variants", []))
    meta["variants"] = [v for v in VARIANT_ORDER if v in variants]
    commands = dict(meta.get("server_commands", {}))
    for record in old_records:
        key = server_key(record["variant"], record["auth"])
        if record["case"] in carried and key in old_meta.get("server_commands", {}):
            commands.setdefault(key, old_meta["server_commands"][key])
    meta["server_commands"] = commands
    if "databases" in old_meta and any(c.startswith("alloc-db") for c in carried):
        meta.setdefault("databases", old_meta["databases"])
    meta["earlier_runs"] = kept
    return carried


def _run_line(info: dict[str, Any]) -> str:
    return (
        f"{info.get('plan')} plan, {info.get('repeats')} repeat(s), run {info.get('started')}, "
        f"took {info.get('seconds') or 0:.0f} s, tsunagu commit {info.get('tsunagu_commit')}, "
        f"coturn {info.get('coturn')}, {info.get('cpu')}"
    )


def _peer(peer: Any) -> str:
    return shlex.join(peer) if isinstance(peer, list) else str(peer)


def markdown(results: dict[str, Any], plots: list[Path]) -> str:
    meta = results["meta"]
    summary = results["summary"]
    machine = meta["machine"]
    variants = [v for v in VARIANT_ORDER if v in meta["variants"]]
    lines = [
        "# Benchmarks: tsunagu against coturn",
        "",
        "Every figure is measured for coturn and for tsunagu on the same machine, in the same "
        "run, with the same load generator, and given as a ratio (tsunagu / coturn). Cells "
        "show the median over the repeats and, in small print, the lowest and highest value. "
        "For CPU and memory a ratio below 1 favours tsunagu; for rates, above 1.",
        "",
        "Regenerate with `make -C bench` (or `.venv/bin/python -m bench`); a smoke version "
        "runs in seconds with `.venv/bin/python -m bench --quick`.",
        "",
        "## Machine and versions",
        "",
        f"- {machine.get('cores')} cores ({machine.get('cpu')}), "
        f"{(machine.get('memory_bytes') or 0) / 2**30:.1f} GiB, kernel {machine.get('kernel')}, "
        f"{machine.get('os')}",
        f"- Python {machine.get('python')}, uvloop {machine.get('uvloop')}, tsunagu "
        f"{machine.get('tsunagu')} (commit {machine.get('tsunagu_commit')}), coturn "
        f"{machine.get('coturn')} (Debian package)",
        f"- {meta['plan']} plan, {meta['repeats']} repeat(s), run {meta['started']}, took "
        f"{meta.get('seconds', 0):.0f} s; load average at start "
        f"{', '.join(str(v) for v in machine.get('loadavg_at_start', []))}",
        f"- Pinning: server on CPU {meta['pinning']['server_cpu']}, load generator and echo peer "
        f"on CPU {meta['pinning']['generator_cpu']}; echo peer: `{_peer(meta['echo_peer'])}`",
    ]
    for part in meta.get("earlier_runs", []):
        titles = ", ".join(f"`{case}`" for case in part["cases"] if case in summary["cases"])
        lines.append(f"- From an earlier run ({_run_line(part)}): {titles}")
    if meta.get("earlier_runs"):
        lines.append("- Every other row comes from the run described first.")
    lines.append("")
    lines += ["## Summary", ""]
    lines += _headline_table(summary, variants)
    lines += [
        "",
        "Medians over the repeats, with the lowest and highest value in small print. The "
        "sections below give every figure with loss, round-trip times and how busy the "
        "machine was.",
        "",
    ]
    for figure, title in _SECTION_TITLES:
        table = _table(summary, figure, variants)
        if len(table) <= 2:
            continue
        lines += [f"## {title}", ""]
        lines += table
        lines.append("")
        if figure == "capacity":
            for plot in plots:
                lines.append(f"![{plot.stem}]({plot.name})")
                lines.append("")
    notes = _notes(summary)
    if notes:
        lines += ["## Limits of these figures", ""]
        lines += [f"- {note}" for note in notes]
        lines.append("")
    if summary.get("errors"):
        lines += ["## Problems seen during the run", ""]
        lines += [f"- {e}" for e in summary["errors"][:40]]
        lines.append("")
    lines += ["## Method", ""]
    lines += METHOD.strip().splitlines()
    lines += ["", "## Exact commands", ""]
    lines += _commands(results)
    lines.append("")
    return "\n".join(lines)


METHOD = """
- **Relayed packets** are twice the messages that came back: each test message goes client ->
  relay -> peer and back peer -> relay -> client. **Server CPU** is utime + stime of the server
  process (all threads) from `/proc/PID/stat`, read by the load generator right before and
  after each measured step; CPU-seconds per million relayed packets is the same number as
  microseconds per packet. `/proc` counts in 10 ms ticks, so short steps carry a few per cent
  of rounding.
- **Load generator**: `tsunagu probe`, one thread around `epoll`. Each allocation is its own
  client socket that does the full exchange (Allocate -> 401 -> Allocate with long-term
  credentials -> CreatePermission -> ChannelBind), then sends paced test messages, round-robin
  over the allocations, carrying a sequence number and the send time; loss and round-trip times
  come from what returns. The echo peer is coturn's `turnutils_peer`. Allocations are released
  (Refresh, lifetime 0) at the end of every load so that no load inherits another's state.
- **Capacity** is the highest step of a rate ladder (1.5 s per step) with loss <= 1 %. When no
  step lost more than 1 %, the figure is a lower bound set by the ladder's top or the load
  generator (see "load generator busy").
- **Allocations per second** are measured with 32 allocations in flight at once on a freshly
  started server; REST credentials are minted per allocation (`<expiry>:probe<i>`, HMAC-SHA1
  of the shared secret). tsunagu runs with `--unauth-rate 1000000`: its default of 20
  unauthenticated answers per second per source IP (a guard against reflection) would
  otherwise cap a single-address load generator, and coturn has no such limit.
- **User databases** (section 5b, opt-in: `make -C bench userdb`): the benchmark starts
  PostgreSQL 15 and Redis 7 itself (loopback, a password, each under a time limit) and fills
  each, and an SQLite file, once with coturn's rows for 2,000 users (`turnusers_lt`, or
  `turn/realm/<realm>/user/<name>/key` in Redis: the hex MD5 of name:realm:password, as
  `turnadmin -a` writes it). Every server then reads that same database: coturn with `-b FILE`,
  `--psql-userdb` or `--redis-userdb`, tsunagu with the same options, neither with any other
  user. On a freshly started server, **cold** makes 2,000 allocations of 2,000 different users
  (each a first lookup: tsunagu asks the database off its event loop and answers the Allocate
  when the key arrives), then **cached** makes them again at once (tsunagu's key cache, 60 s,
  answers; coturn has no such cache and asks its database for every allocation). The database
  server's own CPU (all its processes) is given beside, over the whole load.
- **Memory**: resident set (RSS) of the server process before the allocations and while they
  are held; divided by the number of allocations.
- **STUN Binding**: 4 sockets, each with 16 requests in flight (a new one for every answer);
  answers per second and server CPU per request.
- **Variants**: coturn with one relay thread (`-m 1`) against tsunagu as one process is the
  main comparison. tsunagu relays through its native (C) per-packet path, the default where
  it is built; `--relay-engine python`, the pure-Python path it falls back to, runs the main
  UDP loads too. So do coturn with its default threads and tsunagu with `--workers 2`;
  every server is pinned to the same single core, so these show what their threads or
  processes cost on one core, not what they gain on several.
- **Interleaving**: every server variant gets a fresh process per session; sessions run in a
  rotating order (A B C, B C A, C A B), repeated, and the tables show medians. Each detail
  table shows how much CPU processes outside the benchmark used during the loads: the
  benchmark waits for a quiet machine before each session, and runs a load again once when
  other programs took more than a quarter of the machine meanwhile (both results stay in the
  JSON file; the second one counts).
- Open files: both servers are started with the soft limit raised as far as the machine
  allows (each record in the JSON file says what it was). coturn raises its own soft limit
  at start-up; tsunagu does not, so under a default soft limit of 1024 it would fail beyond
  about 1,000 allocations.
- Socket buffers: both servers use 64 KiB relay sockets (the kernel doubles it) and 2 MiB
  listener buffers; the probe's client sockets ask for 1 MiB.
"""


# --- plots -----------------------------------------------------------------------------------


def ensure_matplotlib(*, install: bool) -> bool:
    return _matplotlib(install) is not None


def _matplotlib(install: bool) -> Any:
    try:
        return importlib.import_module("matplotlib")
    except ImportError:
        if not install:
            return None
    # A bench-only dependency, installed into the interpreter running the benchmark.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "matplotlib",
        ],
        capture_output=True,
    )
    if done.returncode != 0:
        sys.stderr.write("bench: could not install matplotlib; no plots\n")
        return None
    importlib.invalidate_caches()
    return importlib.import_module("matplotlib")


def _ladder_runs(results: dict[str, Any]) -> dict[str, dict[str, list[list[dict[str, Any]]]]]:
    """Capacity ladders as run: case -> variant -> one list of steps per repeat."""
    runs: dict[str, dict[str, list[list[dict[str, Any]]]]] = {}
    for record in results["records"]:
        if record.get("figure") != "capacity" or record.get("superseded"):
            continue
        steps = _result(record).get("steps")
        if steps:
            runs.setdefault(record["case"], {}).setdefault(record["variant"], []).append(steps)
    return runs


def plot(results: dict[str, Any], directory: Path, *, install: bool) -> list[Path]:
    """Loss and server CPU against offered relayed packets/s, per allocation count."""
    runs = _ladder_runs(results)
    if not runs:
        return []
    matplotlib = _matplotlib(install)
    if matplotlib is None:
        return []
    matplotlib.use("Agg")
    pyplot = importlib.import_module("matplotlib.pyplot")
    cases = sorted(runs, key=lambda c: int(c.rsplit("-", 1)[-1]) if c[-1].isdigit() else 0)
    styles = {
        "coturn-m1": ("tab:blue", "coturn -m 1"),
        "coturn": ("tab:cyan", "coturn (default threads)"),
        "tsunagu": ("tab:red", "tsunagu"),
        "tsunagu-py": ("tab:purple", "tsunagu, Python relay path"),
        "tsunagu-w2": ("tab:orange", "tsunagu --workers 2"),
    }
    figure, axes = pyplot.subplots(2, len(cases), figsize=(5 * len(cases), 7), squeeze=False)
    for column, case in enumerate(cases):
        count = case.rsplit("-", 1)[-1]
        top, bottom = axes[0][column], axes[1][column]
        for variant, ladders in sorted(runs[case].items()):
            color, label = styles.get(variant, ("tab:gray", variant))
            for number, steps in enumerate(ladders):
                name = label if number == 0 else None
                xs = [s["relayed_pps"] / 1000 for s in steps]
                top.plot(
                    xs,
                    [s["loss"] * 100 for s in steps],
                    "o-",
                    color=color,
                    label=name,
                    alpha=0.7,
                    markersize=4,
                    linewidth=1.2,
                )
                cpu = [
                    (s["offered_relayed_pps"] / 1000, s["server_cpu_us_per_relayed_packet"])
                    for s in steps
                    if s.get("server_cpu_us_per_relayed_packet") is not None
                ]
                if cpu:
                    bottom.plot(
                        *zip(*cpu, strict=True),
                        "o-",
                        color=color,
                        label=name,
                        alpha=0.7,
                        markersize=4,
                        linewidth=1.2,
                    )
        top.set_title(f"{count} allocation{'s' if count != '1' else ''}")
        top.set_yscale("symlog", linthresh=1)
        top.axhline(1, color="gray", linestyle=":", linewidth=1)
        top.set_ylabel("loss (%)")
        top.set_xlabel("relayed packets/s achieved (thousands)")
        top.grid(True, alpha=0.3)
        top.legend(fontsize=8)
        bottom.set_ylabel("server CPU µs per relayed packet")
        bottom.set_xlabel("offered relayed packets/s (thousands)")
        bottom.set_ylim(bottom=0)
        bottom.grid(True, alpha=0.3)
    figure.suptitle(
        "UDP ChannelData, 100 B, rate ladders: loss against relayed packets/s, and server CPU "
        "(one line per repeat)"
    )
    figure.tight_layout()
    path = directory / "bench-capacity.png"
    figure.savefig(path, dpi=90)
    pyplot.close(figure)
    return [path]
