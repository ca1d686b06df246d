"""The handler wrapper: the one place an errno is chosen for a FUSE request.

``fuse_op`` wraps every pyfuse3 handler of ``KmsfsOperations``: it turns every
exception into a FUSEError with the errno ``errno_for`` gives, logs what is the
volume's fault, and counts the request under its FUSE opcode.  The collaborators
below it (kmsfs.fs.access, .namespace, .contents, .xattrs) raise OSError, FUSEError
for an answer that is no failure, LookAgain, or kmsfs domain errors.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Callable, Coroutine
from time import perf_counter_ns
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from pyfuse3 import FUSEError

from kmsfs.errors import KeyAccessDenied, KmsfsError
from kmsfs.fs.lockwait import LockWaitInterrupted
from kmsfs.fs.requests import OPCODES, RequestStats

log = logging.getLogger("kmsfs.fs")

T = TypeVar("T")
P = ParamSpec("P")


class Counted(Protocol):
    """What ``fuse_op`` counts on: the requests per opcode and the volume's errors."""

    requests: RequestStats
    errors: int


S = TypeVar("S", bound=Counted)


class LookAgain(Exception):
    """The kernel holds a size computed for the wrong file format (``check_marker``,
    kmsfs/fs/attributes.py): answered ESTALE, on which the kernel looks the file up
    again and retries the request (an open or a truncate by name); not a failure the
    caller sees."""


def errno_for(exc: BaseException) -> int:
    """The errno a request answers when its handler raised *exc*.

    OSError keeps its own; the key provider's refusal is EACCES; a wait for
    another daemon's lock whose caller was interrupted is EINTR (what the kernel
    expects for an interrupted request); any other kmsfs error (integrity,
    format, wrong key, provider outage, a lock wait given up) and anything
    unexpected is EIO.
    """
    if isinstance(exc, FUSEError):
        return int(exc.errno)
    if isinstance(exc, OSError):
        return exc.errno or errno.EIO
    if isinstance(exc, KeyAccessDenied):
        return errno.EACCES
    if isinstance(exc, LockWaitInterrupted):
        return errno.EINTR
    return errno.EIO


def fuse_op(
    func: Callable[Concatenate[S, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
    """Turn every exception of a handler into a FUSEError (pyfuse3 must never see others),
    and count the request, its time and its failure under the handler's FUSE opcode."""
    opcode = OPCODES[func.__name__]

    async def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        counter = self.requests.by_opcode[opcode]
        start = perf_counter_ns()
        self.requests.in_flight += 1
        try:
            return await func(self, *args, **kwargs)
        except FUSEError:
            counter.errors += 1
            raise
        except LookAgain:
            counter.errors += 1
            raise FUSEError(errno.ESTALE) from None
        except OSError as exc:
            counter.errors += 1
            if exc.errno in (errno.EBADF, errno.EMFILE, errno.ENFILE):  # our own descriptors
                log.warning("%s: %s", func.__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            raise FUSEError(errno_for(exc)) from None
        except LockWaitInterrupted as exc:  # not the volume's fault: no error line
            counter.errors += 1
            log.info("%s: %s", func.__name__, exc)
            raise FUSEError(errno_for(exc)) from None
        except KmsfsError as exc:
            counter.errors += 1
            self.errors += 1
            log.error("%s: %s", func.__name__, exc)
            raise FUSEError(errno_for(exc)) from None
        except Exception:
            counter.errors += 1
            self.errors += 1
            log.exception("%s: unexpected error", func.__name__)
            raise FUSEError(errno.EIO) from None
        finally:
            self.requests.in_flight -= 1
            counter.add(perf_counter_ns() - start)

    functools.update_wrapper(wrapper, func)
    return wrapper
