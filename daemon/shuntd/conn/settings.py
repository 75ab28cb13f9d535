"""Every Zeek option the connection engine honours, in one dataclass.

The CLI (and later a TOML config) fills an `EngineSettings`; nothing else in `conn/` reads
options from anywhere. Defaults are Zeek's (spec zeek-conn.md §5.1, §3.1, §1.8).
"""

from __future__ import annotations

import dataclasses

TCP = 6
UDP = 17
ICMP = 1
ICMP6 = 58

# Tunnel ports registered by base/packet-protocols: present even in bare mode (spec §0.2).
TUNNEL_UDP_PORTS: frozenset[int] = frozenset({2123, 2152, 3544, 4754, 4789, 5072, 6081})

# likely_server_ports with all base/protocols loaded (`zeek -r`, spec §3.1).
DEFAULT_TCP_SERVER_PORTS: frozenset[int] = frozenset({
    21, 2811, 22, 25, 587, 53, 79, 80, 81, 631, 1080, 3128, 8000, 8080, 8888, 88, 135, 139, 445,
    143, 389, 3268, 443, 465, 563, 585, 614, 636, 989, 990, 992, 993, 995, 5223, 502, 514,
    1434, 3306, 1883, 3389, 5222, 5269, 5432, 6379, 6666, 6667, 6668, 6669, 20000,
})
DEFAULT_UDP_SERVER_PORTS: frozenset[int] = frozenset({
    53, 137, 5353, 5355, 67, 4011, 88, 123, 161, 162, 389, 443, 514, 1812, 3389, 5060, 20000,
}) | TUNNEL_UDP_PORTS

# Ports each base protocol script registers as server ports, for bare mode (`zeek -b`) runs
# that @load a few protocols (spec §0.2, §3.1).
PROTOCOL_SERVER_PORTS: dict[str, tuple[frozenset[int], frozenset[int]]] = {
    # name: (tcp ports, udp ports)
    "ftp": (frozenset({21, 2811}), frozenset()),
    "ssh": (frozenset({22}), frozenset()),
    "smtp": (frozenset({25, 587}), frozenset()),
    "dns": (frozenset({53}), frozenset({53, 137, 5353, 5355})),
    "finger": (frozenset({79}), frozenset()),
    "http": (frozenset({80, 81, 631, 1080, 3128, 8000, 8080, 8888}), frozenset()),
    "krb": (frozenset({88}), frozenset({88})),
    "dce-rpc": (frozenset({135}), frozenset()),
    "smb": (frozenset({139, 445}), frozenset()),
    "imap": (frozenset({143}), frozenset()),
    "ldap": (frozenset({389, 3268}), frozenset({389})),
    "ssl": (frozenset({443, 465, 563, 585, 614, 636, 989, 990, 992, 993, 995, 5223}),
            frozenset()),
    "dtls": (frozenset(), frozenset({443})),
    "quic": (frozenset(), frozenset({443})),
    "modbus": (frozenset({502}), frozenset()),
    "syslog": (frozenset({514}), frozenset({514})),
    "socks": (frozenset({1080}), frozenset()),
    "mysql": (frozenset({1434, 3306}), frozenset()),
    "mqtt": (frozenset({1883}), frozenset()),
    "rdp": (frozenset({3389}), frozenset({3389})),
    "xmpp": (frozenset({5222, 5269}), frozenset()),
    "postgresql": (frozenset({5432}), frozenset()),
    "redis": (frozenset({6379}), frozenset()),
    "irc": (frozenset({6666, 6667, 6668, 6669}), frozenset()),
    "dnp3": (frozenset({20000}), frozenset({20000})),
    "dhcp": (frozenset(), frozenset({67, 4011})),
    "ntp": (frozenset(), frozenset({123})),
    "snmp": (frozenset(), frozenset({161, 162})),
    "radius": (frozenset(), frozenset({1812})),
    "sip": (frozenset(), frozenset({5060})),
    # Loaded by default but registering no ports.
    "conn": (frozenset(), frozenset()),
    "ntlm": (frozenset(), frozenset()),
    "pop3": (frozenset(), frozenset()),
    "rfb": (frozenset(), frozenset()),
    "websocket": (frozenset(), frozenset()),
}

