"""shuntd: live XDP shunting daemon with a Zeek-compatible conn.log."""

__version__ = "0.1.0"
