"""Provider faults: key-provider failures injected at random during a workload.

The daemon runs with tests/support/flaky_provider.py (the local provider patched to
raise KeyUnavailable with a probability read from a control file: a test
stand-in for a KMS that times out).  The key cache is off, so every open and
create reaches the provider.  Checked: every operation either succeeds with
the right bytes or fails with EIO (visible to the application, logged with
the file), a failed create leaves no file, no file is corrupted, and once the
provider answers again everything works without a remount.
Counts: KMSFS_FAULT_OPS (400 x KMSFS_RELIABILITY_SCALE).
"""

from __future__ import annotations

import errno
import os
import random
import re
import subprocess
import sys
from pathlib import Path

from support.fuse import requires_fuse
from support.reliability_util import alive, env_int, scaled
from support.volumes import Volume

pytestmark = requires_fuse

FLAKY = Path(__file__).parent.parent / "support" / "flaky_provider.py"


def flaky_mount(volume: Volume, control: Path) -> int:
    result = subprocess.run(
        [sys.executable, str(FLAKY), "mount", str(volume.backing), str(volume.mountpoint)]
        + ["--log-file", str(volume.log_file), "--log-level", "debug"]
        + ["--cache-max-entries", "0", *volume.key_args],
        capture_output=True,
        text=True,
        env={**os.environ, "KMSFS_TEST_FAULTS": str(control)},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    volume.mounted = True
    match = re.search(r"daemon pid (\d+)", result.stdout)
    assert match, result.stdout
    return int(match.group(1))


def test_random_provider_failures_are_visible_and_harmless(volume: Volume) -> None:
    ops = env_int("KMSFS_FAULT_OPS", scaled(400))
    rng = random.Random(31)
    control = volume.root / "faults"
    control.write_text("0")
    pid = flaky_mount(volume, control)
    model: dict[str, bytes] = {}
    for i in range(10):  # some files made while the provider is healthy
        model[f"h{i}"] = rng.randbytes(rng.randrange(0, 3 * 4096))
        volume.path(f"h{i}").write_bytes(model[f"h{i}"])
    control.write_text("0.3")
    failures = {"create": 0, "open-read": 0, "open-write": 0}
    successes = 0
    for i in range(ops):
        roll = rng.random()
        if roll < 0.3:
            name, data = f"c{i}", rng.randbytes(rng.randrange(0, 3 * 4096))
            try:
                volume.path(name).write_bytes(data)
            except OSError as exc:
                assert exc.errno == errno.EIO, exc
                failures["create"] += 1
                assert not volume.path(name).exists(), "a failed create left a file"
                continue
            model[name] = data
        elif roll < 0.7:
            name = rng.choice(sorted(model))
            try:
                got = volume.path(name).read_bytes()
            except OSError as exc:
                assert exc.errno == errno.EIO, exc
                failures["open-read"] += 1
                continue
            assert got == model[name], f"{name}: wrong bytes while the provider is flaky"
        else:
            name = rng.choice(sorted(model))
            patch = rng.randbytes(rng.randrange(1, 5000))
            off = rng.randrange(0, len(model[name]) + 1)
            try:
                fd = os.open(volume.path(name), os.O_RDWR)
            except OSError as exc:
                assert exc.errno == errno.EIO, exc
                failures["open-write"] += 1
                continue
            try:
                os.pwrite(fd, patch, off)
                os.fsync(fd)
            finally:
                os.close(fd)
            old = model[name].ljust(off, b"\0")
            model[name] = old[:off] + patch + old[off + len(patch) :]
        successes += 1
    assert alive(pid)
    assert all(failures.values()), f"faults were not injected on every path: {failures}"
    log = volume.log_text()
    assert log.count("injected") >= sum(failures.values())
    # The provider is back: no remount needed, then none needed after one either.
    control.write_text("0")
    for name, data in model.items():
        assert volume.path(name).read_bytes() == data
    volume.path("after").write_bytes(b"recovered")
    volume.umount()
    flaky_mount(volume, control)
    for name, data in model.items():
        assert volume.path(name).read_bytes() == data, f"{name} corrupted by a provider fault"
    assert sorted(os.listdir(volume.mountpoint)) == sorted([*model, "after"])
    print(f"provider faults: {ops} operations, {successes} succeeded, failures {failures}")
