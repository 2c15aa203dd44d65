"""``tsunagu serve``: the configuration turned into running parts.

``main.serve`` runs one worker process; worker 0 starts the others. Its parts, lowest first:
``settings`` (what the configuration means for a worker), ``banner`` (the start-up output),
``userdb`` (the user database of a worker), ``turn_side`` (the core, its listeners, the
multi-worker start and the drain), ``running`` (what a reload changes), ``control`` (the
admin API and the metrics endpoints).
"""

from __future__ import annotations

from .banner import internal_network_line
from .main import serve
from .settings import (
    Endpoints,
    aux_addresses,
    certificate_hosts,
    credential_store,
    listening_addresses,
    listening_ports,
    local_addresses,
    nat_discovery,
    own_addresses,
    peer_policy,
    settings_from_config,
    turn_endpoints,
    web_serves_https,
)

__all__ = [
    "Endpoints",
    "aux_addresses",
    "certificate_hosts",
    "credential_store",
    "internal_network_line",
    "listening_addresses",
    "listening_ports",
    "local_addresses",
    "nat_discovery",
    "own_addresses",
    "peer_policy",
    "serve",
    "settings_from_config",
    "turn_endpoints",
    "web_serves_https",
]
