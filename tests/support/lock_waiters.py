"""An application with many threads touching one file through a mount, for the shared-mode
tests of locks held by another host: ``python lock_waiters.py PATH READERS STATS
[links]``.

Each of READERS threads opens PATH and reads one page of it (threads take pages 0, 1
and 2 in turn), and each of STATS threads stats it, all at once; with ``links``,
stat thread N stats PATH.N instead (a hard link to it: the kernel sends one lookup
per name, where it makes concurrent lookups of one name wait for the first).  Prints ``started``
once every thread is ready, then lets them go; then one JSON line per thread as it ends:
``{"kind": "read"|"stat", "outcome": "ok"|ERRNO NAME, "seconds": S}``.  Run it in its
own process: a test may SIGKILL it while its threads wait in the kernel.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import threading
import time

PAGE = 4096


def main() -> None:
    path, readers, stats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    links = sys.argv[4:] == ["links"]
    lock = threading.Lock()
    go = threading.Event()

    def report(kind: str, outcome: str, start: float) -> None:
        line = json.dumps({"kind": kind, "outcome": outcome, "seconds": time.monotonic() - start})
        with lock:
            print(line, flush=True)

    def read(index: int) -> None:
        go.wait()
        start = time.monotonic()
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.pread(fd, PAGE, (index % 3) * PAGE)
            finally:
                os.close(fd)
        except OSError as exc:
            report("read", errno.errorcode.get(exc.errno or 0, str(exc.errno)), start)
            return
        report("read", "ok", start)

    def stat(index: int) -> None:
        go.wait()
        start = time.monotonic()
        try:
            os.stat(f"{path}.{index}" if links else path)
        except OSError as exc:
            report("stat", errno.errorcode.get(exc.errno or 0, str(exc.errno)), start)
            return
        report("stat", "ok", start)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(readers)]
    threads += [threading.Thread(target=stat, args=(i,)) for i in range(stats)]
    for thread in threads:
        thread.start()
    print("started", flush=True)
    go.set()
    for thread in threads:
        thread.join()


if __name__ == "__main__":
    main()
