#!/usr/bin/env python3
"""Backend for the idle-connection memory scenario.

Listens on ADDR:PORT, accepts every connection and holds it open without
reading or writing, and keeps the number of connections it holds in
STATUS_FILE (rewritten whenever it changes).  Exits on SIGTERM.
Usage: holder.py ADDR PORT STATUS_FILE
"""
import os
import resource
import selectors
import socket
import sys


def main():
    addr, port, status = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    hard = 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((addr, port))
    ls.listen(65535)
    ls.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(ls, selectors.EVENT_READ, None)
    held = {}
    last = -1

    def write_status():
        nonlocal last
        n = len(held)
        if n != last:
            tmp = status + ".tmp"
            with open(tmp, "w") as f:
                f.write(str(n))
            os.replace(tmp, status)
            last = n

    write_status()
    while True:
        for key, _ in sel.select(timeout=0.2):
            if key.data is None:
                while True:
                    try:
                        c, _ = ls.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    c.setblocking(False)
                    held[c.fileno()] = c
                    sel.register(c, selectors.EVENT_READ, "conn")
            else:
                # Readable: the peer closed (or sent something). Drop it.
                c = key.fileobj
                try:
                    data = c.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(c)
                    held.pop(c.fileno(), None)
                    c.close()
        write_status()


if __name__ == "__main__":
    main()
