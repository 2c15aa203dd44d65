"""Memory soak: waves of TURN allocations under RTP-like load; the server's RSS after each.

``python -m bench.soak`` starts tsunagu as a user runs it (``tsunagu serve`` with its
default worker count and relay engine; the options bench/servers.py gives every tsunagu
in the benchmark: loopback addresses, a static user, no quotas) and coturn's echo peer
(``turnutils_peer``; without it an echo socket in the load generator). Then, wave after
wave:

1. create ``--allocations`` UDP allocations (Allocate with long-term credentials,
   CreatePermission and ChannelBind to the echo peer), a client socket each;
2. relay RTP-like traffic through them for ``--hold`` seconds: every allocation sends a
   ``--size``-byte ChannelData message every ``--interval-ms``, the peer sends it back
   (the default hold, 45 s, outlasts the 40 s for which the server keeps its answers to
   requests for retransmissions: the Refresh requests that end a wave trim those of its
   Allocate requests, so every wave leaves the same cache behind);
3. end them all (Refresh, LIFETIME 0), close the client sockets, and wait until the
   server's admin socket (``tsunagu status``) counts no allocation left;
4. read VmRSS from /proc/PID/status of the server and of every worker process below it,
   and add them up.

The RSS after the first wave (which also pays for everything allocated once: imports,
caches, buffers) is the baseline. The run fails (exit status 1) when any later wave ends
above ``--limit`` times it, when a wave could not create every allocation, or when
messages did not come back. The load generator is tsunagu's own (``tsunagu probe load``:
one thread around epoll, a socket per allocation, the open-files limit raised); its CPU
time, the echo peer's and the server's are reported beside the figures.

Every loop is bounded: waves by ``--waves`` and ``--duration``, each wait by a time limit.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import resource
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tsunagu.admin.client import AdminUnavailable, request
from tsunagu.probe import procstat
from tsunagu.probe.load import LoadGenerator, LoadSpec
from tsunagu.workers import READY_LINE

from .servers import (
    HOST,
    REPO,
    RESULTS,
    USER,
    BenchError,
    EchoPeer,
    PortPool,
    Server,
    Variant,
    make_certificate,
    process_cpu,
    start_echo_peer,
    start_server,
)

# The soak's copy of its last full run, next to BENCHMARKS.md: the full benchmark, which
# rewrites BENCHMARKS.md, puts the section back from it.
SOAK_JSON = "soak.json"
SECTION_TITLE = "## 8. Memory under waves of allocations (soak)"
MAX_WAVES = 200
FREE_TIMEOUT = 60.0  # seconds for the server to count no allocation after the release
SETTLE = 2.0  # seconds between "no allocation left" and reading RSS
# tsunagu with its defaults: no --workers, no --relay-engine.
DEFAULT_TSUNAGU = Variant("tsunagu-defaults", "tsunagu", "tsunagu (default workers and engine)")


@dataclass(frozen=True)
class Options:
    allocations: int
    waves: int
    duration: float
    hold: float
    interval_ms: float
    size: int
    limit: float
    setup_window: int
    server_args: tuple[str, ...] = ()


def vm_rss_kib(pid: int) -> int:
    """VmRSS of one process, in KiB (0 for a process that is gone or has no memory)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) if match else 0


def server_memory(pid: int) -> dict[str, Any]:
    """RSS of the server and every process below it (its workers), per process and summed."""
    per_process = {str(p): vm_rss_kib(p) for p in procstat.descendants(pid)}
    return {"rss_kib": sum(per_process.values()), "processes": per_process}


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def allocations_left(admin_socket: str) -> int:
    answer = request(admin_socket, {"command": "status"}, timeout=5.0)
    allocations = answer.get("allocations")
    if isinstance(allocations, dict):
        return int(allocations.get("total", 0))
    return int(allocations or 0)


def wait_until_freed(admin_socket: str, timeout: float = FREE_TIMEOUT) -> tuple[int, float]:
    """Poll the admin socket until no allocation is left; (allocations left, seconds)."""
    started = time.monotonic()
    left = -1
    while time.monotonic() - started < timeout:
        with contextlib.suppress(AdminUnavailable):
            left = allocations_left(admin_socket)
            if left == 0:
                break
        time.sleep(0.2)
    return left, time.monotonic() - started


