"""What an attacker plants for the tests: a shared library that records being loaded, and a
TCP listener on 127.0.0.1 that counts connections (a KMS endpoint of their own)."""

from __future__ import annotations

import socket
import subprocess
import threading
from pathlib import Path


def build_planted_module(tmp_path: Path) -> tuple[Path, Path]:
    """(library, marker): the library's constructor writes *marker* when it is loaded."""
    marker = tmp_path / "module-was-loaded"
    source = tmp_path / "evil.c"
    source.write_text(
        "#include <stdio.h>\n"
        "__attribute__((constructor)) static void loaded(void) {\n"
        f'  FILE *f = fopen("{marker}", "w"); if (f) {{ fputs("loaded", f); fclose(f); }}\n'
        "}\n"
    )
    library = tmp_path / "evil.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", library, source], check=True)
    return library, marker


class Listener:
    """A TCP listener on 127.0.0.1 that counts connections (the attacker's 'KMS')."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
        self.sock.close()
