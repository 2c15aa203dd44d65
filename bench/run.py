"""The benchmark: coturn and tsunagu, one after the other, under the same loads.

Each *session* starts one server variant fresh, runs every load of the plan against it
(``tsunagu probe`` and ``turnutils_uclient``), and stops it. Sessions are interleaved
(A B C, B C A, C A B, ...) and repeated, so that drift on the machine hits every server
alike; figures are medians over the repeats. Servers run on one core and the load
generator and echo peer on the other (``taskset``); server CPU is utime + stime from
/proc, sampled by the generator around each measured step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import databases, report
from .databases import UserDatabase
from .servers import (
    DOCS,
    HOST,
    REPO,
    REST_SECRET,
    RESULTS,
    USER,
    VARIANTS,
    BenchError,
    EchoPeer,
    PortPool,
    Server,
    make_certificate,
    pinned,
    process_cpu,
    start_echo_peer,
    start_server,
)

PRIMARY = ("coturn-m1", "tsunagu")
THREE = ("coturn-m1", "coturn", "tsunagu")
ALL_VARIANTS = ("coturn-m1", "coturn", "tsunagu", "tsunagu-py", "tsunagu-w2")
# The loads that also show the pure-Python relay path (--relay-engine python), or 2 workers.
WITH_PYTHON = ("coturn-m1", "coturn", "tsunagu", "tsunagu-py")
WITH_WORKERS = ("coturn-m1", "coturn", "tsunagu", "tsunagu-w2")


@dataclass(frozen=True)
class Case:
    """One load, run once per session of each variant it names."""

    key: str
    figure: str
    title: str
    args: tuple[str, ...]
    variants: tuple[str, ...] = PRIMARY
    kind: str = "probe"  # "probe" or "uclient"
    timeout: float = 120.0
    users: int = 0  # > 0: allocations spread over this many users of the user database
    # A load that leaves state behind it (a filled key cache) cannot be run again on the
    # same server when the machine was busy.
    retry: bool = True


@dataclass
class Plan:
    name: str
    repeats: int
    cases: list[Case]
    rest_case: Case
    hold_case: Case
    budget: float  # seconds for everything
    hold_variants: tuple[str, ...] = PRIMARY
    variants: tuple[str, ...] = ALL_VARIANTS
    notes: dict[str, Any] = field(default_factory=dict)
    # Opt-in (--only alloc-db): allocations of users in each user database, per database
    # the cases in the order they run on one server.
    db_cases: dict[str, list[Case]] = field(default_factory=dict)


# The user database rows are not part of a default run: they start PostgreSQL and Redis.
DB_PREFIX = "alloc-db"


def userdb_cases(count: int, window: int) -> dict[str, list[Case]]:
    """Per database: ``count`` allocations of ``count`` different users (each a first
    lookup), then the same users again at once (tsunagu's key cache answers; coturn asks
    its database for every allocation)."""
    args = ("--mode", "allocate", "-n", str(count), "--window", str(window), "--release")
    out: dict[str, list[Case]] = {}
    for kind in databases.KINDS:
        label = databases.LABELS[kind]
        out[kind] = [
            Case(
                f"{DB_PREFIX}-{kind}-cold",
                "alloc-db",
                f"Allocations/s, {count:,} users in {label}, each looked up for the first time",
                args,
                users=count,
                retry=False,
            ),
            Case(
                f"{DB_PREFIX}-{kind}-cached",
                "alloc-db",
                f"Allocations/s, the same {count:,} users in {label} again at once",
                args,
                users=count,
                retry=False,
            ),
        ]
    return out


def _ladder(rates: list[int]) -> str:
    return ",".join(str(rate) for rate in rates)


def _relay_cases(
    scale: str, udp: str, stream: str, steady: tuple[str, ...], first: tuple[str, ...]
) -> list[Case]:
    """CPU per relayed packet on each client transport; ``first`` also runs other variants."""
    return [
        Case(
            "udp-channel-100",
            "cpu",
            f"UDP ChannelData, 100 B, {scale}",
            ("-n", udp, "-l", "100", *steady),
            first,
        ),
        Case(
            "udp-channel-1000",
            "cpu",
            f"UDP ChannelData, 1000 B, {scale}",
            ("-n", udp, "-l", "1000", *steady),
        ),
        Case(
            "udp-indication-100",
            "cpu",
            f"UDP Send/Data indications, 100 B, {scale}",
            ("--mode", "indication", "-n", udp, "-l", "100", *steady),
        ),
        Case(
            "tcp-channel-100",
            "cpu",
            f"TCP ChannelData, 100 B, {scale}",
            ("-t", "tcp", "-n", stream, "-l", "100", *steady),
        ),
        Case(
            "tls-channel-100",
            "cpu",
            f"TLS ChannelData, 100 B, {scale}",
            ("-t", "tls", "-n", stream, "-l", "100", *steady),
        ),
    ]


def full_plan(hold: float) -> Plan:
    ladder = _ladder([5000, 10000, 20000, 30000, 40000, 50000, 60000, 75000, 90000])
    steady = ("--rate", "10000", "-d", "3", "--warmup", "0.5", "--release")
    cases = [
        Case(
            "alloc-lt",
            "alloc",
            "Allocations/s, long-term credentials (2,000 allocations)",
            ("--mode", "allocate", "-n", "2000", "--window", "32", "--release"),
        ),
        Case(
            "binding",
            "binding",
            "STUN Binding requests/s",
            ("--mode", "binding", "-d", "3", "--warmup", "0.5"),
            ALL_VARIANTS,
        ),
        *_relay_cases("10 allocations, 20k relayed pps", "10", "10", steady, ALL_VARIANTS),
        Case(
            "rtp-100",
            "rtp",
            "RTP-like: 160 B every 20 ms, 100 allocations",
            (
                "-n",
                "100",
                "-l",
                "160",
                "--interval-ms",
                "20",
                "-d",
                "4",
                "--warmup",
                "0.5",
                "--release",
            ),
            WITH_PYTHON,
        ),
        Case(
            "rtp-500",
            "rtp",
            "RTP-like: 160 B every 20 ms, 500 allocations",
            (
                "-n",
                "500",
                "-l",
                "160",
                "--interval-ms",
                "20",
                "-d",
                "4",
                "--warmup",
                "0.5",
                "--release",
            ),
            WITH_WORKERS,
        ),
    ]
    for count in (1, 10, 100):
        cases.append(
            Case(
                f"capacity-{count}",
                "capacity",
                f"Highest relayed packets/s with loss <= 1 %, {count} "
                + ("allocation" if count == 1 else "allocations"),
                ("-n", str(count), "-l", "100", "--rate", ladder, "-d", "1", "--warmup", "0.3")
                + ("--stop-loss", "0.05", "--release"),
                WITH_WORKERS if count == 10 else PRIMARY,
                timeout=90.0,
            )
        )
    cases.append(
        Case(
            "uclient-udp-channel-100",
            "uclient",
            "turnutils_uclient: UDP ChannelData, 100 B, 10 clients, 1 message/ms each",
            ("-m", "10", "-n", "2000", "-l", "100", "-z", "1", "-c"),
            THREE,
            kind="uclient",
        )
    )
    rest = Case(
        "alloc-rest",
        "alloc",
        "Allocations/s, TURN REST credentials (2,000 allocations)",
        ("--mode", "allocate", "-n", "2000", "--window", "32", "--release"),
    )
    hold_case = Case(
        "hold-10000",
        "hold",
        f"10,000 allocations held for {hold:g} s: RSS per allocation, all still relay",
        ("--mode", "allocate", "-n", "10000", "--window", "32", "--hold", f"{hold:g}")
        + ("--verify", "--release", "--setup-timeout", "200"),
        timeout=hold + 300,
    )
    plan = Plan("full", 3, cases, rest, hold_case, budget=14 * 60)
    plan.db_cases = userdb_cases(2000, 32)
    return plan


def quick_plan(hold: float) -> Plan:
    steady = ("--rate", "2000", "-d", "0.4", "--warmup", "0.1", "--release")
    cases = [
        Case(
            "alloc-lt",
            "alloc",
            "Allocations/s, long-term credentials (100 allocations)",
            ("--mode", "allocate", "-n", "100", "--window", "16", "--release"),
        ),
        Case(
            "binding",
            "binding",
            "STUN Binding requests/s",
            ("--mode", "binding", "-d", "0.4", "--warmup", "0.1"),
        ),
        *_relay_cases("2-4 allocations, 4k relayed pps", "4", "2", steady, PRIMARY),
        Case(
            "rtp-100",
            "rtp",
            "RTP-like: 160 B every 20 ms, 20 allocations",
            (
                "-n",
                "20",
                "-l",
                "160",
                "--interval-ms",
                "20",
                "-d",
                "0.4",
                "--warmup",
                "0.1",
                "--release",
            ),
        ),
        Case(
            "capacity-10",
            "capacity",
            "Highest relayed packets/s with loss <= 1 %, 4 allocations",
            (
                "-n",
                "4",
                "-l",
                "100",
                "--rate",
                "1000,4000",
                "-d",
                "0.3",
                "--warmup",
                "0.1",
                "--stop-loss",
                "0.05",
                "--release",
            ),
        ),
        Case(
            "uclient-udp-channel-100",
            "uclient",
            "turnutils_uclient: UDP ChannelData, 100 B, 2 clients",
            ("-m", "2", "-n", "20", "-l", "100", "-z", "5", "-c"),
            kind="uclient",
            timeout=30.0,
        ),
    ]
    rest = Case(
        "alloc-rest",
        "alloc",
        "Allocations/s, TURN REST credentials (100 allocations)",
        ("--mode", "allocate", "-n", "100", "--window", "16", "--release"),
    )
    hold_case = Case(
        "hold-10000",
        "hold",
        f"200 allocations held for {hold:g} s: RSS per allocation, all still relay",
        (
            "--mode",
            "allocate",
            "-n",
            "200",
            "--window",
            "32",
            "--hold",
            f"{hold:g}",
            "--verify",
            "--release",
        ),
        timeout=hold + 60,
    )
    plan = Plan("quick", 1, cases, rest, hold_case, budget=60, variants=PRIMARY)
    plan.db_cases = userdb_cases(20, 8)
    return plan


# --- measuring -----------------------------------------------------------------------------


def _system_busy() -> float:
    """CPU seconds spent in user and system mode on the whole machine so far."""
    with open("/proc/stat") as fh:
        fields = fh.readline().split()
    ticks = os.sysconf("SC_CLK_TCK")
    user, nice, system = (int(value) for value in fields[1:4])
    return (user + nice + system) / ticks


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Window:
    """What else ran on the machine while one load ran: CPU not charged to the benchmark."""

    def __init__(
        self, server: Server, peer: EchoPeer | None, database: UserDatabase | None = None
    ) -> None:
        self.server = server
        self.peer = peer
        self.database = database
        self.started = time.monotonic()
        self.busy = _system_busy()
        self.server_cpu = process_cpu(server.pid)
        self.peer_cpu = process_cpu(peer.pid if peer else None)
        self.database_cpu = database.cpu_seconds() if database else 0.0
        self.children = _children_cpu()
        self.load = os.getloadavg()[0]

    def close(self) -> dict[str, Any]:
        wall = time.monotonic() - self.started
        busy = _system_busy() - self.busy
        server = process_cpu(self.server.pid) - self.server_cpu
        peer = process_cpu(self.peer.pid if self.peer else None) - self.peer_cpu
        generator = _children_cpu() - self.children
        database = self.database.cpu_seconds() - self.database_cpu if self.database else 0.0
        other = max(0.0, busy - server - peer - generator - database)
        cores = os.cpu_count() or 1
        return {
            "wall_s": round(wall, 3),
            "server_cpu_s": round(server, 3),
            "generator_cpu_s": round(generator, 3),
            "peer_cpu_s": round(peer, 3),
            **({"database_cpu_s": round(database, 3)} if self.database else {}),
            "other_cpu_s": round(other, 3),
            # Share of the machine used by processes outside the benchmark.
            "other_share": round(other / (wall * cores), 4) if wall > 0 else None,
            "loadavg_1m": round(self.load, 2),
        }


@dataclass
class Context:
    plan: Plan
    workdir: Path
    cert: Path
    key: Path
    ports: PortPool
    peer: EchoPeer | None
    server_cpu: str | None
    generator_cpu: str | None
    deadline: float
    records: list[dict[str, Any]] = field(default_factory=list)
    log: Any = sys.stderr
    # Wait before a session until no more than this share of the machine is busy (None: never),
    # up to quiet_wait seconds each time and quiet_budget seconds in all.
    quiet_share: float | None = None
    quiet_wait: float = 0.0
    quiet_budget: float = 0.0
    last_quiet: dict[str, Any] = field(default_factory=dict)
    # A load during which other programs used more than this share of the machine is run
    # once more, while retry_budget (seconds) lasts.
    noise_limit: float | None = None
    retry_budget: float = 0.0
    database: UserDatabase | None = None  # the user database of the session running

    def say(self, text: str) -> None:
        self.log.write(f"bench: {text}\n")
        self.log.flush()


def probe_command(case: Case, server: Server, ctx: Context) -> list[str]:
    port = server.tls_port if "tls" in case.args else server.port
    command = [sys.executable, "-m", "tsunagu", "probe", f"{HOST}:{port}"]
    if server.auth == "rest":
        command += ["--rest-secret", REST_SECRET]
    elif case.users:
        command += ["-u", ":".join(databases.USER_PATTERN), "--users", str(case.users)]
    elif "binding" not in case.args:
        command += ["-u", f"{USER[0]}:{USER[1]}"]
    if ctx.peer is not None and "binding" not in case.args:
        command += ["--peer", f"{HOST}:{ctx.peer.port}"]
    command += [*case.args, "--server-pid", str(server.pid)]
    return command


def uclient_command(case: Case, server: Server, ctx: Context) -> list[str]:
    assert ctx.peer is not None
    return [
        "turnutils_uclient",
        "-u",
        USER[0],
        "-w",
        USER[1],
        "-p",
        str(server.port),
        "-e",
        HOST,
        "-r",
        str(ctx.peer.port),
        *case.args,
        HOST,
    ]


_UCLIENT_TOTALS = re.compile(r"tot_send_msgs=(\d+), tot_recv_msgs=(\d+)")
_UCLIENT_RTT = re.compile(r"Average round trip delay ([0-9.]+) ms")


def parse_uclient(output: str) -> dict[str, Any]:
    """The last totals line of turnutils_uclient (earlier ones are progress)."""
    totals = _UCLIENT_TOTALS.findall(output)
    if not totals:
        raise BenchError("turnutils_uclient printed no totals")
    sent, received = (int(value) for value in totals[-1])
    rtt = _UCLIENT_RTT.findall(output)
    return {
        "sent": sent,
        "received": received,
        "loss": round(1 - received / sent, 6) if sent else 1.0,
        "relayed_packets": 2 * received,
        "rtt_avg_ms": float(rtt[-1]) if rtt else None,
        "cannot_allocate": output.count("Cannot complete Allocation"),
    }


def run_case(case: Case, server: Server, ctx: Context, repeat: int) -> dict[str, Any]:
    if case.kind == "uclient":
        command = uclient_command(case, server, ctx)
    else:
        command = probe_command(case, server, ctx)
    record: dict[str, Any] = {
        "case": case.key,
        "figure": case.figure,
        "variant": server.variant.name,
        "auth": server.auth,
        "repeat": repeat,
        "command": command,
        "server_command": server.command,
        "server_open_files": server.open_files_limit(),
    }
    remaining = ctx.deadline - time.monotonic()
    if remaining < 5:
        record["skipped"] = "time budget spent"
        return record
    window = Window(server, ctx.peer, ctx.database)
    before = process_cpu(server.pid)
    try:
        done = subprocess.run(
            pinned(command, ctx.generator_cpu),
            capture_output=True,
            timeout=min(case.timeout, remaining),
            cwd=REPO,
        )
    except subprocess.TimeoutExpired:
        record["error"] = f"timed out after {min(case.timeout, remaining):.0f} s"
        record["machine"] = window.close()
        return record
    record["machine"] = window.close()
    record["server_alive"] = server.alive()
    output = done.stdout.decode(errors="replace")
    if case.kind == "uclient":
        try:
            result = parse_uclient(output + done.stderr.decode(errors="replace"))
        except BenchError as exc:
            record["error"] = str(exc)
            return record
        cpu = process_cpu(server.pid) - before
        result["server_cpu_s"] = round(cpu, 4)
        if result["relayed_packets"]:
            result["server_cpu_us_per_relayed_packet"] = round(
                cpu / result["relayed_packets"] * 1e6, 4
            )
        record["result"] = result
        return record
    try:
        record["result"] = json.loads(output)
    except json.JSONDecodeError:
        record["error"] = (
            f"probe exit {done.returncode}: {done.stderr.decode(errors='replace')[-800:]}"
        )
        return record
    if done.returncode != 0:
        record["error"] = f"probe exit {done.returncode}"
    return record


def busy_share(seconds: float = 0.5) -> float:
    """Share of all cores busy (user and system time) over the next ``seconds``."""
    before = _system_busy()
    started = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    return (_system_busy() - before) / (elapsed * (os.cpu_count() or 1))


def wait_for_quiet(ctx: Context) -> None:
    """Before a session: wait (within limits) until other work on the machine has calmed."""
    if ctx.quiet_share is None:
        return
    waited = 0.0
    share = busy_share()
    while share > ctx.quiet_share and waited < ctx.quiet_wait and ctx.quiet_budget > 0:
        share = busy_share()
        waited += 0.5
        ctx.quiet_budget -= 0.5
    ctx.last_quiet = {"busy_share": round(share, 3), "waited_s": waited}
    if waited:
        ctx.say(f"waited {waited:.1f} s for a quieter machine (busy {share * 100:.0f} %)")


def session(
    ctx: Context,
    variant_name: str,
    cases: list[Case],
    repeat: int,
    auth: str = "static",
    database: UserDatabase | None = None,
) -> None:
    """One fresh server of ``variant_name`` through ``cases``; with ``database``, its users
    live there (``auth`` is then the database's kind)."""
    if time.monotonic() > ctx.deadline - 10:
        ctx.say(f"time budget spent: skipping {variant_name} ({auth}) repeat {repeat + 1}")
        return
    variant = VARIANTS[variant_name]
    cases = [c for c in cases if (variant.cases_of or variant_name) in c.variants]
    if not cases:
        return
    wait_for_quiet(ctx)
    try:
        server = start_server(
            variant,
            ctx.ports,
            auth=auth,
            cert=ctx.cert,
            key=ctx.key,
            workdir=ctx.workdir,
            cpu=ctx.server_cpu,
            userdb=(database.coturn_args, database.tsunagu_args) if database else None,
        )
    except BenchError as exc:
        ctx.say(str(exc))
        for case in cases:
            ctx.records.append(_failed(case, variant_name, auth, repeat, f"server: {exc}"))
        return
    ctx.database = database
    try:
        for case in cases:
            if case.kind == "uclient" and (
                ctx.peer is None or not shutil.which("turnutils_uclient")
            ):
                continue
            for attempt in range(2):
                started = time.monotonic()
                record = run_case(case, server, ctx, repeat)
                record["before_session"] = ctx.last_quiet
                ctx.records.append(record)
                summary = report.one_line(record)
                ctx.say(
                    f"[{repeat + 1}] {variant_name:<9} {case.key:<24} {summary}"
                    f" ({time.monotonic() - started:.1f} s)"
                )
                other = record.get("machine", {}).get("other_share")
                if (
                    attempt
                    or not case.retry
                    or ctx.noise_limit is None
                    or other is None
                    or other <= ctx.noise_limit
                    or not server.alive()
                    or ctx.retry_budget < time.monotonic() - started
                ):
                    break
                # Other programs took much of the machine during this load: run it once more
                # and keep the second result (both stay in the JSON file).
                ctx.retry_budget -= time.monotonic() - started
                record["superseded"] = "other programs were busy; run again"
                wait_for_quiet(ctx)
            if not server.alive():
                ctx.say(f"{variant_name} exited; see {server.log_path}")
                break
    finally:
        ctx.database = None
        try:
            server.stop()
        except BenchError as exc:
            ctx.say(str(exc))


def _failed(case: Case, variant: str, auth: str, repeat: int, why: str) -> dict[str, Any]:
    return {
        "case": case.key,
        "figure": case.figure,
        "variant": variant,
        "auth": auth,
        "repeat": repeat,
        "command": [],
        "server_command": [],
        "error": why,
    }


# --- the run ---------------------------------------------------------------------------------


def _version(command: list[str]) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout + done.stderr).decode(errors="replace")
    return text.strip().splitlines()[0] if text.strip() else None


