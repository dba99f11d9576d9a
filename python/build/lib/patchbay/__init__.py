"""Patchbay from Python: keys, shared memory, /net sockets and CAPS services, over libpatchbay.

The C library is found through $PATCHBAY_LIBRARY if set, else ctypes.util.find_library("patchbay"),
else "libpatchbay.so.0". It is loaded at first use (the first Broker(), shm_anonymous(), ...), so
``import patchbay`` always works; where the library cannot be loaded, that first use raises
OSError saying how to set PATCHBAY_LIBRARY.

Errors: a call the library refuses raises ``OSError(errno, reason)``, where reason is the library's
sentence (pb_last_reason). Python makes that the builtin subclass for the errno, so catch what
you would catch for the same errno from the os module: FileNotFoundError (ENOENT),
FileExistsError (EEXIST), PermissionError (EACCES, EPERM), BlockingIOError (EAGAIN),
ConnectionResetError (ECONNRESET), ... and OSError with .errno for the rest (EINVAL, EMSGSIZE).
Using a closed object raises ValueError.

    import patchbay
    with patchbay.Broker() as broker:
        key = broker.share(fd)          # in one process
        fd = broker.claim(key)          # in another
"""

from ._broker import SHM_RENAME_EXCHANGE, SHM_RENAME_NOREPLACE, Broker
from ._caps import GROUP, USER, WORLD, CapsClient, CapsService, Message, MessageKind
from ._net import Socket
from ._shm import Mapping, shm_anonymous, shm_map

__version__ = "0.1.0"

REQUEST = MessageKind.REQUEST
REPLY = MessageKind.REPLY
DISPOSE = MessageKind.DISPOSE
ABORTED = MessageKind.ABORTED
CONNECTED = MessageKind.CONNECTED
DISCONNECTED = MessageKind.DISCONNECTED

__all__ = [
    "Broker", "SHM_RENAME_NOREPLACE", "SHM_RENAME_EXCHANGE",
    "shm_anonymous", "shm_map", "Mapping",
    "CapsService", "CapsClient", "Message", "MessageKind",
    "REQUEST", "REPLY", "DISPOSE", "ABORTED", "CONNECTED", "DISCONNECTED",
    "USER", "GROUP", "WORLD",
    "Socket",
]
