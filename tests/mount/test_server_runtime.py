"""A mount run as a service: sd_notify, signals, stale mounts, status, metrics, logging.

The protocol tests bind a real datagram socket and point NOTIFY_SOCKET at it;
the lifecycle tests run real daemons (foreground ones as our children, so
that their exit status can be checked) and send them real signals.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.cli import BIN, run_kmsfs
from support.fuse import force_unmount, requires_fuse
from support.reliability_util import drop_file_cache
from support.volumes import Volume

from kmsfs.errors import MountError
from kmsfs.server import mountpoint as mountpoint_module
from kmsfs.server import notify
from kmsfs.server.logs import JournalFormatter, stderr_formatter, stderr_is_journal
from kmsfs.server.stats import ProviderStats, percentile

# -- helpers -------------------------------------------------------------------


def write_config(volume: Volume, extra: str = "", provider: str | None = None) -> Path:
    provider = provider or f'type = "local"\nkey_file = "{volume.key_file}"\n'
    path = volume.root / "volume.toml"
    path.write_text(
        f'backing = "{volume.backing}"\nmountpoint = "{volume.mountpoint}"\n{extra}\n'
        f"[provider]\n{provider}"
    )
    return path


def status_json(mountpoint: Path) -> dict[str, Any]:
    result = run_kmsfs("status", mountpoint, "--json")
    info: dict[str, Any] = json.loads(result.stdout)
    return info


def wait_for(predicate: Any, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def answers(mountpoint: Path) -> bool:
    try:
        return os.path.ismount(mountpoint) and os.stat(mountpoint).st_ino == 1
    except OSError:
        return False


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(30)
    try:
        yield sock, str(path)
    finally:
        sock.close()


def receive_until(sock: socket.socket, wanted: str) -> list[str]:
    """Datagrams received until one contains the line *wanted* (inclusive)."""
    messages = []
    while True:
        message = sock.recv(4096).decode()
        messages.append(message)
        if wanted in message.split("\n"):
            return messages


@contextlib.contextmanager
def foreground(
    config: Path, env: dict[str, str], stderr: Any = subprocess.DEVNULL
) -> Iterator[subprocess.Popen[bytes]]:
    """A ``kmsfs mount --foreground`` child; killed at the end if still running."""
    proc = subprocess.Popen(
        [str(BIN), "mount", "--foreground", "--config", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        env={**os.environ, **env},
    )
    with proc:
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# -- sd_notify protocol --------------------------------------------------------


@pytest.mark.nomount
def test_notify_path_socket(notify_socket: tuple[socket.socket, str], monkeypatch: Any) -> None:
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert notify.notify("READY=1", "STATUS=two\nlines")
    assert sock.recv(4096) == b"READY=1\nSTATUS=two lines"
    assert notify.stopping("bye")
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=bye"


@pytest.mark.nomount
def test_notify_abstract_socket(monkeypatch: Any) -> None:
    name = f"kmsfs-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.status("hello")
        assert sock.recv(4096) == b"STATUS=hello"


@pytest.mark.nomount
def test_notify_without_socket(monkeypatch: Any, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert notify.notify("READY=1") is False  # logged, never raised


@pytest.mark.nomount
def test_watchdog_interval(monkeypatch: Any) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert notify.watchdog_interval() == 2.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert notify.watchdog_interval() is None


@requires_fuse
@pytest.mark.mount
def test_ready_after_mount_answers_then_stopping_on_sigterm(
    volume: Volume, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    config = write_config(volume, f'log_file = "{volume.log_file}"\nlog_level = "debug"')
    with foreground(config, {"NOTIFY_SOCKET": path}) as proc:
        messages = receive_until(sock, "READY=1")
        # at READY the mount answers, and the daemon had already seen it answer
        assert answers(volume.mountpoint)
        assert f"ready: {volume.mountpoint} answers" in volume.log_text()
        ready = messages[-1].split("\n")
        assert f"STATUS=serving {volume.mountpoint}" in ready
        assert f"MAINPID={proc.pid}" in ready
        (volume.mountpoint / "f").write_text("kept")

        proc.send_signal(signal.SIGTERM)
        stopping = receive_until(sock, "STOPPING=1")
        assert f"STATUS=unmounting {volume.mountpoint}" in stopping[-1].split("\n")
        assert proc.wait(timeout=30) == 0
    assert not os.path.ismount(volume.mountpoint)


# -- signals and stale mounts --------------------------------------------------


@requires_fuse
@pytest.mark.mount
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_exit_0_data_intact(volume: Volume, signum: int) -> None:
    config = write_config(volume, f'log_file = "{volume.log_file}"')
    closed = os.urandom(1 << 20)
    still_open = os.urandom(3 << 20)
    with foreground(config, {}) as proc:
        wait_for(lambda: answers(volume.mountpoint), what="the mount")
        (volume.mountpoint / "closed").write_bytes(closed)
        # written but neither closed nor fsynced: in the kernel's writeback cache
        handle = open(volume.mountpoint / "open", "wb")  # noqa: SIM115
        handle.write(still_open)
        handle.flush()
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == 0
        try:
            handle.close()
        except OSError:
            pass  # the mount is gone; what matters is what reached the backing files
    assert not os.path.ismount(volume.mountpoint)
    assert f"received {signal.Signals(signum).name}: unmounting" in volume.log_text()
    volume.mount()
    assert (volume.mountpoint / "closed").read_bytes() == closed
    assert (volume.mountpoint / "open").read_bytes() == still_open
    volume.umount()


@requires_fuse
@pytest.mark.mount
def test_stale_mount_after_kill_9_is_recovered(volume: Volume) -> None:
    volume.mount()
    (volume.mountpoint / "f").write_text("survives")
    pid = status_json(volume.mountpoint)["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), what="the daemon to die")
    with pytest.raises(OSError) as info:
        os.listdir(volume.mountpoint)
    assert info.value.errno == errno.ENOTCONN
    volume.mounted = False

    result = volume.mount()
    assert f"detached the stale mount at {volume.mountpoint}" in result.stderr
    assert (volume.mountpoint / "f").read_text() == "survives"
    volume.umount()


@pytest.mark.nomount
def test_stale_mount_that_cannot_be_detached_says_what_to_run(monkeypatch: Any) -> None:
    monkeypatch.setattr(mountpoint_module, "is_stale", lambda path: True)
    monkeypatch.setattr(mountpoint_module.shutil, "which", lambda name: None)
    monkeypatch.setattr(mountpoint_module.os, "geteuid", lambda: 1000)
    with pytest.raises(MountError) as info:
        mountpoint_module.recover_stale_mount("/srv/data")
    assert "stale mount left by a daemon that died" in str(info.value)
    assert "run 'fusermount3 -uz /srv/data'" in str(info.value)


@requires_fuse
@pytest.mark.mount
def test_non_empty_mount_point_refused_unless_asked(volume: Volume) -> None:
    (volume.mountpoint / "hidden").write_text("underneath")
    result = volume.mount(check=False)
    assert result.returncode == 7
    assert "is not empty" in result.stderr and "-o nonempty" in result.stderr
    assert not os.path.ismount(volume.mountpoint)
    config = write_config(volume, 'options = ["nonempty"]')
    run_kmsfs("mount", "--config", config)
    volume.mounted = True
    assert os.listdir(volume.mountpoint) == []
    volume.umount()
    assert (volume.mountpoint / "hidden").read_text() == "underneath"


# -- status and metrics --------------------------------------------------------


@requires_fuse
@pytest.mark.mount
def test_status_figures_move(volume: Volume) -> None:
    volume.mount("--cache-max-entries", "50")
    before = status_json(volume.mountpoint)
    assert before["mountpoint"] == str(volume.mountpoint)
    assert before["backing"] == str(volume.backing)
    config = json.loads((volume.backing / ".kmsfs.json").read_text())
    assert before["volume_id"] == config["volume_id"]
    assert before["providers"][0]["provider"] == "local"
    assert before["providers"][0]["key_ref"] == config["keys"][0]["key_ref"]
    assert before["key_cache"]["max_entries"] == 50
    assert before["open_files"] == 0
    assert before["bytes_written"] == 0

    data = os.urandom(300_000)
    for name in ("a", "b"):
        (volume.mountpoint / name).write_bytes(data)
    handle = open(volume.mountpoint / "a", "rb")  # noqa: SIM115
    try:
        middle = status_json(volume.mountpoint)
        assert middle["open_files"] == 1
    finally:
        handle.close()
    assert middle["bytes_written"] >= 600_000
    calls = middle["provider_calls"]
    assert calls["by_operation"]["generate"]["count"] >= 2
    assert calls["errors"] == 0
    assert calls["latency_ms"]["p50"] is not None
    assert calls["latency_ms"]["p50"] <= calls["latency_ms"]["p99"] <= calls["latency_ms"]["max"]
    assert middle["key_cache"]["size"] >= 2

    drop_file_cache(volume.mountpoint / "b")
    assert (volume.mountpoint / "b").read_bytes() == data
    wait_for(
        lambda: status_json(volume.mountpoint)["open_files"] == 0, what="release of open files"
    )
    after = status_json(volume.mountpoint)
    assert after["bytes_read"] >= before["bytes_read"] + 300_000
    assert after["uptime_seconds"] > before["uptime_seconds"]
    assert after["pid"] == before["pid"]

    text = run_kmsfs("status", volume.mountpoint).stdout
    assert f"volume:         {before['volume_id']}" in text
    assert re.search(r"bytes read:\s+\d+", text)
    assert "key cache:" in text and "provider calls:" in text
    volume.umount()


@requires_fuse
@pytest.mark.mount
def test_status_counts_fuse_requests_per_opcode(volume: Volume) -> None:
    volume.mount()
    before = status_json(volume.mountpoint)["requests"]["by_opcode"]
    assert "CREATE" not in before and "WRITE" not in before
    files = 25
    for i in range(files):
        fd = os.open(volume.mountpoint / f"f{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.write(fd, b"x" * 1000)
        os.close(fd)  # the writeback cache writes the page back before close returns

    def counts() -> dict[str, Any]:
        by_opcode: dict[str, Any] = status_json(volume.mountpoint)["requests"]["by_opcode"]
        return by_opcode

    wait_for(lambda: counts()["RELEASE"]["count"] == files, what="RELEASE of every file")
    with pytest.raises(OSError) as refused:
        os.setxattr(volume.mountpoint / "f0", "security.kmsfs-test", b"v")
    assert refused.value.errno == errno.EOPNOTSUPP
    assert not (volume.mountpoint / "missing").exists()
    after = counts()
    assert after["CREATE"]["count"] == files and after["CREATE"]["errors"] == 0
    assert after["WRITE"]["count"] == files and after["WRITE"]["errors"] == 0
    assert after["RELEASE"]["count"] == files
    # one negative lookup before each create, one for "missing"; none is an error
    assert after["LOOKUP"]["count"] == files + 1 and after["LOOKUP"]["errors"] == 0
    assert after["SETXATTR"] == {**after["SETXATTR"], "count": 1, "errors": 1}
    create = after["CREATE"]
    assert 0 < create["time_max_ms"] <= create["time_total_ms"]
    assert list(create["buckets"])[-1] == "+Inf"
    assert list(create["buckets"].values())[-1] == files
    assert list(create["buckets"].values()) == sorted(create["buckets"].values())
    info = status_json(volume.mountpoint)["requests"]
    assert info["count"] == sum(f["count"] for f in info["by_opcode"].values())

    text = run_kmsfs("status", volume.mountpoint).stdout
    assert re.search(r"FUSE requests:\s+\d+ \(\d+ answered with an error\)", text)
    assert re.search(rf"\n  CREATE\s+{files}\s+0\s+\d+\.\d+\s+\d+\.\d+", text)
    volume.umount()


def test_syncs_of_a_lone_process_run_on_the_loop_and_are_counted(volume: Volume) -> None:
    """FSYNC and FSYNCDIR run their backing sync on the loop thread when no other request
    waits (kmsfs/fs/syncs.py): one process syncing in turn gets most of its syncs that
    way, the status counts each sync once, and the data is there after a remount."""
    volume.mount()
    path = volume.mountpoint / "f"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    try:
        for i in range(10):
            os.pwrite(fd, b"%d" % i, 0)
            os.fdatasync(fd) if i % 2 else os.fsync(fd)
    finally:
        os.close(fd)
    dir_fd = os.open(volume.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    info = status_json(volume.mountpoint)
    by_opcode = info["requests"]["by_opcode"]
    syncs = info["syncs"]
    assert syncs["inline"] + syncs["in_thread"] == 10 + 1
    assert by_opcode["FSYNC"]["count"] == 10 and by_opcode["FSYNCDIR"]["count"] == 1
    assert syncs["inline"] > syncs["in_thread"]
    volume.umount()
    volume.mount()
    assert path.read_bytes() == b"9"
    volume.umount()


@pytest.mark.nomount
def test_status_without_daemon(tmp_path: Path) -> None:
    result = run_kmsfs("status", tmp_path, check=False)
    assert result.returncode == 7
    assert f"no kmsfs daemon answers for {tmp_path}" in result.stderr


@requires_fuse
@pytest.mark.mount
def test_metrics_endpoint(volume: Volume) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    config = write_config(volume, 'metrics_listen = "127.0.0.1:0"')
    run_kmsfs("mount", "--config", config, "--log-file", volume.log_file)
    volume.mounted = True
    url = status_json(volume.mountpoint)["metrics_url"]
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", url)

    def scrape() -> dict[str, float]:
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            text = response.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}"] = sample.value
        return samples

    volume_id = status_json(volume.mountpoint)["volume_id"]

    def key(name: str, **labels: str) -> str:
        labels = {"mountpoint": str(volume.mountpoint), "volume_id": volume_id, **labels}
        return name + "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"

    first = scrape()
    assert first[key("kmsfs_up")] == 1
    assert first[key("kmsfs_written_bytes_total")] == 0
    (volume.mountpoint / "f").write_bytes(b"x" * 50_000)
    second = scrape()
    assert second[key("kmsfs_written_bytes_total")] >= 50_000
    assert second[key("kmsfs_provider_calls_total", operation="generate")] >= 1
    assert key("kmsfs_provider_latency_seconds", quantile="0.5") in second
    assert second[key("kmsfs_key_cache_entries")] >= 1
    creates = second[key("kmsfs_fuse_requests_total", opcode="CREATE")]
    assert creates >= 1
    assert second[key("kmsfs_fuse_request_errors_total", opcode="CREATE")] == 0
    histogram = "kmsfs_fuse_request_duration_seconds"
    assert second[key(f"{histogram}_count", opcode="CREATE")] == creates
    assert second[key(f"{histogram}_bucket", opcode="CREATE", le="+Inf")] == creates
    assert second[key(f"{histogram}_sum", opcode="CREATE")] > 0
    assert second[key("kmsfs_fuse_request_duration_max_seconds", opcode="CREATE")] > 0
    volume.umount()


def test_bad_metrics_address_refused_before_mounting(volume: Volume) -> None:
    result = volume.mount("--metrics-listen", "nowhere", check=False)
    assert result.returncode == 3
    assert "--metrics-listen: 'nowhere' is not HOST:PORT" in result.stderr
    assert not os.path.ismount(volume.mountpoint)


@pytest.mark.nomount
def test_provider_stats_percentiles() -> None:
    from kmsfs.keys.events import KeyEvent

    stats = ProviderStats(window=100)
    for ms in range(1, 101):
        stats.record(KeyEvent("unwrap", "local", "k", "v", "f", "ok", float(ms)))
    stats.record(KeyEvent("unwrap", "local", "k", "v", "f", "KeyUnavailable", 500.0))
    stats.record(KeyEvent("cache-hit", "local", "k", "v", "f", "ok", 0.0))
    summary = stats.summary()
    assert summary["count"] == 101 and summary["errors"] == 1
    assert summary["latency_ms"]["window"] == 100  # the oldest call left the window
    assert summary["latency_ms"]["p50"] == 51.0
    assert summary["latency_ms"]["p99"] == 100.0
    assert summary["latency_ms"]["max"] == 500.0
    assert percentile([], 50) is None


# -- logging -------------------------------------------------------------------


@pytest.mark.nomount
def test_journal_formatter() -> None:
    formatter = JournalFormatter()
    record = logging.LogRecord("kmsfs.fs", logging.ERROR, __file__, 1, "bad %s", ("x",), None)
    assert formatter.format(record) == "<3>kmsfs.fs: bad x"
    record = logging.LogRecord("kmsfs", logging.DEBUG, __file__, 1, "two\nlines", (), None)
    assert formatter.format(record) == "<7>kmsfs: two\n<7>lines"


@pytest.mark.nomount
def test_journal_stream_detection(tmp_path: Path, monkeypatch: Any) -> None:
    with open(tmp_path / "stream", "w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert stderr_is_journal(stream)
        assert isinstance(stderr_formatter(stream), JournalFormatter)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        assert not stderr_is_journal(stream)
        assert not isinstance(stderr_formatter(stream), JournalFormatter)


@requires_fuse
@pytest.mark.mount
def test_foreground_logs_to_journal_without_secrets(tmp_path: Path) -> None:
    passphrase = "correct horse battery staple 7f3a"
    pass_file = tmp_path / "passphrase"
    pass_file.write_text(passphrase + "\n")
    os.chmod(pass_file, 0o600)
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mnt.mkdir()
    run_kmsfs("init", backing, "--passphrase-file", pass_file)
    volume = Volume(tmp_path, backing, mnt, tmp_path / "no.key", tmp_path / "unused.log")
    config = write_config(
        volume,
        'log_level = "debug"',
        provider=f'type = "local"\npassphrase_file = "{pass_file}"\n',
    )
    stderr_path = tmp_path / "stderr"
    with open(stderr_path, "w") as stderr:
        st = os.fstat(stderr.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        try:
            with foreground(config, env, stderr=stderr) as proc:
                wait_for(lambda: answers(mnt), what="the mount")
                (mnt / "f").write_text("x")
                assert (mnt / "f").read_text() == "x"
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=30) == 0
        finally:
            force_unmount(mnt)
    lines = stderr_path.read_text().splitlines()
    assert lines, "the daemon logged nothing"
    assert all(re.match(r"<[2-7]>kmsfs[\w.]*: ", line) for line in lines), lines
    assert any(line.startswith("<6>kmsfs.daemon: mounted") for line in lines)
    assert any(line.startswith("<7>") for line in lines)  # debug level reached the journal
    assert not any(re.match(r"<\d>\d{4}-\d\d-\d\d", line) for line in lines)  # no timestamps
    text = stderr_path.read_text()
    assert passphrase not in text and "horse" not in text