# Site::private_address_space (spec §1.8): local unless private_address_space_is_local=F.
PRIVATE_ADDRESS_SPACE: tuple[str, ...] = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/24", "239.0.0.0/8", "240.0.0.0/4",
    "255.255.255.255/32",
    "2002::/24", "2002:a00::/24", "2002:6440::/26", "2002:7f00::/24", "2002:a9fe::/32",
    "2002:ac10::/28", "2002:c000::/40", "2002:c000:200::/40", "2002:c0a8::/32",
    "2002:c612::/31", "2002:c633:6400::/40", "2002:cb00:7100::/40", "2002:e000::/40",
    "2002:ef00::/24", "2002:f000::/20", "2002:ffff:ffff::/48",
    "::/128", "::1/128", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:2::/48",
    "2001:db8::/32", "fc00::/7", "fe80::/10", "fec0::/10",
)


def bare_server_ports(protocols: list[str]) -> tuple[frozenset[int], frozenset[int]]:
    """likely_server_ports of `zeek -b` loading only `protocols` (tunnel ports always)."""
    tcp: set[int] = set()
    udp: set[int] = set(TUNNEL_UDP_PORTS)
    for name in protocols:
        if name not in PROTOCOL_SERVER_PORTS:
            raise ValueError(f"unknown protocol {name!r} for likely server ports; known: "
                             + ", ".join(sorted(PROTOCOL_SERVER_PORTS)))
        t, u = PROTOCOL_SERVER_PORTS[name]
        tcp |= t
        udp |= u
    return frozenset(tcp), frozenset(udp)


@dataclasses.dataclass
class EngineSettings:
    """Zeek's timeouts and options for connection tracking (names follow Zeek's globals)."""

    tcp_inactivity_timeout: float = 300.0
    udp_inactivity_timeout: float = 60.0
    icmp_inactivity_timeout: float = 60.0
    unknown_ip_inactivity_timeout: float = 60.0
    tcp_SYN_timeout: float = 5.0  # noqa: N815 (Zeek's name)
    tcp_session_timer: float = 6.0
    tcp_connection_linger: float = 5.0
    tcp_attempt_delay: float = 5.0
    tcp_close_delay: float = 5.0
    tcp_reset_delay: float = 5.0
    tcp_partial_close_delay: float = 3.0
    max_timer_expires: int = 300
    # Conn::port_inactivity_timeouts, applied at connection_established (spec §5.1).
    port_inactivity_timeouts: dict[int, float] = dataclasses.field(
        default_factory=lambda: {21: 3600.0, 22: 3600.0, 23: 3600.0, 513: 3600.0})
    # -C: verify no checksums.
    ignore_checksums: bool = False
    # Site::local_nets (CIDR strings) and whether the private space is merged in.
    local_nets: tuple[str, ...] = ()
    private_address_space_is_local: bool = True
    # likely_server_ports per transport; default mode (all base scripts loaded).
    likely_tcp_ports: frozenset[int] = DEFAULT_TCP_SERVER_PORTS
    likely_udp_ports: frozenset[int] = DEFAULT_UDP_SERVER_PORTS
    # TCP reassembly limits (Zeek globals of the same names).
    tcp_max_initial_window: int = 16384
    tcp_max_above_hole_without_any_acks: int = 16384
    tcp_excessive_data_without_further_acks: int = 10 * 1024 * 1024
    report_gaps_for_partial: bool = False
    # ConnSize analyzer on (orig_pkts/..._ip_bytes are set).
    conn_size: bool = True
    # Tunnel::delay_teredo_confirmation / delay_gtp_confirmation (conn/tunnels.py).
    delay_teredo_confirmation: bool = True
    delay_gtp_confirmation: bool = False
    # Bound on tracked connections; past it the longest-inactive are evicted (conn/bound.py).
    max_connections: int = 1_000_000