def run_wave(
    number: int,
    options: Options,
    server: Server,
    admin_socket: str,
    peer: EchoPeer | None,
) -> dict[str, Any]:
    spec = LoadSpec(
        server=(HOST, server.port),
        allocations=options.allocations,
        username=USER[0],
        password=USER[1],
        peer=(HOST, peer.port) if peer is not None else None,
        size=options.size,
        setup_window=options.setup_window,
        setup_timeout=120.0,
        server_pid=server.pid,
    )
    started = time.monotonic()
    cpu = {"generator": _self_cpu(), "server": process_cpu(server.pid)}
    if peer is not None:
        cpu["peer"] = process_cpu(peer.pid)
    generator = LoadGenerator(spec)
    try:
        if peer is None:
            generator._open_echo()  # an echo socket in this process
        setup = generator.setup()
        ready = setup["ready"]
        rate = ready / (options.interval_ms / 1000) if ready else 0.0
        # Step numbers tell this wave's messages from late ones of the wave before.
        step = generator.run_step(rate, options.hold, number + 1) if ready else {}
        release = generator.release()
    finally:
        generator.close()
    left, free_seconds = wait_until_freed(admin_socket)
    time.sleep(SETTLE)
    memory = server_memory(server.pid)
    seconds = time.monotonic() - started
    used = {
        "generator": _self_cpu() - cpu["generator"],
        "server": process_cpu(server.pid) - cpu["server"],
    }
    if peer is not None:
        used["peer"] = process_cpu(peer.pid) - cpu["peer"]
    return {
        "wave": number,
        "allocations_requested": options.allocations,
        "allocations_created": ready,
        "setup_errors": setup["errors"],
        "setup_seconds": setup["seconds"],
        "allocations_per_s": setup["per_second"],
        "offered_msgs_per_s": round(rate, 1),
        "sent": step.get("sent", 0),
        "received": step.get("received", 0),
        "relayed_packets": step.get("relayed_packets", 0),
        "relayed_pps": step.get("relayed_pps", 0.0),
        "loss": step.get("loss"),
        "rtt_ms": step.get("rtt_ms"),
        "send_lag_ms_max": step.get("send_lag_ms_max"),
        "released": release.get("released", 0),
        "allocations_left": left,
        "free_seconds": round(free_seconds, 2),
        "rss_kib": memory["rss_kib"],
        "rss_kib_per_process": memory["processes"],
        "seconds": round(seconds, 2),
        "cpu_s": {key: round(value, 2) for key, value in used.items()},
        "generator_busy": round(used["generator"] / seconds, 3) if seconds else None,
    }


def _wave_line(wave: dict[str, Any], baseline: int | None) -> str:
    ratio = wave["rss_kib"] / baseline if baseline else 1.0
    loss = wave["loss"]
    return (
        f"{wave['wave']:>4} {wave['allocations_created']:>7,} {wave['relayed_packets']:>12,}"
        f" {(loss or 0) * 100:>6.2f} {wave['rss_kib'] / 1024:>9.1f} {ratio:>7.3f}"
        f" {wave['cpu_s'].get('server', 0):>8.1f} {wave['cpu_s'].get('generator', 0):>8.1f}"
        f" {wave['seconds']:>6.1f}"
    )


