"""A daemon with few descriptors serves directories with many more files than that.

The inode table holds one descriptor per inode the kernel knows; past its
high-water mark the daemon asks the kernel to forget the oldest entries
(docs/DESIGN.md).  Here the daemon runs under RLIMIT_NOFILE = 400, and the
directory holds 1,500 files.

The tests marked ``nomount`` run the inode table and the operations in a child
interpreter whose descriptors they use up (a new process: the limit is the process's,
and the test's own process must keep its descriptors).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.cli import run_kmsfs
from support.fuse import requires_fuse
from support.volumes import Volume, make_volume

LIMIT = 400
FILES = 1500


@requires_fuse
@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
def test_more_files_than_descriptors(volume: Volume) -> None:
    env_prefix = ["prlimit", f"--nofile={LIMIT}:{LIMIT}"]

    from support.cli import BIN

    mount = subprocess.run(
        [
            *env_prefix,
            str(BIN),
            "mount",
            str(volume.backing),
            str(volume.mountpoint),
            "--log-level",
            "debug",
            "--log-file",
            str(volume.log_file),
            *volume.key_args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert mount.returncode == 0, mount.stderr
    volume.mounted = True
    pid = int(mount.stdout.split("daemon pid ")[1].rstrip(")\n"))
    with open(f"/proc/{pid}/limits") as limits:
        assert any(
            line.startswith("Max open files") and line.split()[3] == str(LIMIT) for line in limits
        )

    directory = volume.path("many")
    directory.mkdir()
    for n in range(FILES):
        (directory / f"f{n:05d}").write_bytes(b"%d" % n)
    assert len(os.listdir(directory)) == FILES
    for n in range(FILES):
        assert (directory / f"f{n:05d}").stat().st_size == len(b"%d" % n)
    for n in range(0, FILES, 7):
        assert (directory / f"f{n:05d}").read_bytes() == b"%d" % n
    assert len(os.listdir(f"/proc/{pid}/fd")) < LIMIT
    shutil.rmtree(directory)
    assert not directory.exists()
    volume.umount()
    assert "Too many open files" not in volume.log_text()
    assert run_kmsfs("fsck", volume.backing, "--key-file", volume.key_file).returncode == 0


# -- a child process out of descriptors (nothing mounted) ---------------------------------


_OUT_OF_DESCRIPTORS = """
import errno, os, resource, sys
from kmsfs.fs.inodes import InodeTable, Reserve
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
root = os.open(sys.argv[1], os.O_PATH)
table = InodeTable(root, high_water=40)
if sys.argv[2] == "no-reserve":
    table.reserve.close()
    table.reserve = Reserve(0)
st = os.stat("f", dir_fd=root)
hog = []
while True:  # use up every descriptor left
    try:
        hog.append(os.open("/", os.O_PATH))
    except OSError as exc:
        assert exc.errno == errno.EMFILE
        break
entry, _ = table.remember(st, 1, b"f")
assert entry.fd == -1, "the entry should have been deferred"
try:
    table.open_deferred(entry)
except OSError as exc:
    print(errno.errorcode[exc.errno])
else:
    print("same inode" if os.stat(entry.fd).st_ino == st.st_ino else "other inode")
"""


@pytest.mark.nomount
@pytest.mark.parametrize(
    ("reserve", "expected"), [("reserve", "same inode"), ("no-reserve", "EMFILE")]
)
def test_a_deferred_entry_opens_from_the_reserve_when_out_of_descriptors(
    tmp_path: Path, reserve: str, expected: str
) -> None:
    """A request on a deferred entry (the kernel's SETATTR of a dirty inode's times,
    which must succeed before the kernel will forget it) gets a descriptor even when
    the process has none left; without the reserve it fails with EMFILE."""
    (tmp_path / "f").write_bytes(b"x")
    result = subprocess.run(
        [sys.executable, "-c", _OUT_OF_DESCRIPTORS, str(tmp_path), reserve],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


_NUMBER_REUSED = """
import errno, os, resource, sys
from kmsfs.fs.inodes import InodeTable
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
os.chdir(sys.argv[1])
root = os.open(".", os.O_PATH)
table = InodeTable(root, high_water=40)
with open("f", "wb") as handle:
    handle.write(b"first file")
st = os.stat("f")
hog = []
while True:
    try:
        hog.append(os.open("/", os.O_PATH))
    except OSError:
        break
entry, _ = table.remember(st, 1, b"f")
assert entry.fd == -1, "the entry should have been deferred"
for fd in hog:
    os.close(fd)
os.unlink("f")
for n in range(200):  # ext4 hands a freed inode number to the next file it creates
    with open(f"x{n}", "wb") as handle:
        handle.write(b"another file")
    if os.stat(f"x{n}").st_ino == st.st_ino:
        os.rename(f"x{n}", "f")
        break
else:
    print("not reused")
    sys.exit(0)
try:
    table.open_deferred(entry)
except OSError as exc:
    print(errno.errorcode[exc.errno])
else:
    print("opened the other file")
"""


@pytest.mark.nomount
def test_a_deferred_entry_never_opens_another_file_that_took_its_number(tmp_path: Path) -> None:
    """A deferred entry holds no inode, so its number can be reused by a new file under
    the same name before its first use; that file has another birth time, and the
    entry answers ESTALE instead of serving it under the old inode's number."""
    result = subprocess.run(
        [sys.executable, "-c", _NUMBER_REUSED, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    if result.stdout.strip() == "not reused":
        pytest.skip("this filesystem did not reuse the inode number in 200 creates")
    assert result.stdout.strip() == "ESTALE"


_OPEN_OUT_OF_DESCRIPTORS = """
import errno, os, resource, sys
from types import SimpleNamespace
import pyfuse3, trio
from kmsfs.fs.operations import KmsfsOperations, open_served_volume
from kmsfs.volume_open import open_volume
backing, key = sys.argv[1:3]
resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
config, keyring = open_volume(backing, {"key_file": key})
ops = KmsfsOperations(open_served_volume(backing, config, keyring))
ctx = SimpleNamespace(uid=os.geteuid(), gid=os.getegid(), pid=os.getpid(), umask=0o022)

async def main():
    info, attr = await ops.create(pyfuse3.ROOT_INODE, b"f", 0o644, os.O_RDWR, ctx)
    await ops.write(info.fh, 0, b"its bytes")
    await ops.release(info.fh)
    hog = []
    while True:  # use up every descriptor left
        try:
            hog.append(os.open("/", os.O_PATH))
        except OSError as exc:
            assert exc.errno == errno.EMFILE
            break
    try:
        fh = (await ops.open(attr.st_ino, os.O_RDONLY, ctx)).fh
    except pyfuse3.FUSEError as exc:
        print(errno.errorcode[exc.errno])
        return
    print(bytes(await ops.read(fh, 0, 100)).decode())

trio.run(main)
"""


@pytest.mark.nomount
def test_an_open_gets_its_content_descriptor_when_the_process_has_none_left(
    tmp_path: Path,
) -> None:
    """Under a small descriptor limit the kernel may not yet have forgotten the entries
    the daemon asked it to drop: an open then finds no descriptor for the file's
    content.  It takes a spare from the inode table's reserve (before: EMFILE at once,
    the CI failure of tests/mount/test_fd_limit.py)."""
    vol = make_volume(tmp_path, in_process=True)
    result = subprocess.run(
        [sys.executable, "-c", _OPEN_OUT_OF_DESCRIPTORS, str(vol.backing), str(vol.key_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "its bytes"
