"""Shunt bulk transfers (trigger `bulk`): once a connection has sent 10 packets, watch for
1 MB of IP bytes in either direction and shunt it when one direction crosses that."""

from shuntd.policy import set_bytes_threshold, set_packets_threshold, shunt

WATCH_AFTER_PACKETS = 10
BULK_BYTES = 1_000_000


def new_connection(conn):
    set_packets_threshold(conn, WATCH_AFTER_PACKETS)


def packets_threshold_crossed(conn, threshold, is_orig=None):
    set_bytes_threshold(conn, BULK_BYTES, True)
    set_bytes_threshold(conn, BULK_BYTES, False)


def bytes_threshold_crossed(conn, threshold, is_orig):
    shunt(conn, "bulk")
