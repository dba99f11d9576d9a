"""The broker connection: keys and named shared memory."""

from __future__ import annotations

import errno
import math
import os
from ctypes import byref, c_void_p, create_string_buffer
from typing import Optional, Union

from . import _native
from ._native import FileDescriptorLike, check, encode, lib

_INT64_MAX = 2**63 - 1

SHM_RENAME_NOREPLACE = 1  # PB_SHM_RENAME_NOREPLACE: fail with EEXIST if the target exists
SHM_RENAME_EXCHANGE = 2   # PB_SHM_RENAME_EXCHANGE: swap the two names atomically


class Broker(_native.Handle):
    """A connection to a Patchbay broker (patchbayd).

    ``Broker()`` connects to $PATCHBAY_SOCKET if set, else to this user's broker, starting it when
    none answers (PATCHBAY_AUTOSTART=0 disables that). ``Broker(socket=path)`` connects to the
    broker listening at path, without autostart. Thread-safe; ports and sockets opened through a
    broker stay valid after it is closed.
    """

    _close_function = "pb_broker_close"

    def __init__(self, socket: Union[str, os.PathLike[str], None] = None) -> None:
        out = c_void_p()
        if socket is None:
            check(lib().pb_broker_open(byref(out)))
        else:
            check(lib().pb_broker_open_at(byref(out), encode(socket)))
        assert out.value is not None
        super().__init__(out.value)

    # Keys

    def share(self, fd: FileDescriptorLike, timeout: Optional[float] = 60.0, *, for_uid: Optional[int] = None,
              for_gid: Optional[int] = None, for_pid: Optional[int] = None) -> str:
        """Puts fd (a number or an object with fileno()) under a new one-time key and returns its
        text. The key is valid for timeout seconds (60 unless given), or until claimed (or the
        broker stops) when timeout is None; a timeout that is not positive (or NaN) is OSError
        EINVAL, as in C, and one too long to count (1e20, infinity) lasts as long as the
        broker's clock counts. fd stays yours: the key holds the same open file description. At most one
        of for_uid, for_gid, for_pid restricts who may claim (anyone else gets FileNotFoundError,
        as for a wrong key); a for_pid no process has is ProcessLookupError (ESRCH)."""
        restrictions = [(who, value) for who, value in ((1, for_uid), (2, for_gid), (3, for_pid)) if value is not None]
        if len(restrictions) > 1:
            raise ValueError("give at most one of for_uid, for_gid and for_pid")
        if timeout is None:
            milliseconds = _native.TIMEOUT_NEVER
        elif timeout > 0:
            # Past what a signed 64-bit count of milliseconds holds (infinity included) the key
            # lasts as long as the broker's clock can count, as in C with INT64_MAX.
            milliseconds = _INT64_MAX if timeout * 1000 >= _INT64_MAX else max(1, math.ceil(timeout * 1000))
        else:
            raise OSError(errno.EINVAL, f"the timeout must be positive seconds (or None: never), not {timeout!r}")
        key = create_string_buffer(_native.KEY_TEXT_SIZE)
        if restrictions:
            (who, value), = restrictions
            check(lib().pb_share_for(self._live(), _native.fd_of(fd), milliseconds, who, value, key))
        else:
            check(lib().pb_share(self._live(), _native.fd_of(fd), milliseconds, key))
        return key.value.decode("ascii")

    def claim(self, key: str) -> int:
        """Claims key and returns a new descriptor (close-on-exec) for the shared open file
        description; close it yourself. FileNotFoundError (ENOENT) for an unknown, claimed or
        expired key; OSError EINVAL for text that is not a key.

        The file is whatever the sharer chose, and your close may be its last one, which can wait
        as long as the sharer likes (a TCP socket with SO_LINGER, a local socket holding one, a
        FUSE file). From a key you did not expect, close it on a thread that may wait, or leave it
        to the process's exit, which never waits on it."""
        return check(lib().pb_claim(self._live(), encode(key)))

    # Named shared memory (FreeBSD's shm_open semantics, in the broker's namespace)

    def shm_open(self, name: str, flags: int, mode: int = 0o600) -> int:
        """Opens the shared memory object name ('/' and at most 1023 bytes) and returns a new
        descriptor. flags: os.O_RDONLY or os.O_RDWR, with os.O_CREAT, os.O_EXCL, os.O_TRUNC. A new
        object has size 0 (grow it with os.ftruncate) and mode (mode & ~umask & 0o777)."""
        return check(lib().pb_shm_open(self._live(), encode(name), flags, mode))

    def shm_unlink(self, name: str) -> None:
        """Removes name; descriptors and mappings of the object keep working."""
        check(lib().pb_shm_unlink(self._live(), encode(name)))

    def shm_rename(self, source: str, target: str, flags: int = 0) -> None:
        """Renames source to target atomically, replacing target; flags SHM_RENAME_NOREPLACE
        (FileExistsError if target exists) or SHM_RENAME_EXCHANGE (swap the two names)."""
        check(lib().pb_shm_rename(self._live(), encode(source), encode(target), flags))
