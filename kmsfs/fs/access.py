"""The access policy in the operations: which action each request needs, who asks,
and the audit records of opens, creates and decisions (kmsfs.policy decides).

``Access`` is what every concern of the operations asks (EACCES on a denial);
``policy reload`` swaps its policy through ``set_policy``.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import Any

import pyfuse3
import trio
from pyfuse3 import FUSEError

from kmsfs.backing.names import Listed
from kmsfs.fs.access_events import AccessEvent, access_mode
from kmsfs.fs.errno_map import errno_for, log
from kmsfs.fs.inodes import DirHandle, Inode
from kmsfs.fs.places import Places
from kmsfs.fs.served import ServedVolume
from kmsfs.policy import Decision, Pending, Policy, Requester
from kmsfs.policy.records import audit_record

MAX_ROUNDS = 3  # Pending kinds (program look-up, SHA-256) + 1
_FMODE_EXEC = 0x20  # in an OPEN's flags when the kernel opens a file to execute it


def open_actions(flags: int) -> tuple[str, ...]:
    """The policy actions an open with *flags* needs: read, write, both, or exec."""
    mode = flags & os.O_ACCMODE
    actions: list[str] = []
    if mode in (os.O_RDONLY, os.O_RDWR):
        actions.append("exec" if flags & _FMODE_EXEC else "read")
    if mode in (os.O_WRONLY, os.O_RDWR) or flags & os.O_TRUNC:
        actions.append("write")
    return tuple(actions)


def once(path: Callable[[], str | None]) -> Callable[[], str | None]:
    """*path*, computed on the first call only (a readlink each time otherwise)."""
    found: list[str | None] = []

    def cached() -> str | None:
        if not found:
            found.append(path())
        return found[0]

    return cached


def _constant(path: str | None) -> Callable[[], str | None]:
    return lambda: path


def mode_lets_read(st: os.stat_result, uid: int, groups: frozenset[int]) -> bool:
    """True if the mode bits of *st* let *uid* (in *groups*) read it, as the kernel checks
    them without ACLs: the owner's bits for the owner, else the group's, else others'."""
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IRUSR)
    if st.st_gid in groups:
        return bool(st.st_mode & stat.S_IRGRP)
    return bool(st.st_mode & stat.S_IROTH)


