"""Files and directories the host names to kmsfs (secrets, logs, the runtime directory),
opened so that no other local user can steer or stall kmsfs through them.

- Never through a symbolic link in the last component (``O_NOFOLLOW``): a link
  planted under the name would make a root process read or write the file it
  points to.
- Never waiting on the other end (``O_NONBLOCK``): opening a FIFO for reading
  returns at once instead of blocking until a writer comes, and then the type
  check refuses it.
- A file must be a regular file, a directory a directory; anything else is
  refused with a message that names what it is ("is a FIFO", "is a symbolic
  link", ...).
- Owner and mode are checked on the descriptor opened (``fstat``), never on a
  path that may have changed meanwhile.

Depends on nothing but ``kmsfs.errors``: every layer may use it.
"""

from __future__ import annotations

import errno
import os
import stat

from kmsfs.errors import ConfigError

# O_NOCTTY: a terminal named as a file must not become our controlling terminal
OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
DIR_OPEN_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_KINDS = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISREG, "a regular file"),
)


def kind_of(mode: int) -> str:
    """What a file of mode *mode* is, for messages: "a FIFO", "a directory", ..."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def describe(path: str | os.PathLike[str]) -> str | None:
    """What *path* itself is ("a symbolic link (to 'x')", "a pipe", "a FIFO"...), without
    following it; None if it cannot be told.  A symlink's target is read, never entered:
    ``/dev/fd/N`` of a pipe (``--passphrase-file <(...)``) names "pipe:[inode]"."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISLNK(st.st_mode):
        return kind_of(st.st_mode)
    try:
        target = os.readlink(path)
    except OSError:
        return "a symbolic link"
    if target.startswith(("pipe:[", "socket:[")):
        return "a pipe" if target.startswith("pipe:") else "a socket"
    return f"a symbolic link (to {target!r})"


def open_regular(
    path: str | os.PathLike[str],
    flags: int,
    what: str,
    hint: str = "",
    create_mode: int = 0o600,
    follow: bool = False,
) -> tuple[int, os.stat_result]:
    """Open the regular file *path* with *flags* plus ``OPEN_FLAGS``; its descriptor and
    ``fstat``.  Nothing is read or written here.

    ConfigError naming *what* and *path*, with *hint* appended when the file is not a
    regular file: it does not exist (without ``O_CREAT`` in *flags*), it is a symbolic
    link (unless *follow*: then what it points to is checked) or anything but a regular
    file (naming its type), or it cannot be opened.  A file created here gets
    *create_mode* (less the umask).
    """
    flags |= OPEN_FLAGS & ~os.O_NOFOLLOW if follow else OPEN_FLAGS
    try:
        fd = os.open(path, flags, create_mode)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except OSError as exc:
        # ELOOP: a symlink under O_NOFOLLOW; EISDIR: a directory opened for writing;
        # ENXIO: a FIFO opened for writing with no reader, or a socket
        kind = None
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            kind = _kind_followed(path) if follow else describe(path)
        if kind is not None and kind != "a regular file":
            raise ConfigError(_not_regular(what, path, kind, hint)) from None
        raise ConfigError(f"cannot open {what} {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise ConfigError(f"cannot open {what} {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ConfigError(_not_regular(what, path, kind_of(st.st_mode), hint))
    return fd, st


def _kind_followed(path: str | os.PathLike[str]) -> str | None:
    try:
        return kind_of(os.stat(path).st_mode)  # stat opens nothing: never waits
    except OSError:
        return None


def _not_regular(what: str, path: str | os.PathLike[str], kind: str, hint: str) -> str:
    why = " (kmsfs does not follow one here)" if kind.startswith("a symbolic link") else ""
    return f"{what} {path} is {kind}, not a regular file{why}" + (f": {hint}" if hint else "")


def check_owner(st: os.stat_result, path: str | os.PathLike[str], what: str) -> None:
    """ConfigError unless the file *st* describes belongs to root or to the user running
    kmsfs (any other owner could read it, or replace what it holds); the message gives
    the ``chown`` that fixes it."""
    me = os.geteuid()
    if st.st_uid not in (0, me):
        raise ConfigError(
            f"{what} {path} belongs to uid {st.st_uid}, not to root or to you"
            f" ({user_name(me)}): run 'chown {user_name(me)} {path}'"
        )


def user_name(uid: int) -> str:
    """The login name of *uid*, else the number."""
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def open_private_log(path: str | os.PathLike[str], what: str) -> tuple[int, str | None]:
    """Open the log file *path* for appending (``O_WRONLY|O_APPEND|O_CREAT`` plus
    ``OPEN_FLAGS``), creating it 0600; returns its descriptor and a note to log, or None.

    ConfigError if it is a symbolic link (never followed: a link planted there would
    make a root daemon append to the file it names) or anything but a regular file,
    naming what it is, or if it belongs to a user other than root or the one running
    kmsfs (who could read it, or change what it says).  An existing file that group or
    others may access (0644: what kmsfs made before) is made 0600, and the note says
    so: logs name paths and key IDs.  A reader that opened it before keeps its
    descriptor.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
    fd, st = open_regular(path, flags, what, "name a regular file (kmsfs creates it 0600)")
    try:
        check_owner(st, path, what)
        if not st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            return fd, None
        os.fchmod(fd, 0o600)
    except OSError as exc:
        os.close(fd)
        raise ConfigError(f"cannot make {what} {path} private (0600): {exc.strerror}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd, f"{what} {path} was mode {stat.S_IMODE(st.st_mode):04o}: made it 0600"


def open_private_dir(
    path: str | os.PathLike[str], what: str, create: bool, hint: str = ""
) -> int | None:
    """The directory *path* opened (``O_DIRECTORY|O_NOFOLLOW``), if it belongs to the user
    running kmsfs and group and others have no access (mode 0700 or stricter); created
    0700 if it is missing and *create* (else None).

    ConfigError naming what is wrong (a symbolic link, not a directory, another owner,
    a looser mode) and how to fix it: ``chmod 700`` for a mode; for the rest, removing
    it, or *hint* (where else kmsfs can be told to look).  Another user who made it
    first could otherwise read, replace or intercept what kmsfs puts there.
    """
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass  # someone's: checked below, like any existing one
        except OSError as exc:
            raise ConfigError(f"cannot create {what} {path}: {exc.strerror}") from None
    try:
        fd = os.open(path, DIR_OPEN_FLAGS)
    except FileNotFoundError:
        if create:
            raise ConfigError(f"{what} {path} vanished while kmsfs created it") from None
        return None
    except OSError as exc:
        kind = describe(path) if exc.errno in (errno.ELOOP, errno.ENOTDIR) else None
        if kind is None:
            raise ConfigError(f"cannot open {what} {path}: {exc.strerror}") from None
        raise ConfigError(_unusable_dir(what, path, f"is {kind}, not a directory", hint)) from None
    st = os.fstat(fd)
    me = os.geteuid()
    if st.st_uid != me:
        os.close(fd)
        problem = f"belongs to uid {st.st_uid}, not to you ({user_name(me)})"
        raise ConfigError(_unusable_dir(what, path, problem, hint))
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        os.close(fd)
        raise ConfigError(
            f"{what} {path} is accessible by group or others (mode"
            f" {stat.S_IMODE(st.st_mode):04o}): run 'chmod 700 {path}'"
        )
    return fd


def _unusable_dir(what: str, path: str | os.PathLike[str], problem: str, hint: str) -> str:
    return (
        f"{what} {path} {problem}: kmsfs uses only a directory of its own user with mode"
        f" 0700; remove it ('rm -rf {path}', as root if it is another user's){hint}"
    )
