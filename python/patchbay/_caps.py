"""CAPS (DragonFly BSD): named request/reply services and their clients."""

from __future__ import annotations

import errno
import enum
import os
import threading
from ctypes import byref, c_char, c_uint64, string_at
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple, Union

from . import _native
from ._broker import Broker
from ._native import check, encode, lib


class MessageKind(enum.IntEnum):
    """enum pb_caps_kind."""

    REQUEST = 1       # a client's request: answer with CapsService.reply
    REPLY = 2         # the service's answer (a client's message)
    DISPOSE = 3       # the client consumed the reply, or went away: its space is free
    ABORTED = 4       # the client aborted a request the service had read
    CONNECTED = 5     # a client connected (services opened with notices only)
    DISCONNECTED = 6  # a client went away (idem)


USER = 1   # PB_CAPS_USER: clients of the service's uid may connect
GROUP = 2  # PB_CAPS_GROUP: clients in the service's group may connect
WORLD = 4  # PB_CAPS_WORLD: anyone may connect

BytesLike = Union[bytes, bytearray, memoryview]

_ACCESS = {"user": USER, "group": GROUP, "world": WORLD}
_WAIT_FOR_SERVICE = 1  # PB_CAPS_WAIT_FOR_SERVICE
_NOTIFY = 8  # PB_CAPS_NOTIFY
_EXCLUSIVE = 16  # PB_CAPS_EXCLUSIVE


@dataclass(frozen=True)
class Message:
    """A message with its payload. The credentials are the kernel's (SO_PEERCRED when the client
    connected): for a service, the client's; for a client, zero (it chose the service)."""

    id: int
    kind: int  # a MessageKind: compare with patchbay.REQUEST, patchbay.DISPOSE, ...
    data: bytes
    pid: int
    uid: int
    euid: int
    gid: int


def _access_mask(access: Union[int, str, Iterable[str]]) -> int:
    if isinstance(access, int):
        return access
    if isinstance(access, str):
        access = (access,)
    mask = 0
    for word in access:
        if word not in _ACCESS:
            raise ValueError(f"unknown access class {word!r}: user, group or world")
        mask |= _ACCESS[word]
    return mask


def _message(header: _native.CapsMessage, data: bytes) -> Message:
    try:
        kind: int = MessageKind(header.kind)
    except ValueError:  # a kind newer than this package
        kind = header.kind
    return Message(header.id, kind, data, header.pid, header.uid, header.euid, header.gid)


def _receive(function: Callable[..., int], handle: int, capacity: int,
             too_long: Optional[Callable[[int], Optional[Message]]] = None,
             limit: Optional[int] = None) -> Tuple[Message, int]:
    """Calls a pb_caps_wait-shaped function, with a larger buffer when the message is longer
    than the buffer (it then stays queued). Returns the message and the capacity to use next:
    the one given, never a larger one a single long message needed (a peer's one hollow request
    of gigabytes would otherwise make every later message allocate and clear as much). A message
    longer than limit is handed to too_long instead of being copied: it returns the message to
    give instead, or None to look again."""
    header = _native.CapsMessage()
    usual = capacity
    # A buffer no larger than limit: a longer message then never fits, so it stays queued and
    # goes to too_long unread, whatever its length (a limit below the usual buffer included).
    first = capacity if limit is None or too_long is None else max(min(capacity, limit), 1)
    capacity = first
    while True:
        buffer = (c_char * capacity).from_buffer(bytearray(capacity))
        result = function(handle, byref(header), buffer, capacity)
        if result > capacity or (result == -errno.EMSGSIZE and header.length > capacity):
            if limit is not None and too_long is not None and header.length > limit:
                instead = too_long(limit)
                if instead is not None:
                    return instead, usual
                capacity = first
                continue
            capacity = max(result, header.length)
            continue
        check(result)
        return _message(header, string_at(buffer, header.length)), usual


def _payload(data: BytesLike) -> bytes:
    return data if isinstance(data, bytes) else bytes(data)


