#!/usr/bin/env python3
"""Client for the idle-connection memory scenario.

Opens N TCP connections to ADDR:PORT one after another (blocking connect,
5 s timeout each), prints "ready <opened> <failed>" and then holds them all,
idle, until a line (or EOF) arrives on stdin; then closes them and exits.
Usage: idle_client.py ADDR PORT N
"""
import resource
import socket
import sys


def main():
    addr, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    hard = 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
    socks, failed = [], 0
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect((addr, port))
            socks.append(s)
        except OSError:
            failed += 1
            s.close()
            if failed > 50:
                break
    print(f"ready {len(socks)} {failed}", flush=True)
    sys.stdin.readline()
    for s in socks:
        s.close()


if __name__ == "__main__":
    main()
