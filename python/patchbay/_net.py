"""Sockets through /net (PatchworkOS)."""

from __future__ import annotations

import array
import ctypes
import errno
import os
import queue
import socket as _socket
import stat
import struct
import threading
from typing import Union

from . import _native
from ._broker import Broker
from ._native import check, encode, lib

_NONBLOCK = 1  # PB_NET_NONBLOCK
_SUN_PATH = 108  # sizeof(sockaddr_un.sun_path)
_SOCKADDR_UN_SIZE = 2 + _SUN_PATH


class Socket(_native.Handle):
    """A /net socket: made from a factory (/net/local/<type>, type "seqpacket", "stream" or
    "dgram"), driven by ctl command lines, with the kernel socket (fileno()) as its data path
    once connected. Make one with Socket.open, Socket.listen or Socket.connect (or accept());
    use it from one thread at a time.
    """

    _close_function = "pb_net_close"
    _type = "seqpacket"

    def _typed(self, type: str) -> Socket:
        self._type = type
        return self

    @classmethod
    def open(cls, broker: Broker, type: str = "seqpacket", nonblock: bool = False) -> Socket:
        """A new socket in state NEW; nonblock makes accept and data calls raise BlockingIOError
        instead of waiting."""
        return cls(_native.open_handle(lib().pb_net_open, broker._live(), encode(type), _NONBLOCK if nonblock else 0))._typed(type)

    @classmethod
    def listen(cls, broker: Broker, name: str, type: str = "seqpacket") -> Socket:
        """A socket bound to name and listening (seqpacket or stream). OSError EADDRINUSE when the
        name is taken."""
        return cls(_native.open_handle(lib().pb_net_listen, broker._live(), encode(name), encode(type)))._typed(type)

    @classmethod
    def connect(cls, broker: Broker, name: str, type: str = "seqpacket") -> Socket:
        """A socket connected to the listener bound to name (FileNotFoundError when nothing is,
        ConnectionRefusedError when nobody listens there)."""
        return cls(_native.open_handle(lib().pb_net_connect, broker._live(), encode(name), encode(type)))._typed(type)

    def ctl(self, command: str) -> None:
        """Runs a ctl command line: "bind NAME [MODE]", "listen [BACKLOG]", "connect NAME", joined
        with "&&"; the line is checked whole, then each command runs until one fails."""
        check(lib().pb_net_ctl(self._live(), encode(command)))

    def accept(self, nonblock: bool = False) -> Socket:
        """Accepts one connection on a listening socket, waiting for it unless the socket was opened
        non-blocking or nonblock is true (then BlockingIOError when none is pending). The
        connection accepted is non-blocking too in either case (its send and recv raise
        BlockingIOError instead of waiting), as PB_NET_NONBLOCK makes it in C. A blocking accept
        waits in the broker over its Broker's one connection and holds up that Broker's other
        calls until it returns: give a listener that waits a Broker of its own."""
        return Socket(_native.open_handle(lib().pb_net_accept, self._live(), _NONBLOCK if nonblock else 0))._typed(self._type)

    def fileno(self) -> int:
        """The kernel socket, from the open on, for select/poll/selectors: a listener's is readable
        when a connection waits (then accept(nonblock=True)), a connected one's when data does.
        It belongs to the Socket: do not close it. A listener whose broker restarted without
        keeping its sockets gets a new one at its next accept."""
        return check(lib().pb_net_fd(self._live()))

    def _data(self) -> int:
        """The kernel socket once it carries data (connected, accepted, or a bound dgram);
        OSError ENOTCONN before that."""
        return check(lib().pb_net_data(self._live()))

    @property
    def id(self) -> int:
        """The socket's id: its directory is /net/local/<id>/."""
        return int(lib().pb_net_id(self._live()))

    def send(self, data: bytes) -> int:
        """Writes data to the kernel socket (one packet for seqpacket); returns the bytes written.
        Never raises SIGPIPE (MSG_NOSIGNAL): a peer gone is BrokenPipeError (or
        ConnectionResetError), whatever the process does with SIGPIPE."""
        view = _socket.socket(fileno=self._data())
        try:
            return view.send(data, _socket.MSG_NOSIGNAL)
        finally:
            view.detach()

    def recv(self, size: int = 65536) -> bytes:
        """Reads at most size bytes (one packet for seqpacket); b"" at the end of the stream.
        A seqpacket or dgram packet longer than size is cut to size and the rest discarded, as
        socket.recv does, with no sign of it: read with a size as large as the largest packet.
        On a dgram socket it is recv_from without the sender (a bound one minds its broker while
        it waits: see recv_from).

        Descriptors a peer sends along (SCM_RIGHTS) are received and closed on a thread of this
        package's, never here: the last close of one can wait as long as its sender likes (a TCP
        socket with SO_LINGER), and a plain read would make the kernel close them in this
        thread. A socket's lingering is turned off before it is closed. While more than 1024
        received descriptors wait to be closed (a peer keeps making their closes wait), recv
        raises OSError EMFILE and reads nothing: the bytes stay queued, and closing the socket
        cuts the peer off."""
        if self._dgram:
            return self._receive_datagram(size, want_sender=False)[0]
        return _receive(self._data(), size)

    def recv_from(self, size: int = 65536) -> "tuple[bytes, Union[str, bytes]]":
        """A dgram socket's next packet and its sender's address, as socket.recvfrom gives them:
        a path (str), an abstract name (bytes starting with a NUL), or "" for an unnamed sender
        (which cannot be answered). A packet longer than size is cut to size, the rest
        discarded. Answer with reply(data, address).

        A blocking receive on a bound dgram socket also minds its broker, as a listener's accept
        does: after a broker restart (its broker's end of this socket's handle closes) it has the
        broker that comes back take the socket back under its name, at once and then with
        growing pauses (at most 5 s), receiving all the while; without that the socket would
        receive on but not be listed, and its name could not be reached through the broker.
        Signals are handled while it waits (KeyboardInterrupt ends it). Descriptors a peer
        sends along are received and closed on a thread of the library's; once 64 of them wait to
        be closed (their closes do not finish), the socket is shut for reading and this raises
        OSError ENOBUFS."""
        if not self._dgram:
            raise OSError(errno.EOPNOTSUPP, f"recv_from is for dgram sockets; this one is {self._type}")
        return self._receive_datagram(size, want_sender=True)

    def reply(self, data: bytes, address: "Union[str, bytes]") -> int:
        """Answers the sender of a packet recv_from returned, as a server should: never waiting
        (a sender that does not read loses the answer: BlockingIOError), and to a path only
        through the very socket file found there with no symbolic link in any component
        (OSError ELOOP), so a sender that bound under a link and then pointed the link at
        another socket cannot have the answer sent there in this process's name (sendto would
        follow the link). Only one of the last 64 senders recv_from returned is answered.
        OSError EINVAL, nothing sent: any other address, a sender bound at a relative path (it
        would name a file relative to this process's directory), or under an abstract name the
        kernel did not choose (autobound names, five hex digits, are answered; others would be
        looked up in this process's network namespace, not the sender's). PermissionError
        (EACCES), nothing sent: the socket file at the sender's path is not the sender's uid's
        (a sender in a mount namespace of its own can bind at the path of any socket file), an
        autobound sender of this process's uid is not in its network namespace, or one of
        another uid does not hold, among its first 256 descriptors, the very socket bound at
        its name here (or may not be traced by this process, or is gone). BlockingIOError
        (EAGAIN), nothing sent: the receiver's queue is full, or the sender's uid's senders
        have had their 64 searches this second (all uids' 256). Returns the bytes sent."""
        if not self._dgram:
            raise OSError(errno.EOPNOTSUPP, f"reply is for dgram sockets; this one is {self._type}")
        raw = os.fsencode(address) if isinstance(address, str) else bytes(address)
        if not raw:
            raise OSError(errno.EINVAL, "an unnamed sender cannot be answered")
        if not raw.startswith(b"\0"):
            raw += b"\0"
        if len(raw) > _SUN_PATH:
            raise OSError(errno.ENAMETOOLONG, f"the address is {len(raw)} bytes; a sockaddr_un holds {_SUN_PATH}")
        sockaddr = struct.pack("=H", _socket.AF_UNIX) + raw
        payload = bytes(data)
        return check(lib().pb_net_reply(self._live(), payload, len(payload), sockaddr, len(sockaddr)))

    @property
    def _dgram(self) -> bool:
        return self._type == "dgram"

    def _receive_datagram(self, size: int, want_sender: bool) -> "tuple[bytes, Union[str, bytes]]":
        if size < 0:
            raise ValueError("negative size")
        buffer = ctypes.create_string_buffer(max(size, 1))
        sockaddr = ctypes.create_string_buffer(_SOCKADDR_UN_SIZE)
        length = ctypes.c_uint(_SOCKADDR_UN_SIZE)
        while True:
            result = lib().pb_net_recv(self._live(), buffer, size, sockaddr if want_sender else None,
                                       ctypes.byref(length) if want_sender else None)
            # PEP 475: a signal's handler runs here, between two calls (a KeyboardInterrupt raises
            # out of the loop), and the wait goes on.
            if result != -errno.EINTR:
                break
        check(result)
        data = buffer.raw[: min(result, size)]
        if not want_sender:
            return data, ""
        raw = sockaddr.raw[2 : min(length.value, _SOCKADDR_UN_SIZE)]
        if not raw:
            return data, ""
        if raw[0] == 0:
            return data, raw
        return data, os.fsdecode(raw.split(b"\0", 1)[0])