class Access:
    """Policy checks and audit records for the handlers (EACCES on a denial).

    Attributes: policy (the access policy served; ``set_policy`` replaces it),
    policy_serial (policies set so far), timeout (the seconds the kernel may keep
    entries and attributes under the current policy: 0 when listings differ per
    requester), identities (requester identities), on_access (the audit log's sink
    for opens and creates, or None), on_policy (its sink for decisions marked for
    audit, or None).
    """

    def __init__(self, parts: ServedVolume, places: Places) -> None:
        self.places = places
        self.names = parts.names
        self.inodes = parts.inodes
        self.identities = parts.identities
        self.on_access = parts.on_access
        self.on_policy = parts.on_policy
        self._volume_hex = parts.config.volume_id.hex()
        self._key_limiter = parts.key_limiter
        self._timeout = parts.timeout  # the configured one; ``timeout`` may be 0 (policy)
        self.timeout = parts.timeout
        self._exec_warned: set[int] = set()  # inodes (warn_exec_only)
        self.policy_serial = 0  # policies set so far (set_policy counts them)
        self.set_policy(parts.policy)

    @property
    def policy(self) -> Policy:
        return self._policy

    def set_policy(self, policy: Policy) -> None:
        """Swap the access policy (SIGHUP reload).  When two processes may be shown
        different things for some name (``list`` rules that test the requester), entries
        and attributes are kept by the kernel only where ``timeout_for`` says so: a reply
        that does not ask it gets timeout 0 (docs/DESIGN.md "Access policy")."""
        self._policy = policy
        self.policy_serial += 1  # listings the kernel kept under the old one are made again
        self.timeout = 0.0 if policy.varies_by_requester("list") else self._timeout
        self._exec_warned.clear()  # warned once per file and policy

    @property
    def _per_path(self) -> bool:
        """Whether cache times are chosen per path: the kernel keeps entries at all, and
        some ``list`` rule tests the requester (``set_policy`` then set ``timeout`` 0)."""
        return self.timeout == 0 and self._timeout > 0

    def timeout_for(self, path: Callable[[], str | None]) -> float:
        """How long the kernel may keep the entry at *path* and its attributes: 0 where two
        processes may be shown different things for it (its ``list`` decision may differ
        by requester: docs/POLICY.md "What the kernel caches"), else the configured time.
        The kernel answers a kept entry for every process without asking the daemon."""
        if not self._per_path:
            return self.timeout
        return 0.0 if self._policy.varies_for(path(), "list") else self._timeout

    def listing_kept(self, path: Callable[[], str | None]) -> bool:
        """True if the kernel may keep the listing of the directory at *path* for every
        process that opens it: no ``list`` decision below it may differ by requester."""
        if not self._per_path:
            return self.timeout > 0
        return not self._policy.varies_below(path(), "list")

    def timeout_of_listed(self, directory: Inode | None, name: bytes) -> float:
        """``timeout_for`` the entry *name* of a listing of *directory* (None: gone)."""
        if not self._per_path or directory is None:
            return self.timeout
        return self.timeout_for(self.places.path_of(directory, name))

    def forget_moved(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes
    ) -> None:
        """After a rename, when some ``list`` decision may differ by requester: have the
        kernel drop the entries it moved (a directory's with the entries below it).  It
        moves an entry with the time it may keep it, given for its old path, which the
        new one may not allow.  Queued to pyfuse3's notify thread: the kernel holds the
        directories until it has moved the entry, so the notice waits for that."""
        if not self._per_path:
            return
        pyfuse3.invalidate_entry_async(new_parent, new_name, ignore_enoent=True)
        pyfuse3.invalidate_entry_async(old_parent, old_name, ignore_enoent=True)  # exchange

    async def allow(
        self,
        ctx: pyfuse3.RequestContext,
        action: str,
        path: Callable[[], str | None],
        tree: bool = False,
    ) -> None:
        """EACCES unless the access policy lets the requester do *action* on *path*.

        With *tree*, on *path* and everything below it (renaming a directory).
        A path that cannot be established (None) is denied whenever a rule could
        decide it.  Decisions marked for audit go to ``on_policy``.  Permit-all
        policies cost one dictionary look-up.
        """
        policy = self._policy
        path = once(path)
        if not policy.applies(action):
            decision = policy.default_decision
            if decision.allowed and not decision.audit:
                return
            requester = self.identities.lookup(ctx.pid, ctx.uid, ctx.gid)
        else:
            requester = self.identities.lookup(ctx.pid, ctx.uid, ctx.gid)
            decision = await self.decide(policy, requester, action, path, tree)
        if decision.audit and self.on_policy is not None:
            self.on_policy(audit_record(requester, action, path(), decision))
        if not decision.allowed:
            raise FUSEError(errno.EACCES)  # the access policy denies it

    async def decide(
        self,
        policy: Policy,
        requester: Requester,
        action: str,
        path: Callable[[], str | None],
        tree: bool = False,
    ) -> Decision:
        """``policy.decide`` (``decide_tree`` with *tree*), reading in a worker thread the
        facts a rule needs that take blocking I/O (``Pending``: a program's SHA-256, a
        configured program looked up again).  Each kind is read at most once per
        requester, so this decides in at most three rounds."""
        for _ in range(MAX_ROUNDS):
            try:
                if tree:
                    return policy.decide_tree(requester, action, path())
                return policy.decide(requester, action, path)
            except Pending as pending:
                await trio.to_thread.run_sync(pending.resolve, limiter=self._key_limiter)
        raise RuntimeError(f"policy decision for {action} still pending after {MAX_ROUNDS} rounds")

    async def listable(self, handle: DirHandle, names: list[Listed]) -> list[Listed]:
        """The entries of *names* (in the directory *handle*) its opener may ``list``.

        A denied entry is left out, not audited (the opener asked for the
        directory, not for it).  Costs one decision per entry, only when a rule
        names ``list`` and the policy enforces; the current policy decides, with
        the identity of the process that opened the directory.
        """
        policy = self._policy
        requester = handle.requester
        if requester is None or policy.mode != "enforce" or not policy.applies("list"):
            return names
        entry = self.inodes.get(handle.ino)
        base = None if entry is None else self.places.path_of(entry)()
        shown = []
        for name in names:
            path = None if base is None else os.path.join(base, os.fsdecode(name.name))
            decision = await self.decide(policy, requester, "list", _constant(path))
            if decision.allowed:
                shown.append(name)
        return shown

    async def warn_exec_only(self, ctx: pyfuse3.RequestContext, entry: Inode) -> None:
        """Log (once per file and policy) an exec the policy permits to a requester it
        denies ``read``, of a file whose mode lets that requester read it.

        The kernel marks a process undumpable only when it may not read the file
        it executes; otherwise a process of the same user can read the program
        from the new process's memory (ptrace, /proc/PID/mem), whatever the
        policy says about ``read``.  One extra decision per exec, only when a rule
        names ``read``; root is skipped (it may read the file regardless).
        """
        policy = self._policy
        if ctx.uid == 0 or policy.mode != "enforce" or not policy.applies("read"):
            return
        if entry.ino in self._exec_warned:
            return
        requester = self.identities.lookup(ctx.pid, ctx.uid, ctx.gid)
        path = once(self.places.path_of(entry))
        if (await self.decide(policy, requester, "read", path)).allowed:
            return
        st = os.stat(entry.fd)
        if not mode_lets_read(st, requester.uid, requester.groups):
            return
        if len(self._exec_warned) < 1024:
            self._exec_warned.add(entry.ino)
        log.warning(
            "%s: exec is permitted to uid %d and read is denied, but the file's mode %04o"
            " lets that uid read it, so the running program can be read from its memory"
            " (ptrace, /proc/PID/mem); for an exec-only program remove read for it"
            " (chmod go-r, e.g. mode 0711)",
            path() or f"inode {entry.ino}",
            requester.uid,
            stat.S_IMODE(st.st_mode),
        )

    async def allow_rename(
        self,
        ctx: pyfuse3.RequestContext,
        old_parent: Inode,
        old_name: bytes,
        new_parent: Inode,
        new_name: bytes,
    ) -> None:
        """rename on the source (and all below it), create on the destination, delete on a
        name it replaces; the existence check costs a syscall only under a delete rule."""
        await self.allow(ctx, "rename", self.places.path_of(old_parent, old_name), tree=True)
        await self.allow(ctx, "create", self.places.path_of(new_parent, new_name))
        if self._policy.applies("delete") or not self._policy.default_decision.allowed:
            backing = self.names.backing_name(self.places.dir(new_parent), new_name)
            try:
                os.stat(backing, dir_fd=new_parent.fd, follow_symlinks=False)
            except FileNotFoundError:
                return
            await self.allow(ctx, "delete", self.places.path_of(new_parent, new_name), tree=True)

    def requester(
        self,
        ctx: pyfuse3.RequestContext | None,
        entry: Inode | None,
        name: bytes | None = None,
    ) -> dict[str, Any]:
        """Who asked, for the audit log (built only when there is one: a few small
        /proc reads per request, on the loop).

        The path is the entry's, or *name* inside the directory *entry*.  The
        process may have exited (or be a kernel thread), or run in another
        namespace than the daemon's: then "exe" is empty and "unknown_program"
        says why (identity.py).
        """
        if self.on_access is None or ctx is None:
            return {}
        try:
            with open(f"/proc/{ctx.pid}/comm") as handle:
                process = handle.read().strip()
        except OSError:
            process = ""
        requester = self.identities.lookup(ctx.pid, ctx.uid, ctx.gid)
        info: dict[str, Any] = {
            "uid": ctx.uid,
            "gid": ctx.gid,
            "pid": ctx.pid,
            "process": process,
            "exe": requester.exe or "",
            "unknown_program": requester.unknown_program,
        }
        if entry is not None:
            path = self.places.describe(entry)
            if name is not None:
                path = os.path.join(path, os.fsdecode(name))
            info["path"] = path
        return info

    def audit_access(
        self,
        operation: str,
        flags: int,
        requester: dict[str, Any],
        file_id: bytes | None,
        exc: BaseException | None = None,
    ) -> None:
        """Report an open or create, allowed (*exc* None) or refused, to the audit log."""
        if self.on_access is None:
            return
        if exc is None:
            result, error = "ok", ""
        else:
            code = errno_for(exc)
            result = errno.errorcode.get(code, str(code))
            error = os.strerror(code) if isinstance(exc, FUSEError) else str(exc)
        self.on_access(
            AccessEvent(
                operation,
                access_mode(flags),
                self._volume_hex,
                file_id.hex() if file_id else "",
                result,
                error,
                requester,
            )
        )
