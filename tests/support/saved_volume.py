"""Saved volumes: a backing directory as JSON (files, their bytes and xattrs, the config).

Volumes made by every released format are kept under tests/data/volumes/ and
mounted on every run (as gocryptfs keeps tests/example_filesystems), so a
change that stops an old volume from opening fails the suite.  Xattrs cannot
live in git, hence this form.  ``python tests/support/saved_volume.py dump BACKING OUT``
writes one; the secrets (key file, passphrase) are test-only values saved beside.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from support.volumes import Volume

DATA = Path(__file__).parent.parent / "data" / "volumes"


def _user_xattrs(path: Path) -> dict[str, str]:
    return {
        attr: base64.b64encode(os.getxattr(path, attr)).decode()
        for attr in sorted(os.listxattr(path))
        if attr.startswith("user.")
    }


def dump_volume(backing: Path) -> dict[str, Any]:
    """Every entry under *backing*: dirs and regular files (with their user xattrs: the
    file headers, a directory's ID and encrypted xattrs with encrypted names), symlinks."""
    entries: list[dict[str, Any]] = []
    for dirpath, dirnames, filenames in os.walk(backing):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = str(path.relative_to(backing))
            st = os.lstat(path)
            entry: dict[str, Any] = {"path": rel, "mode": stat.S_IMODE(st.st_mode)}
            if stat.S_ISLNK(st.st_mode):
                entry.update(kind="symlink", target=os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                entry.update(kind="dir", xattrs=_user_xattrs(path))
            else:
                entry.update(kind="file", data=base64.b64encode(path.read_bytes()).decode())
                entry["xattrs"] = _user_xattrs(path)
            entries.append(entry)
    return {"entries": entries}


def restore_volume(saved: dict[str, Any], backing: Path) -> None:
    """Recreate a dumped backing directory at *backing* (which must not exist)."""
    backing.mkdir(mode=0o700)
    for entry in saved["entries"]:
        path = backing / entry["path"]
        if entry["kind"] == "dir":
            path.mkdir(mode=entry["mode"])
            for attr, value in entry.get("xattrs", {}).items():  # none before format 4
                os.setxattr(path, attr, base64.b64decode(value))
        elif entry["kind"] == "symlink":
            path.symlink_to(entry["target"])
        else:
            path.write_bytes(base64.b64decode(entry["data"]))
            for attr, value in entry["xattrs"].items():
                os.setxattr(path, attr, base64.b64decode(value))
            path.chmod(entry["mode"])


def restore_saved_volume(name: str, tmp_path: Path) -> tuple[Volume, dict[str, Any], list[str]]:
    """The saved volume *name* (``format1-local``, ``format2-passphrase``...: its config
    format and key; every saved volume's files are file format 1) restored as a
    ``Volume`` under *tmp_path*, not mounted, its key file or passphrase file
    written beside it (0600); returns (volume, the saved JSON, the key options naming
    its key)."""
    from support.volumes import make_volume

    saved = json.loads((DATA / f"{name}.json").read_text())
    vol = make_volume(tmp_path, key=False)
    vol.backing.rmdir()
    restore_volume(saved, vol.backing)
    if "key_file" in saved["secrets"]:
        vol.key_file.write_text(saved["secrets"]["key_file"])
        vol.key_file.chmod(0o600)
        args = ["--key-file", str(vol.key_file)]
    else:
        secret = tmp_path / "pass"
        secret.write_text(saved["secrets"]["passphrase"])
        secret.chmod(0o600)
        args = ["--passphrase-file", str(secret)]
    vol.key_args = args
    return vol, saved, args


def check_saved_plaintext(vol: Volume, saved: dict[str, Any]) -> None:
    """Every file, symlink and user xattr of the saved volume reads as saved through
    *vol*'s mount."""
    for rel, encoded in saved["plaintext"].items():
        assert vol.path(rel).read_bytes() == base64.b64decode(encoded), rel
    for rel, target in saved["symlinks"].items():
        assert os.readlink(vol.path(rel)) == target
    for rel, values in saved.get("xattrs", {}).items():
        for name, encoded in values.items():
            assert os.getxattr(vol.path(rel), name) == base64.b64decode(encoded), (rel, name)


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "dump":
        sys.exit("usage: saved_volume.py dump BACKING OUT.json")
    Path(sys.argv[3]).write_text(json.dumps(dump_volume(Path(sys.argv[2])), indent=1) + "\n")
