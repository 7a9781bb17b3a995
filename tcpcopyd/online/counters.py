"""Names of tcpcopyd's per-worker counters (index = position in shm)."""
from __future__ import annotations

from typing import Final

from tcpcopyd.health import kinds

KIND = 1        # the kind number of tcpcopyd's shm segments

COUNTERS = (
    ("captured", "client packets read from the capture socket"),
    ("malformed", "captured packets that are not well-formed TCP/IPv4 or TCP/IPv6 "
                  "(skipped)"),
    ("no_session", "captured packets without payload for no known session (skipped)"),
    ("duplicate", "captured client data already queued (client retransmission)"),
    ("out_of_order", "captured client data ahead of a gap, held until the gap fills"),
    ("sent", "packets sent to the target"),
    ("send_errors", "raw-socket sends that failed"),
    ("bytes_sent", "client payload bytes sent to the target (first transmissions)"),
    ("replies", "reply headers received from interceptd"),
    ("replies_no_session", "reply headers for no live session (late or foreign)"),
    ("replies_malformed", "reply headers that could not be parsed (skipped)"),
    ("sessions_opened", "sessions started from a captured SYN"),
    ("sessions_fake", "sessions started with a fake SYN (opened before we started)"),
    ("sessions_closed", "sessions that ended normally (FIN both ways, or client RST)"),
    ("sessions_expired", "sessions ended by the idle timeout (-t)"),
    ("sessions_target_rst", "sessions the target reset"),
    ("sessions_reused", "sessions replaced by a new SYN on the same client port"),
    ("sessions_overflow", "sessions reset because their buffer exceeded the limit"),
    ("sessions_evicted", "sessions reset because the shm table was full"),
    ("sessions_gave_up", "sessions reset after too many retransmissions"),
    ("sessions_broken", "sessions reset because a capture gap never filled"),
    ("sessions_active", "gauge: live sessions"),
    ("retransmits", "segments sent again on timeout"),
    ("fast_retransmits", "segments sent again after 3 duplicate ACKs"),
    ("paced", "requests held until the target answered the previous one"),
    ("kernel_drops", "packets the kernel dropped before we read them"),
    ("control_connects", "control connections established to interceptd"),
    ("control_errors", "control connections lost or refused"),
    ("sessions_restored", "sessions a new worker carried on from the shm table"),
    ("sessions_resynced", "restored sessions whose lost data made us reopen them at the "
                          "client's next request (fake SYN at its sequence number)"),
    ("handshake_restarts", "handshakes started again because the target refused our ACK of an "
                           "old SYN-ACK"),
    ("oversize_frames", "captured frames larger than the MTU (GRO/TSO), cut to the MSS"),
    ("not_sampled", "captured packets of sessions -r leaves out (not copied)"),
    ("not_from_syn", "captured packets of sessions whose SYN was not seen (-O)"),
    ("sessions_refused", "sessions not opened: the buffers reached -m"),
    ("port_reuse_held", "new sessions that waited for the previous session of their client port "
                        "to deliver its data first"),
    ("sessions_torn", "sessions lost because their worker died in the middle of writing their "
                      "shm slot (cleared by the next worker)"),
    ("resets_out_of_window", "resets from the target side ignored: not at our next expected "
                             "sequence number nor in our window (forged?)"),
    ("challenge_acks", "resets in our window but not exact: answered with an ACK (RFC 5961), "
                       "the session goes on"),
    ("stale_connections_reset", "older connections of the target on a port our SYN met (it "
                                "answered with an ACK): reset, SYN sent again"),
    ("out_of_window", "captured client data further ahead than a session may buffer (dropped: "
                      "forged, or a session that cannot be whole)"),
    ("lag_drops", "captured packets dropped for being older than --max-lag (the worker had "
                  "fallen behind: the copy stays live)"),
    ("capture_lag_ms", "gauge: how old the packets the worker reads are, ms (0: none waiting)"),
    ("capture_lag_peak_ms", "gauge: the oldest packet handed on in the last 0.1 s, ms"),
    ("exchanges", "comparison test: exchanges (a request and its answers online and on "
                  "the target) handed to the master for compare_log"),
    ("compare_dropped", "comparison test: exchanges dropped because the master did not "
                        "take them in time (its ring was full)"),
    ("compare_answers_lost", "comparison test: online answers dropped because more than "
                             "64 of one connection's answers came before their requests "
                             "were read (those exchanges show an online size too small)"),
    ("held_no_link", "packets not sent to the target because no interceptd held their "
                     "session's registration (its answer would not be caught): sent when a "
                     "link comes up, or by the retransmission timer"),
    ("interface_down", "gauge: 1 while the capture interface is down (nothing to capture; "
                       "capture resumes when it comes back)"),
    ("interface_downs", "times the capture interface went down"),
    ("interface_down_ms", "time the capture interface was down in all, ms (traffic of that "
                          "gap was not copied)"),
    ("not_followed", "captured IPv6 packets whose TCP header could not be reached (a "
                     "fragment, ESP, an extension header chain too long or cut short): "
                     "skipped"),
    ("sessions_ipv6", "sessions started (from a SYN or a fake SYN) of IPv6 clients; the "
                      "others are IPv4"),
    ("capture_gaps", "gaps opened in a client's stream: data captured ahead of data not "
                     "captured (lost before the capture, or reordered; held until the gap "
                     "fills, or the session broken)"),
    ("mirror_duplicates", "--mirror: captured packets identical to one just captured (a "
                          "mirror delivering the same packet twice): skipped"),
    ("truncated", "captured packets shorter than their IP length says (a mirror that cuts "
                  "packets): the data that arrived is used, the rest is a gap"),
    ("strays_handed", "workers auto: captured packets of a session another worker holds "
                      "(the pool grew or shrank since it opened), handed to that worker"),
    ("strays_taken", "workers auto: packets of this worker's sessions that another worker "
                     "captured and handed over"),
    ("strays_lost", "workers auto: packets of another worker's session that could not be "
                    "handed over (its inbox was full): not copied"),
    ("pool_shared", "gauge: 1 while this worker shares the pool with others (its sessions "
                    "published for them to find)"),
)
NAMES = tuple(name for name, _ in COUNTERS)
HELP = dict(COUNTERS)
INDEX = {name: i for i, name in enumerate(NAMES)}
# the indexes of the counters the engine adds to, by their names in upper case (Final: the
# compiled modules read them as C constants, not from this module's dict)
CAPTURED: Final = INDEX["captured"]
MALFORMED: Final = INDEX["malformed"]
NO_SESSION: Final = INDEX["no_session"]
DUPLICATE: Final = INDEX["duplicate"]
OUT_OF_ORDER: Final = INDEX["out_of_order"]
SENT: Final = INDEX["sent"]
SEND_ERRORS: Final = INDEX["send_errors"]
BYTES_SENT: Final = INDEX["bytes_sent"]
REPLIES: Final = INDEX["replies"]
REPLIES_NO_SESSION: Final = INDEX["replies_no_session"]
REPLIES_MALFORMED: Final = INDEX["replies_malformed"]
NOT_SAMPLED: Final = INDEX["not_sampled"]
NOT_FROM_SYN: Final = INDEX["not_from_syn"]
PORT_REUSE_HELD: Final = INDEX["port_reuse_held"]
OUT_OF_WINDOW: Final = INDEX["out_of_window"]
SESSIONS_OPENED: Final = INDEX["sessions_opened"]
SESSIONS_FAKE: Final = INDEX["sessions_fake"]
SESSIONS_REFUSED: Final = INDEX["sessions_refused"]
RESETS_OUT_OF_WINDOW: Final = INDEX["resets_out_of_window"]
CHALLENGE_ACKS: Final = INDEX["challenge_acks"]
STALE_CONNECTIONS_RESET: Final = INDEX["stale_connections_reset"]
HANDSHAKE_RESTARTS: Final = INDEX["handshake_restarts"]
FAST_RETRANSMITS: Final = INDEX["fast_retransmits"]
RETRANSMITS: Final = INDEX["retransmits"]
PACED: Final = INDEX["paced"]
HELD_NO_LINK: Final = INDEX["held_no_link"]
SESSIONS_ACTIVE: Final = INDEX["sessions_active"]
SESSIONS_RESTORED: Final = INDEX["sessions_restored"]
SESSIONS_TORN: Final = INDEX["sessions_torn"]
OVERSIZE: Final = INDEX["oversize_frames"]
CAPTURE_GAPS: Final = INDEX["capture_gaps"]
MIRROR_DUPLICATES: Final = INDEX["mirror_duplicates"]
TRUNCATED: Final = INDEX["truncated"]
NOT_FOLLOWED: Final = INDEX["not_followed"]
SESSIONS_IPV6: Final = INDEX["sessions_ipv6"]
STRAYS_HANDED: Final = INDEX["strays_handed"]
STRAYS_TAKEN: Final = INDEX["strays_taken"]
STRAYS_LOST: Final = INDEX["strays_lost"]
POOL_SHARED: Final = INDEX["pool_shared"]
# why a session ended: the counter its end adds to
SESSIONS_CLOSED: Final = INDEX["sessions_closed"]
SESSIONS_EXPIRED: Final = INDEX["sessions_expired"]
SESSIONS_TARGET_RST: Final = INDEX["sessions_target_rst"]
SESSIONS_REUSED: Final = INDEX["sessions_reused"]
SESSIONS_OVERFLOW: Final = INDEX["sessions_overflow"]
SESSIONS_EVICTED: Final = INDEX["sessions_evicted"]
SESSIONS_GAVE_UP: Final = INDEX["sessions_gave_up"]
SESSIONS_BROKEN: Final = INDEX["sessions_broken"]
SESSIONS_RESYNCED: Final = INDEX["sessions_resynced"]
# gauges are set, not added up over time
GAUGES = frozenset({"sessions_active", "capture_lag_ms", "capture_lag_peak_ms",
                    "interface_down", "pool_shared"})
# counters whose rise means traffic that was not copied whole (status: "drops rising")
DROPS = frozenset({"kernel_drops", "lag_drops", "send_errors", "sessions_overflow",
                   "sessions_evicted", "sessions_gave_up", "sessions_broken",
                   "sessions_refused", "sessions_torn", "strays_lost"})
kinds.register(KIND, "tcpcopyd", COUNTERS, GAUGES, DROPS)