# Descriptors that arrived with data: SCM_RIGHTS carries at most 253 (SCM_MAX_FD) per message,
# all received, so the kernel drops none (and closes none) in the caller's thread.
_ANCILLARY = _socket.CMSG_SPACE(253 * array.array("i").itemsize)
# Received descriptors queued or being closed, at most about this many: past it, recv refuses
# (EMFILE) without reading until the closing thread catches up.
_CLOSING_BOUND = 1024
_closing: "queue.SimpleQueue[int]" = queue.SimpleQueue()
_closer_lock = threading.Condition()
_closer: "threading.Thread | None" = None
_outstanding = 0


def _close_handed_over(fd: int) -> None:
    """Closes fd, which a peer chose: a socket's lingering is turned off first, so that its last
    close does not wait for unsent data (the kernel still sends it, after the close)."""
    try:
        if stat.S_ISSOCK(os.fstat(fd).st_mode):
            view = _socket.socket(fileno=fd)
            try:
                view.setsockopt(_socket.SOL_SOCKET, _socket.SO_LINGER, struct.pack("ii", 0, 0))
            finally:
                view.detach()
    except OSError:
        pass
    try:
        os.close(fd)
    except OSError:
        pass


def _close_queued() -> None:
    global _outstanding
    while True:
        _close_handed_over(_closing.get())
        with _closer_lock:
            _outstanding -= 1
            _closer_lock.notify_all()


