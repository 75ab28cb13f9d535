"""TCP endpoint state numbers (Zeek's TCP_ENDPOINT_*, also the script constants)."""

INACTIVE = 0
SYN_SENT = 1
SYN_ACK_SENT = 2
PARTIAL = 3
ESTABLISHED = 4
CLOSED = 5
RESET = 6

HANDSHAKE_STATES = frozenset((INACTIVE, SYN_SENT, SYN_ACK_SENT))
