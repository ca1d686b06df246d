"""The online rekey job of a mounted volume, driven through the control socket
(docs/DESIGN.md "Online rekey").

``RekeyService`` runs beside the FUSE loop (``ServerRuntime`` starts it).  It answers
``rekey-start <json>``, ``rekey-pause``, ``rekey-resume``, ``rekey-cancel`` and
``rekey-status``; runs one job at a time: a walk in a worker thread counts what is due,
a second walk feeds the due files to the loop through a channel, and each is re-keyed
by ``kmsfs.fs.rekey_online.OnlineRekey`` under the rate limits; and journals the job in
``.kmsfs.d/rekey-online.json`` so that it resumes at the next mount.  With
``-o auto_rekey`` it also re-keys files whose format-1 key reached the usage warning.

Refused (the reply says why, with an exit code): a shared mount (naming the other
daemons registered), a read-only mount, a second job, an interrupted offline rekey.
Nothing here raises into the loop: a failing file is counted and logged, a failing
job ends in state "failed" with the reason.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from kmsfs.backing.content_file import ContentFile
from kmsfs.backing.journals import drop_journal, load_journal, save_journal
from kmsfs.backing.syscalls import birth_time
from kmsfs.backing.tree import Tree, open_state_dir
from kmsfs.backing.volume_lock import daemons_serving
from kmsfs.errors import FormatError, KmsfsError, LifecycleError
from kmsfs.format.content import Layout, format_of_mode
from kmsfs.format.header import XATTR_NAME, FileHeader
from kmsfs.fs.rekey_online import Moved, NotDue, OnlineRekey, Skipped
from kmsfs.lifecycle.selection import Selection, backing_paths, journal_cutoff
from kmsfs.server.rekey_progress import Counters, JobSettings, Pace, RateLimit

if TYPE_CHECKING:
    from kmsfs.fs.operations import KmsfsOperations

log = logging.getLogger("kmsfs.rekey")

JOURNAL = "rekey-online"
OFFLINE_JOURNAL = "rekey"  # kmsfs.lifecycle.rekey's
SAVE_INTERVAL = 2.0  # seconds between journal writes of the counters
AUTO_POLL = 1.0  # seconds between looks at the queue of worn format-1 files (auto_rekey)
FINISHED = ("done", "cancelled", "failed")
MAX_WALKS = 4  # a file renamed across a walk is met by the next one, up to this many
MAX_HANDLED = 100_000  # files skipped or failed that later walks leave alone


class Refused(KmsfsError):
    """A request the service will not carry out (the reply's ``refused``)."""

    exit_code = 1


class Job:
    """One rekey job.  Attributes: settings, counters, state ("scanning", "running",
    "paused", "done", "cancelled", "failed"), reason (why it failed), files_total and
    bytes_total (due, known after the first walk), pace, scope (cancels it), cancelled
    (by request: the journal goes; otherwise the daemon is stopping and it stays)."""

    def __init__(self, settings: JobSettings, counters: Counters | None = None) -> None:
        self.settings = settings
        self.counters = counters or Counters()
        self.state = "scanning"
        self.paused = False
        self.reason: str | None = None
        self.files_total: int | None = None
        self.bytes_total = 0
        self.pace = Pace()
        self.bytes_limit = RateLimit(settings.max_mbps * 1e6 if settings.max_mbps else None)
        self.files_limit = RateLimit(settings.max_files_per_second)
        self.resumed = trio.Event()
        self.resumed.set()
        self.scope = trio.CancelScope()
        self.cancelled = False
        self.saved_at = 0.0
        self.handled: set[tuple[int, int]] = set()  # skipped, failed, not due: no retry
        self.retry = False  # a file moved under the rekey: walk again

    def remember(self, st: os.stat_result) -> None:
        """Do not take the file of *st* again in this job's later walks (bounded: past
        MAX_HANDLED files, later walks may meet some of them again)."""
        if len(self.handled) < MAX_HANDLED:
            self.handled.add((st.st_dev, st.st_ino))

    def to_journal(self) -> dict[str, Any]:
        c = self.counters
        return {
            "version": 1,
            **self.settings.to_json(),
            "paused": self.paused,
            "files_done": c.files_done,
            "bytes_done": c.bytes_done,
        }

    @classmethod
    def from_journal(cls, data: dict[str, Any], where: str) -> Job:
        """The job *data* (``to_journal``'s form) describes; LifecycleError if malformed."""
        try:
            if data.get("version") != 1:
                raise ValueError(f"version {data.get('version')!r}")
            names = ("cutoff", "max_mbps", "max_files_per_second", "files_done", "bytes_done")
            numbers = {name: data.get(name) for name in names}
            for name, value in numbers.items():
                if value is not None and (not isinstance(value, int | float) or value < 0):
                    raise ValueError(name)
            settings = JobSettings(
                Selection.from_json(data.get("selection"), where),
                float(numbers["cutoff"] or 0.0),
                numbers["max_mbps"] or None,
                numbers["max_files_per_second"] or None,
                str(data.get("started", "?"))[:40],
            )
        except (ValueError, TypeError) as exc:
            raise LifecycleError(f"malformed rekey journal ({exc})", where=where) from None
        counters = Counters(int(numbers["files_done"] or 0), int(numbers["bytes_done"] or 0))
        job = cls(settings, counters)
        job.paused = bool(data.get("paused"))
        return job

    def status(self, current: dict[str, Any] | None) -> dict[str, Any]:
        c = self.counters
        live_bytes = c.bytes_done + (current["copied"] if current else 0)
        byte_rate, file_rate = self.pace.rates()
        files_left = (self.files_total or 0) - c.files_met
        eta = None
        if self.state == "running" and self.files_total is not None:
            eta = self.pace.eta(self.bytes_total - live_bytes, files_left)
        return {
            "state": self.state,
            "reason": self.reason,
            "selection": self.settings.selection.describe(),
            "started": self.settings.started,
            "max_mbps": self.settings.max_mbps,
            "max_files_per_second": self.settings.max_files_per_second,
            "files_total": self.files_total,
            "bytes_total": self.bytes_total,
            "files_done": c.files_done,
            "bytes_done": live_bytes,
            "files_skipped": c.files_skipped,
            "files_failed": c.files_failed,
            "files_not_due": c.files_not_due,
            "rate_bytes_per_second": None if byte_rate is None else round(byte_rate, 1),
            "rate_files_per_second": None if file_rate is None else round(file_rate, 3),
            "eta_seconds": None if eta is None else round(eta, 1),
            "current": current["path"] if current else None,
            "skipped_files": list(c.skipped),
            "failed_files": list(c.failed),
        }


class RekeyService:
    """The rekey side of a daemon.  Attributes: read_only (the mount is), auto (``-o
    auto_rekey``), job (the current or last job, or None), ops and engine (once
    running), auto_queue (inodes whose key reached the usage warning), auto_done,
    auto_failed."""

    def __init__(self, read_only: bool = False, auto: bool = False) -> None:
        self.read_only = read_only
        self.auto = auto
        self.job: Job | None = None
        self.ops: KmsfsOperations | None = None
        self.engine: OnlineRekey | None = None
        self.auto_queue: collections.deque[int] = collections.deque()
        self.auto_done = 0
        self.auto_failed = 0
        self._engine_lock = trio.Lock()
        self._journal_lock = trio.Lock()  # one journal write at a time (one temporary name)
        self._control_lock = trio.Lock()  # one start, pause, resume or cancel at a time
        self._nursery: trio.Nursery | None = None
        self._tree: Tree | None = None
        self._state_fd = -1

    @property
    def backing(self) -> Path:
        assert self.ops is not None
        return Path(self.ops.backing)

    async def run(self, ops: KmsfsOperations) -> None:
        """Serve rekeys for *ops* until cancelled: recover what a killed daemon left,
        resume a journalled job, re-key what ``auto_rekey`` queues."""
        self.ops = ops
        if self.auto and self.read_only:
            log.warning("-o auto_rekey is off on a read-only mount")
            self.auto = False
        if self.auto:
            ops.contents.on_worn = self._queue_worn
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                async with self._control_lock:
                    await self._resume_journalled()
                if self.auto:
                    nursery.start_soon(self._serve_auto)
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self._close_engine()

    # -- requests ------------------------------------------------------------

    async def request(self, text: str) -> dict[str, Any]:
        """Answer one control-socket request (``rekey-...``)."""
        verb, _, argument = text.partition(" ")
        if verb == "rekey-status":
            return {"rekey": self.status()}
        async with self._control_lock:  # two starts at once would both find no job
            return await self._control(verb, argument, text)

    async def _control(self, verb: str, argument: str, text: str) -> dict[str, Any]:
        try:
            if verb == "rekey-start":
                await self._start(argument)
            elif verb == "rekey-pause":
                await self._set_paused(True)
            elif verb == "rekey-resume":
                await self._resume_request()
            elif verb == "rekey-cancel":
                self._cancel()
            else:
                return {"error": f"unknown request {text[:40]!r}"}
        except Refused as exc:
            return {"refused": str(exc), "exit_code": exc.exit_code, "rekey": self.status()}
        return {"rekey": self.status()}

    def status(self) -> dict[str, Any] | None:
        """The ``rekey`` part of ``kmsfs status`` (None if nothing was ever asked)."""
        info: dict[str, Any] = {}
        if self.job is not None:
            current = self.engine.current if self.engine is not None else None
            shown = None
            if current is not None and self.job.state not in FINISHED:
                shown = {"path": current.path, "copied": current.copied}
            info["job"] = self.job.status(shown)
        if self.auto:
            info["auto_rekey"] = {
                "queued": len(self.auto_queue),
                "done": self.auto_done,
                "failed": self.auto_failed,
            }
        return info or None

    async def _start(self, argument: str) -> None:
        self._check_allowed()
        if self.job is not None and self.job.state not in FINISHED:
            what = self.job.settings.selection.describe()
            raise Refused(
                f"a rekey job is {self.job.state} already ({what}): wait for it, or cancel it"
                " first (kmsfs rekey --cancel)"
            )
        try:
            asked = json.loads(argument or "{}")
            if not isinstance(asked, dict):
                raise ValueError("not an object")
            selection = Selection.from_json(asked.get("selection", {}), "the request")
            limits = [asked.get("max_mbps"), asked.get("max_files_per_second")]
            for value in limits:
                if value is not None and (not isinstance(value, int | float) or value <= 0):
                    raise ValueError("a rate limit must be a positive number")
        except (ValueError, LifecycleError) as exc:
            raise Refused(f"malformed rekey request: {exc}") from None
        journal = await trio.to_thread.run_sync(load_journal, self.backing, OFFLINE_JOURNAL)
        if journal is not None:
            raise Refused(
                f"an interrupted offline rekey left {self.backing}/.kmsfs.d/{OFFLINE_JOURNAL}.json:"
                " finish it first (unmount, then kmsfs rekey BACKING)"
            )
        cutoff = await trio.to_thread.run_sync(self._new_journal, selection)
        job = Job(JobSettings(selection, cutoff, limits[0], limits[1]))
        await self._launch(job)

    def _new_journal(self, selection: Selection) -> float:
        """Write a first journal and return the job's cutoff (its birth time less
        ``older_than``); blocking."""
        save_journal(self.backing, JOURNAL, {"version": 1, "selection": selection.to_json()})
        try:
            return journal_cutoff(self.backing, JOURNAL, selection.older_than)
        except LifecycleError:
            drop_journal(self.backing, JOURNAL)
            raise

    def _check_allowed(self) -> None:
        ops = self.ops
        assert ops is not None
        if ops.content_access.shared:
            names = "; ".join(map(str, daemons_serving(ops.backing)))
            error = Refused(
                f"{ops.backing} is served in shared mode by {names}: online rekey does not"
                " coordinate with other daemons, so it refuses; unmount every one of them and"
                " rekey through a mount without -o shared, or unmounted (kmsfs rekey BACKING)"
            )
            error.exit_code = 7
            raise error
        if self.read_only:
            error = Refused(f"{ops.backing} is mounted read-only: online rekey writes it")
            error.exit_code = 7
            raise error

    async def _set_paused(self, paused: bool) -> None:
        """Pause or resume the job, and journal it at once (a pause outlives a restart)."""
        job = self._running_job("pause" if paused else "resume")
        if job.paused == paused:
            return
        job.paused = paused
        if paused:
            job.resumed = trio.Event()
            if job.state == "running":
                job.state = "paused"
            log.info("rekey paused")
        else:
            job.resumed.set()
            if job.state == "paused":
                job.state = "running"
            log.info("rekey resumed")
        await self._save(job)

    async def _resume_request(self) -> None:
        """``kmsfs rekey --resume``: resume a paused job, or start again a journalled job
        that did not run (its daemon could not resume it at mount)."""
        if self.job is None or self.job.state in FINISHED:
            if not await self._resume_journalled(force=True):
                raise Refused("no rekey job to resume")
            return
        await self._set_paused(False)

    def _cancel(self) -> None:
        job = self._running_job("cancel")
        job.cancelled = True
        job.scope.cancel()
        job.resumed.set()

    def _running_job(self, what: str) -> Job:
        if self.job is None or self.job.state in FINISHED:
            raise Refused(f"no rekey job to {what}")
        return self.job

    # -- the job ----------------------------------------------------------------

    async def _resume_journalled(self, force: bool = False) -> bool:
        """Recover a killed daemon's leftovers and resume the journalled job, if any;
        True if one was started."""
        ops = self.ops
        assert ops is not None
        try:
            engine = await self._engine()
            async with self._engine_lock:  # never under a file being re-keyed
                await trio.to_thread.run_sync(engine.recover)  # also an auto_rekey's leftover
            data = await trio.to_thread.run_sync(load_journal, self.backing, JOURNAL)
            if data is None:
                return False
            where = f"{self.backing}/.kmsfs.d/{JOURNAL}.json"
            try:
                self._check_allowed()
            except Refused as exc:
                log.warning("rekey journal %s not resumed: %s", where, exc)
                if force:
                    raise
                return False
            job = Job.from_journal(data, where)
        except (KmsfsError, OSError) as exc:
            if isinstance(exc, Refused):
                raise
            log.error("rekey not resumed: %s", exc)
            return False
        log.info("resuming the rekey journalled in %s%s", where, " (paused)" if job.paused else "")
        if job.paused:
            job.resumed = trio.Event()
        await self._launch(job)
        return True

    async def _engine(self) -> OnlineRekey:
        """The engine, opening the backing root and ``.kmsfs.d`` on first use."""
        if self.engine is None:
            ops = self.ops
            assert ops is not None
            tree = Tree.at(
                ops.inodes.root_fd, ops.backing, encrypted_names=ops.config.encrypted_names
            )
            try:
                state = open_state_dir(tree.fd, create=True)
                assert state is not None
            except BaseException:
                tree.close()
                raise
            self._tree, self._state_fd = tree, state
            self.engine = OnlineRekey(ops, tree, state)
        return self.engine

    def _close_engine(self) -> None:
        if self._tree is not None:
            self._tree.close()
            os.close(self._state_fd)
            self._tree, self._state_fd, self.engine = None, -1, None

    async def _launch(self, job: Job) -> None:
        assert self._nursery is not None
        await self._engine()
        self.job = job
        if job.paused:
            job.state = "paused"
        self._nursery.start_soon(self._run_job, job)

    async def _run_job(self, job: Job) -> None:
        stopping = True
        try:
            with job.scope:
                await self._work(job)
                stopping = False
            if job.cancelled:
                job.state, stopping = "cancelled", False
                log.info("rekey cancelled after %d files", job.counters.files_done)
        except (KmsfsError, OSError) as exc:
            job.state, job.reason, stopping = "failed", str(exc), False
            log.error("rekey failed: %s", exc)
        finally:
            with trio.CancelScope(shield=True):
                if stopping:  # the daemon stops: resume at the next mount
                    await self._save(job)
                else:
                    async with self._journal_lock:
                        await trio.to_thread.run_sync(drop_journal, self.backing, JOURNAL)

    async def _work(self, job: Job) -> None:
        total_files, total_bytes = await trio.to_thread.run_sync(self._walk, job, None)
        job.files_total = job.counters.files_done + total_files
        job.bytes_total = job.counters.bytes_done + total_bytes
        job.state = "paused" if job.paused else "running"
        log.info(
            "rekey started: %s; %d files (%d bytes) due",
            job.settings.selection.describe(),
            total_files,
            total_bytes,
        )
        await self._save(job)
        for walk in range(MAX_WALKS):
            send, receive = trio.open_memory_channel[tuple[str, os.stat_result]](64)
            met = job.counters.files_met
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._produce, job, send)
                async with receive:
                    async for rel, st in receive:
                        if walk:  # missed by the first walk: renamed across it
                            job.files_total = max(job.files_total or 0, job.counters.files_met + 1)
                        await self._one(job, rel, st)
            if job.counters.files_met == met and not job.retry:
                break
            job.retry = False
        c = job.counters
        job.state, job.files_total = "done", c.files_met
        log.info(
            "rekey done: %d files re-keyed (%d bytes), %d skipped, %d failed, %d not due",
            c.files_done,
            c.bytes_done,
            c.files_skipped,
            c.files_failed,
            c.files_not_due,
        )

    async def _produce(
        self, job: Job, send: trio.MemorySendChannel[tuple[str, os.stat_result]]
    ) -> None:
        async with send:

            def emit(rel: str, st: os.stat_result) -> None:
                trio.from_thread.run(send.send, (rel, st))

            await trio.to_thread.run_sync(self._walk, job, emit)

    def _walk(self, job: Job, emit: Any) -> tuple[int, int]:
        """Every file due by birth time, path and master key (a worker thread), but those
        this job skipped or failed already: counted, and handed to *emit(rel, st)* if
        given.  Returns (files, plaintext bytes)."""
        assert self._tree is not None and self.ops is not None
        selection, cutoff = job.settings.selection, job.settings.cutoff
        wanted_paths = selection.in_backing(backing_paths(self.ops.names, self._tree.fd))
        block_size = self.ops.config.block_size
        files = size = 0
        for node in self._tree.walk():
            if not stat.S_ISREG(node.st.st_mode) or not wanted_paths.path_selected(node.rel):
                continue
            if (node.st.st_dev, node.st.st_ino) in job.handled:
                continue
            try:
                born = birth_time(node.parent_fd, os.fsencode(node.name))
                if born is None or born >= cutoff or not _key_selected(node, selection):
                    continue
            except OSError:
                continue  # removed meanwhile
            files += 1
            size += Layout(block_size, format_of_mode(node.st.st_mode)).plain_size(node.st.st_size)
            if emit is not None:
                emit(node.rel, node.st)
        return files, size

    def _wanted(self, header: FileHeader, content: ContentFile) -> str | None:
        selection = self.job.settings.selection if self.job is not None else Selection()
        if not selection.header_selected(header):
            return "no wrapped key under the master keys selected"
        if not selection.sealed_selected(content.usage.sealed):
            return f"its key sealed {content.usage.sealed} blocks, not more than asked"
        return None

    async def _one(self, job: Job, rel: str, st: os.stat_result) -> None:
        await job.resumed.wait()
        await job.files_limit.take(1)
        await job.resumed.wait()

        async def before_chunk(copied: int) -> None:
            await job.bytes_limit.take(copied)
            await job.resumed.wait()
            current = self.engine.current if self.engine is not None else None
            job.pace.sample(
                job.counters.bytes_done + (current.copied if current else 0),
                job.counters.files_met,
            )

        c = job.counters
        path = self._volume_path(rel)
        try:
            copied = await self._rekey(rel, path, st, self._wanted, before_chunk)
        except Moved as exc:  # met again by the next walk, if it still exists
            job.retry = True
            log.info("rekey: %s; tried again later", exc)
        except (NotDue, Skipped, FormatError, KmsfsError, OSError) as exc:
            job.remember(st)
            if isinstance(exc, NotDue):
                c.files_not_due += 1
            elif isinstance(exc, Skipped | FormatError):
                c.files_skipped += 1
                c.skipped.append(str(exc))
                log.warning("rekey skipped %s", exc)
            else:
                c.files_failed += 1
                c.failed.append(f"{path}: {exc}")
                log.error("rekey of %s failed: %s", path, exc)
        else:
            c.files_done += 1
            c.bytes_done += copied
        job.pace.sample(c.bytes_done, c.files_met)
        if trio.current_time() - job.saved_at >= SAVE_INTERVAL:
            await self._save(job)

    def _volume_path(self, rel: str) -> str:
        """The path in the volume of the backing path *rel*, for messages and the audit
        log (with encrypted names each component decrypted; the backing path if one
        does not decrypt, which is logged)."""
        assert self.ops is not None and self._tree is not None
        return self.ops.names.plain_path(self._tree.fd, "/" + rel) or "/" + rel

    async def _rekey(
        self, rel: str, path: str, st: os.stat_result, wanted: Any, before_chunk: Any
    ) -> int:
        engine = await self._engine()
        async with self._engine_lock:  # one file at a time: one temporary name
            return await engine.rekey(rel, st, wanted, before_chunk, path)

    async def _save(self, job: Job) -> None:
        """Journal *job* (not once it has ended: its journal is gone then)."""
        job.saved_at = trio.current_time()
        async with self._journal_lock:
            if job.state in FINISHED:
                return
            try:
                data = job.to_journal()
                await trio.to_thread.run_sync(save_journal, self.backing, JOURNAL, data)
            except (KmsfsError, OSError) as exc:
                log.error("rekey journal not written: %s", exc)

    # -- auto_rekey ---------------------------------------------------------------

    def _queue_worn(self, ino: int) -> None:
        """Called (from any thread) when a format-1 key reaches the usage warning."""
        if ino not in self.auto_queue:
            self.auto_queue.append(ino)

    async def _serve_auto(self) -> None:
        while True:
            await trio.sleep(AUTO_POLL)
            while self.auto_queue and self.ops is not None:
                ino = self.auto_queue[0]
                await self._rekey_worn(ino)
                self.auto_queue.popleft()

    async def _rekey_worn(self, ino: int) -> None:
        """Re-key the file of inode *ino*, found by its descriptor's path now."""
        ops = self.ops
        assert ops is not None
        entry = ops.inodes.get(ino)
        if entry is None or entry.fd < 0:
            return  # forgotten since: nothing to do
        backing = ops.places.paths.backing_of(entry.fd)
        if backing is None or backing == "/":
            return  # unlinked since
        try:
            st = os.stat(entry.fd)
            path = ops.places.describe(entry)
            await self._rekey(backing[1:], path, st, lambda header, content: None, _no_pace)
        except Skipped as exc:
            log.warning("automatic rekey skipped %s", exc)
            return
        except (KmsfsError, OSError) as exc:
            self.auto_failed += 1
            log.error("automatic rekey of %s failed: %s", path, exc)
            return
        self.auto_done += 1


async def _no_pace(copied: int) -> None:
    return None


def _key_selected(node: Any, selection: Selection) -> bool:
    """True if the file of walk *node* has a wrapped key under the selected master keys
    (or none was asked for, or its header cannot be read: the rekey will say why)."""
    if not selection.master_keys:
        return True
    try:
        raw = os.getxattr(
            f"/proc/self/fd/{node.parent_fd}/{node.name}", XATTR_NAME, follow_symlinks=False
        )
        return selection.header_selected(FileHeader.parse(raw))
    except (OSError, FormatError):
        return True