def _close_later(fds: "list[int]") -> None:
    """Closes fds on the package's closing thread (started on first use, a daemon)."""
    global _closer, _outstanding
    with _closer_lock:
        _outstanding += len(fds)
        if _closer is None:
            _closer = threading.Thread(target=_close_queued, name="patchbay-closer", daemon=True)
            _closer.start()
    for fd in fds:
        _closing.put(fd)


def _closed_all(timeout: float) -> bool:
    """Whether every received descriptor queued so far was closed within timeout (for tests)."""
    with _closer_lock:
        return _closer_lock.wait_for(lambda: _outstanding == 0, timeout)


def _receive(fd: int, size: int) -> bytes:
    """recvmsg on the kernel socket fd, which stays the Socket's: the bytes, with any descriptors
    that came along closed off this thread. EMFILE, reading nothing, while the closing thread is
    more than _CLOSING_BOUND descriptors behind (a peer that makes their closes wait)."""
    with _closer_lock:
        if _outstanding >= _CLOSING_BOUND:
            raise OSError(errno.EMFILE, f"{_outstanding} descriptors received with data still wait to be closed "
                          "(a peer makes their closes wait); nothing was read")
    view = _socket.socket(fileno=fd)
    try:
        data, ancillary, _, _ = view.recvmsg(size, _ANCILLARY, _socket.MSG_CMSG_CLOEXEC)
    finally:
        view.detach()
    received: "list[int]" = []
    for level, kind, payload in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            received.extend(fds)
    if received:
        _close_later(received)
    return data
