"""``tsunagu policy chrome``: the browser side of a firewall that opens a narrow UDP range.

A company that lets WebRTC out through a few UDP ports must also make its browsers send from
those ports: Chrome, Chromium and Edge pick any free local port unless the enterprise policy
``WebRtcUdpPortRange`` narrows them down. This module writes that policy, together with a
``WebRtcIPHandling`` matching the server's ICE transport policy, as the JSON file Chrome and
Chromium read from their managed policy directory. Everything here is pure: the command
reads the same configuration as ``tsunagu serve`` and prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from tsunagu.config import Config, ConfigError, build_parser, config_from_args

__all__ = [
    "DEFAULT_UDP_PORTS",
    "MIN_UDP_PORTS",
    "PortRange",
    "chrome_policy",
    "explanation",
    "ip_handling",
    "placement",
    "policy_command",
]


@dataclass(frozen=True, slots=True)
class PortRange:
    """An inclusive range of local UDP ports, written ``LOW-HIGH``."""

    low: int
    high: int

    @property
    def size(self) -> int:
        return self.high - self.low + 1

    @property
    def text(self) -> str:
        return f"{self.low}-{self.high}"

    @classmethod
    def parse(cls, text: str) -> PortRange:
        """``"LOW-HIGH"``, ordered, within 1024-65535 and at least :data:`MIN_UDP_PORTS`
        ports wide; ValueError saying what is wrong otherwise."""
        low_text, sep, high_text = text.strip().partition("-")
        if not sep or not low_text.strip().isdigit() or not high_text.strip().isdigit():
            raise ValueError(f"must be LOW-HIGH, two port numbers, got {text!r}")
        low, high = int(low_text), int(high_text)
        if not 1024 <= low <= 65535 or not 1024 <= high <= 65535:
            # The well-known ports: services' everywhere, and privileged on Linux, where a
            # browser could not bind them.
            raise ValueError(f"ports must be 1024-65535, got {text!r}")
        if low > high:
            raise ValueError(f"LOW must not be above HIGH, got {text!r}")
        ports = cls(low, high)
        if ports.size < MIN_UDP_PORTS:
            raise ValueError(
                f"{text!r} holds {ports.size} ports; give at least {MIN_UDP_PORTS}: Chrome takes"
                " one per call and network interface (IPv4 and IPv6 apart), a room of 8 is 7"
                " calls, and an ICE restart holds a second set for a moment"
            )
        return ports


# 7 peer connections (a full room of 8) x 2 address families x 2 while an ICE restart
# overlaps: 28, rounded up.
MIN_UDP_PORTS = 32

# Below the ephemeral ranges of Linux (32768-60999), Windows and macOS (49152-65535), so that
# outgoing connections of other programs never hold ports of the range; 200 ports serve
# about a hundred simultaneous connections, for every WebRTC site the browser opens (the
# policy is not per site).
DEFAULT_UDP_PORTS = PortRange(20000, 20199)

RELAY_ONLY_HANDLING = "default_public_interface_only"
DEFAULT_HANDLING = "default_public_and_private_interfaces"


def ip_handling(config: Config) -> str:
    """The ``WebRtcIPHandling`` value for browsers that call through this server.

    ``--ice-transport-policy relay``: every call goes through TURN, so the browser needs no
    local address at all: ``default_public_interface_only`` gathers on the default route's
    interface only and never exposes a local address, while TURN over UDP, TCP and TLS work
    as before. ``all``: ``default_public_and_private_interfaces`` keeps the private address
    (two people in one office still call each other directly) but uses the default route's
    interface only, so a connection takes one port of the range per address family rather
    than one per interface (VPNs, container bridges, Wi-Fi beside Ethernet), and nothing
    leaves through an interface the firewall opening does not cover. ``default`` would
    spend ports on every interface; ``disable_non_proxied_udp`` turns UDP off unless a
    proxy carries it, which is the opposite of opening a UDP range.
    """
    return RELAY_ONLY_HANDLING if config.ice_transport_policy == "relay" else DEFAULT_HANDLING


def chrome_policy(config: Config, ports: PortRange = DEFAULT_UDP_PORTS) -> dict[str, str]:
    """The managed policy, as Chrome and Chromium read it from a JSON file."""
    return {"WebRtcIPHandling": ip_handling(config), "WebRtcUdpPortRange": ports.text}


def _server_host(config: Config) -> str:
    """The address browsers reach the server at, as the TURN URIs handed to them name it."""
    if config.public_host is not None:
        return config.public_host
    if config.external_ips:
        return str(config.external_ips[0].public)
    for address in config.listening_ips:
        if not address.is_unspecified:
            return str(address)
    return "the server's address"


def _tcp_ports(config: Config) -> list[int]:
    ports = [config.listening_port]
    if not config.no_tls and not config.stun_only:
        ports.append(config.tls_listening_port)
    ports += [aux.port for aux in config.aux_servers]
    return sorted(set(ports))


# Microsoft Edge reads WebRtcUdpPortRange under the same name, but the IP handling under a
# name and values of its own.
EDGE_HANDLING = {
    RELAY_ONLY_HANDLING: "AllowPublicInterfaceOnly",
    DEFAULT_HANDLING: "AllowPublicAndPrivateInterfaces",
}


def placement(config: Config | None = None) -> str:
    """Where the file goes, per browser and system."""
    edge = EDGE_HANDLING[ip_handling(config or Config())]
    return (
        "Where it goes (a JSON file of any name in the managed policy directory; restart"
        " the browser, then check chrome://policy):\n"
        "  Chromium on Linux:      /etc/chromium/policies/managed/tsunagu.json\n"
        "  Google Chrome on Linux: /etc/opt/chrome/policies/managed/tsunagu.json\n"
        "  Windows: Group Policy with Google's Chrome ADMX templates, or the registry:"
        " string values WebRtcUdpPortRange and WebRtcIPHandling under"
        " HKLM\\SOFTWARE\\Policies\\Google\\Chrome (Chromium: ...\\Policies\\Chromium)\n"
        "  macOS: a configuration profile (MDM) for the preference domain com.google.Chrome"
        " with the same keys and string values\n"
        "  Microsoft Edge (HKLM\\SOFTWARE\\Policies\\Microsoft\\Edge, com.microsoft.Edge):"
        f" WebRtcUdpPortRange the same, and WebRtcLocalhostIpHandling = {edge}\n"
    )


def explanation(config: Config, ports: PortRange = DEFAULT_UDP_PORTS) -> str:
    """What the policy does and the firewall opening that matches it and the server."""
    host = _server_host(config)
    tcp = ", ".join(str(port) for port in _tcp_ports(config))
    handling = ip_handling(config)
    lines = [
        f"WebRtcUdpPortRange {ports.text}: every UDP socket WebRTC opens (host, server-"
        f"reflexive and TURN-over-UDP candidates share one per connection) is bound to a"
        f" local port in {ports.text} ({ports.size} ports). The browser needs a restart.",
        f"WebRtcIPHandling {handling}: "
        + (
            "the server forces relayed calls (--ice-transport-policy relay), so browsers"
            " gather on the default route's interface only and expose no local address."
            if handling == RELAY_ONLY_HANDLING
            else "browsers gather on the default route's interface only (one port of the"
            " range per connection and address family) and keep their private address for"
            " direct calls inside the office."
        ),
        "Firewall opening for the browsers' network:",
    ]
    if config.no_turn or config.stun_only or config.no_udp:
        lines.append(f"  (this server offers no TURN over UDP; TCP to {host} ports {tcp} is left)")
    else:
        lines.append(
            f"  UDP from source ports {ports.text} to {host} port {config.listening_port}"
            " (TURN over UDP), and its answers"
        )
    if config.ice_transport_policy == "all":
        lines.append(
            f"  UDP from source ports {ports.text} to {host} ports"
            f" {config.min_port}-{config.max_port} (peers' relayed addresses) and, for direct"
            " calls with people elsewhere, to any address; or set --ice-transport-policy"
            " relay and open only the line above"
        )
    if not config.no_turn and not (config.no_tcp and config.no_tls):
        lines.append(
            f"  TCP to {host} ports {tcp} from any source port: TURN over TCP and TLS, the"
            " fallback where UDP is blocked (WebRtcUdpPortRange does not cover TCP)"
        )
    if config.ice_transport_policy == "relay":
        lines.append(
            "  No other UDP of the browsers needs to leave: with all of it dropped at the"
            " router, calls connect through the relay."
        )
    return "\n".join(lines) + "\n"


_DESCRIPTION = """\
Print the Chrome/Chromium enterprise policy (JSON) that makes browsers use WebRTC through a
firewall opening of a few UDP ports, matching this server's settings:

  tsunagu policy chrome -c /etc/tsunagu/tsunagu.toml > /etc/chromium/policies/managed/tsunagu.json

