"""Shunt bulk transfers (trigger `bulk`): a connection is shunted once one direction has sent
1 MB of IP bytes.

Both directions are watched from the connection's first packet. (Watching only from a
direction's 10th packet on, as this policy first did, changed nothing: an IP packet is at most
65,535 bytes, so 1 MB takes a direction at least 16 packets; it only cost a second event on
every connection that got that far.)"""

from shuntd.policy import set_bytes_threshold, shunt

BULK_BYTES = 1_000_000


def new_connection(conn):
    set_bytes_threshold(conn, BULK_BYTES, True)
    set_bytes_threshold(conn, BULK_BYTES, False)


def bytes_threshold_crossed(conn, threshold, is_orig):
    shunt(conn, "bulk")
