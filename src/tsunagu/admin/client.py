"""The client side of the admin API: one request to a running server's admin socket.

Blocking and small on purpose: a command sends one JSON line, reads one JSON line back
(bounded in size and time) and exits; see :mod:`.server` for the protocol.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

__all__ = ["MAX_ANSWER", "AdminUnavailable", "request"]

MAX_ANSWER = 256 * 1024 * 1024
"""Bytes of an answer a command reads at most (every worker's list of sessions)."""
TIMEOUT = 10.0


class AdminUnavailable(Exception):
    """No running server answered on the admin socket; the message says what to do."""


def request(path: str, payload: dict[str, Any], timeout: float = TIMEOUT) -> dict[str, Any]:
    """Send ``payload`` to the server listening on ``path``; its answer."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise AdminUnavailable(
                f"no admin socket at {path}: is tsunagu serve running, as this user and with"
                " this state directory? (--admin-socket PATH or -c FILE names another)"
            ) from None
        except ConnectionRefusedError:
            raise AdminUnavailable(
                f"nothing answers on {path}: the server is not running"
            ) from None
        except PermissionError:
            raise AdminUnavailable(
                f"no permission to connect to {path}: run the command as the server's user"
            ) from None
        except OSError as exc:
            raise AdminUnavailable(f"cannot connect to {path}: {exc.strerror or exc}") from None
        try:
            sock.sendall(json.dumps(payload).encode() + b"\n")
            chunks: list[bytes] = []
            size = 0
            while True:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                data = sock.recv(1 << 20)
                if not data:
                    break
                chunks.append(data)
                size += len(data)
                if size > MAX_ANSWER:
                    raise AdminUnavailable(f"the answer from {path} is over {MAX_ANSWER} bytes")
                if data.endswith(b"\n"):
                    break
        except TimeoutError:
            raise AdminUnavailable(
                f"the server on {path} did not answer in {timeout:g} s"
            ) from None
        except OSError as exc:
            raise AdminUnavailable(f"{path}: {exc.strerror or exc}") from None
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError:
        raise AdminUnavailable(f"the answer from {path} is not JSON") from None
    if not isinstance(answer, dict):
        raise AdminUnavailable(f"the answer from {path} is not a JSON object")
    return answer