WebRtcUdpPortRange (--browser-udp-ports, default {default}) binds every UDP socket WebRTC
opens in the browser to a local port of the range, so that the firewall can let out UDP from
those source ports only. Chrome takes one port per connection and network interface (IPv4
and IPv6 apart; host, server-reflexive and TURN-over-UDP candidates share it) and tries the
ports in order; at least {minimum} are required (a room of 8 is 7 connections, and an
ICE restart holds a second set for a moment). The default lies below the ephemeral port ranges
of Linux (32768-60999), Windows and macOS (49152-65535), so other programs' connections do
not hold its ports, and its 200 ports serve about a hundred connections at once, for every
WebRTC site in the browser.

WebRtcIPHandling follows --ice-transport-policy: relay gives default_public_interface_only
(the default route's interface only and no local address exposed: every call is relayed
anyway); all gives default_public_and_private_interfaces (the default route's interface
only, so a connection takes one port of the range per address family instead of one per
interface, and its private address stays for direct calls inside the office). Neither
default (every interface: more ports, and paths the firewall does not open) nor
disable_non_proxied_udp (no UDP at all without a UDP-capable proxy).
WebRtcLocalIpsAllowedUrls is left out: it would expose real private addresses to a page in
place of mDNS names, which nothing here needs.

Standard output is the JSON alone; where the file goes is printed to standard error, and
with --explain also the firewall opening that matches the policy and the server: UDP from
the range to the server's TURN port ({port} by default), and TCP to its TURN ports as the
fallback. Chromium on Linux reads /etc/chromium/policies/managed/*.json, Google Chrome
/etc/opt/chrome/policies/managed/*.json; on Windows use Group Policy (Google's ADMX
templates) or the registry (HKLM\\SOFTWARE\\Policies\\Google\\Chrome, string values of the
same names), on macOS a configuration profile for com.google.Chrome. Microsoft Edge takes
WebRtcUdpPortRange as it is and the IP handling as WebRtcLocalhostIpHandling
(AllowPublicInterfaceOnly, AllowPublicAndPrivateInterfaces). Restart the browser and check
chrome://policy. tsunagu's own tests prove it with Chromium behind a router that lets UDP
out from the range only.

Every option of 'tsunagu serve' is accepted (-c FILE and flags, see 'tsunagu serve --help'),
so that the same command line or file gives the matching policy; those read here are
--ice-transport-policy, --public-host, --external-ip, --listening-ip, --listening-port,
--tls-listening-port, --aux-server, --min-port, --max-port, --no-turn, --stun-only,
--no-udp, --no-tcp and --no-tls.
"""

_READ_HERE = frozenset(
    {
        "config",
        "ice_transport_policy",
        "public_host",
        "external_ips",
        "listening_ips",
        "listening_port",
        "tls_listening_port",
        "aux_servers",
        "min_port",
        "max_port",
        "no_turn",
        "stun_only",
        "no_udp",
        "no_tcp",
        "no_tls",
    }
)


def _port_range(text: str) -> PortRange:
    try:
        return PortRange.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser(prog: str) -> argparse.ArgumentParser:
    server = build_parser(prog, add_help=False)
    # The server's other options are accepted but not listed: the help is about the policy.
    for action in server._actions:
        if action.dest not in _READ_HERE:
            action.help = argparse.SUPPRESS
    parser = argparse.ArgumentParser(
        prog=prog,
        allow_abbrev=False,
        parents=[server],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_DESCRIPTION.format(
            default=DEFAULT_UDP_PORTS.text,
            minimum=MIN_UDP_PORTS,
            port=Config().listening_port,
        ),
    )
    parser.add_argument(
        "browser", choices=["chrome"], help="Chrome and Chromium (Microsoft Edge: see above)"
    )
    parser.add_argument(
        "--browser-udp-ports",
        type=_port_range,
        default=DEFAULT_UDP_PORTS,
        metavar="LOW-HIGH",
        help=f"local UDP ports browsers may use (default: {DEFAULT_UDP_PORTS.text})",
    )
    parser.add_argument(
        "--explain",
        action="store_true",
        help="also print what each policy does and the matching firewall opening (stderr)",
    )
    return parser


def policy_command(argv: list[str], prog: str) -> int:
    """``tsunagu policy chrome``: print the managed policy JSON; notes go to stderr."""
    args = _parser(prog).parse_args(argv)
    ports: PortRange = args.browser_udp_ports
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    policy = chrome_policy(config, ports)
    sys.stdout.write(json.dumps(policy, indent=2, sort_keys=True) + "\n")
    notes = placement(config)
    if args.explain:
        notes = explanation(config, ports) + "\n" + notes
    sys.stderr.write(notes)
    return 0
