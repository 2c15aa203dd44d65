"""Background load on loopback for tests that must work on a busy machine.

Run as a script (``python tests/support/loopback_load.py --help``). It holds ``--connections``
idle TCP connections open to a listener of its own and sends a UDP stream at ``--udp-rate``
datagrams per second to a sink socket of its own, everything on 127.0.0.1 and on ports the
kernel picks. Once the connections are up it prints one line,
``ready connections=N tcp_port=P udp_port=Q``, then a line per second with what it sent.

It is bounded: it stops by itself after ``--duration`` seconds, when its standard input
closes (the test that started it went away) and on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import signal
import socket
import sys
import time

HOST = "127.0.0.1"
CONNECT_BATCH = 200


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class _Sink(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received = 0

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received += 1


def _raise_open_files(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(needed, soft)), hard))


async def _hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Server side of one idle connection: wait for its end."""
    with contextlib.suppress(ConnectionError):
        await reader.read()
    writer.close()


async def _flood(
    sock: socket.socket, target: tuple[str, int], rate: int, size: int, counts: dict[str, int]
) -> None:
    """Send ``rate`` datagrams per second, in 100 slices a second, counting them."""
    payload = bytes(size)
    per_slice = max(1, rate // 100)
    next_at = time.monotonic()
    while True:
        for _ in range(per_slice):
            try:
                sock.sendto(payload, target)
            except BlockingIOError:
                break
            counts["sent"] += 1
        next_at += 0.01
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))


async def main(args: argparse.Namespace) -> int:
    _raise_open_files(2 * args.connections + 100)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    def on_stdin() -> None:
        if not os.read(0, 4096):
            loop.remove_reader(0)
            stop.set()

    loop.add_reader(0, on_stdin)
    loop.call_later(args.duration, stop.set)

    server = await asyncio.start_server(_hold, HOST, 0, backlog=4096)
    tcp_port = server.sockets[0].getsockname()[1]
    sink_transport, sink = await loop.create_datagram_endpoint(_Sink, local_addr=(HOST, 0))
    udp_port = sink_transport.get_extra_info("sockname")[1]

    writers: list[asyncio.StreamWriter] = []
    for start in range(0, args.connections, CONNECT_BATCH):
        if stop.is_set():
            break
        count = min(CONNECT_BATCH, args.connections - start)
        opened = await asyncio.gather(
            *(asyncio.open_connection(HOST, tcp_port) for _ in range(count)),
            return_exceptions=True,
        )
        for item in opened:
            if isinstance(item, BaseException):
                _say(f"connect failed: {item!r}")
            else:
                writers.append(item[1])
    _say(f"ready connections={len(writers)} tcp_port={tcp_port} udp_port={udp_port}")

    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.setblocking(False)
    counts = {"sent": 0}
    flood = asyncio.create_task(
        _flood(sender, (HOST, udp_port), args.udp_rate, args.udp_size, counts)
    )
    started = time.monotonic()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
        _say(
            f"t={time.monotonic() - started:.0f}s connections={len(writers)}"
            f" udp_sent={counts['sent']} udp_received={sink.received}"
        )
    flood.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await flood
    sender.close()
    for writer in writers:
        writer.close()
    sink_transport.close()
    server.close()
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument("--udp-rate", type=int, default=20000, help="datagrams per second")
    parser.add_argument("--udp-size", type=int, default=1000, help="bytes per datagram")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds, at most")
    args = parser.parse_args(argv)
    if not 0 <= args.connections <= 10000 or not 0 < args.udp_rate <= 100000:
        parser.error("at most 10000 connections and 100000 datagrams per second")
    if not 0 < args.duration <= 1800 or not 0 < args.udp_size <= 1400:
        parser.error("duration up to 1800 s, datagrams up to 1400 bytes")
    return args


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(parse())))
