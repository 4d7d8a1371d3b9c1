"""Local channels that only the pair's own user can use: private directories, 0600 sockets, peer checks.

Why: every hybridft service listens on sockets that can steer the pair (a control verb fails the disk
over, a heartbeat line orders a failover, an NBD write lands in the replica, a second connection to the
comparator's ``out`` would take the clients' output).  On one host the kernel gives us three cheap locks,
used together so that no single mistake opens the pair to other local users:

* the work directory is created ``0700`` and, when it already exists, must belong to us and must not be
  group- or world-writable (:func:`ensure_private_dir`): otherwise another user could have planted a
  symlink or a socket there before we started;
* every unix socket is bound ``0600`` (:func:`bind_unix`), never relying on the caller's umask;
* every accepted unix connection is checked with ``SO_PEERCRED`` (:func:`check_peer`): the peer must run
  as our uid or as root.  The file mode alone is not enough, since an already-open directory
  descriptor or a socket passed over ``SCM_RIGHTS`` bypasses it.

State files in those directories are opened with ``O_NOFOLLOW`` (:func:`open_nofollow`), so a symlink
planted in place of a journal cannot redirect our writes.

A refusal is a :class:`ChannelError` (a :class:`~hybridft_common.errors.HybridftError`), whose message
says what was wrong and what to do.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hybridft_common.errors import HybridftError

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ChannelError(HybridftError):
    """A channel or a directory that is not safe to use (``code`` says which rule it broke)."""

    def __init__(self, message: str, code: str = "insecure") -> None:
        super().__init__(message, code)


def ensure_private_dir(path: str | os.PathLike[str], *, what: str = "work directory") -> Path:
    """Create ``path`` mode 0700 (parents as needed), or check that an existing one is ours and private.

    Refused (:class:`ChannelError`): a symlink, something that is not a directory, a directory owned by
    another user, a group- or world-writable one.
    """
    target = Path(path)
    try:
        os.mkdir(target, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        target.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(target, 0o700)
    try:
        info = os.lstat(target)
    except OSError as exc:
        raise ChannelError(f"cannot use {what} {target}: {exc.strerror}", "insecure-dir") from None
    if stat.S_ISLNK(info.st_mode):
        raise ChannelError(f"{what} {target} is a symlink; refusing to follow it", "insecure-dir")
    if not stat.S_ISDIR(info.st_mode):
        raise ChannelError(f"{what} {target} exists and is not a directory", "insecure-dir")
    if info.st_uid != os.geteuid():
        raise ChannelError(
            f"{what} {target} belongs to uid {info.st_uid}, not to this user (uid {os.geteuid()}); "
            "use a directory of your own",
            "insecure-dir",
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ChannelError(
            f"{what} {target} is group- or world-writable (mode {stat.S_IMODE(info.st_mode):04o}); "
            f"`chmod 700 {target}` or use another directory",
            "insecure-dir",
        )
    return target


def open_nofollow(path: str | os.PathLike[str], flags: int, mode: int = 0o600) -> int:
    """``os.open`` that refuses a symlink as the last path component (``ELOOP`` becomes ChannelError)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == 40:  # ELOOP: the name is a symlink
            raise ChannelError(f"{path} is a symlink; refusing to follow it", "insecure-file") from None
        raise


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def bind_unix(sock: socket.socket, path: str) -> None:
    """Bind a unix socket so that its file is mode 0600 from the start (a stale file is replaced)."""
    with contextlib.suppress(FileNotFoundError):
        info = os.lstat(path)
        if not stat.S_ISSOCK(info.st_mode):
            raise ChannelError(f"{path} exists and is not a socket; refusing to replace it", "insecure-file")
        os.unlink(path)
    with _umask(0o177):
        sock.bind(path)
    os.chmod(path, 0o600)  # belt and braces: a umask cannot widen it, but make the mode explicit


def unix_listener(path: str, backlog: int = 16) -> socket.socket:
    """A listening unix stream socket at ``path``, mode 0600."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        bind_unix(sock, path)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(frozen=True, slots=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


def peer_cred(sock: socket.socket) -> PeerCred | None:
    """The peer's credentials (``SO_PEERCRED``) of a connected unix socket; None for other families."""
    if sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return PeerCred(*_UCRED.unpack(raw))


def check_peer(sock: socket.socket | None) -> None:
    """Refuse a unix peer that runs neither as our uid nor as root (other families pass: TLS covers them)."""
    if sock is None:
        raise ChannelError("no socket to check the peer of", "peer-refused")
    try:
        cred = peer_cred(sock)
    except OSError as exc:
        raise ChannelError(f"cannot read the peer's credentials: {exc}", "peer-refused") from None
    if cred is None:
        return
    if cred.uid not in (os.geteuid(), 0):
        raise ChannelError(
            f"peer pid {cred.pid} runs as uid {cred.uid}, not as this service's uid {os.geteuid()} or root",
            "peer-refused",
        )
