"""Volumes with encrypted names through a real mount and the offline tools.

The POSIX behaviour suites run on both kinds of volume (test_posix.py and its
neighbours); this module checks what is particular to encrypted names: nothing
written reaches the backing directory in the clear, entries moved between
directories or volumes are refused and logged, fsck checks every name, the tools
map paths, re-key, re-wrap, import and export headers, two daemons racing on one
name, and the former key holder's view (docs/FORMAT.md, "What encrypted names
hide").
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cli import run_kmsfs
from support.cluster import Cluster, cluster_on
from support.fuse import force_unmount, requires_fuse
from support.volumes import Volume, make_volume

from kmsfs.format.names import DIR_ID_XATTR, LONG_NAME_PREFIX
from kmsfs.format.volume_config import load_config

pytestmark = requires_fuse

LONG = "Q3 résumé of the été accounts, ACME-Corp; " * 6  # 258 bytes of UTF-8: cut below
LONG = LONG.encode()[:250].decode(errors="ignore")
SECRETS = [
    "salaries-2026.xlsx",
    "customers",
    "ACME-Corp",
    "contains SSNs",
    "user.comment",
    "tenant-4711",
    "../customers/ACME-Corp/contract.pdf",
    LONG,
]


@pytest.fixture
def enc(tmp_path: Path) -> Iterator[Volume]:
    """A mounted volume with encrypted names (unmounted at teardown, log checked by the
    caller where it matters)."""
    vol = make_volume(tmp_path, names="encrypted")
    vol.mount()
    try:
        yield vol
    finally:
        if vol.mounted:
            vol.umount()
        force_unmount(vol.mountpoint)


def write_tree(vol: Volume) -> dict[str, bytes]:
    """A tree of every kind of entry with the names, targets and xattrs of SECRETS."""
    customers = vol.path("customers/ACME-Corp")
    customers.mkdir(parents=True)
    files = {
        "customers/ACME-Corp/salaries-2026.xlsx": b"pay",
        f"customers/{LONG}": b"long name",
        "tenant-4711": b"tenant",
        LONG[:200]: b"a long name at the root",  # .kmsfs-ln.* beside .kmsfs.json
    }
    for rel, data in files.items():
        vol.path(rel).write_bytes(data)
    os.link(vol.path(f"customers/{LONG}"), vol.path(f"customers/ACME-Corp/{LONG}"))
    os.symlink("../customers/ACME-Corp/contract.pdf", vol.path("customers/link"))
    os.setxattr(vol.path("tenant-4711"), "user.comment", b"contains SSNs")
    os.setxattr(vol.path("customers"), "user.comment", b"contains SSNs")
    os.setxattr(vol.path("customers"), "trusted.comment", b"contains SSNs")
    os.mkfifo(vol.path("customers/ACME-Corp/tenant-4711.fifo"))
    return files


def backing_strings(backing: Path) -> list[bytes]:
    """Every name, symlink target, xattr name and value, and file's bytes under *backing*
    (but the config, whose key hint names the test's directory)."""
    found: list[bytes] = []
    for top, dirs, files in os.walk(backing):
        for name in dirs + files:
            path = os.path.join(top, name)
            if path == str(backing / ".kmsfs.json"):
                continue
            found.append(os.fsencode(name))
            if os.path.islink(path):
                found.append(os.fsencode(os.readlink(path)))
            for attr in os.listxattr(path, follow_symlinks=False):
                found += [os.fsencode(attr), os.getxattr(path, attr, follow_symlinks=False)]
            if stat.S_ISREG(os.lstat(path).st_mode):
                found.append(Path(path).read_bytes())
    return found


def test_backing_holds_no_plaintext_name_target_or_xattr(enc: Volume) -> None:
    files = write_tree(enc)
    os.rename(enc.path("tenant-4711"), enc.path("customers/tenant-4711"))
    enc.remount()
    assert enc.path("customers/tenant-4711").read_bytes() == files["tenant-4711"]
    assert os.readlink(enc.path("customers/link")) == "../customers/ACME-Corp/contract.pdf"
    assert os.getxattr(enc.path("customers"), "trusted.comment") == b"contains SSNs"
    assert sorted(os.listdir(enc.path("customers"))) == sorted(
        ["ACME-Corp", LONG, "link", "tenant-4711"]
    )
    enc.umount()
    haystack = backing_strings(enc.backing)
    for secret in SECRETS:
        for needle in (secret.encode(), secret.encode()[:12], secret.encode()[-12:]):
            assert not any(needle in item for item in haystack), secret
    # what is still visible: the shape (2 directories, their entry counts) and a long name
    dirs = [p for p in enc.backing.rglob("*") if p.is_dir() and ".kmsfs" not in str(p)]
    assert len(dirs) == 2 and all(len(os.getxattr(d, DIR_ID_XATTR)) == 16 for d in dirs)
    assert any(p.name.startswith(".kmsfs-ln.") for p in enc.backing.rglob("*"))


def test_names_copied_from_another_directory_or_volume_are_left_out_and_logged(
    enc: Volume, tmp_path: Path
) -> None:
    enc.path("a").mkdir()
    enc.path("b").mkdir()
    enc.path("a/report.txt").write_bytes(b"a")
    enc.path("a/" + "L" * 200).write_bytes(b"long")
    other = make_volume(tmp_path / "other", names="encrypted")
    other.mount()
    try:
        other.path("foreign.txt").write_bytes(b"foreign")
    finally:
        other.umount()
    enc.umount()
    a_dir, b_dir = enc.backing_path("a"), enc.backing_path("b")
    for entry in os.listdir(a_dir):  # names of /a copied into /b (sidecar included)
        shutil.copy2(a_dir / entry, b_dir / entry)
    foreign = other.backing_path("foreign.txt")
    shutil.copy2(foreign, enc.backing / foreign.name)  # another volume's root entry
    enc.mount()
    assert os.listdir(enc.path("b")) == []
    assert sorted(os.listdir(enc.mountpoint)) == ["a", "b"]
    assert errno_of(os.stat, enc.path("b/report.txt")) == errno.ENOENT
    assert enc.path("a/report.txt").read_bytes() == b"a"
    enc.umount()
    log = enc.log_text()
    assert f"/b: entry '{enc.backing_path('a/report.txt').name}' left out" in log
    assert f"/: entry '{foreign.name}' left out of the listing" in log
    assert "failed authentication" in log and ".kmsfs-ln." in log
    check = run_kmsfs("fsck", enc.backing, *enc.key_args, check=False)
    assert check.returncode == 5
    assert f"{foreign.name}: name: encrypted name" in check.stdout
    assert check.stdout.count(": name: ") == 3  # the two copies in /b and the foreign one


def errno_of(func: object, *args: object) -> int:
    try:
        func(*args)  # type: ignore[operator]
    except OSError as exc:
        return int(exc.errno or 0)
    raise AssertionError("no error")


def test_fsck_checks_every_name_target_id_and_xattr(enc: Volume) -> None:
    write_tree(enc)
    enc.path("plain").mkdir()
    enc.path("plain/kept").write_bytes(b"kept")
    enc.umount()
    assert "clean" in run_kmsfs("fsck", enc.backing, *enc.key_args).stdout
    customers = enc.backing_path("customers")
    link = enc.backing_path("customers/link")
    stored = os.readlink(link)
    os.unlink(link)
    os.symlink(stored[:-4] + ("AAAA" if stored[-4:] != "AAAA" else "BBBB"), link)
    tenant = enc.backing_path("tenant-4711")
    (name,) = [n for n in os.listxattr(tenant) if not n.startswith("user.kmsfs.")]
    os.setxattr(customers, name, os.getxattr(tenant, name))  # a value moved to the directory
    long_entry = enc.backing_path(f"customers/{LONG}")
    os.unlink(str(long_entry) + ".name")  # a long name without its sidecar
    (customers / ".kmsfs-tmp.00112233").mkdir()  # an interrupted mkdir
    (customers / ".hidden").write_bytes(b"")  # planted
    os.removexattr(enc.backing_path("plain"), DIR_ID_XATTR)
    result = run_kmsfs("fsck", enc.backing, *enc.key_args, "--json", check=False)
    assert result.returncode == 5
    findings = {(f["kind"], f["path"]) for f in json.loads(result.stdout)["findings"]}
    cust = customers.relative_to(enc.backing).as_posix()
    assert findings == {
        ("symlink", "customers/link"),
        ("xattr", "customers"),
        ("name", f"{cust}/{long_entry.name}"),
        ("leftover", f"{cust}/.kmsfs-tmp.00112233"),
        ("stray", f"{cust}/.hidden"),
        ("dir-id", "plain"),
    }, findings
    text = run_kmsfs("fsck", enc.backing, *enc.key_args, check=False).stdout
    assert "its sidecar" in text and "is missing" in text and "(backing " in text


def test_paths_map_both_ways_and_decrypt_inspect_take_a_path_in_the_volume(
    enc: Volume, tmp_path: Path
) -> None:
    files = write_tree(enc)
    enc.umount()
    for rel, data in files.items():
        mapped = run_kmsfs("path", enc.backing, "--to-backing", rel, *enc.key_args).stdout
        backing = Path(mapped.strip())
        assert backing == enc.backing_path(rel) and backing.is_file()
        back = run_kmsfs("path", enc.backing, "--to-plain", backing, *enc.key_args).stdout
        assert back.removesuffix("\n") == "/" + rel
        relative = backing.relative_to(enc.backing)
        again = run_kmsfs("path", enc.backing, "--to-plain", relative, *enc.key_args).stdout
        assert again.removesuffix("\n") == "/" + rel
        out = tmp_path / f"out-{len(rel)}"
        run_kmsfs("decrypt", "--volume", enc.backing, "--in-volume", rel, out, *enc.key_args)
        assert out.read_bytes() == data
        shown = run_kmsfs(
            "inspect", "--volume", enc.backing, "--in-volume", rel, "--json", *enc.key_args
        )
        info = json.loads(shown.stdout)
        assert info["path"] == str(backing) and info["path_in_volume"] == rel
        assert info["volume_config"]["names"] == "encrypted"
    info = json.loads(
        run_kmsfs(
            "path", enc.backing, "--json", "--to-backing", f"customers/{LONG}", *enc.key_args
        ).stdout
    )
    assert Path(info["backing"]).name.startswith(LONG_NAME_PREFIX.decode())
    assert Path(info["sidecar"]).read_bytes().startswith(b"") and Path(info["sidecar"]).is_file()
    missing = run_kmsfs(
        "path", enc.backing, "--to-backing", "customers/nope/x", *enc.key_args, check=False
    )
    assert missing.returncode == 1
    assert "customers/nope/x: no such path in the volume (customers/nope" in missing.stderr
    nokey = run_kmsfs("path", enc.backing, "--to-backing", "customers", check=False)
    assert nokey.returncode == 3 and "give --key-file" in nokey.stderr
    plain = make_volume(tmp_path / "plain")  # plain names: no key, the same path
    (plain.backing / "a").mkdir()
    mapped = run_kmsfs("path", plain.backing, "--to-backing", "a/b").stdout
    assert mapped == f"{plain.backing / 'a/b'}\n"


def test_rekey_rewrap_headers_and_keys_remove_keep_names_readable(
    enc: Volume, tmp_path: Path
) -> None:
    files = write_tree(enc)
    enc.umount()
    before = load_config(enc.backing)
    assert before.version == 4 and before.names is not None
    result = run_kmsfs("rekey", enc.backing, *enc.key_args)
    assert "4 re-keyed" in result.stdout and "0 failed" in result.stdout
    second = tmp_path / "second.key"
    run_kmsfs("keys", "add", enc.backing, "--key-file", second, "--old-key-file", enc.key_file)
    export = tmp_path / "headers.jsonl"
    assert "exported 5 headers" in run_kmsfs("headers", "export", enc.backing, export).stdout
    first_ref = before.keys[0].key_ref
    run_kmsfs("keys", "remove", enc.backing, first_ref, "--key-file", second)
    after = load_config(enc.backing)
    # the volume key was replaced: the name secret was sealed again, not replaced
    assert after.names is not None and after.names.sealed != before.names.sealed
    assert after.generation > before.generation and len(after.chain) == 1
    for path in enc.backing.rglob("*"):  # strip the headers, as a copy without xattrs would
        if not path.is_symlink() and "user.kmsfs.header" in os.listxattr(path):
            os.removexattr(path, "user.kmsfs.header")
    restored = run_kmsfs("headers", "import", enc.backing, export)
    assert "4 restored" in restored.stdout and "1 unchanged" in restored.stdout  # a hard link
    enc.key_args = ["--key-file", str(second)]
    assert "clean" in run_kmsfs("fsck", enc.backing, *enc.key_args).stdout
    enc.mount()
    for rel, data in files.items():
        assert enc.path(rel).read_bytes() == data, rel
    assert os.getxattr(enc.path("tenant-4711"), "user.comment") == b"contains SSNs"
    assert os.readlink(enc.path("customers/link")) == "../customers/ACME-Corp/contract.pdf"


def test_a_former_volume_key_holder_still_reads_every_name(enc: Volume, tmp_path: Path) -> None:
    """What FORMAT.md says a former holder keeps ("Who can read names"): the config of
    their time opens the same name secret, so names made after the rotation read too."""
    from kmsfs.backing.encrypted_names import names_for
    from kmsfs.backing.tree import open_root
    from kmsfs.format.volume_config import VolumeConfig
    from kmsfs.volume_open import open_volume

    old_config = (enc.backing / ".kmsfs.json").read_text()
    _, keyring = open_volume(enc.backing, {"key_file": str(enc.key_file)})
    old_key = bytes(keyring.volume_key or b"")
    keyring.close()
    enc.umount()
    second = tmp_path / "second.key"
    run_kmsfs("keys", "add", enc.backing, "--key-file", second, "--old-key-file", enc.key_file)
    run_kmsfs(
        "keys",
        "remove",
        enc.backing,
        load_config(enc.backing).keys[0].key_ref,
        "--key-file",
        second,
    )
    enc.key_args = ["--key-file", str(second)]
    enc.mount()
    enc.path("made-after-the-rotation").write_bytes(b"x")
    enc.umount()
    config = VolumeConfig.loads(old_config)
    names = names_for(config.names, old_key, config.volume_id)  # no master key needed now
    root = open_root(enc.backing)
    try:
        listed = names.listing(_dir(root), lambda: "/")
    finally:
        os.close(root)
    assert [item.name for item in listed] == [b"made-after-the-rotation"]


def _dir(fd: int) -> object:
    from kmsfs.backing.names import Dir
    from kmsfs.format.names import ROOT_DIR_ID

    return Dir(fd, ROOT_DIR_ID, True)


def test_import_into_encrypted_names_and_resume(tmp_path: Path) -> None:
    plain = tmp_path / "src"
    (plain / "customers" / "ACME-Corp").mkdir(parents=True)
    (plain / "customers" / "ACME-Corp" / "salaries-2026.xlsx").write_bytes(b"pay")
    (plain / "customers" / LONG).write_bytes(b"long")
    os.link(plain / "customers" / LONG, plain / "tenant-4711")
    os.symlink("../customers/ACME-Corp/contract.pdf", plain / "customers" / "link")
    os.symlink("t" * 3024, plain / "too-long-for-encrypted")  # refused, reported
    os.setxattr(plain / "tenant-4711", "user.comment", b"contains SSNs")
    os.setxattr(plain / "customers", "user.comment", b"contains SSNs")
    vol = make_volume(tmp_path, key=False)
    result = run_kmsfs(
        "import", plain, vol.backing, "--encrypted-names", "--key-file", vol.key_file
    )
    assert "1 hard links" in result.stdout
    assert "too-long-for-encrypted: symlink target of 3024 bytes" in result.stderr
    vol.encrypted_names = True
    assert load_config(vol.backing).version == 4
    # a run killed after its last file left its journal: the next one finds every name
    journal = {"source": str(plain.resolve()), "started": "2026-01-01T00:00:00+00:00"}
    (vol.backing / ".kmsfs.d" / "import.json").write_text(json.dumps(journal))
    again = run_kmsfs("import", plain, vol.backing, "--key-file", vol.key_file)
    assert "0 encrypted" in again.stdout and "3 already done" in again.stdout
    assert "clean" in run_kmsfs("fsck", vol.backing, *vol.key_args).stdout
    haystack = backing_strings(vol.backing)
    for secret in ["salaries-2026", "ACME-Corp", "contains SSNs", LONG[:40], "tenant-4711"]:
        assert not any(secret.encode() in item for item in haystack), secret
    vol.mount()
    try:
        assert vol.path(f"customers/{LONG}").read_bytes() == b"long"
        assert os.stat(vol.path("tenant-4711")).st_nlink == 2
        assert os.readlink(vol.path("customers/link")) == "../customers/ACME-Corp/contract.pdf"
        assert os.getxattr(vol.path("tenant-4711"), "user.comment") == b"contains SSNs"
        assert os.getxattr(vol.path("customers"), "user.comment") == b"contains SSNs"
        assert not os.path.lexists(vol.path("too-long-for-encrypted"))
    finally:
        vol.umount()


def test_a_plain_name_volume_converts_through_import_of_its_mount(tmp_path: Path) -> None:
    """docs/FORMAT.md "Converting a volume with plain names": mount the old volume read-
    only, import the mount into a new volume with encrypted names, compare, retire."""
    old = make_volume(tmp_path / "old")
    old.mount()
    files = write_tree(old)
    old.umount()
    old.mount("-o", "ro")
    new = make_volume(tmp_path / "new", key=False)
    try:
        run_kmsfs(
            "import", old.mountpoint, new.backing, "--encrypted-names", "--key-file", new.key_file
        )
    finally:
        old.umount()
    new.encrypted_names = True
    assert "clean" in run_kmsfs("fsck", new.backing, *new.key_args).stdout
    new.mount()
    try:
        for rel, data in files.items():
            assert new.path(rel).read_bytes() == data, rel
        assert os.getxattr(new.path("tenant-4711"), "user.comment") == b"contains SSNs"
        assert os.readlink(new.path("customers/link")) == "../customers/ACME-Corp/contract.pdf"
        assert os.stat(new.path(f"customers/{LONG}")).st_nlink == 2
        assert stat.S_ISFIFO(os.lstat(new.path("customers/ACME-Corp/tenant-4711.fifo")).st_mode)
    finally:
        new.umount()
    haystack = backing_strings(new.backing)
    for secret in ["salaries-2026", "ACME-Corp", "contains SSNs", "tenant-4711"]:
        assert not any(secret.encode() in item for item in haystack), secret
    # the old volume's names are what they were: in the clear
    assert (old.backing / "customers" / "ACME-Corp" / "salaries-2026.xlsx").exists()


@pytest.fixture(params=["local", "glusterfs"])
def enc_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """A volume with encrypted names for several daemons: on one local directory, and
    on a GlusterFS volume each daemon reaches through its own client (whose FUSE
    client has no RENAME_NOREPLACE: directories are made in place there)."""
    with cluster_on(request, request.param, tmp_path, "encrypted") as cluster:
        yield cluster


def test_two_daemons_making_one_name_at_once(enc_cluster: Cluster) -> None:
    """Shared mode: two daemons make the same directory (short and long names) and the
    same file at once: one wins, the other gets EEXIST, and neither shows anything
    half-made (a directory without its ID, a long name without its sidecar)."""
    cluster = enc_cluster
    vol = cluster.volume
    mounts = cluster.shared(2)
    barrier = threading.Barrier(3)
    outcome: dict[tuple[int, str], object] = {}
    rounds = [f"d{n}" for n in range(15)] + [f"{n:03d}" + "D" * 190 for n in range(15)]
    failures: list[tuple[str, int]] = []
    stop = threading.Event()

    def make(index: int) -> None:
        for name in rounds:
            barrier.wait(timeout=30)
            for kind in ("dir", "file"):
                path = mounts[index].path(f"{name}.{kind}")
                try:
                    if kind == "dir":
                        os.mkdir(path)
                    else:
                        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                    outcome[index, path.name] = "won"
                except OSError as exc:
                    outcome[index, path.name] = exc.errno

    def watch() -> None:
        while not stop.is_set():
            for name in os.listdir(mounts[1].mountpoint):  # every entry shown is whole
                if name.endswith(".dir"):
                    try:
                        os.listdir(mounts[1].path(name))  # has its ID: readable
                    except OSError as exc:
                        failures.append((name, exc.errno or 0))

    threads = [threading.Thread(target=make, args=(i,)) for i in (0, 1)]
    watcher = threading.Thread(target=watch)
    watcher.start()
    for thread in threads:
        thread.start()
    for _ in rounds:
        barrier.wait(timeout=30)
    for thread in threads:
        thread.join(timeout=120)
    stop.set()
    watcher.join(timeout=30)
    for name in rounds:
        for kind in ("dir", "file"):
            key = f"{name}.{kind}"
            results = sorted(map(str, (outcome[0, key], outcome[1, key])))
            assert results == sorted([str(errno.EEXIST), "won"]), (key, results)
    if not cluster.distributed:
        assert failures == []  # no directory was ever seen without its ID
    else:  # made in place: the moment before its ID is set may answer EIO, no more
        assert {code for _, code in failures} <= {errno.EIO}, failures
    for mount in mounts:
        names = sorted(os.listdir(mount.mountpoint))
        assert names == sorted(f"{n}.{k}" for n in rounds for k in ("dir", "file"))
    for mount in mounts:
        os.mkdir(mount.path(f"d0.dir/from-{mount.mountpoint.name}"))
    assert sorted(os.listdir(mounts[0].path("d0.dir"))) == ["from-mnt0", "from-mnt1"]
    cluster.umount_all()
    assert not [p for p in vol.backing.rglob(".kmsfs-tmp.*")]
    cluster.fsck_clean()


def test_policy_rules_and_audit_records_use_plaintext_paths(shared_dir: Path) -> None:
    """The access policy decides on paths in the volume and the audit log names them,
    also below a long name (kmsfs/backing/paths.py decrypts each component)."""
    from support.policy_volume import DENY_VAULT, as_root, denied, policy_volume

    pv = policy_volume(shared_dir, ("shared", "vault", f"vault/{LONG}"), names="encrypted")
    pv.write_config(DENY_VAULT)
    pv.mount()
    mnt = pv.vol.mountpoint
    try:
        assert denied(as_root("cat", mnt / "vault/f"))
        assert denied(as_root("cat", mnt / f"vault/{LONG}/f"))
        assert as_root("cat", mnt / "shared/f").stdout == "shared data\n"
        assert sorted(os.listdir(mnt / "vault")) == sorted([LONG, "f"])
        paths = {r["path"] for r in pv.records() if r["allowed"] is False}
        assert paths == {"/vault/f", f"/vault/{LONG}/f"}, paths
    finally:
        pv.vol.umount()


@pytest.mark.parametrize("name", ["format3-plain-names", "format4-encrypted-names"])
def test_saved_volume_of_either_kind_of_names_mounts(name: str, tmp_path: Path) -> None:
    """Volumes of this release, saved in tests/data/volumes/: one with plain names
    (config format 3) and one with encrypted names (format 4, a long name, a non-ASCII
    name, symlinks and xattrs on a file and a directory) keep mounting as they are."""
    from support.saved_volume import check_saved_plaintext, restore_saved_volume

    vol, saved, args = restore_saved_volume(name, tmp_path)
    encrypted = saved["names"] == "encrypted"
    vol.encrypted_names = encrypted
    config = load_config(vol.backing)
    assert (config.version, config.encrypted_names) == (saved["format"], encrypted)
    out = tmp_path / "hello.out"
    run_kmsfs("decrypt", "--volume", vol.backing, "--in-volume", "hello.txt", out, *args)
    assert out.read_bytes().startswith(b"hello from format")
    long = next(rel for rel in saved["plaintext"] if "long-" in rel)
    mapped = Path(run_kmsfs("path", vol.backing, "--to-backing", long, *args).stdout.strip())
    assert mapped.is_file() and mapped.name.startswith(".kmsfs-ln.") == encrypted
    try:
        vol.mount()
        check_saved_plaintext(vol, saved)
        listed = sorted(os.listdir(vol.path("dir")))
        assert listed == sorted(["nested.txt", long.split("/")[1], "résumé.txt", "uplink"])
        vol.path("dir/new.txt").write_bytes(b"written by this version")
        vol.remount()
        check_saved_plaintext(vol, saved)
        assert vol.path("dir/new.txt").read_bytes() == b"written by this version"
    finally:
        vol.umount()
    again = load_config(vol.backing)
    assert (again.version, again.generation) == (config.version, config.generation)
    assert "clean" in run_kmsfs("fsck", vol.backing, *args).stdout
