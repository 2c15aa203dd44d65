"""The interop tests' allowance for uclient's own channel draw (``UCLIENT_CHANNEL_REDRAW``):
it matches tsunagu's actual answer to that draw and coturn's, nothing else, and a run that
ends on it is run once more, not more."""

from __future__ import annotations

import sys
from pathlib import Path

from support.interop import UCLIENT_CHANNEL_REDRAW, run_uclient, uclient_redrew_a_channel
from support.turn_harness import PEER, Client, make_server, success
from tsunagu.stun import ChannelNumber, ErrorCode, Method, XorPeerAddress
from tsunagu.turn import TurnSettings

COTURN_REASON = "You cannot use the same channel number with different peer"


def _uclient_line(reason: str, code: int = 400) -> str:
    # uclient's words for a refused ChannelBind (startuclient.c, turn_channel_bind).
    return f"0: : channel bind: error {code} ({reason})\n"


def _refusal(client: Client, number: int, peer: tuple[str, int]) -> ErrorCode:
    response = client.request(Method.CHANNEL_BIND, [ChannelNumber(number), XorPeerAddress(*peer)])
    refusal = response.get(ErrorCode)
    assert refusal is not None, response
    return refusal


def test_it_matches_tsunagus_answer_to_the_draw_and_no_other() -> None:
    server, _ = make_server(TurnSettings())
    client = Client(server)
    assert success(client.allocate())
    rtcp_peer = (PEER[0], PEER[1] + 1)
    # uclient's order: a channel for the peer's port + 1, the same number drawn for the peer.
    assert success(
        client.request(Method.CHANNEL_BIND, [ChannelNumber(0x6DB6), XorPeerAddress(*rtcp_peer)])
    )
    drawn_again = _refusal(client, 0x6DB6, PEER)
    assert drawn_again.code == 400
    assert uclient_redrew_a_channel(255, _uclient_line(drawn_again.reason))
    # Another refusal of the same code is a failure, as is any other code.
    second_channel = _refusal(client, 0x4001, rtcp_peer)
    assert second_channel.code == 400 and second_channel.reason != drawn_again.reason
    assert not uclient_redrew_a_channel(255, _uclient_line(second_channel.reason))
    assert not uclient_redrew_a_channel(255, _uclient_line(drawn_again.reason, code=403))


def test_it_matches_coturns_answer() -> None:
    assert UCLIENT_CHANNEL_REDRAW.search(_uclient_line(COTURN_REASON))
    assert not uclient_redrew_a_channel(0, _uclient_line(COTURN_REASON))


def _script(tmp_path: Path, outputs: list[tuple[int, str]]) -> list[str]:
    """A stand-in for uclient that prints and exits as ``outputs`` say, one per run."""
    runs = tmp_path / "runs"
    runs.write_text("0")
    program = (
        "import pathlib, sys\n"
        f"runs = pathlib.Path({str(runs)!r})\n"
        "n = int(runs.read_text())\n"
        "runs.write_text(str(n + 1))\n"
        f"code, text = {outputs!r}[n]\n"
        "sys.stdout.write(text)\n"
        "sys.exit(code)\n"
    )
    return [sys.executable, "-c", program]


def test_a_run_ended_by_the_draw_is_run_once_more(tmp_path: Path) -> None:
    drawn = (255, _uclient_line(COTURN_REASON))
    done = (0, "start_mclient: tot_send_msgs=10, tot_recv_msgs=10\n")
    assert run_uclient(_script(tmp_path, [drawn, done]), 10.0) == done
    assert (tmp_path / "runs").read_text() == "2"


def test_a_second_draw_fails_the_run(tmp_path: Path) -> None:
    drawn = (255, _uclient_line(COTURN_REASON))
    assert run_uclient(_script(tmp_path, [drawn, drawn, (0, "")]), 10.0) == drawn
    assert (tmp_path / "runs").read_text() == "2"


def test_any_other_failure_is_not_run_again(tmp_path: Path) -> None:
    failed = (255, _uclient_line("Bad Request"))
    assert run_uclient(_script(tmp_path, [failed, (0, "")]), 10.0) == failed
    assert (tmp_path / "runs").read_text() == "1"
