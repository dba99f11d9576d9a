"""libpatchbay through ctypes: loading, the prototypes of patchbay.h, errors and handles.

The library is loaded at first use (the first Broker, shm_anonymous, ...), not at import, so
``import patchbay`` works everywhere; where the library cannot be found that first use raises
OSError saying how to point PATCHBAY_LIBRARY at it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from ctypes import (CFUNCTYPE, POINTER, Structure, c_char_p, c_int, c_int64, c_size_t, c_ssize_t,
                    c_uint, c_uint64, c_void_p)
from typing import Any, Callable, Optional, Protocol, TypeVar, Union

KEY_TEXT_SIZE = 23  # PB_KEY_TEXT_SIZE: 22 characters of base64url and a NUL
TIMEOUT_NEVER = -1  # PB_TIMEOUT_NEVER


class CapsMessage(Structure):
    """struct pb_caps_message."""

    _fields_ = [
        ("id", c_uint64),
        ("kind", c_int),
        ("length", c_size_t),
        ("pid", c_int),    # pid_t
        ("uid", c_uint),   # uid_t
        ("euid", c_uint),  # uid_t
        ("gid", c_uint),   # gid_t
    ]


# int (*read)(const struct pb_caps_message *m, const void *data, size_t length, void *context)
READ_CALLBACK = CFUNCTYPE(c_int, POINTER(CapsMessage), c_void_p, c_size_t, c_void_p)
# void (*fill)(void *buffer, size_t length, void *context)
FILL_CALLBACK = CFUNCTYPE(None, c_void_p, c_size_t, c_void_p)

_OUT = POINTER(c_void_p)  # pb_broker **out and the like: the handles are opaque
_MESSAGE = POINTER(CapsMessage)

# Every function of patchbay.h: name -> (restype, argtypes), in the header's order.
_PROTOTYPES: dict[str, tuple[Any, list[Any]]] = {
    # The broker
    "pb_broker_open": (c_int, [_OUT]),
    "pb_broker_open_at": (c_int, [_OUT, c_char_p]),
    "pb_broker_close": (None, [c_void_p]),
    "pb_last_reason": (c_char_p, []),
    # Keys
    "pb_share": (c_int, [c_void_p, c_int, c_int64, c_char_p]),
    "pb_claim": (c_int, [c_void_p, c_char_p]),
    "pb_share_for": (c_int, [c_void_p, c_int, c_int64, c_int, c_int64, c_char_p]),
    # Shared memory
    "pb_shm_open": (c_int, [c_void_p, c_char_p, c_int, c_uint]),
    "pb_shm_unlink": (c_int, [c_void_p, c_char_p]),
    "pb_shm_rename": (c_int, [c_void_p, c_char_p, c_char_p, c_int]),
    "pb_shm_anonymous": (c_int, [c_uint]),
    "pb_shm_map": (c_int, [c_int, c_size_t, c_int, POINTER(c_void_p)]),
    # Sockets through /net
    "pb_net_open": (c_int, [c_void_p, c_char_p, c_uint, _OUT]),
    "pb_net_ctl": (c_int, [c_void_p, c_char_p]),
    "pb_net_accept": (c_int, [c_void_p, c_uint, _OUT]),
    "pb_net_data": (c_int, [c_void_p]),
    "pb_net_recv": (c_ssize_t, [c_void_p, c_void_p, c_size_t, c_void_p, POINTER(c_uint)]),
    "pb_net_reply": (c_ssize_t, [c_void_p, c_void_p, c_size_t, c_void_p, c_uint]),
    "pb_net_fd": (c_int, [c_void_p]),
    "pb_net_id": (c_uint64, [c_void_p]),
    "pb_net_listen": (c_int, [c_void_p, c_char_p, c_char_p, _OUT]),
    "pb_net_connect": (c_int, [c_void_p, c_char_p, c_char_p, _OUT]),
    "pb_net_close": (None, [c_void_p]),
    # CAPS services
    "pb_caps_service_open": (c_int, [c_void_p, c_char_p, c_uint, _OUT]),
    "pb_caps_service_register": (c_int, [c_void_p, c_char_p, c_int64, c_int64, c_uint, _OUT]),
    "pb_caps_wait": (c_int, [c_void_p, _MESSAGE, c_void_p, c_size_t]),
    "pb_caps_get": (c_int, [c_void_p, _MESSAGE, c_void_p, c_size_t]),
    "pb_caps_receive": (c_int, [c_void_p, READ_CALLBACK, c_void_p]),
    "pb_caps_reply": (c_int, [c_void_p, c_uint64, c_void_p, c_size_t]),
    "pb_caps_reply_in_place": (c_int, [c_void_p, c_uint64, c_size_t, FILL_CALLBACK, c_void_p]),
    "pb_caps_reply_error": (c_int, [c_void_p, c_uint64, c_int]),
    "pb_caps_set_generation": (c_int, [c_void_p, c_uint64]),
    "pb_caps_service_fd": (c_int, [c_void_p]),
    "pb_caps_service_cancel": (None, [c_void_p]),
    "pb_caps_service_close": (None, [c_void_p]),
    # CAPS clients
    "pb_caps_client_open": (c_int, [c_void_p, c_char_p, c_uint, _OUT]),
    "pb_caps_client_connect": (c_int, [c_void_p, c_char_p, c_int64, c_int64, c_uint, c_uint, _OUT]),
    "pb_caps_call": (c_ssize_t, [c_void_p, c_void_p, c_size_t, c_void_p, c_size_t]),
    "pb_caps_abort": (c_int, [c_void_p, c_uint64]),
    "pb_caps_generation": (c_int, [c_void_p, POINTER(c_uint64)]),
    "pb_caps_put": (c_int, [c_void_p, c_void_p, c_size_t, POINTER(c_uint64)]),
    "pb_caps_put_in_place": (c_int, [c_void_p, c_size_t, FILL_CALLBACK, c_void_p, POINTER(c_uint64)]),
    "pb_caps_wait_reply": (c_int, [c_void_p, _MESSAGE, c_void_p, c_size_t]),
    "pb_caps_client_get": (c_int, [c_void_p, _MESSAGE, c_void_p, c_size_t]),
    "pb_caps_receive_reply": (c_int, [c_void_p, READ_CALLBACK, c_void_p]),
    "pb_caps_client_fd": (c_int, [c_void_p]),
    "pb_caps_client_close": (None, [c_void_p]),
}

_library: Optional[ctypes.CDLL] = None
_lock = threading.Lock()


def _load() -> ctypes.CDLL:
    name = os.environ.get("PATCHBAY_LIBRARY") or ctypes.util.find_library("patchbay") or "libpatchbay.so.0"
    try:
        library = ctypes.CDLL(name)
    except OSError as error:
        raise OSError(f"libpatchbay could not be loaded ({error}); install it, or set PATCHBAY_LIBRARY "
                      f"to its path, e.g. PATCHBAY_LIBRARY=/usr/lib/libpatchbay.so.0") from error
    checked = _Library()
    for function_name, (restype, argtypes) in _PROTOTYPES.items():
        function = getattr(library, function_name)
        function.restype = restype
        function.argtypes = argtypes
        setattr(checked, function_name, _range_checked(function_name, function, argtypes))
    return checked  # type: ignore[return-value]


class _Library:
    """The library's functions, each behind a check of its integer arguments."""