def machine_description() -> dict[str, Any]:
    cpu_model = None
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = None
    try:
        with open("/proc/meminfo") as fh:
            memory = int(fh.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    coturn = None
    if shutil.which("dpkg-query"):
        coturn = _version(["dpkg-query", "-W", "-f", "${Version}", "coturn"])
    try:
        import uvloop

        uvloop_version: str | None = uvloop.__version__
    except ImportError:
        uvloop_version = None
    from tsunagu import __version__

    commit = _version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = _version(["git", "-C", str(REPO), "status", "--porcelain", "--", "src/tsunagu"])
    if commit and dirty:
        commit += " with uncommitted changes in src/tsunagu"
    return {
        "cores": os.cpu_count(),
        "cpu": cpu_model,
        "memory_bytes": memory,
        "kernel": platform.release(),
        "os": _os_release(),
        "python": platform.python_version(),
        "uvloop": uvloop_version,
        "tsunagu": __version__,
        "tsunagu_commit": commit,
        "coturn": coturn,
        "loadavg_at_start": [round(value, 2) for value in os.getloadavg()],
    }


def _os_release() -> str | None:
    try:
        with open("/etc/os-release") as fh:
            for line in fh:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return None


def _db_selected(kind: str, only: set[str] | None) -> bool:
    """Whether --only asks for the user database rows of ``kind``: alloc-db (all of them),
    alloc-db-KIND or one of its cases (a cached case needs the cold one before it)."""
    if only is None:
        return False
    own = f"{DB_PREFIX}-{kind}"
    return any(
        key.startswith(DB_PREFIX) and (own.startswith(key) or key.startswith(own)) for key in only
    )


def _rotate(items: tuple[str, ...], by: int) -> list[str]:
    by %= len(items)
    return list(items[by:] + items[:by])


def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = quick_plan(args.hold or 1.0) if args.quick else full_plan(args.hold or 60.0)
    if args.repeats:
        plan.repeats = args.repeats
    variants = [v for v in (args.variants or ",".join(plan.variants)).split(",") if v]
    for name in variants:
        if name not in VARIANTS:
            raise BenchError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    if not shutil.which("turnserver"):
        dropped = [v for v in variants if VARIANTS[v].kind == "coturn"]
        if dropped:
            sys.stderr.write("bench: turnserver not found; running tsunagu alone\n")
        variants = [v for v in variants if VARIANTS[v].kind != "coturn"]
    cores = os.cpu_count() or 1
    server_cpu = None if args.no_pin or cores < 2 else str(args.server_cpu)
    generator_cpu = None if args.no_pin or cores < 2 else str(args.generator_cpu)
    started = time.monotonic()
    budget = args.budget or plan.budget
    workdir = Path(tempfile.mkdtemp(prefix="tsunagu-bench-"))
    cert, key = make_certificate(workdir)
    peer = None if args.internal_echo else start_echo_peer(generator_cpu)
    ctx = Context(
        plan=plan,
        workdir=workdir,
        cert=cert,
        key=key,
        ports=PortPool(),
        peer=peer,
        server_cpu=server_cpu,
        generator_cpu=generator_cpu,
        deadline=started + budget,
        quiet_share=None if args.quick or args.quiet_share <= 0 else args.quiet_share,
        quiet_wait=20.0,
        quiet_budget=min(45.0, budget / 16),
        noise_limit=None if args.quick or args.noise_limit <= 0 else args.noise_limit,
        retry_budget=min(45.0, budget / 16),
    )
    only = set(args.only.split(",")) if args.only else None
    cases = [c for c in plan.cases if only is None or c.key in only]
    db_cases = {
        kind: [c for c in kind_cases if c.variants and set(c.variants) & set(variants)]
        for kind, kind_cases in plan.db_cases.items()
        if _db_selected(kind, only)
    }
    for kind in list(db_cases):
        if not databases.available(kind):
            ctx.say(f"{databases.LABELS[kind]} is not installed: no {DB_PREFIX}-{kind} rows")
            del db_cases[kind]
    meta = {
        "plan": plan.name,
        "repeats": plan.repeats,
        "variants": variants,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_description(),
        "pinning": {"server_cpu": server_cpu, "generator_cpu": generator_cpu},
        "echo_peer": peer.command if peer else "inside the probe",
        "hold_seconds": args.hold or (1.0 if args.quick else 60.0),
        "cases": {
            c.key: {"title": c.title, "figure": c.figure, "variants": list(c.variants)}
            for c in [
                *plan.cases,
                plan.rest_case,
                plan.hold_case,
                *(c for kind_cases in db_cases.values() for c in kind_cases),
            ]
        },
    }
    ctx.say(
        f"{plan.name} run: {', '.join(variants)}, {plan.repeats} repeat(s), budget {budget:.0f} s, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    hold_variants = [v for v in variants if v in plan.hold_variants]
    run_holds = not args.no_hold and (only is None or plan.hold_case.key in only)
    if run_holds:
        # The held allocations come last; keep their time free of the repeats.
        count = int(plan.hold_case.args[plan.hold_case.args.index("-n") + 1])
        ctx.deadline -= len(hold_variants) * (meta["hold_seconds"] + 5 + count / 500)
    opened: dict[str, UserDatabase] = {}
    try:
        with contextlib.ExitStack() as stack:
            for kind in db_cases:
                # Filled once; every server and repeat then reads the very same database.
                opened[kind] = stack.enter_context(
                    databases.user_database(
                        kind, workdir, db_cases[kind][0].users, lifetime=budget + 120
                    )
                )
                ctx.say(
                    f"{databases.LABELS[kind]}: {opened[kind].users} users "
                    f"in {opened[kind].fill_seconds:.1f} s"
                )
            meta["databases"] = {kind: db.describe() for kind, db in opened.items()}
            for repeat in range(plan.repeats):
                order = _rotate(tuple(variants), repeat)
                for name in order:
                    session(ctx, name, cases, repeat)
                if only is None or plan.rest_case.key in only:
                    for name in order:
                        if name in plan.rest_case.variants:
                            session(ctx, name, [plan.rest_case], repeat, auth="rest")
                for kind, database in opened.items():
                    for name in order:
                        session(ctx, name, db_cases[kind], repeat, auth=kind, database=database)
        if run_holds:
            ctx.deadline = started + budget
            for name in hold_variants:
                session(ctx, name, [plan.hold_case], 0)
    finally:
        if peer is not None:
            peer.stop()
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
    meta["seconds"] = round(time.monotonic() - started, 1)
    meta["server_commands"] = {
        report.server_key(r["variant"], r["auth"]): r["server_command"]
        for r in reversed(ctx.records)
        if r.get("server_command")
    }
    ctx.say(f"done in {meta['seconds']:.0f} s")
    return {"meta": meta, "records": ctx.records}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Benchmark tsunagu against coturn on loopback with the same loads, "
            "and write bench/results/*.json and docs/BENCHMARKS.md."
        ),
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: seconds, tiny loads")
    parser.add_argument("--repeats", type=int, help="sessions per variant (default: plan's)")
    parser.add_argument(
        "--variants",
        help=f"comma-separated server variants (default: {','.join(ALL_VARIANTS)}; "
        f"quick: {','.join(PRIMARY)})",
    )
    parser.add_argument(
        "--only",
        help="comma-separated case keys to run (default: all but the user database rows); "
        f"{DB_PREFIX} runs those (PostgreSQL, Redis and SQLite), {DB_PREFIX}-sqlite one of them",
    )
    parser.add_argument("--hold", type=float, help="seconds to hold the 10,000 allocations")
    parser.add_argument("--no-hold", action="store_true", help="skip the held allocations")
    parser.add_argument("--budget", type=float, help="overall time limit in seconds")
    parser.add_argument(
        "--quiet-share",
        type=float,
        default=0.15,
        help="before each session, wait (20 s at most, 45 s in all) until no more than this "
        "share of all cores is busy; 0: do not wait (default: %(default)s; quick runs never wait)",
    )
    parser.add_argument(
        "--noise-limit",
        type=float,
        default=0.25,
        help="run a load again (once, 45 s in all) when other programs used more than this "
        "share of all cores meanwhile; 0: never (default: %(default)s; quick runs never do)",
    )
    parser.add_argument("--server-cpu", type=int, default=1, help="core for the server")
    parser.add_argument("--generator-cpu", type=int, default=0, help="core for the load")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument(
        "--internal-echo", action="store_true", help="echo inside the probe, not turnutils_peer"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for result files")
    parser.add_argument(
        "--docs",
        type=Path,
        help="write BENCHMARKS.md, benchmarks.json and plots here (default: docs/ in a full "
        "run, the --out directory in a quick run)",
    )
    parser.add_argument("--no-plot", action="store_true", help="no PNG plots")
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs")
    parser.add_argument(
        "--no-carry",
        action="store_true",
        help="write the report with this run's loads only (by default a full-plan report keeps "
        "the rows of loads this run did not measure from the benchmarks.json it replaces, "
        "each marked with the run it came from)",
    )
    parser.add_argument(
        "--from-json", type=Path, help="only write the report from an earlier result file"
    )
    return parser.parse_args(argv)


def _slim(results: dict[str, Any]) -> dict[str, Any]:
    """The results without what every record repeats (the probe's echo of its options, the
    server's command line), for the copy kept next to the report."""
    records = []
    for record in results["records"]:
        record = dict(record)
        if isinstance(record.get("result"), dict):
            record["result"] = {k: v for k, v in record["result"].items() if k != "spec"}
        record.pop("server_command", None)
        records.append(record)
    return {**results, "records": records}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.quick and not args.no_plot:
        # Installed (if missing) before measuring, so that pip does not run during a load.
        report.ensure_matplotlib(install=True)
    if args.from_json is not None:
        results = json.loads(args.from_json.read_text())
        results["summary"] = report.summarize(results)
    else:
        try:
            results = run(args)
        except BenchError as exc:
            sys.stderr.write(f"bench: {exc}\n")
            return 1
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = args.out / f"{results['meta']['plan']}-{stamp}.json"
        results["summary"] = report.summarize(results)
        path.write_text(json.dumps(results, indent=1) + "\n")
        sys.stderr.write(f"bench: results in {path}\n")
    quick = results["meta"]["plan"] == "quick"
    docs = args.docs or (args.out if quick else DOCS)
    docs.mkdir(parents=True, exist_ok=True)
    earlier = docs / "benchmarks.json"
    if not quick and not args.no_carry and earlier.exists():
        carried = report.carry_over(results, json.loads(earlier.read_text()))
        if carried:
            results["summary"] = report.summarize(results)
            sys.stderr.write(
                f"bench: {len(carried)} load(s) this run did not measure kept from {earlier}\n"
            )
    plots = [] if args.no_plot else report.plot(results, docs, install=not quick)
    markdown = report.markdown(results, plots)
    if not quick:
        from . import soak  # the memory soak's section, from its last run (make -C bench soak)

        markdown = soak.keep_section(markdown, docs)
    (docs / "BENCHMARKS.md").write_text(markdown)
    (docs / "benchmarks.json").write_text(json.dumps(_slim(results), indent=1) + "\n")
    sys.stderr.write(f"bench: report in {docs / 'BENCHMARKS.md'}\n")
    return 0
