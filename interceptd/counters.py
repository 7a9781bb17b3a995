"""Names of interceptd's per-worker counters (index = position in shm)."""
from __future__ import annotations

from tcpcopyd.health import kinds

KIND = 2        # the kind number of interceptd's shm segments

COUNTERS = (
    ("queued", "target packets read from the NFQUEUE (all dropped: fail-closed)"),
    ("malformed", "queued packets that are not TCP/IPv4 or TCP/IPv6 (dropped, skipped)"),
    ("routed", "reply headers sent to the tcpcopyd that registered the session"),
    ("delayed", "reply headers held until their session is registered"),
    ("delay_expired", "held reply headers whose session never registered"),
    ("delay_full", "reply headers dropped because the delay table was full"),
    ("slow_peer_dropped", "reply headers dropped because a tcpcopyd stopped reading"),
    ("client_add", "CLIENT_ADD messages"),
    ("client_del", "CLIENT_DEL messages"),
    ("bad_messages", "control messages of an unknown type (skipped)"),
    ("peers", "gauge: connected tcpcopyd control connections"),
    ("peers_accepted", "control connections accepted"),
    ("routes", "gauge: registered sessions"),
    ("queue_drops", "packets the kernel dropped because the queue was full"),
    ("handed_off", "reply headers handed to the worker holding their connection"),
    ("handed_in", "reply headers received from other workers"),
    ("handoff_full", "reply headers dropped because a hand-off ring was full"),
    ("route_table_full", "sessions not published in the shared route table (full)"),
    ("peers_refused", "control connections from addresses not in `allow`"),
    ("peers_over_limit", "control connections closed at once: max_connections(_per_address)"),
    ("peers_displaced", "connections still in their handshake (or refused) ended to make room "
                        "for a new one at max_connections(_per_address)"),
    ("handshake_timeouts", "control connections closed: no handshake within the time allowed"),
    ("bad_peers", "control connections closed: the first message was not the version"),
    ("auth_failures", "control connections closed: no (or a wrong) proof of the secret, "
     "or a batch with a wrong tag"),
    ("routes_refused", "registrations of a session another peer address holds (refused)"),
    ("routes_over_limit", "registrations refused: max_routes(_per_connection) reached"),
    ("replies_foreign", "replies whose source is not their session's registered target"),
    ("peers_payload", "gauge: connected tcpcopyd control connections that asked for the "
                      "first bytes of the target's answers (a comparison test)"),
    ("accept_paused", "times accept stopped for a while: out of file descriptors"),
    ("queued_ipv6", "target packets read that are IPv6 (of queued; the others are IPv4)"),
)
NAMES = tuple(name for name, _ in COUNTERS)
HELP = dict(COUNTERS)
INDEX = {name: i for i, name in enumerate(NAMES)}
GAUGES = frozenset({"peers", "routes", "peers_payload"})
# counters whose rise means replies that did not reach their tcpcopyd (status: "drops
# rising")
DROPS = frozenset({"queue_drops", "delay_expired", "delay_full", "slow_peer_dropped",
                   "handoff_full", "route_table_full", "routes_over_limit"})
kinds.register(KIND, "interceptd", COUNTERS, GAUGES, DROPS)
