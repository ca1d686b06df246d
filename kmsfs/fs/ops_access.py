"""The access policy in the operations: which action each request needs, who asks,
and the audit records of opens, creates and decisions (kmsfs.policy decides)."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any

import pyfuse3
import trio
from pyfuse3 import FUSEError

from kmsfs.fs.events import AccessEvent, access_mode
from kmsfs.fs.inodes import Inode
from kmsfs.fs.ops_base import OperationsBase, errno_for
from kmsfs.policy import Policy
from kmsfs.policy.identity import HashPending
from kmsfs.policy.records import audit_record


class AccessChecks(OperationsBase):
    """Policy checks and audit records for the handlers (EACCES on a denial)."""

    @property
    def policy(self) -> Policy:
        return self._policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        """Swap the access policy (SIGHUP reload).  When two processes may be shown
        different things for one name (``list`` rules that test the requester), entries
        and attributes are not cached by the kernel (docs/DESIGN.md "Access policy")."""
        self._policy = policy
        self.timeout = 0.0 if policy.varies_by_requester("list") else self._timeout

    async def _allow(
        self,
        ctx: pyfuse3.RequestContext,
        action: str,
        path: Callable[[], str],
        tree: bool = False,
    ) -> None:
        """EACCES unless the access policy lets the requester do *action* on *path*.

        With *tree*, on *path* and everything below it (renaming a directory).
        Decisions marked for audit go to ``on_policy``.  Permit-all policies cost
        one dictionary look-up.
        """
        policy = self._policy
        if not policy.applies(action):
            decision = policy.default_decision
            if decision.allowed and not decision.audit:
                return
            requester = self.identities.lookup(ctx.pid, ctx.uid, ctx.gid)
        else:
            requester = self.identities.lookup(ctx.pid, ctx.uid, ctx.gid)
            try:
                decision = self._decide(policy, requester, action, path, tree)
            except HashPending:  # a rule needs the program's SHA-256: read it off the loop
                await trio.to_thread.run_sync(requester.compute_sha256, limiter=self._key_limiter)
                decision = self._decide(policy, requester, action, path, tree)
        if decision.audit and self.on_policy is not None:
            self.on_policy(audit_record(requester, action, path(), decision))
        if not decision.allowed:
            raise FUSEError(errno.EACCES)  # the access policy denies it

    @staticmethod
    def _decide(
        policy: Policy, requester: Any, action: str, path: Callable[[], str], tree: bool
    ) -> Any:
        if tree:
            return policy.decide_tree(requester, action, path())
        return policy.decide(requester, action, path)

    async def _allow_rename(
        self,
        ctx: pyfuse3.RequestContext,
        old_parent: Inode,
        old_name: bytes,
        new_parent: Inode,
        new_name: bytes,
    ) -> None:
        """rename on the source (and all below it), create on the destination, delete on a
        name it replaces; the existence check costs a syscall only under a delete rule."""
        await self._allow(ctx, "rename", self._path_of(old_parent, old_name), tree=True)
        await self._allow(ctx, "create", self._path_of(new_parent, new_name))
        if self._policy.applies("delete") or not self._policy.default_decision.allowed:
            try:
                os.stat(new_name, dir_fd=new_parent.fd, follow_symlinks=False)
            except FileNotFoundError:
                return
            await self._allow(ctx, "delete", self._path_of(new_parent, new_name), tree=True)

    def _requester(
        self,
        ctx: pyfuse3.RequestContext | None,
        entry: Inode | None,
        name: bytes | None = None,
    ) -> dict[str, Any]:
        """Who asked, for the audit log (built only when there is one: two small
        /proc reads per request, on the loop).

        The path is the entry's, or *name* inside the directory *entry*.  The
        process may have exited (or be a kernel thread): then "process" and
        "exe" are empty.
        """
        if self.on_access is None or ctx is None:
            return {}
        try:
            with open(f"/proc/{ctx.pid}/comm") as handle:
                process = handle.read().strip()
        except OSError:
            process = ""
        try:
            exe = os.readlink(f"/proc/{ctx.pid}/exe")
        except OSError:
            exe = ""
        info: dict[str, Any] = {
            "uid": ctx.uid,
            "gid": ctx.gid,
            "pid": ctx.pid,
            "process": process,
            "exe": exe,
        }
        if entry is not None:
            path = self.describe(entry)
            if name is not None:
                path = os.path.join(path, os.fsdecode(name))
            info["path"] = path
        return info

    def _audit_access(
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
