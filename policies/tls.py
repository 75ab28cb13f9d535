"""Shunt TLS sessions once their handshake is complete (trigger `ssl`).

After the handshake a TLS session's bytes tell the analyser nothing more. `ssl_established`
needs handshake messages from both sides (Zeek's rule), so a client alone cannot get its
traffic shunted by sending something that merely looks like TLS.
"""

from shuntd.policy import shunt


def ssl_established(conn):
    shunt(conn, "ssl")
