"""Shunt TLS sessions once their handshake is complete (trigger `ssl`).

After the handshake a TLS session's bytes tell the analyser nothing more. `ssl_established`
needs handshake messages from both sides (Zeek's rule), so a client alone cannot get its
traffic shunted by sending something that merely looks like TLS.
"""

from shuntd.policy import shunt

# "I shunt every connection at ssl_established with trigger `ssl`, unconditionally": lets XDP
# follow TLS handshakes itself and start dropping on the packet that completes one (early
# shunts, --early-port), without waiting for the daemon; the daemon adopts the entry when its
# own analyser reaches ssl_established. Remove this line if ssl_established below ever gets
# a condition.
EARLY_SHUNT = "ssl"


def ssl_established(conn):
    shunt(conn, "ssl")
