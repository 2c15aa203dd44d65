from typing import Any

from tsunagu.stun.framing import FramingError as FramingError

BATCH: int

def admit(buckets: tuple[Any, ...], now: int, size: int) -> bool: ...

class Relay:
    fd: int
    allocation: Any
    to_client: Any
    pad_stream: bool
    paused: bool
    packets_to_peers: int
    bytes_to_peers: int
    packets_to_client: int
    bytes_to_client: int
    dropped: int
    bandwidth_dropped: int
    def __init__(self, fd: int, tid_prefix: bytes) -> None: ...
    def readable(self) -> None: ...
    def set_client(self, fd: int, address: Any) -> None: ...
    def clear_client(self) -> None: ...
    def sendto(self, data: bytes | memoryview, address: Any) -> int: ...

class Listener:
    fd: int
    relayed: int
    bindings: int
    answer_binding: bool
    def __init__(self, fd: int, allocations: dict[Any, Any], fallback: Any) -> None: ...
    def readable(self) -> None: ...

class Stream:
    allocation: Any
    relayed: int
    buffered: int
    def __init__(self, fallback: Any) -> None: ...
    def feed(self, data: bytes | bytearray | memoryview) -> bool: ...
