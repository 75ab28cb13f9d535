#!/usr/bin/env python3
"""Traffic for the veth lab: TLS sessions and a bulk transfer from client to server namespace.

Run by `scripts/veth-lab traffic`; it starts itself once inside each namespace (`ip netns exec`)
as the server and the client. Prints what was sent, so a person (or a test) can compare it with
conn.log. Only the lab's own addresses are ever contacted.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TLS_PORT = 443
BULK_PORT = 9000
TLS_REPLY = 1_000_000
SERVER_THINK = 0.3  # seconds before the reply: time for the sensor to shunt the session


def make_cert(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "lab.crt", directory / "lab.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=shuntd-lab",
         "-days", "1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


def serve(args: argparse.Namespace) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    tls = socket.create_server(("0.0.0.0", TLS_PORT))
    bulk = socket.create_server(("0.0.0.0", BULK_PORT))
    print("ready", flush=True)
    for _ in range(args.tls_sessions):
        conn, _addr = tls.accept()
        with ctx.wrap_socket(conn, server_side=True) as s:
            s.recv(1024)
            time.sleep(SERVER_THINK)
            s.sendall(b"x" * TLS_REPLY)
            s.unwrap()
    if args.bulk_mb:
        conn, _addr = bulk.accept()
        with conn:
            received = 0
            while chunk := conn.recv(1 << 16):
                received += len(chunk)
        print(f"bulk received {received}", flush=True)


def client(args: argparse.Namespace) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for i in range(args.tls_sessions):
        with socket.create_connection((args.server, TLS_PORT), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="shuntd-lab") as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: shuntd-lab\r\n\r\n")
                got = 0
                while got < TLS_REPLY:
                    chunk = s.recv(1 << 16)
                    if not chunk:
                        break
                    got += len(chunk)
                try:
                    s.unwrap()
                except (ssl.SSLError, OSError):
                    pass
        print(f"tls session {i + 1}: {got} bytes received", flush=True)
    if args.bulk_mb:
        block = b"b" * (1 << 16)
        total = args.bulk_mb * 1_000_000
        with socket.create_connection((args.server, BULK_PORT), timeout=10) as s:
            sent = 0
            while sent < total:
                n = min(len(block), total - sent)
                s.sendall(block[:n])
                sent += n
        print(f"bulk sent {sent} bytes", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--role", choices=["server", "client"])
    ap.add_argument("--cli-ns", default="shuntd-lab-cli")
    ap.add_argument("--srv-ns", default="shuntd-lab-srv")
    ap.add_argument("--server", default="10.77.0.2")
    ap.add_argument("--tls-sessions", type=int, default=5)
    ap.add_argument("--bulk-mb", type=int, default=20)
    ap.add_argument("--cert")
    ap.add_argument("--key")
    args = ap.parse_args()
    if args.role == "server":
        serve(args)
        return 0
    if args.role == "client":
        client(args)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = make_cert(Path(tmp))
        me = [sys.executable, os.path.abspath(__file__), "--tls-sessions", str(args.tls_sessions),
              "--bulk-mb", str(args.bulk_mb), "--server", args.server]
        server = subprocess.Popen(
            ["ip", "netns", "exec", args.srv_ns, *me, "--role", "server", "--cert", str(cert),
             "--key", str(key)], stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None
            if server.stdout.readline().strip() != "ready":
                print("lab_traffic: server did not start", file=sys.stderr)
                return 1
            rc = subprocess.run(["ip", "netns", "exec", args.cli_ns, *me, "--role", "client"],
                                timeout=300).returncode
            out, _ = server.communicate(timeout=60)
            sys.stdout.write(out)
            return rc or server.returncode
        finally:
            if server.poll() is None:
                server.kill()
            time.sleep(0)


if __name__ == "__main__":
    sys.exit(main())