def _range_checked(name: str, function: Any, argtypes: list[Any]) -> Callable[..., Any]:
    """function, refusing integer arguments outside their C type with OverflowError: ctypes would
    silently keep their low bits (a descriptor 2**40 would become 0, a uid 2**70 root's)."""
    bounds = []
    for index, argtype in enumerate(argtypes):
        if argtype in (c_int, c_uint, c_int64, c_uint64, c_size_t):
            bits = 8 * ctypes.sizeof(argtype)
            signed = argtype(-1).value < 0
            low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
            bounds.append((index, low, high, argtype.__name__))
    if not bounds:
        return function

    def call(*arguments: Any) -> Any:
        for index, low, high, type_name in bounds:
            value = arguments[index] if index < len(arguments) else None
            if isinstance(value, int) and not low <= value <= high:
                raise OverflowError(f"{name}: argument {index + 1} is {value}, outside {type_name} ({low} to {high})")
        return function(*arguments)
    return call


def lib() -> ctypes.CDLL:
    """The loaded library, its functions declared and their integer arguments range-checked
    (loaded at the first call)."""
    global _library
    if _library is None:
        with _lock:
            if _library is None:
                _library = _load()
    return _library


def check(result: int) -> int:
    """Returns result if >= 0; raises OSError(-result, pb_last_reason()) otherwise.

    OSError(errno, ...) is the builtin subclass for that errno: FileNotFoundError for ENOENT,
    FileExistsError for EEXIST, PermissionError for EACCES and EPERM, and so on.
    """
    if result >= 0:
        return result
    code = -result
    reason = lib().pb_last_reason().decode("utf-8", "replace") or os.strerror(code)
    raise OSError(code, reason)


def encode(text: Union[str, bytes, os.PathLike[str]]) -> bytes:
    """A string argument as NUL-terminated UTF-8 (paths in the file system's encoding)."""
    data = os.fsencode(text)
    if b"\0" in data:
        raise ValueError("embedded null byte")
    return data


class HasFileno(Protocol):
    def fileno(self) -> int: ...


FileDescriptorLike = Union[int, HasFileno]
_Self = TypeVar("_Self", bound="Handle")


def fd_of(file: FileDescriptorLike) -> int:
    """A descriptor number from an int or from an object with fileno()."""
    return file if isinstance(file, int) else file.fileno()


class Handle:
    """An opaque library handle, freed exactly once: by close(), on leaving a with block, or when
    the object is garbage collected. Not safe to close while another thread uses it."""

    _close_function: str = ""
    _handle: Optional[int] = None

    def __init__(self, handle: int) -> None:
        self._free: Callable[[int], None] = getattr(lib(), self._close_function)
        self._handle = handle

    def _live(self) -> int:
        handle = self._handle
        if handle is None:
            raise ValueError(f"{type(self).__name__} is closed")
        return handle

    @property
    def closed(self) -> bool:
        """True once close() has run."""
        return self._handle is None

    def close(self) -> None:
        """Frees the handle; later calls do nothing."""
        handle, self._handle = self._handle, None
        if handle is not None:
            self._free(handle)

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def open_handle(function: Callable[..., int], *arguments: Any) -> int:
    """Calls a pb_*_open-shaped function whose last argument is the out pointer; returns the handle."""
    out = c_void_p()
    check(function(*arguments, ctypes.byref(out)))
    assert out.value is not None
    return out.value
