"""``tsunagu probe``: check a STUN/TURN server the way a failing call uses it, or load it.

    tsunagu probe stun URL...     is it reachable, what address does it see, how fast
    tsunagu probe turn URL...     allocate, permit, bind, relay test traffic; what is wrong
    tsunagu probe nat URL...      how the NAT here maps and filters (RFC 5780)
    tsunagu probe load IP:PORT    the load generator (JSON), as used by bench/

``tsunagu probe IP:PORT ...`` (no subcommand) is ``probe load``, as it was before the
subcommands existed: the benchmark records in docs/BENCHMARKS.md are written that way.

``stun``, ``turn`` and ``nat`` print the steps as they run and a verdict in one sentence with
what to do about it; ``--json`` prints one JSON object instead. The exit status is 0 when
every URL works (for ``nat``: the NAT was classified), 1 when one does not, 2 for a usage
error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..auth.rest import mint_credentials
from ..config import parse_alternate_server, parse_user
from . import net, verdicts
from .checks import CheckResult, Observer, StunOptions, TurnOptions, check_stun, check_turn
from .load import PROBE_BYTES, LoadSpec, run
from .nat import NatOptions, check_nat
from .net import Proxy, TlsOptions, parse_pin
from .output import JsonOutput, TextOutput, json_report
from .urls import IceUrl, UrlError, parse_ice_url
from .verdicts import Verdict

__all__ = ["SUBCOMMANDS", "Subcommand", "probe_command"]


def _address(text: str) -> tuple[str, int]:
    try:
        ip, port = parse_alternate_server(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return str(ip), port


def _user(text: str) -> tuple[str, str]:
    try:
        return parse_user(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _rates(text: str) -> list[float]:
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers: {text!r}") from None
    if not rates or any(rate <= 0 for rate in rates):
        raise argparse.ArgumentTypeError(f"rates must be positive: {text!r}")
    return rates


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return value

    return parse


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def build_load_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        allow_abbrev=False,
        description=(
            "Load a STUN/TURN server with many allocations at a fixed offered rate and "
            "report loss, round-trip times, allocation rate and, given --server-pid, the "
            "server's CPU time and memory, as JSON on stdout. Every test message goes "
            "client -> relay -> peer -> relay -> client, so it counts as two relayed packets."
        ),
    )
    parser.add_argument("server", type=_address, metavar="IP:PORT", help="the server")
    parser.add_argument(
        "-t", "--transport", choices=("udp", "tcp", "tls"), default="udp", help="client transport"
    )
    parser.add_argument(
        "--mode",
        choices=("channel", "indication", "allocate", "binding"),
        default="channel",
        help="ChannelData, Send/Data indications, allocations only, or STUN Binding",
    )
    parser.add_argument(
        "-n", "--allocations", type=_positive(int), default=1, metavar="N", help="allocations"
    )
    credentials = parser.add_mutually_exclusive_group()
    credentials.add_argument(
        "-u", "--user", type=_user, metavar="NAME:PASSWORD", help="long-term credentials"
    )
    credentials.add_argument(
        "--rest-secret",
        metavar="SECRET",
        help="mint TURN REST credentials from this shared secret, one per allocation",
    )
    parser.add_argument(
        "--users",
        type=_positive(int),
        metavar="N",
        help="spread the allocations over N long-term users: allocation i authenticates as "
        "user i mod N, with {n} in -u NAME:PASSWORD replaced by that number",
    )
    parser.add_argument(
        "--peer",
        type=_address,
        metavar="IP:PORT",
        help="external UDP echo peer (default: an echo socket inside the probe)",
    )
    parser.add_argument(
        "-l",
        "--size",
        type=int,
        default=100,
        metavar="BYTES",
        help=f"payload bytes per message, at least {PROBE_BYTES} (default: %(default)s)",
    )
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument(
        "--rate",
        type=_rates,
        metavar="R[,R...]",
        help="offered messages per second (all allocations together); several: a ladder",
    )
    pace.add_argument(
        "--interval-ms",
        type=_positive(float),
        metavar="MS",
        help="each allocation sends one message every MS milliseconds (RTP-like)",
    )
    parser.add_argument(
        "-d", "--duration", type=_positive(float), default=3.0, help="seconds per rate"
    )
    parser.add_argument(
        "--warmup", type=_non_negative, default=0.5, help="seconds of load before measuring"
    )
    parser.add_argument(
        "--window", type=_positive(int), default=32, help="allocations being set up at once"
    )
    parser.add_argument(
        "--setup-timeout", type=_positive(float), default=120.0, help="limit for the set-up"
    )
    parser.add_argument(
        "--hold", type=_non_negative, default=0.0, help="seconds to hold the allocations"
    )
    parser.add_argument(
        "--verify", action="store_true", help="check that every allocation relays, at the end"
    )
    parser.add_argument(
        "--release", action="store_true", help="release the allocations (Refresh 0) at the end"
    )
    parser.add_argument(
        "--stop-loss",
        type=_non_negative,
        default=0.05,
        help="end a rate ladder after a step losing more than this fraction",
    )
    parser.add_argument(
        "--server-pid", type=int, metavar="PID", help="measure this process's CPU and memory"
    )
    parser.add_argument(
        "--binding-sockets", type=_positive(int), default=4, help="sockets in Binding mode"
    )
    parser.add_argument(
        "--binding-window", type=_positive(int), default=16, help="requests in flight per socket"
    )
    parser.add_argument(
        "--no-fingerprint", action="store_true", help="send requests without FINGERPRINT"
    )
    parser.add_argument("--indent", type=int, default=None, help="indent the JSON output")
    return parser


def load_command(argv: list[str], prog: str) -> int:
    """``tsunagu probe load`` (and ``tsunagu probe IP:PORT``): the load generator."""
    parser = build_load_parser(prog)
    args = parser.parse_args(argv)
    if args.size < PROBE_BYTES:
        parser.error(f"--size must be at least {PROBE_BYTES}")
    if args.mode != "binding" and args.user is None and args.rest_secret is None:
        parser.error("TURN modes need --user or --rest-secret")
    if args.mode in ("channel", "indication") and args.rate is None and args.interval_ms is None:
        parser.error(f"--mode {args.mode} needs --rate or --interval-ms")
    if args.mode == "binding" and args.transport != "udp":
        parser.error("--mode binding runs over UDP")
    username, password = args.user if args.user is not None else ("", "")
    if args.users is not None and (args.user is None or "{n}" not in username):
        parser.error("--users needs -u with {n} in the name, e.g. -u 'user{n}:password{n}'")
    spec = LoadSpec(
        server=args.server,
        transport=args.transport,
        mode=args.mode,
        allocations=args.allocations,
        username=username,
        password=password,
        rest_secret=args.rest_secret,
        users=args.users or 0,
        peer=args.peer,
        size=args.size,
        rates=args.rate or [],
        interval=None if args.interval_ms is None else args.interval_ms / 1000.0,
        duration=args.duration,
        warmup=args.warmup,
        setup_window=args.window,
        setup_timeout=args.setup_timeout,
        hold=args.hold,
        verify=args.verify,
        release=args.release,
        stop_loss=args.stop_loss,
        server_pid=args.server_pid,
        binding_sockets=args.binding_sockets,
        binding_window=args.binding_window,
        fingerprint=not args.no_fingerprint,
    )
    try:
        result = run(spec)
    except OSError as exc:
        sys.stderr.write(f"{prog}: {exc}\n")
        return 1
    sys.stdout.write(json.dumps(result, indent=args.indent) + "\n")
    setup = result.get("setup")
    if setup is not None and setup["ready"] == 0:
        return 1
    return 0


# --- probe stun, probe turn -------------------------------------------------------------------


def _url_type(turn: bool) -> Callable[[str], IceUrl]:
    def parse(text: str) -> IceUrl:
        try:
            return parse_ice_url(text, turn=turn)
        except UrlError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _proxy(text: str) -> Proxy:
    try:
        return Proxy.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _pin(text: str) -> tuple[str, str]:
    try:
        return parse_pin(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout",
        type=_positive(float),
        default=5.0,
        metavar="S",
        help="seconds to wait for a connection or an answer (default: %(default)s)",
    )
    parser.add_argument(
        "--proxy",
        type=_proxy,
        metavar="http://[USER:PASSWORD@]HOST:PORT",
        help="reach the server through this HTTP proxy (CONNECT): TCP and TLS URLs (UDP ones "
        "go direct, as a browser's would)",
    )
    trust = parser.add_mutually_exclusive_group()
    trust.add_argument(
        "--ca",
        metavar="FILE",
        help="trust the CA certificates in FILE (PEM) instead of the system's",
    )
    trust.add_argument(
        "--pin",
        type=_pin,
        action="append",
        metavar="PIN",
        help="trust exactly this certificate: sha256/BASE64 of its key or the SHA-256 of the "
        "certificate in hex, as tsunagu serve prints them (repeatable)",
    )
    trust.add_argument(
        "--insecure", action="store_true", help="do not verify the TLS certificate at all"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object, no steps")


def _tls_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> TlsOptions:
    options = TlsOptions(
        insecure=args.insecure, ca_file=args.ca, pins=tuple(args.pin) if args.pin else ()
    )
    if args.ca is not None:
        try:
            open(args.ca, "rb").close()
        except OSError as exc:
            parser.error(f"--ca {args.ca}: {exc.strerror or exc}")
    return options


def _check_proxy(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.proxy is not None and all(url.transport == "udp" for url in args.urls):
        parser.error(
            "an HTTP proxy carries TCP only: give turn:…?transport=tcp or turns: URLs with --proxy"
        )


def _through(proxy: Proxy | None, url: IceUrl) -> str:
    return f" through {proxy}" if proxy is not None and url.transport != "udp" else ""


def _direct_beside_proxy(
    results: list[CheckResult], proxy: Proxy | None, timeout: float
) -> Verdict | None:
    """With a proxy that worked: can this host reach the server without it? The answer
    tells a proxy-only network from one where the proxy is merely configured."""
    if proxy is None:
        return None
    through = next((r for r in results if r.proxy is not None and r.verdict.ok), None)
    if through is None:
        return None
    try:
        address = net.resolve(through.url.host, through.url.port, stream=True)
        net.connect_tcp(address, min(timeout, 3.0)).close()
    except verdicts.Failure as failure:
        return failure.verdict
    except OSError as exc:
        return verdicts.unreachable(through.url.authority, exc.strerror or str(exc))
    return Verdict("ok", f"{through.url.authority} is reachable without the proxy too.")


def _run_checks(
    probe: str,
    urls: list[IceUrl],
    check: Callable[[IceUrl, Observer], CheckResult],
    heading: Callable[[IceUrl], str],
    as_json: bool,
    *,
    proxy: Proxy | None = None,
    timeout: float = 2.0,
) -> int:
    output: TextOutput | JsonOutput
    if as_json:
        output = JsonOutput()
    else:
        output = TextOutput(sys.stdout, live=sys.stdout.isatty())
    results: list[CheckResult] = []
    try:
        for number, url in enumerate(urls):
            if number and isinstance(output, TextOutput):
                output.heading("")
            output.heading(heading(url))
            result = check(url, output)
            results.append(result)
            if isinstance(output, TextOutput):
                output.verdict(result.verdict)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return 130
    direct = _direct_beside_proxy(results, proxy, timeout)
    tried = [
        verdicts.Tried(str(r.url), r.url.transport, r.verdict, proxied=r.proxy is not None)
        for r in results
    ]
    overall = verdicts.summary(tried, direct=direct)
    if isinstance(output, TextOutput):
        if len(results) > 1:
            output.heading("")
            output.verdict(overall, label="overall", advice=False)
    else:
        sys.stdout.write(json_report(probe, results, overall) + "\n")
    return 0 if overall.ok else 1


def build_stun_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        allow_abbrev=False,
        description=(
            "Send STUN Binding requests to each URL and say whether the server is "
            "reachable, what address it sees you at, and how long an answer takes. "
            "URLs: stun:host[:port] (UDP), stun:host:port?transport=tcp|tls, stuns:host[:port]."
        ),
    )
    parser.add_argument("urls", nargs="+", type=_url_type(False), metavar="URL")
    parser.add_argument(
        "--count", type=_positive(int), default=3, help="Binding requests (default: %(default)s)"
    )
    _common_options(parser)
    return parser


def stun_command(argv: list[str], prog: str) -> int:
    """``tsunagu probe stun URL...``."""
    parser = build_stun_parser(prog)
    args = parser.parse_args(argv)
    _check_proxy(args, parser)
    options = StunOptions(
        timeout=args.timeout, count=args.count, tls=_tls_options(args, parser), proxy=args.proxy
    )

    def heading(url: IceUrl) -> str:
        return f"STUN {url}{_through(options.proxy, url)}"

    return _run_checks(
        "stun",
        args.urls,
        lambda url, observer: check_stun(url, options, observer),
        heading,
        args.json,
        proxy=options.proxy,
        timeout=options.timeout,
    )


def _credentials(text: str) -> tuple[str, str]:
    """``NAME:PASSWORD``; a TURN REST name keeps its colon (``1700000000:alice:PASSWORD``)."""
    head, sep, tail = text.partition(":")
    if sep and head.isascii() and head.isdigit() and ":" in tail:
        user_id, _, password = tail.partition(":")
        name = f"{head}:{user_id}"
    else:
        name, password = head, tail
    if not sep or not name or not password:
        raise argparse.ArgumentTypeError(
            "expected NAME:PASSWORD (or -u NAME with --password PASSWORD)"
        )
    return name, password


def build_turn_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        allow_abbrev=False,
        description=(
            "Check each TURN URL the way a call uses it: connect, allocate, allocate a "
            "second time as the peer, permit and bind a channel each way, then relay test "
            "traffic A -> relay A -> relay B -> B and back for a few seconds. Prints the "
            "steps, then a verdict that names the cause of a failure and what to do. URLs as "
            "ICE servers write them: turn:host[:port]?transport=udp|tcp, "
            "turns:host[:port]?transport=tcp."
        ),
    )
    parser.add_argument("urls", nargs="+", type=_url_type(True), metavar="URL")
    credentials = parser.add_mutually_exclusive_group(required=True)
    credentials.add_argument(
        "-u",
        "--credentials",
        metavar="NAME:PASSWORD",
        help="long-term credentials (a TURN REST name like 1700000000:alice keeps its colon; "
        "with --password, NAME alone)",
    )
    credentials.add_argument(
        "--secret",
        metavar="SECRET",
        help="mint a TURN REST credential from the server's shared secret",
    )
    parser.add_argument("--password", metavar="PASSWORD", help="the password, apart from -u")
    parser.add_argument(
        "--user",
        default="probe",
        metavar="ID",
        help="user id of the credential minted with --secret (default: %(default)s)",
    )
    parser.add_argument(
        "--ttl",
        type=_positive(int),
        default=600,
        metavar="S",
        help="lifetime of the credential minted with --secret (default: %(default)s)",
    )
    parser.add_argument(
        "--seconds",
        type=_positive(float),
        default=3.0,
        metavar="S",
        help="length of the relay test (default: %(default)s)",
    )
    parser.add_argument(
        "--rate",
        type=_positive(float),
        default=200.0,
        metavar="N",
        help="test packets per second (default: %(default)s)",
    )
    parser.add_argument(
        "--size",
        type=_positive(int),
        default=1000,
        metavar="BYTES",
        help="payload bytes per test packet, 12-1400 (default: %(default)s)",
    )
    _common_options(parser)
    return parser


def turn_command(argv: list[str], prog: str) -> int:
    """``tsunagu probe turn URL... (-u NAME:PASSWORD | --secret S [--user ID])``."""
    parser = build_turn_parser(prog)
    args = parser.parse_args(argv)
    _check_proxy(args, parser)
    if not 12 <= args.size <= 1400:
        parser.error("--size must be 12-1400 bytes")
    if args.seconds > 60:
        parser.error("--seconds is at most 60: this is a check, not a load test (probe load)")
    minted = args.secret is not None
    if minted:
        if args.password is not None:
            parser.error("--password goes with -u, not with --secret")
        username, password = mint_credentials(args.secret, args.user, args.ttl, time.time())
    elif args.password is not None:
        username, password = args.credentials, args.password
    else:
        try:
            username, password = _credentials(args.credentials)
        except argparse.ArgumentTypeError as exc:
            parser.error(f"-u: {exc}")
    options = TurnOptions(
        username=username,
        password=password,
        minted=minted,
        timeout=args.timeout,
        seconds=args.seconds,
        rate=args.rate,
        size=args.size,
        tls=_tls_options(args, parser),
        proxy=args.proxy,
    )

    def heading(url: IceUrl) -> str:
        return f"TURN {url} as {username}{_through(options.proxy, url)}"

    return _run_checks(
        "turn",
        args.urls,
        lambda url, observer: check_turn(url, options, observer),
        heading,
        args.json,
        proxy=options.proxy,
        timeout=options.timeout,
    )


# --- probe nat ---------------------------------------------------------------------------------


def build_nat_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        allow_abbrev=False,
        description=(
            "Find out how the NAT in front of this host behaves (RFC 5780 NAT behaviour "
            "discovery, over UDP): its mapping (endpoint-independent, address-dependent or "
            "address-and-port-dependent), its filtering, whether it hairpins and, with "
            "--lifetime-max, how long a mapping lives. The server must support RFC 5780 "
            "(tsunagu serve --rfc5780 with two listening IPs, or coturn with two listening "
            "IPs); without it, the probe says what it can still tell. URL: stun:host[:port]."
        ),
    )
    parser.add_argument("urls", nargs="+", type=_url_type(False), metavar="URL")
    parser.add_argument(
        "--timeout",
        type=_positive(float),
        default=3.0,
        metavar="S",
        help="seconds to wait for each answer; a filtering test that gets none costs this "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--lifetime-max",
        type=_non_negative,
        default=0.0,
        metavar="S",
        help="find how long a mapping lives, trying waits of 1, 2, 4... up to S seconds, "
        "side by side (at most 600; default: %(default)s, no lifetime test)",
    )
    parser.add_argument("--no-hairpinning", action="store_true", help="skip the hairpinning test")
    parser.add_argument("--json", action="store_true", help="print one JSON object, no steps")
    return parser


def nat_command(argv: list[str], prog: str) -> int:
    """``tsunagu probe nat stun:HOST[:PORT]...``."""
    parser = build_nat_parser(prog)
    args = parser.parse_args(argv)
    for url in args.urls:
        if url.transport != "udp":
            parser.error(f"{url}: NAT behaviour discovery runs over UDP: give stun:host[:port]")
    if args.lifetime_max > 600:
        parser.error("--lifetime-max is at most 600 seconds")
    options = NatOptions(
        timeout=args.timeout,
        lifetime_max=args.lifetime_max,
        hairpinning=not args.no_hairpinning,
    )
    return _run_checks(
        "nat",
        args.urls,
        lambda url, observer: check_nat(url, options, observer),
        lambda url: f"NAT behaviour (RFC 5780) via {url}",
        args.json,
    )


# --- the subcommands --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Subcommand:
    name: str
    summary: str
    run: Callable[[list[str], str], int]


SUBCOMMANDS: tuple[Subcommand, ...] = (
    Subcommand("stun", "is a STUN server reachable, and what address does it see", stun_command),
    Subcommand(
        "turn",
        "allocate, permit, bind and relay test traffic; say what is wrong and what to do",
        turn_command,
    ),
    Subcommand(
        "nat",
        "how the NAT here maps and filters (RFC 5780): do calls need TURN",
        nat_command,
    ),
    Subcommand(
        "load", "load a STUN/TURN server and report loss, RTT and cost as JSON", load_command
    ),
)


def _usage(prog: str) -> str:
    width = max(len(s.name) for s in SUBCOMMANDS)
    listing = "\n".join(f"  {s.name:<{width}}  {s.summary}" for s in SUBCOMMANDS)
    return (
        f"usage: {prog} {{{','.join(s.name for s in SUBCOMMANDS)}}} ...\n\n"
        "Check a STUN/TURN server the way a failing call uses it, or load it.\n\n"
        f"subcommands:\n{listing}\n\n"
        f"Run '{prog} SUBCOMMAND --help' for its options. '{prog} IP:PORT ...' is "
        f"'{prog} load IP:PORT ...'.\n"
    )


def probe_command(argv: list[str], prog: str) -> int:
    """``tsunagu probe``: dispatch to a subcommand; no subcommand is ``load``, as before."""
    if not argv:
        sys.stderr.write(_usage(prog))
        return 2
    first = argv[0]
    if first in ("-h", "--help"):
        sys.stdout.write(_usage(prog))
        return 0
    for subcommand in SUBCOMMANDS:
        if first == subcommand.name:
            return subcommand.run(argv[1:], f"{prog} {subcommand.name}")
    scheme = first.partition(":")[0].lower()
    if scheme in ("stun", "stuns", "turn", "turns"):
        kind = "stun" if scheme.startswith("stun") else "turn"
        sys.stderr.write(f"{prog}: a URL needs its subcommand: {prog} {kind} {first} ...\n")
        return 2
    return load_command(argv, prog)