TABLE_HEAD = "wave  created      relayed  loss%   RSS MiB   ratio  srv CPU  gen CPU  wave s"


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def verdict(waves: list[dict[str, Any]], options: Options) -> list[str]:
    """What is wrong with a run (nothing: it passed)."""
    problems: list[str] = []
    if not waves:
        return ["no wave ran"]
    baseline = waves[0]["rss_kib"]
    for wave in waves:
        number = wave["wave"]
        if wave["allocations_created"] < options.allocations:
            problems.append(
                f"wave {number}: {wave['allocations_created']} of {options.allocations}"
                f" allocations created ({wave['setup_errors']})"
            )
        if wave["received"] <= 0 or (wave["loss"] or 0) > 0.05:
            problems.append(
                f"wave {number}: {wave['received']} of {wave['sent']} messages came back"
            )
        if wave["allocations_left"] != 0:
            problems.append(
                f"wave {number}: {wave['allocations_left']} allocations still counted"
                f" {FREE_TIMEOUT:.0f} s after the release"
            )
        if number > 1 and wave["rss_kib"] > options.limit * baseline:
            problems.append(
                f"wave {number}: RSS {wave['rss_kib']} KiB is {wave['rss_kib'] / baseline:.3f}"
                f" x wave 1's {baseline} KiB (limit {options.limit})"
            )
    return problems


