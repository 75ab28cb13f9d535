"""Protocol analysers used for service detection (Zeek's analyzer tree, reduced to what sets
`service` and `ssl_established`).

Every analyser is a small incremental parser over one connection's payload. It never raises
on bad input: it records a verdict in plain attributes that `conn.service` reads after each
delivery (`confirmed`, `violation`, `done`), so the hot path has no callbacks or exceptions.
"""
