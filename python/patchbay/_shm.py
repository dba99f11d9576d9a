"""Anonymous shared memory and mappings."""

from __future__ import annotations

import ctypes
import mmap
import os
import weakref
from ctypes import byref, c_char, c_int, c_size_t, c_void_p

from . import _native
from ._native import FileDescriptorLike, check, lib

SHM_SEALABLE = 1  # PB_SHM_SEALABLE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.munmap.argtypes = [c_void_p, c_size_t]
_libc.munmap.restype = c_int


def _unmap(address: int, length: int) -> None:
    if _libc.munmap(address, length) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"munmap: {os.strerror(error)}")


def shm_anonymous(sealable: bool = False) -> int:
    """A new anonymous shared memory object (a memfd made here, no broker needed), of size 0
    until its first shm_map or an os.ftruncate. Returns its descriptor: share it with
    Broker.share, close it yourself. sealable allows Linux memfd seals (F_ADD_SEALS)."""
    return check(lib().pb_shm_anonymous(SHM_SEALABLE if sealable else 0))


class Mapping:
    """A MAP_SHARED mapping of a shared memory object, made by shm_map.

    ``view`` is a memoryview of its bytes (read-only unless mapped writable); ``address`` and
    ``length`` say where it is. close() (or leaving a with block) unmaps it at once: the view, and
    any slice taken from it, must not be used after that. Without close(), the memory is unmapped
    when the Mapping and every view of it are gone.
    """

    def __init__(self, address: int, length: int, writable: bool) -> None:
        self.address = address
        self.length = length
        memory = (c_char * length).from_address(address)
        # Unmaps once: at close(), or when the last view holding `memory` goes away.
        self._unmap = weakref.finalize(memory, _unmap, address, length)
        view = memoryview(memory).cast("B")
        self.view: memoryview = view if writable else view.toreadonly()

    @property
    def closed(self) -> bool:
        """True once the memory is unmapped."""
        return not self._unmap.alive

    def close(self) -> None:
        """Unmaps the memory; later calls do nothing."""
        if self._unmap.alive:
            self.view.release()
            self._unmap()

    def __enter__(self) -> Mapping:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.length


def shm_map(fd: FileDescriptorLike, length: int, writable: bool = True) -> Mapping:
    """Maps length bytes of the shared memory object fd (a number or an object with fileno()),
    shared, at offset 0. The first mapping of an anonymous object of size 0 fixes its size
    (length rounded up to the page size); a later mapping longer than the object is OSError
    EINVAL. PermissionError for a writable mapping of a read-only descriptor; OSError ENOMEM when
    the kernel cannot map that much (a first mapping that fails leaves the object of size 0).
    A named object maps as mmap does, past its size too, and touching the part past its size
    kills the process with SIGBUS, as with mmap: size it first (os.ftruncate), or map at most
    os.fstat(fd).st_size bytes."""
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    address = c_void_p()
    check(lib().pb_shm_map(_native.fd_of(fd), length, prot, byref(address)))
    assert address.value is not None
    return Mapping(address.value, length, writable)