def _wait_ready(server: Server, timeout: float = 30.0) -> None:
    """Wait for the ready line, printed once every worker has bound its listeners.

    Worker 0 answers STUN before the other workers have joined the SO_REUSEPORT group; a
    client that starts then may have its later packets hashed to another worker.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if READY_LINE in server.log_path.read_text(errors="replace"):
            return
        if not server.alive():
            break
        time.sleep(0.1)
    raise BenchError(f"tsunagu did not print {READY_LINE!r} within {timeout:g} s")


@contextlib.contextmanager
def _servers(workdir: Path, extra: tuple[str, ...]) -> Iterator[tuple[Server, EchoPeer | None]]:
    cert, key = make_certificate(workdir)
    peer = start_echo_peer(None)
    variant = dataclasses.replace(DEFAULT_TSUNAGU, extra=extra)
    try:
        server = start_server(
            variant,
            PortPool(),
            auth="static",
            cert=cert,
            key=key,
            workdir=workdir,
            cpu=None,
        )
        try:
            _wait_ready(server)
            yield server, peer
        finally:
            server.stop()
    finally:
        if peer is not None:
            peer.stop()


def soak(options: Options) -> dict[str, Any]:
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    started = time.monotonic()
    waves: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tsunagu-soak-") as tmp:
        workdir = Path(tmp)
        with _servers(workdir, options.server_args) as (server, peer):
            admin_socket = str(workdir / "state" / "tsunagu" / "admin.sock")
            idle = server_memory(server.pid)
            workers = len(idle["processes"])
            _say(
                f"soak: tsunagu pid {server.pid}, {workers} process(es), RSS"
                f" {idle['rss_kib'] / 1024:.1f} MiB at start; echo peer:"
                f" {'turnutils_peer' if peer else 'in the load generator'}"
            )
            _say(
                f"soak: {options.allocations:,} allocations a wave, each sends"
                f" {options.size} B every {options.interval_ms:g} ms"
                f" ({options.allocations * 1000 / options.interval_ms:,.0f} messages/s offered,"
                f" twice that relayed) for {options.hold:g} s; up to {options.waves} waves"
                f" in {options.duration:g} s"
            )
            _say(TABLE_HEAD)
            longest = 0.0
            for number in range(1, options.waves + 1):
                elapsed = time.monotonic() - started
                # Start a wave only if one as long as the longest so far still fits.
                if number > 1 and elapsed + longest > options.duration:
                    break
                if not server.alive():
                    raise BenchError("tsunagu exited during the soak")
                wave = run_wave(number, options, server, admin_socket, peer)
                waves.append(wave)
                longest = max(longest, wave["seconds"])
                _say(_wave_line(wave, waves[0]["rss_kib"]))
            command = server.command
    baseline = waves[0]["rss_kib"] if waves else 0
    for wave in waves:
        wave["rss_ratio"] = round(wave["rss_kib"] / baseline, 4) if baseline else None
    seconds = time.monotonic() - started
    problems = verdict(waves, options)
    generator_cpu = sum(w["cpu_s"]["generator"] for w in waves)
    wave_seconds = sum(w["seconds"] for w in waves)
    return {
        "meta": {
            "kind": "soak",
            "started": started_at,
            "seconds": round(seconds, 1),
            "options": options.__dict__,
            "server_command": command,
            "server_processes": workers,
            "echo_peer": "turnutils_peer" if peer else "in the load generator",
            "cores": os.cpu_count(),
            "tsunagu_commit": _commit(),
        },
        "idle_rss_kib": idle["rss_kib"],
        "waves": waves,
        "summary": {
            "waves": len(waves),
            "baseline_rss_kib": baseline,
            "max_ratio_after_first": max((w["rss_ratio"] for w in waves[1:]), default=None),
            "relayed_packets": sum(w["relayed_packets"] for w in waves),
            "allocations_created": sum(w["allocations_created"] for w in waves),
            "generator_busy": round(generator_cpu / wave_seconds, 3) if wave_seconds else None,
            "passed": not problems,
            "problems": problems,
        },
    }


def _commit() -> str | None:
    import subprocess

    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


# --- the section of docs/BENCHMARKS.md ------------------------------------------------------


def section(results: dict[str, Any]) -> list[str]:
    """The soak's section of BENCHMARKS.md, as lines."""
    meta, summary, waves = results["meta"], results["summary"], results["waves"]
    options = meta["options"]
    rate = options["allocations"] * 1000 / options["interval_ms"]
    lines = [
        SECTION_TITLE,
        "",
        f"tsunagu with its defaults ({meta['server_processes']} processes: the default worker"
        f" count on {meta['cores']} cores, the default relay engine), {summary['waves']} waves"
        f" in {meta['seconds'] / 60:.1f} minutes (run {meta['started']}, commit"
        f" {meta['tsunagu_commit']}). Each wave creates {options['allocations']:,} UDP"
        f" allocations (long-term credentials, a permission and a channel to the echo peer,"
        f" {meta['echo_peer']}), relays RTP-like traffic through them for {options['hold']:g} s"
        f" ({options['size']} B every {options['interval_ms']:g} ms per allocation:"
        f" {rate:,.0f} messages/s offered, {2 * rate:,.0f} relayed packets/s), ends them"
        f" (Refresh, lifetime 0) and waits until `tsunagu status` counts none; then the RSS"
        f" of the server and all its workers (VmRSS, summed) is read. Wave 1 is the baseline;"
        f" every later wave must stay within {options['limit']:.2f} x it. Regenerate with"
        f" `make -C bench soak`; CI runs a shorter version (tests/bench/test_bench_soak.py).",
        "",
        "| Wave | Allocations created | Packets relayed | Loss (%) | RSS after the wave (MiB)"
        " | RSS / wave 1 | Server CPU (s) | Load generator CPU (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for wave in waves:
        lines.append(
            f"| {wave['wave']} | {wave['allocations_created']:,} | {wave['relayed_packets']:,}"
            f" | {(wave['loss'] or 0) * 100:.2f} | {wave['rss_kib'] / 1024:.1f}"
            f" | {wave['rss_ratio']:.3f} | {wave['cpu_s'].get('server', 0):.1f}"
            f" | {wave['cpu_s'].get('generator', 0):.1f} |"
        )
    worst = summary["max_ratio_after_first"]
    lines += [
        "",
        f"- RSS at start {results['idle_rss_kib'] / 1024:.1f} MiB, after wave 1"
        f" {summary['baseline_rss_kib'] / 1024:.1f} MiB; highest later wave"
        f" {worst if worst is None else f'{worst:.3f}'} x wave 1:"
        f" {'within' if summary['passed'] else 'NOT within'} the bound.",
        f"- {summary['allocations_created']:,} allocations and"
        f" {summary['relayed_packets']:,} relayed packets in all. The load generator"
        f" (`tsunagu probe`'s, one thread) was busy {summary['generator_busy'] * 100:.0f} % of a"
        f" core on average, the echo peer {_peer_busy(results) * 100:.0f} %.",
    ]
    for problem in summary["problems"]:
        lines.append(f"- Problem: {problem}")
    return lines


def _peer_busy(results: dict[str, Any]) -> float:
    waves = results["waves"]
    seconds = sum(w.get("seconds", 0) for w in waves)
    return sum(w["cpu_s"].get("peer", 0) for w in waves) / seconds if seconds else 0.0


def insert_section(markdown: str, lines: list[str]) -> str:
    """``markdown`` with the soak section replaced, or put before the limits and method."""
    text = "\n".join(lines) + "\n"
    start = markdown.find(SECTION_TITLE)
    if start >= 0:
        following = markdown.find("\n## ", start + len(SECTION_TITLE))
        end = following + 1 if following >= 0 else len(markdown)
        return markdown[:start] + text + "\n" + markdown[end:]
    for anchor in ("## Limits of these figures", "## Problems seen", "## Method"):
        at = markdown.find("\n" + anchor)
        if at >= 0:
            return markdown[: at + 1] + text + "\n" + markdown[at + 1 :]
    return markdown.rstrip("\n") + "\n\n" + text


def keep_section(markdown: str, docs: Path) -> str:
    """Put the last soak's section (docs/soak.json) into a freshly written report."""
    path = docs / SOAK_JSON
    if not path.exists():
        return markdown
    return insert_section(markdown, section(json.loads(path.read_text())))


# --- command line ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description="Waves of TURN allocations under RTP-like load; tsunagu's RSS after each.",
    )
    parser.add_argument("--allocations", type=int, default=2000, help="allocations per wave")
    parser.add_argument("--waves", type=int, default=MAX_WAVES, help="at most this many waves")
    parser.add_argument(
        "--duration", type=float, default=600.0, help="seconds: no wave starts that would end later"
    )
    parser.add_argument(
        "--hold",
        type=float,
        default=45.0,
        help="seconds of traffic per wave (default: longer than the 40 s the server keeps its"
        " answers for retransmissions, so that every wave ends with the same server state)",
    )
    parser.add_argument(
        "--interval-ms", type=float, default=100.0, help="ms between one allocation's messages"
    )
    parser.add_argument("--size", type=int, default=172, help="bytes per message (RTP-like)")
    parser.add_argument("--limit", type=float, default=1.05, help="highest RSS / wave 1's")
    parser.add_argument("--setup-window", type=int, default=32, help="allocations in flight")
    parser.add_argument(
        "--server-args",
        default="",
        help="more options for tsunagu serve, one string (to compare, say '--workers 1')",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON file")
    parser.add_argument(
        "--docs",
        type=Path,
        help=f"also write {SOAK_JSON} and the section of BENCHMARKS.md in this directory",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.allocations <= 10000:
        parser.error("--allocations: 1 to 10000")
    if not 1 <= args.waves <= MAX_WAVES:
        parser.error(f"--waves: 1 to {MAX_WAVES}")
    if not 0 < args.duration <= 7200 or not 0 < args.hold <= 600:
        parser.error("--duration up to 7200 s, --hold up to 600 s")
    if not 20 <= args.interval_ms <= 1000 or not 32 <= args.size <= 1200:
        parser.error("--interval-ms 20 to 1000, --size 32 to 1200")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = Options(
        allocations=args.allocations,
        waves=args.waves,
        duration=args.duration,
        hold=args.hold,
        interval_ms=args.interval_ms,
        size=args.size,
        limit=args.limit,
        setup_window=args.setup_window,
        server_args=tuple(shlex.split(args.server_args)),
    )
    try:
        results = soak(options)
    except BenchError as exc:
        sys.stderr.write(f"soak: {exc}\n")
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    summary = results["summary"]
    _say(
        f"soak: {summary['waves']} waves, RSS after wave 1 {summary['baseline_rss_kib'] / 1024:.1f}"
        f" MiB, highest later wave {summary['max_ratio_after_first']} x it (limit"
        f" {options.limit}); load generator busy {summary['generator_busy']:.0%} of a core"
    )
    _say(f"soak: results in {path}")
    if args.docs is not None:
        args.docs.mkdir(parents=True, exist_ok=True)
        (args.docs / SOAK_JSON).write_text(json.dumps(results, indent=1) + "\n")
        report = args.docs / "BENCHMARKS.md"
        if report.exists():
            report.write_text(insert_section(report.read_text(), section(results)))
            _say(f"soak: section written to {report}")
    for problem in summary["problems"]:
        sys.stderr.write(f"soak: {problem}\n")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