class CapsService(_native.Handle):
    """A CAPS service registered under name (1 to 63 of [0-9A-Za-z_.]) for this effective uid.

    access says who may connect: an iterable of "user", "group", "world" (or a mask of USER,
    GROUP, WORLD). notify: also deliver CONNECTED and DISCONNECTED messages; exclusive: raise
    FileExistsError if the name is registered already. Iterating over the service yields its
    messages, waiting for each, until cancel() is called. Thread-safe (close() aside).

    uid and gid register it under other keys, as DragonFly's caps_sys_service: uid (this
    effective uid unless given) is whom "user" admits, gid (this effective gid with "group",
    else none, unless given) whose members "group" admits; -1 is none. Clients that name a uid
    or gid find only registrations under it. Only root may give another uid or a group it is
    not in (PermissionError, EPERM).

    What a client can make the service hold is bounded, as `patchbay caps serve` bounds it: a
    request longer than max_request (64 MiB) is answered EMSGSIZE unread, never copied (a client
    can announce gigabytes it never wrote); a reply that would take the replies a client's uid
    has not consumed yet past max_reply_bytes_per_uid (256 MiB) is answered EDQUOT instead, since
    a reply's memory is the service's until the client consumes it (its DISPOSE). None: no limit.
    """

    _close_function = "pb_caps_service_close"

    def __init__(self, broker: Broker, name: str, access: Union[int, str, Iterable[str]] = ("user",), *,
                 notify: bool = False, exclusive: bool = False, max_request: Optional[int] = 64 << 20,
                 max_reply_bytes_per_uid: Optional[int] = 256 << 20, uid: Optional[int] = None,
                 gid: Optional[int] = None) -> None:
        mask = _access_mask(access) | (_NOTIFY if notify else 0) | (_EXCLUSIVE if exclusive else 0)
        if uid is None and gid is None:
            super().__init__(_native.open_handle(lib().pb_caps_service_open, broker._live(), encode(name), mask))
        else:
            if uid is None:
                uid = os.geteuid()
            if gid is None:
                gid = os.getegid() if mask & GROUP else -1
            super().__init__(_native.open_handle(lib().pb_caps_service_register, broker._live(), encode(name),
                                                 uid, gid, mask))
        self.name = name
        self.max_request = max_request
        self.max_reply_bytes_per_uid = max_reply_bytes_per_uid
        self._capacity = 64 * 1024
        self._books = threading.Lock()
        self._awaiting: Dict[int, int] = {}              # request id -> its client's uid
        self._replied: Dict[int, Tuple[int, int]] = {}   # reply id -> (uid, bytes), until its DISPOSE
        self._held: Dict[int, int] = {}                  # uid -> bytes of its replies not consumed

    def _refuse_long(self, limit: int) -> Optional[Message]:
        """Takes the next message in place: a REQUEST longer than limit is answered EMSGSIZE,
        unread (None: look again); anything else (another thread took the long one first) is
        copied and returned."""
        taken: Dict[str, object] = {}

        def read(m, data, length, context):  # type: ignore[no-untyped-def]
            header = m.contents
            if header.kind == MessageKind.REQUEST and header.length > limit:
                taken["refuse"] = header.id
            else:
                taken["message"] = _message(header, string_at(data, min(length, limit)))
            return 0

        check(lib().pb_caps_receive(self._live(), _native.READ_CALLBACK(read), None))
        if "refuse" in taken:
            lib().pb_caps_reply_error(self._live(), taken["refuse"], errno.EMSGSIZE)
            return None
        message = taken.get("message")
        return message if isinstance(message, Message) else None

    def _noted(self, message: Message) -> Message:
        """Keeps the books of requests awaiting replies and replies not consumed."""
        if self.max_reply_bytes_per_uid is None:
            return message
        with self._books:
            if message.kind == MessageKind.REQUEST:
                self._awaiting[message.id] = message.uid
            elif message.kind in (MessageKind.DISPOSE, MessageKind.ABORTED):
                self._awaiting.pop(message.id, None)
                uid, size = self._replied.pop(message.id, (0, 0))
                if size:
                    self._held[uid] = self._held.get(uid, 0) - size
        return message

    def wait(self) -> Message:
        """Waits for the next message (REQUEST, DISPOSE, ABORTED, or a notice).
        OSError ECANCELED once cancel() is called."""
        message, self._capacity = _receive(lib().pb_caps_wait, self._live(), self._capacity,
                                           self._refuse_long, self.max_request)
        return self._noted(message)

    def get(self) -> Optional[Message]:
        """The next message if one is queued, else None (does not wait)."""
        try:
            message, self._capacity = _receive(lib().pb_caps_get, self._live(), self._capacity,
                                               self._refuse_long, self.max_request)
        except BlockingIOError:
            return None
        return self._noted(message)

    def __iter__(self) -> Iterator[Message]:
        while True:
            try:
                yield self.wait()
            except OSError as error:
                if error.errno == errno.ECANCELED:
                    return
                raise

    def reply(self, id: int, data: BytesLike) -> None:
        """Replies to request id with data (any bytes-like object). A reply that would take its
        client's uid past max_reply_bytes_per_uid of replies not consumed yet is answered EDQUOT
        instead (the client's call raises it)."""
        data = _payload(data)
        if self.max_reply_bytes_per_uid is not None:
            with self._books:
                uid = self._awaiting.get(id)
                over = uid is not None and self._held.get(uid, 0) + len(data) > self.max_reply_bytes_per_uid
            if over:
                check(lib().pb_caps_reply_error(self._live(), id, errno.EDQUOT))
                with self._books:
                    self._awaiting.pop(id, None)
                return
        check(lib().pb_caps_reply(self._live(), id, data, len(data)))
        if self.max_reply_bytes_per_uid is not None:
            with self._books:
                uid = self._awaiting.pop(id, None)
                if uid is not None:
                    self._replied[id] = (uid, len(data))
                    self._held[uid] = self._held.get(uid, 0) + len(data)

    def reply_error(self, id: int, error: int) -> None:
        """Answers request id with an errno (> 0) instead of bytes: the client's call raises it."""
        check(lib().pb_caps_reply_error(self._live(), id, error))
        with self._books:
            self._awaiting.pop(id, None)

    def set_generation(self, generation: int) -> None:
        """Sets this service's generation, which its clients read with CapsClient.generation()."""
        check(lib().pb_caps_set_generation(self._live(), generation))

    def fileno(self) -> int:
        """A descriptor readable when a message may be waiting (for select/poll/epoll); then
        drain with get() until it returns None. It belongs to the service: do not close it.
        A message queued before the first call makes it readable too."""
        return check(lib().pb_caps_service_fd(self._live()))

    def cancel(self) -> None:
        """Makes a wait() in another thread (or the next one) raise ECANCELED, ending iteration."""
        lib().pb_caps_service_cancel(self._live())


