"""The asyncio driver of the sans-I/O TURN core.

:class:`TurnDriver` owns a :class:`~tsunagu.turn.TurnServer` and does on the event loop
what the core asks for: after each call into the core it takes the core's events
(attaching a new allocation to the listener its Allocate came through, closing up an ended
one and writing its audit line) and keeps one loop timer armed at the core's next deadline.
Every ``report_interval`` seconds it writes what failed meanwhile, from the core's tally of
refusals (:attr:`TurnServer.refusals`) and the transport's (:attr:`TurnDriver.failures`: TLS
handshakes, bytes that are not STUN): one line per cause and client, with the count and the
facts (:func:`~.failures.describe`), never one per packet.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from typing import Any, cast

from ..logs import structured
from ..turn.allocation import Allocation
from ..turn.authentication import KeyLookup
from ..turn.events import AllocationCreated, AllocationEnded
from ..turn.refusals import RefusalTally
from ..turn.server import Session, TurnServer
from .engine import RelayEngine
from .failures import describe
from .listeners import ClientSide, StreamConnection, UdpListener
from .lookups import KeyLookups
from .relay import RelayEndpointLike

__all__ = ["TurnDriver", "family_label"]

log = logging.getLogger("tsunagu")
audit = logging.getLogger("tsunagu.audit")


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class TurnDriver:
    """Runs the TURN core on an event loop, for the listeners of one worker process.

    ``worker`` is this process's index among the workers sharing the ports; it is written
    into every audit line.
    """

    def __init__(
        self,
        server: TurnServer,
        loop: asyncio.AbstractEventLoop,
        engine: RelayEngine,
        *,
        worker: int = 0,
        report_interval: float = 10.0,
        lookups: KeyLookups | None = None,
    ) -> None:
        self.server = server
        self.lookups = lookups
        """Key lookups in the user database, when one is configured."""
        self.loop = loop
        self.engine = engine
        self.worker = worker
        self.stream_framer = engine.stream_framer
        self.streams: set[StreamConnection] = set()
        self.udp_listeners: dict[tuple[str, int], UdpListener] = {}
        """The UDP listeners by local address: a listener registers itself, and sends an
        RFC 5780 response through the one bound to its source address."""
        self.all_ended = asyncio.Event()
        self._fold_counters = engine.fold_counters
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        # An allocation that ends sooner than this without a peer and without a refused request
        # is routine (a browser drops the allocations of the candidates it did not pick, at
        # once, or after an offer collision): its explanation is logged at INFO, not WARNING.
        self.short_lived = 5.0
        self.report_interval = report_interval
        self._report: asyncio.TimerHandle | None = None
        self.failures = RefusalTally()
        """What the transport saw fail (TLS handshakes, bytes that are not STUN), by cause
        and client; written with the core's refusals."""
        self.ended_counters = [0, 0, 0, 0, 0]
        """What the allocations that ended relayed, summed: packets and bytes to the peers,
        packets and bytes to the clients, drops (``tsunagu status``)."""
        self.ended_count = 0
        self.created: dict[tuple[str, str], int] = {}
        """Allocations created, by transport and relayed address family (metrics)."""
        self.ended_by_transport: dict[str, list[int]] = {}
        """``ended_counters`` by the client's transport (metrics)."""

    def session_id(self, number: int) -> str:
        """The id operators name an allocation by: unique across the workers of a server."""
        return f"{self.worker}-{number}"

    def sessions(self, match: Callable[[Allocation], bool] | None = None) -> list[Session]:
        """The core's sessions with what the engine counted outside them added in."""
        found = self.server.sessions(match)
        pending = getattr(self.engine, "pending_counters", None)
        if pending is None:
            return found
        allocations = self.server.allocations
        completed = []
        for session in found:
            allocation = allocations.get(session.five_tuple)
            if allocation is None:
                continue
            extra = pending(allocation)
            if any(extra):
                session = dataclasses.replace(
                    session,
                    packets_to_peers=session.packets_to_peers + extra[0],
                    bytes_to_peers=session.bytes_to_peers + extra[1],
                    packets_to_client=session.packets_to_client + extra[2],
                    bytes_to_client=session.bytes_to_client + extra[3],
                    dropped=session.dropped + extra[4],
                )
            completed.append(session)
        return completed

    def end_allocations(self, match: Callable[[Allocation], bool], reason: str) -> int:
        """End the allocations ``match`` accepts now (an operator's kill): audit lines
        written, relay sockets closed; how many."""
        ended = self.server.end_allocations(match, reason, time.time())
        self.after_core_call()
        return ended

    def start_reports(self) -> None:
        """Write the failure lines every ``report_interval`` seconds until :meth:`shutdown`."""
        if self._report is None and self.report_interval > 0:
            self._report = self.loop.call_later(self.report_interval, self._report_fired)

    def _report_fired(self) -> None:
        self._report = None
        self.report_refusals()
        self.start_reports()

    def await_keys(self, lookup: KeyLookup, again: Callable[[], None]) -> None:
        """Look a user's keys up in the database, then call ``again`` (a listener hands the
        request in again). Without a database, or beyond the lookups' bounds, the request
        is dropped and counted: its client retransmits."""
        if self.lookups is None or not self.lookups.submit(lookup, again):
            self.server.drops["key lookup dropped"] += 1

    def report_refusals(self) -> None:
        """Log what failed since the last report: one line per cause and client."""
        if self.lookups is not None:
            self.lookups.report(worker=self.worker, interval=self.report_interval)
        for tally in (self.server.refusals, self.failures):
            if not tally:
                continue
            for summary in tally.take():
                level, text, fields = describe(
                    summary, worker=self.worker, interval=self.report_interval
                )
                log.log(level, "%s", text, extra=structured(fields))

    def after_message(self, origin: ClientSide, addr: Any) -> None:
        """Take the core's events after it handled a client's message, and re-arm the timer.

        Only that message can have created an allocation, so a new one is attached to
        ``origin``, the listener or connection it came through, with the client's ``addr``.
        """
        # Called after every STUN message: the loop over events and the timer check are inline.
        server = self.server
        event = server.next_event()
        while event is not None:
            if isinstance(event, AllocationCreated):
                _hand_to_relays(event.allocation)
                origin.attach(event.allocation, addr)
                self._created(event.allocation)
            elif isinstance(event, AllocationEnded):
                self._ended(event)
            event = server.next_event()
        deadline = server.get_timer()
        if deadline != self._timer_at:
            self._arm_timer(deadline)

    def after_core_call(self) -> None:
        """Take the core's events after a call that involved no client message (a closed
        connection, the timer, shutdown), and re-arm the timer."""
        server = self.server
        event = server.next_event()
        while event is not None:
            if isinstance(event, AllocationEnded):
                self._ended(event)
            else:  # not expected without a message; relaying still needs the allocation
                _hand_to_relays(event.allocation)
                self._created(event.allocation)
            event = server.next_event()
        deadline = server.get_timer()
        if deadline != self._timer_at:
            self._arm_timer(deadline)

    def _arm_timer(self, deadline: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = (
            None
            if deadline is None
            else self.loop.call_later(max(0.0, deadline - time.time()), self._timer_fired)
        )

    def _timer_fired(self) -> None:
        self._timer = None
        self._timer_at = None
        self.server.handle_timer(time.time())
        self.after_core_call()

    def _created(self, allocation: Allocation) -> None:
        # The start of what "allocation-ended" closes: a call can be followed in the audit
        # trail from its first allocation on, by user and relayed address.
        record = {
            "event": "allocation-created",
            "worker": self.worker,
            "session": self.session_id(allocation.number),
            "user": allocation.username,
            "client": str(allocation.five_tuple),
            "relay": [
                f"{_bracket(ip)}:{port}" for ip, port in allocation.relayed_addresses.values()
            ],
        }
        audit.info(
            "%s",
            json.dumps(record, separators=(",", ":")),
            extra=structured(record, "allocation created"),
        )
        key = (allocation.five_tuple.protocol, family_label(allocation))
        self.created[key] = self.created.get(key, 0) + 1

    def _ended(self, event: AllocationEnded) -> None:
        allocation = event.allocation
        link = allocation.client_link
        if link is not None:
            link.detach(allocation)
        self._fold_counters(allocation)
        totals = self.ended_counters
        totals[0] += allocation.packets_to_peers
        totals[1] += allocation.bytes_to_peers
        totals[2] += allocation.packets_to_client
        totals[3] += allocation.bytes_to_client
        totals[4] += allocation.dropped
        self.ended_count += 1
        protocol = allocation.five_tuple.protocol
        mine = self.ended_by_transport.get(protocol)
        if mine is None:
            mine = self.ended_by_transport[protocol] = [0, 0, 0, 0, 0]
        mine[0] += allocation.packets_to_peers
        mine[1] += allocation.bytes_to_peers
        mine[2] += allocation.packets_to_client
        mine[3] += allocation.bytes_to_client
        mine[4] += allocation.dropped
        duration = round(event.ended_at - allocation.created, 3)
        record = {
            "event": "allocation-ended",
            "worker": self.worker,
            "session": self.session_id(allocation.number),
            "reason": event.reason,
            "user": allocation.username,
            "client": str(allocation.five_tuple),
            "relay": [
                f"{_bracket(ip)}:{port}" for ip, port in allocation.relayed_addresses.values()
            ],
            "peers": sorted(allocation.peers_seen),
            "permission_requests": allocation.permission_requests,
            "refused": allocation.refused,
            "to_peers": {
                "packets": allocation.packets_to_peers,
                "bytes": allocation.bytes_to_peers,
            },
            "to_client": {
                "packets": allocation.packets_to_client,
                "bytes": allocation.bytes_to_client,
            },
            "dropped": allocation.dropped,
            "bandwidth_dropped": allocation.bandwidth_dropped,
            "duration": duration,
        }
        audit.info(
            "%s",
            json.dumps(record, separators=(",", ":")),
            extra=structured(record, "allocation ended"),
        )
        if not allocation.peers_seen:
            _explain_never_permitted(allocation, duration, self.short_lived)
        if not self.server.allocations:
            self.all_ended.set()

    def shutdown(self) -> None:
        """End every allocation now and stop the timer."""
        self.server.shutdown(time.time())
        self.after_core_call()
        if self._timer is not None:
            self._timer.cancel()
        if self._report is not None:
            self._report.cancel()
            self._report = None
        self.report_refusals()


def family_label(allocation: Allocation) -> str:
    """The relayed address families of ``allocation``: ipv4, ipv6 or ipv4+ipv6."""
    return "+".join(f"ipv{version}" for version in sorted(allocation.relayed_addresses))


def _hand_to_relays(allocation: Allocation) -> None:
    # A relay endpoint reads its allocation's state without a look-up per packet.
    for relay in allocation.relays.values():
        cast(RelayEndpointLike, relay).allocation = allocation


def _explain_never_permitted(allocation: Allocation, duration: float, short_lived: float) -> None:
    # The commonest reason a call "connects to TURN but no media flows"; say which side to
    # look at, in the operator's log rather than only in the audit record.
    refusals = {
        cause: count
        for cause, count in allocation.refused.items()
        if cause.startswith(("CreatePermission ", "ChannelBind ")) or cause == "other"
    }
    level = logging.WARNING
    if not allocation.permission_requests and not refusals:
        if duration < short_lived:
            level = logging.INFO
        cause = (
            "no CreatePermission or ChannelBind was received (the client never had a peer"
            " address to reach: check signaling and the other side's candidates)"
        )
    else:
        # A request refused before its handler (a stale nonce, say) is not in
        # permission_requests, and a retried one is in both: at least this many were refused.
        requests = max(allocation.permission_requests, sum(refusals.values()))
        cause = (
            f"its {requests} CreatePermission/ChannelBind requests were refused:"
            f" {', '.join(sorted(refusals)) or 'no reason recorded'}"
        )
        likely = _likely_cause(refusals)
        if likely:
            cause = f"{cause}; likely cause: {likely}"
    log.log(
        level,
        "allocation of user %r from %s ended after %.1f s without relaying to any peer: %s",
        allocation.username,
        allocation.five_tuple,
        duration,
        cause,
    )


# What an error code refusing CreatePermission or ChannelBind most likely means for a call.
_LIKELY_CAUSES = {
    403: "the peer addresses the client named are denied by the relay policy (each refusal"
    " names its rule): the other side offered only addresses this server does not relay to,"
    " such as private or loopback ones, or --allowed-peer-ip must open their range",
    438: "stale nonces: the client kept sending nonces this server did not accept",
    401: "its credentials were refused (an expired TURN REST credential with"
    " --rest-check-on-refresh, or a wrong password)",
    441: "its requests were signed by another user than the allocation's",
    443: "the peers' address family differs from the relayed address's (an IPv6 peer on an"
    " IPv4 relay: the client must ask for an IPv6 or a dual-stack allocation)",
    508: "the allocation reached its limit of permissions",
    400: "malformed requests (a client bug)",
}


def _likely_cause(refusals: dict[str, int]) -> str:
    """The likely cause of the refusal seen most often ("<method> <code> <cause>" keys)."""
    for key, _ in sorted(refusals.items(), key=lambda item: -item[1]):
        parts = key.split(" ", 2)
        if len(parts) >= 2 and parts[1].isdigit() and int(parts[1]) in _LIKELY_CAUSES:
            return _LIKELY_CAUSES[int(parts[1])]
    return ""
