"""Shunt VPN tunnels once both ends are talking (the payload is encrypted end to end).

WireGuard (UDP 51820): shunted by connection after packets from both sides (trigger
`wireguard`). IPsec: ESP carries no ports and Zeek drops it before connection tracking, so when
an IKE exchange (UDP 500 or 4500) gets answers, the two gateways are shunted by IP pair, which
covers their ESP (trigger `ipsec`).
"""

from shuntd.policy import set_packets_threshold, shunt, shunt_ip_pair

WIREGUARD_PORTS = {51820}
IKE_PORTS = {500, 4500}
PACKETS_BEFORE_SHUNT = 4


def new_connection(conn):
    if conn.proto == "udp" and conn.id.resp_p in WIREGUARD_PORTS | IKE_PORTS:
        set_packets_threshold(conn, PACKETS_BEFORE_SHUNT)


def packets_threshold_crossed(conn, threshold, is_orig=None):
    if conn.resp.num_pkts == 0:
        return  # one-sided: nobody answered, keep watching
    if conn.id.resp_p in IKE_PORTS:
        shunt_ip_pair(conn.id.orig_h, conn.id.resp_h, "ipsec")
    elif conn.id.resp_p in WIREGUARD_PORTS:
        shunt(conn, "wireguard")
