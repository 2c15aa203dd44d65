"""Hostile bytes against the real ``tsunagu serve`` while a legitimate call is relaying.

Random datagrams, mutated STUN messages (valid ones with bytes flipped, lengths changed,
attributes cut) and stray ChannelData go to the UDP port, and the same material down TCP
connections. The legitimate aioice client keeps echoing through its relay during and after
the storm; the server logs no traceback and shuts down cleanly. Bounded: a fixed number of
packets from a fixed seed.
"""

from __future__ import annotations

import asyncio
import random
import socket
from pathlib import Path

import pytest

from support.interop import HOST, run_serve, turn_allocate, udp_echo_server
from tsunagu.stun import MessageClass, Method, encode_message
from tsunagu.stun.attributes import (
    ChannelNumber,
    Data,
    Lifetime,
    Nonce,
    Realm,
    RequestedTransport,
    Username,
    XorPeerAddress,
)

pytestmark = pytest.mark.interop

PACKETS = 3000
SEED = 20261122


def _templates(rng: random.Random) -> list[bytes]:
    def tid() -> bytes:
        return rng.randbytes(12)

    return [
        encode_message(Method.BINDING, MessageClass.REQUEST, tid(), fingerprint=True),
        encode_message(Method.ALLOCATE, MessageClass.REQUEST, tid(), [RequestedTransport(17)]),
        encode_message(
            Method.ALLOCATE,
            MessageClass.REQUEST,
            tid(),
            [
                RequestedTransport(17),
                Lifetime(600),
                Username("alice"),
                Realm("tsunagu"),
                Nonce("x" * 40),
            ],
            integrity_key=bytes(16),
            fingerprint=True,
        ),
        encode_message(
            Method.CHANNEL_BIND,
            MessageClass.REQUEST,
            tid(),
            [ChannelNumber(0x4001), XorPeerAddress(HOST, 9), Username("alice")],
            integrity_key=bytes(16),
        ),
        encode_message(
            Method.SEND, MessageClass.INDICATION, tid(), [XorPeerAddress(HOST, 9), Data(b"x")]
        ),
        b"\x40\x00\x00\x04abcd",
    ]


def _mutate(rng: random.Random, template: bytes) -> bytes:
    data = bytearray(template)
    choice = rng.randrange(6)
    if choice == 0:  # flip some bytes
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif choice == 1:  # lie about the length
        data[2:4] = rng.randrange(0x10000).to_bytes(2, "big")
    elif choice == 2:  # cut short
        del data[rng.randrange(len(data)) :]
    elif choice == 3:  # append junk
        data += rng.randbytes(rng.randrange(1, 64))
    elif choice == 4:  # a random attribute header in the middle
        at = rng.randrange(20, max(21, len(data)))
        data[at:at] = rng.randrange(0x10000).to_bytes(2, "big") + rng.randbytes(2)
    else:  # entirely random
        return rng.randbytes(rng.randrange(0, 300))
    return bytes(data)


async def _storm(host: str, port: int, rng: random.Random) -> None:
    templates = _templates(rng)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setblocking(False)
    try:
        for index in range(PACKETS):
            udp.sendto(_mutate(rng, rng.choice(templates)), (host, port))
            if index % 100 == 99:
                await asyncio.sleep(0.01)  # let the server and the legitimate call breathe
                while True:  # discard whatever the server answered
                    try:
                        udp.recv(2048)
                    except BlockingIOError:
                        break
    finally:
        udp.close()
    for _ in range(20):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"".join(_mutate(rng, rng.choice(templates)) for _ in range(20)))
        try:
            await writer.drain()
            await asyncio.wait_for(reader.read(4096), 0.2)
        except (TimeoutError, ConnectionError):
            pass
        writer.close()


def test_hostile_traffic_does_not_disturb_a_call(tmp_path: Path) -> None:
    async def scenario(port: int) -> None:
        async with udp_echo_server() as (echo, peer):
            client = await turn_allocate(server)
            try:
                assert await client.echo(b"before", peer) == b"before"
                storm = asyncio.create_task(_storm(HOST, port, random.Random(SEED)))
                echoed = 0
                while not storm.done():
                    payload = f"during {echoed}".encode()
                    assert await client.echo(payload, peer) == payload
                    echoed += 1
                    await asyncio.sleep(0.02)
                await storm
                assert echoed > 0
                assert await client.echo(b"after", peer) == b"after"
            finally:
                await client.close()

    with run_serve(tmp_path / "serve") as server:
        asyncio.run(scenario(server.port))
        assert server.pid > 0
    output = server.log_text() + server.stdout_path.read_text(errors="replace")
    assert "Traceback" not in output and "Exception" not in output, output
