"""``tsunagu probe``: load a STUN/TURN server (this one or any other) and report as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..config import parse_alternate_server, parse_user
from .load import PROBE_BYTES, LoadSpec, run

__all__ = ["probe_command"]


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


def build_parser(prog: str) -> argparse.ArgumentParser:
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


def probe_command(argv: list[str], prog: str) -> int:
    """``tsunagu probe``."""
    parser = build_parser(prog)
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
    spec = LoadSpec(
        server=args.server,
        transport=args.transport,
        mode=args.mode,
        allocations=args.allocations,
        username=username,
        password=password,
        rest_secret=args.rest_secret,
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
