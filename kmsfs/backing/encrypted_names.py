"""Names of a volume with encrypted names (config format 4): ``EncryptedNames``.

The ``Names`` interface (kmsfs/backing/names.py) over the volume's ``NameCipher``
(kmsfs/format/names.py, docs/FORMAT.md "Encrypted names"): a name is encrypted
under its directory's ID (``user.kmsfs.dirid``; the root's is all zeros); a long
name (160..255 bytes) is a fixed-length entry with a sidecar file beside it holding
its encrypted name; symlink targets and ``user.*`` / ``trusted.*`` attribute names
and values are encrypted too.  Every backing name starting with '.' is kmsfs's own
(sidecars, temporary names, the config and state at the root) and is never shown;
no plaintext name is reserved.

What is read from the backing directory is trusted only once it decrypts: a name,
sidecar, target or attribute that does not is refused with EncryptedNameError
naming its backing bytes, never returned as garbage (``listing`` and
``xattr_names`` leave it out and log it).  Nothing here follows a symlink in the
backing tree.

How the operations that touch long names stay consistent (docs/DESIGN.md,
"Encrypted names"): a long name's sidecar is a function of the name alone, so it
is written (idempotently, by rename) before the entry is made, linked or renamed
to, and removed after the entry is unlinked or renamed away, and only if no entry
of that name exists then; ``RENAME_EXCHANGE`` leaves both where they are.  A
directory is made under a temporary name, given its ID and renamed into place
with ``RENAME_NOREPLACE`` (where the backing filesystem has it): no directory
without an ID is ever visible.  ``names_for`` picks the names of a volume.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Callable

from kmsfs.backing.names import (
    NO_RENAME_FLAGS,
    O_PATH_DIR,
    TEMP_PREFIX,
    Dir,
    Listed,
    PlainNames,
    XattrNameTooLong,
    rename_noreplace,
)
from kmsfs.backing.syscalls import RENAME_EXCHANGE, renameat2
from kmsfs.errors import ConfigError, EncryptedNameError, KmsfsError, PlaintextTooLong
from kmsfs.format.name_secret import SealedNameSecret
from kmsfs.format.names import (
    DIR_ID_XATTR,
    MAX_SIDECAR_SIZE,
    NAME_MAX,
    ROOT_DIR_ID,
    BackingName,
    EntryKind,
    NameCipher,
    XattrKind,
    entry_kind,
    new_dir_id,
    parse_dir_id,
    xattr_kind,
)

log = logging.getLogger(__name__)

NOFOLLOW_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
MAX_LOGGED = 1024  # undecryptable entries logged once each, up to this many
MAX_CACHED = 8192  # decrypted path components kept for paths.py
MAX_ENCRYPTED = 8192  # (directory ID, name) -> backing name kept, oldest dropped first


class EncryptedNames(PlainNames):
    """Names of a volume with encrypted names, with its ``NameCipher``.

    Holds no key but the cipher's subkeys.  Decrypted path components are kept
    (a name's encryption never changes) for ``plain_path``.  The backing names of
    the last ``MAX_ENCRYPTED`` names encrypted or listed are kept too, by
    (directory ID, name): a name is deterministic, so the LOOKUP before a CREATE,
    MKDIR or UNLINK, or the listing before ``rm -rf``'s UNLINKs, encrypts it for
    both.  Only names that decrypted (authenticated) are kept from a listing.
    """

    encrypted = True

    def __init__(self, cipher: NameCipher) -> None:
        self.cipher = cipher
        self._logged: set[tuple[bytes, bytes]] = set()
        self._components: dict[tuple[bytes, bytes], bytes] = {}
        self._backing: OrderedDict[tuple[bytes, bytes], BackingName] = OrderedDict()
        self._dirs_in_place = False  # the backing filesystem lacks RENAME_NOREPLACE

    # -- directories -------------------------------------------------------------

    def dir_id(self, path: str, root: bool) -> bytes:
        """The ID in the directory's ``user.kmsfs.dirid`` (all zeros for the root).

        EncryptedNameError if it is missing, FormatError if malformed.
        """
        if root:
            return ROOT_DIR_ID
        try:
            value = os.getxattr(path, DIR_ID_XATTR)
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
            raise EncryptedNameError(
                f"a directory without a directory ID ({DIR_ID_XATTR} is missing: made in the"
                " backing directory by hand, or copied without xattrs): its names cannot be"
                " read or made"
            ) from None
        return parse_dir_id(value)

    def reserved(self, root: bool, name: bytes) -> bool:
        return False  # every plaintext name encrypts to a name that does not start with '.'

    def namemax(self, backing_namemax: int) -> int:
        return NAME_MAX

    # -- names -------------------------------------------------------------------

    def _encrypted(self, parent: Dir, name: bytes) -> BackingName:
        """Where *name* lives in *parent*: OSError(ENAMETOOLONG) for a name over 255
        bytes, as the backing filesystem would answer; '.' and '..' are themselves."""
        if len(name) > NAME_MAX:
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
        if name in (b".", b".."):
            return BackingName(name)
        key = (parent.dir_id, name)
        backing = self._backing.get(key)
        if backing is None:
            backing = self.cipher.encrypt_name(parent.dir_id, name)
            self._keep(key, backing)
        return backing

    def _keep(self, key: tuple[bytes, bytes], backing: BackingName) -> None:
        """Keep *backing* as the backing name of *key* (directory ID, name), dropping
        the oldest kept beyond ``MAX_ENCRYPTED``.  Each step is one operation on the
        OrderedDict, so worker threads (path resolution) may share it."""
        kept = self._backing
        if key in kept:
            return
        while len(kept) >= MAX_ENCRYPTED:
            try:
                kept.popitem(last=False)
            except KeyError:  # emptied by another thread meanwhile
                break
        kept[key] = backing

    def backing_name(self, parent: Dir, name: bytes) -> bytes:
        return self._encrypted(parent, name).name

    def listing(self, parent: Dir, where: Callable[[], str]) -> list[Listed]:
        shown = []
        for text in os.listdir(parent.fd):
            backing = os.fsencode(text)
            if entry_kind(backing) not in (EntryKind.NAME, EntryKind.LONG_NAME):
                continue  # a sidecar, a temporary name, the config and state at the root
            try:
                shown.append(Listed(self.name_of(parent, backing), backing))
            except FileNotFoundError:
                continue  # a long name removed meanwhile, with its sidecar
            except (EncryptedNameError, OSError) as exc:
                self._log_once((parent.dir_id, backing), _left_out(where, backing), exc)
        return shown

    def name_of(self, parent: Dir, backing: bytes) -> bytes:
        """The plaintext name of *backing*, kept with it: a name that authenticates under
        this directory's ID is the one name that encrypts to *backing* (AES-SIV is
        deterministic; the encoding, padding and sidecar are checked canonical)."""
        sidecar = None
        if entry_kind(backing) is EntryKind.LONG_NAME:
            sidecar = _read_sidecar(parent.fd, backing)
        name = self.cipher.decrypt_name(parent.dir_id, backing, sidecar)
        self._keep((parent.dir_id, name), BackingName(backing, sidecar))
        return name

    def _log_once(self, key: tuple[bytes, bytes], what: Callable[[], str], exc: Exception) -> None:
        """Log *exc* (an entry or attribute that does not decrypt) once per *key*."""
        if key in self._logged:
            return
        if len(self._logged) < MAX_LOGGED:
            self._logged.add(key)
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        log.error("%s: %s", what(), reason)

    # -- long names --------------------------------------------------------------

    def _put_sidecar(self, parent: Dir, target: BackingName) -> bool:
        """Make the sidecar of the long name *target* (nothing for a short one); True
        if this wrote it (it was absent or held other bytes)."""
        sidecar_name = target.sidecar_name
        if sidecar_name is None or target.sidecar is None:
            return False
        try:
            if _read_sidecar(parent.fd, target.name) == target.sidecar:
                return False
        except (FileNotFoundError, EncryptedNameError):
            pass
        temp = TEMP_PREFIX + os.urandom(8).hex().encode()
        fd = os.open(
            temp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=parent.fd,
        )
        try:
            os.write(fd, target.sidecar)
        except BaseException:
            os.close(fd)
            _unlink_quietly(parent.fd, temp)
            raise
        os.close(fd)
        try:
            return _rename_sidecar(parent.fd, temp, sidecar_name, target)
        except BaseException:
            _unlink_quietly(parent.fd, temp)
            raise

    @staticmethod
    def _drop_sidecar(parent: Dir, target: BackingName) -> None:
        """Remove the sidecar of the long name *target* unless an entry of that name
        exists (a hard link left in place, a rename onto itself, another daemon's)."""
        sidecar_name = target.sidecar_name
        if sidecar_name is None:
            return
        try:
            os.stat(target.name, dir_fd=parent.fd, follow_symlinks=False)
            return
        except FileNotFoundError:
            pass
        _unlink_quietly(parent.fd, sidecar_name)

    def _making(self, parent: Dir, name: bytes, make: Callable[[bytes], None]) -> bytes:
        """``make(backing name)`` with the long name's sidecar written first, and
        removed again if making fails and no entry of that name exists."""
        target = self._encrypted(parent, name)
        wrote = self._put_sidecar(parent, target)
        try:
            make(target.name)
        except BaseException:
            if wrote:
                self._drop_sidecar(parent, target)
            raise
        return target.name

    # -- making and removing entries -------------------------------------------------

    def make_dir(self, parent: Dir, name: bytes, mode: int) -> tuple[bytes, bytes]:
        """mkdir under a temporary name, set its new ID, rename it into place with
        RENAME_NOREPLACE (FileExistsError if the name exists: of two daemons making
        it at once, one wins and the other leaves nothing behind).

        A backing filesystem without RENAME_NOREPLACE (NFS, GlusterFS's client:
        EINVAL) gets the directory made in place and its ID set right after, the
        first ID to land deciding which daemon made it (``_make_and_claim_dir``):
        another daemon may meet it without an ID for that moment (EIO for that
        request), and a crash in between leaves an empty directory without one
        (fsck: ``dir-id``; rmdir through the mount removes it, mkdir claims it).  Once
        the rename has answered so, every later mkdir is made in place straight away
        (no long name's sidecar written and dropped again by the failed rename)."""
        dir_id = new_dir_id()
        if self._dirs_in_place:
            return self._make_dir_in_place(parent, name, mode, dir_id), dir_id
        temp = TEMP_PREFIX + os.urandom(8).hex().encode()
        os.mkdir(temp, mode, dir_fd=parent.fd)
        try:
            _set_dir_id(parent.fd, temp, dir_id)
            backing = self.place(parent.fd, temp, parent, name)
        except BaseException as exc:
            try:
                os.rmdir(temp, dir_fd=parent.fd)
            except OSError:
                pass
            if isinstance(exc, OSError) and exc.errno in NO_RENAME_FLAGS:
                self._dirs_in_place = True
                return self._make_dir_in_place(parent, name, mode, dir_id), dir_id
            raise
        return backing, dir_id

    def _make_dir_in_place(self, parent: Dir, name: bytes, mode: int, dir_id: bytes) -> bytes:
        make = lambda at: _make_and_claim_dir(parent.fd, at, mode, dir_id)  # noqa: E731
        return self._making(parent, name, make)

    def make_node(self, parent: Dir, name: bytes, mode: int, rdev: int) -> bytes:
        return self._making(parent, name, lambda at: os.mknod(at, mode, rdev, dir_fd=parent.fd))

    def make_symlink(self, parent: Dir, name: bytes, target: bytes) -> bytes:
        stored = self.stored_target(target)
        return self._making(parent, name, lambda at: os.symlink(stored, at, dir_fd=parent.fd))

    def read_link(self, fd: int) -> bytes:
        return self.target_of(os.readlink(b"", dir_fd=fd))

    def target_of(self, stored: bytes) -> bytes:
        return self.cipher.decrypt_symlink(stored)

    def link_size(self, backing_size: int, read: Callable[[], bytes] | None) -> int:
        if read is None:
            raise EncryptedNameError("a symlink whose target cannot be read (no descriptor)")
        return len(self.target_of(read()))

    def stored_target(self, target: bytes) -> bytes:
        return self.cipher.encrypt_symlink(target)

    def open_new(self, parent: Dir, name: bytes, flags: int, mode: int) -> tuple[int, bytes]:
        opened: list[int] = []

        def make(at: bytes) -> None:
            opened.append(os.open(at, flags | os.O_CREAT | os.O_EXCL, mode, dir_fd=parent.fd))

        backing = self._making(parent, name, make)
        return opened[0], backing

    def link(self, path: str, parent: Dir, name: bytes) -> bytes:
        return self._making(
            parent,
            name,
            lambda at: os.link(path, at, dst_dir_fd=parent.fd, follow_symlinks=True),
        )

    def place(self, from_fd: int, from_name: bytes, parent: Dir, name: bytes) -> bytes:
        return self._making(
            parent, name, lambda at: rename_noreplace(from_fd, from_name, parent.fd, at)
        )

    def unlink(self, parent: Dir, name: bytes) -> None:
        target = self._encrypted(parent, name)
        os.unlink(target.name, dir_fd=parent.fd)
        self._drop_sidecar(parent, target)

    def rmdir(self, parent: Dir, name: bytes) -> None:
        """rmdir; a directory that holds only kmsfs's leftovers (sidecars without an
        entry, temporary names of an interrupted mkdir) is emptied of them first."""
        target = self._encrypted(parent, name)
        try:
            os.rmdir(target.name, dir_fd=parent.fd)
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY or not _clear_leftovers(parent.fd, target.name):
                raise
            os.rmdir(target.name, dir_fd=parent.fd)
        self._drop_sidecar(parent, target)

    def rename(self, old: Dir, old_name: bytes, new: Dir, new_name: bytes, flags: int) -> None:
        """Each name re-encrypted under its own directory.  RENAME_EXCHANGE swaps the
        two entries and leaves both sidecars (they describe the names, not the
        inodes); otherwise the new name's sidecar is made first and the old one's
        removed after (unless the old name still exists: renaming a name onto a
        hard link of the same inode, or onto itself, leaves both names)."""
        source = self._encrypted(old, old_name)
        if flags & RENAME_EXCHANGE:
            target = self._encrypted(new, new_name)
            renameat2(old.fd, source.name, new.fd, target.name, flags)
            return
        super_rename = super().rename
        self._making(new, new_name, lambda at: super_rename(old, source.name, new, at, flags))
        self._drop_sidecar(old, source)

    # -- extended attributes ---------------------------------------------------------

    def _xattr_name(self, name: bytes) -> bytes:
        if xattr_kind(name) is not XattrKind.ENCRYPTED:
            return name
        try:
            return self.cipher.encrypt_xattr_name(name)
        except PlaintextTooLong as exc:
            raise XattrNameTooLong(str(exc)) from None

    def get_xattr(self, path: str, name: bytes, object_id: Callable[[], bytes]) -> bytes:
        stored = os.getxattr(path, self._xattr_name(name))
        if xattr_kind(name) is not XattrKind.ENCRYPTED:
            return stored
        return self.cipher.decrypt_xattr_value(object_id(), name, stored)

    def set_xattr(
        self, path: str, name: bytes, value: bytes, object_id: Callable[[], bytes]
    ) -> None:
        backing = self._xattr_name(name)
        if xattr_kind(name) is XattrKind.ENCRYPTED:
            value = self.cipher.encrypt_xattr_value(object_id(), name, value)
        os.setxattr(path, backing, value)

    def remove_xattr(self, path: str, name: bytes) -> None:
        os.removexattr(path, self._xattr_name(name))

    def stored_xattrs(
        self, values: dict[str, bytes], object_id: bytes
    ) -> tuple[dict[str, bytes], list[tuple[str, str]]]:
        stored: dict[str, bytes] = {}
        refused: list[tuple[str, str]] = []
        for text, value in values.items():
            name = os.fsencode(text)
            if xattr_kind(name) is not XattrKind.ENCRYPTED:
                stored[text] = value
                continue
            try:
                backing = self._xattr_name(name)
                stored[os.fsdecode(backing)] = self.cipher.encrypt_xattr_value(
                    object_id, name, value
                )
            except PlaintextTooLong as exc:
                refused.append((text, str(exc)))
        return stored, refused

    def rebind_xattrs(
        self, values: dict[str, bytes], old_id: bytes, new_id: bytes
    ) -> dict[str, bytes]:
        rebound: dict[str, bytes] = {}
        for text, stored in values.items():
            backing = os.fsencode(text)
            if xattr_kind(backing) is not XattrKind.ENCRYPTED:
                rebound[text] = stored
                continue
            name = self.cipher.decrypt_xattr_name(backing)
            value = self.cipher.decrypt_xattr_value(old_id, name, stored)
            rebound[text] = self.cipher.encrypt_xattr_value(new_id, name, value)
        return rebound

    def xattr_names(self, path: str, where: Callable[[], str]) -> list[bytes]:
        shown = []
        for text in os.listxattr(path):
            backing = os.fsencode(text)
            if xattr_kind(backing) is not XattrKind.ENCRYPTED:
                shown.append(backing)
                continue
            try:
                shown.append(self.cipher.decrypt_xattr_name(backing))
            except EncryptedNameError as exc:
                self._log_once(
                    (b"xattr", backing), lambda: f"{where()}: extended attribute left out", exc
                )
        return shown

    # -- paths ---------------------------------------------------------------------

    def plain_path(self, root_fd: int, backing_path: str) -> str | None:
        try:
            return self.resolve_plain(root_fd, backing_path)
        except (KmsfsError, OSError, ValueError) as exc:
            self._log_once(
                (b"path", os.fsencode(backing_path)),
                lambda: f"backing path {backing_path}: no path in the volume",
                exc,
            )
            return None

    def resolve_plain(self, root_fd: int, backing_path: str) -> str:
        parts = [part for part in os.fsencode(backing_path).split(b"/") if part]
        names: list[str] = []
        dir_fd, dir_id = root_fd, ROOT_DIR_ID
        try:
            for index, part in enumerate(parts):
                key = (dir_id, part)
                name = self._components.get(key)
                if name is None:
                    try:
                        name = self.name_of(Dir(dir_fd, dir_id), part)
                    except KmsfsError as exc:
                        raise exc.located(_show(part)) from None
                    if len(self._components) >= MAX_CACHED:
                        self._components.clear()
                    self._components[key] = name
                names.append(os.fsdecode(name))
                if index + 1 < len(parts):
                    next_fd = os.open(part, O_PATH_DIR, dir_fd=dir_fd)
                    if dir_fd != root_fd:
                        os.close(dir_fd)
                    dir_fd = next_fd
                    try:
                        dir_id = self.dir_id(f"/proc/self/fd/{dir_fd}", root=False)
                    except KmsfsError as exc:
                        raise exc.located(_show(part)) from None
        finally:
            if dir_fd != root_fd:
                os.close(dir_fd)
        return "/" + "/".join(names)


def names_for(
    sealed: SealedNameSecret | None, volume_key: bytes | bytearray | None, volume_id: bytes
) -> PlainNames:
    """The names of a volume: ``PlainNames`` unless its config has a sealed name
    secret, which *volume_key* opens (ConfigTampered if it does not)."""
    if sealed is None:
        return PlainNames()
    if volume_key is None:
        raise ConfigError("a volume with encrypted names needs its volume key (format 4)")
    secret = sealed.open(volume_key, volume_id)
    try:
        return EncryptedNames(NameCipher(secret, volume_id))
    finally:
        secret[:] = bytes(len(secret))


# -- helpers ---------------------------------------------------------------------------


def _read_sidecar(dir_fd: int, long_name: bytes) -> bytes | None:
    """The bytes of the sidecar of *long_name* in *dir_fd* (never through a symlink);
    None if it is absent.  EncryptedNameError if it is not a regular file or too long."""
    sidecar_name = long_name + b".name"
    try:
        fd = os.open(sidecar_name, NOFOLLOW_READ, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise EncryptedNameError(
                f"long name {long_name!r}: its sidecar is a symlink (not followed)"
            ) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise EncryptedNameError(f"long name {long_name!r}: its sidecar is not a regular file")
        data = os.read(fd, MAX_SIDECAR_SIZE + 1)
    finally:
        os.close(fd)
    return data


# tries of a directory's claim or a sidecar's rename; waits 5, 10 … 640 ms between (1.3 s)
CLAIM_ATTEMPTS = 9
CLAIM_RETRY = (errno.ENOENT, errno.ESTALE)  # a name another client is making this moment


def _pause(attempt: int) -> None:
    """Wait before try *attempt* + 2 of a claim or a sidecar's rename (5 ms, doubling)."""
    time.sleep(0.005 * 2**attempt)


def _rename_sidecar(dir_fd: int, temp: bytes, sidecar_name: bytes, target: BackingName) -> bool:
    """Rename the sidecar written as *temp* onto *sidecar_name*; True if this one
    landed, False if another client's of the same bytes is there instead.

    On GlusterFS two clients renaming onto one name at once (two daemons making one
    long name) may get ENOENT or ESTALE; the sidecar of a name is always the same
    bytes, so one that is in place serves, else the rename is tried again."""
    for attempt in range(CLAIM_ATTEMPTS - 1):
        try:
            os.rename(temp, sidecar_name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            return True
        except OSError as exc:
            if exc.errno not in CLAIM_RETRY:
                raise
        try:
            if _read_sidecar(dir_fd, target.name) == target.sidecar:
                _unlink_quietly(dir_fd, temp)
                return False
        except (OSError, EncryptedNameError):
            pass
        _pause(attempt)
    os.rename(temp, sidecar_name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)  # its error is the answer
    return True


def _set_dir_id(parent_fd: int, name: bytes, dir_id: bytes) -> None:
    """Give the new directory *name* of *parent_fd* its ID (through an O_PATH descriptor:
    its mode may not let the daemon open it for reading)."""
    fd = os.open(name, O_PATH_DIR, dir_fd=parent_fd)
    try:
        path = f"/proc/self/fd/{fd}"
        try:
            os.setxattr(path, DIR_ID_XATTR, dir_id, os.XATTR_CREATE)
        except PermissionError:  # not root, and a mode without write for its owner
            mode = stat.S_IMODE(os.stat(fd).st_mode)
            os.chmod(path, mode | stat.S_IRWXU)
            try:
                os.setxattr(path, DIR_ID_XATTR, dir_id, os.XATTR_CREATE)
            finally:
                os.chmod(path, mode)
    finally:
        os.close(fd)


def _make_and_claim_dir(parent_fd: int, name: bytes, mode: int, dir_id: bytes) -> None:
    """Make the directory *name* in place and claim it by setting its ID: the daemon
    whose ID lands first (``XATTR_CREATE``) owns it, whoever's mkdir made it.
    FileExistsError if the name is taken (a directory with an ID, or no directory).

    On GlusterFS two clients making one name at once may both get EEXIST from mkdir
    and then see the name as ENOENT or ESTALE for a moment (6 rounds in 600 here), so
    mkdir's answer cannot pick the winner; the ID can. A directory without an ID is
    claimed whoever made it (another daemon between its mkdir and its ID, or one left
    by a crash, which is empty: nothing is made in a directory without an ID)."""
    for attempt in range(CLAIM_ATTEMPTS):
        last = attempt == CLAIM_ATTEMPTS - 1
        made = False
        try:
            os.mkdir(name, mode, dir_fd=parent_fd)
            made = True
        except FileExistsError:
            pass
        except OSError as exc:
            if exc.errno not in CLAIM_RETRY or last:
                raise
            _pause(attempt)
            continue
        try:
            _set_dir_id(parent_fd, name, dir_id)
        except OSError as exc:
            # EEXIST: another daemon's ID landed first (theirs: leave it); ENOTDIR,
            # ELOOP: the name is taken by something that is not a directory
            if exc.errno in (errno.EEXIST, errno.ENOTDIR, errno.ELOOP):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), name) from None
            if exc.errno in CLAIM_RETRY and not last:
                _pause(attempt)
                continue
            if made:
                try:
                    os.rmdir(name, dir_fd=parent_fd)
                except OSError:
                    pass
            raise
        if not made:  # claimed a directory another made: give it this request's mode
            _chmod_at(parent_fd, name, mode)
        return


def _chmod_at(parent_fd: int, name: bytes, mode: int) -> None:
    """chmod *name* of *parent_fd* (a directory) without following a symlink, keeping
    the set-group-ID bit it inherited from its parent."""
    fd = os.open(name, O_PATH_DIR, dir_fd=parent_fd)
    try:
        inherited = os.stat(fd).st_mode & stat.S_ISGID
        os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(mode) | inherited)
    finally:
        os.close(fd)


def _left_out(where: Callable[[], str], backing: bytes) -> Callable[[], str]:
    return lambda: f"{where()}: entry {_show(backing)} left out of the listing"


def _show(data: bytes) -> str:
    """Backing bytes for a log line, quoted: ASCII as is, anything else as \\xNN."""
    return repr(data)[1:]


def _unlink_quietly(dir_fd: int, name: bytes) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def _clear_leftovers(parent_fd: int, name: bytes) -> bool:
    """Remove kmsfs's leftovers from the directory *name* of *parent_fd* if it holds
    nothing else: sidecars whose entry is gone, temporary names.  True if it did."""
    fd = os.open(
        name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd
    )
    try:
        found = [os.fsencode(n) for n in os.listdir(fd)]
        present = set(found)
        leftovers = []
        for entry in found:
            kind = entry_kind(entry)
            orphan = kind is EntryKind.SIDECAR and entry[: -len(b".name")] not in present
            if orphan or entry.startswith(TEMP_PREFIX):
                leftovers.append(entry)
            else:
                return False
        for entry in leftovers:
            st = os.stat(entry, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                os.rmdir(entry, dir_fd=fd)
            else:
                os.unlink(entry, dir_fd=fd)
        return True
    finally:
        os.close(fd)