class CapsClient(_native.Handle):
    """A connection to the CAPS service registered under name.

    FileNotFoundError (ENOENT) when no such service is registered (or none this user may
    reach), unless wait is true: then it waits until the name is registered. Thread-safe
    (close() aside).

    uid, gid and access are DragonFly's caps_sys_client's: the newest service registered under
    that uid and gid (-1 or None: any) is chosen, and the client is admitted through one of
    access's classes ("user", "group", "world", or a mask; all three unless given) that the
    service also set (PermissionError, EACCES, when none admits it). Naming no uid finds only
    services this user can trust: its own uid's, root's, or the name's owners' by the broker's
    policy; naming one finds that uid's, whoever it is.
    """

    _close_function = "pb_caps_client_close"

    def __init__(self, broker: Broker, name: str, wait: bool = False, *, reply_capacity: int = 1 << 20,
                 uid: Optional[int] = None, gid: Optional[int] = None,
                 access: Optional[Union[int, str, Iterable[str]]] = None) -> None:
        flags = _WAIT_FOR_SERVICE if wait else 0
        if uid is None and gid is None and access is None:
            super().__init__(_native.open_handle(lib().pb_caps_client_open, broker._live(), encode(name), flags))
        else:
            super().__init__(_native.open_handle(lib().pb_caps_client_connect, broker._live(), encode(name),
                                                 -1 if uid is None else uid, -1 if gid is None else gid,
                                                 0 if access is None else _access_mask(access), flags))
        self.name = name
        self.reply_capacity = reply_capacity
        self._buffers = threading.local()
        self._capacity = 64 * 1024

    def call(self, data: BytesLike, *, reply_capacity: Optional[int] = None) -> bytes:
        """Sends data as a request and returns the reply. A reply longer than reply_capacity
        (default: the client's, 1 MiB) is discarded: OSError EMSGSIZE. The errno a service
        answered with reply_error is raised as OSError; ConnectionResetError when the service
        went away first. It waits as long as the service takes: with a service not trusted to
        answer, put() the request, wait on fileno() (select, selectors) with a deadline of your
        own, take the reply with get(), and abort() it at the deadline."""
        data = _payload(data)
        capacity = self.reply_capacity if reply_capacity is None else reply_capacity
        # One reply buffer per thread, kept: allocating (and zeroing) a megabyte per call would
        # cost more than the round trip itself.
        buffer = getattr(self._buffers, "reply", None)
        if buffer is None or len(buffer) < capacity:
            buffer = (c_char * capacity)()
            self._buffers.reply = buffer
        length = check(lib().pb_caps_call(self._live(), data, len(data), buffer, capacity))
        return string_at(buffer, length)

    def abort(self, id: int) -> bool:
        """Takes request id back. True: the service had not read it, and it is gone (no reply
        will come); False: the service has it and is told, and its reply is discarded. OSError
        EINVAL when id is not a request of this client in flight. (The service is told with an
        ABORTED message at its next wait or get; one that replies before that never sees it:
        its reply is discarded, and it gets the DISPOSE.)"""
        return check(lib().pb_caps_abort(self._live(), id)) == 0

    def generation(self) -> int:
        """The service's generation (it sets it; a restarted service starts past the old ones)."""
        value = c_uint64()
        check(lib().pb_caps_generation(self._live(), byref(value)))
        return value.value

    def put(self, data: BytesLike) -> int:
        """Sends data as a request without waiting; returns its message id (see wait_reply)."""
        data = _payload(data)
        message_id = c_uint64()
        check(lib().pb_caps_put(self._live(), data, len(data), byref(message_id)))
        return message_id.value

    def _drop_long(self, limit: int) -> Optional[Message]:
        """Takes the next reply in place: one longer than limit is disposed of unread and raised
        as OSError EMSGSIZE; anything else (another thread took the long one first) is copied
        and returned."""
        taken: Dict[str, object] = {}

        def read(m, data, length, context):  # type: ignore[no-untyped-def]
            header = m.contents
            if header.length > limit:
                taken["dropped"] = (header.id, header.length)
            else:
                taken["message"] = _message(header, string_at(data, length))
            return 0

        check(lib().pb_caps_receive_reply(self._live(), _native.READ_CALLBACK(read), None))
        dropped = taken.get("dropped")
        if isinstance(dropped, tuple):
            raise OSError(errno.EMSGSIZE, f"the reply to request {dropped[0]} is {dropped[1]} bytes, more than "
                                          f"reply_capacity ({limit}); disposed of unread")
        message = taken.get("message")
        return message if isinstance(message, Message) else None

    def wait_reply(self) -> Tuple[int, bytes]:
        """Waits for the next reply and returns (request id, reply). Raises the errno the service
        answered with (an OSError whose text names the request id; with several requests in
        flight, call() each, or keep the ids in order: replies to one service come back as it
        answers them). A request the service left unanswered when it went away comes back as an
        empty reply (DragonFly's rule); after those, OSError ENOTCONN. A reply longer than
        reply_capacity is disposed of unread: OSError EMSGSIZE (a service can announce gigabytes
        it never wrote)."""
        message, self._capacity = _receive(lib().pb_caps_wait_reply, self._live(), self._capacity,
                                           self._drop_long, self.reply_capacity)
        return message.id, message.data

    def get(self) -> Optional[Tuple[int, bytes]]:
        """The next reply as (request id, reply) if one is queued, else None (does not wait);
        one longer than reply_capacity as in wait_reply."""
        try:
            message, self._capacity = _receive(lib().pb_caps_client_get, self._live(), self._capacity,
                                               self._drop_long, self.reply_capacity)
        except BlockingIOError:
            return None
        return message.id, message.data

    def fileno(self) -> int:
        """A descriptor readable when a reply may be waiting (for select/poll/epoll). It belongs
        to the client: do not close it; drain with get() until it returns None. A reply that
        arrived before the first call makes it readable too."""
        return check(lib().pb_caps_client_fd(self._live()))
