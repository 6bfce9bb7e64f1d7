"""The SFTP side of the CDR loader: connect from an `sftp://` URL, list a directory, read files.

The login is by the URL's password, or by a private key (`SFTP_KEY_FILE`) when one is given.

paramiko's default flow-control window makes reads of many small files crawl (about 6 MB/s on
loopback); a large window, and read requests as large as the server serves, read them at
several times that.
"""

from __future__ import annotations

import logging
import posixpath
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import paramiko

from common.closing import Closing

log = logging.getLogger(__name__)

WINDOW_SIZE = 64 * 1024 * 1024
MAX_PACKET_SIZE = 32 * 1024
TIMEOUT = 30.0
READ_REQUEST_SIZE = 255 * 1024
"""Bytes asked for per SFTP read request: OpenSSH's sftp-server (9.2 here) serves up to 255 KiB
per request (older releases 64 KiB), so a CDR file (about 90 KB in the starter format) comes in
one request instead of paramiko's 32 KiB ones. A server that serves less answers short, and the
read goes on from there."""
FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
"""Preferred when the server offers them: AEAD, one call per packet, no separate MAC."""


class SftpError(RuntimeError):
    """The SFTP URL or server cannot be used (bad URL, authentication, host key)."""


SFTP_ERRORS: tuple[type[BaseException], ...] = (
    SftpError,
    paramiko.SSHException,
    OSError,
    EOFError,
)
"""What a lost or refused SFTP connection raises (a missing file is an OSError too); retried."""


@dataclass(frozen=True)
class RemoteFile:
    """An entry of the CDR directory as listed: name, size, modification time (s), and why it
    is not taken (`skip`: a dot file, a symlink, not a regular file), None for a regular file."""

    name: str
    size: int
    mtime: int
    skip: str | None = None


def skip_reason(name: str, mode: int | None) -> str | None:
    """Why a directory entry is not taken as a CDR file, or None when it may be one."""
    if name.startswith("."):
        return "dot file: hidden files (e.g. uploads in progress) are not taken"
    if mode is None:
        return "no file type reported by the server"
    if stat.S_ISLNK(mode):
        return "symlink: links are not followed out of the drop folder"
    if stat.S_ISDIR(mode):
        return "directory: only files directly in the drop folder are taken"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    return None


class CdrSftp(Closing):
    """One SFTP session on the CDR directory. Not thread-safe: one per thread."""

    def __init__(
        self,
        url: str,
        directory: str = ".",
        known_hosts: Path | None = None,
        key_file: Path | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "sftp" or not parts.hostname:
            raise SftpError(f"not an sftp:// URL: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 22
        self.directory = directory
        sock = socket.create_connection((self.host, self.port), timeout=TIMEOUT)
        self._transport = paramiko.Transport(
            sock, default_window_size=WINDOW_SIZE, default_max_packet_size=MAX_PACKET_SIZE
        )
        options = self._transport.get_security_options()
        options.ciphers = sorted(options.ciphers, key=lambda c: c not in FAST_CIPHERS)
        try:
            self._transport.start_client(timeout=TIMEOUT)
            self._check_host_key(known_hosts)
            user = unquote(parts.username or "")
            if key_file is not None:
                self._transport.auth_publickey(user, paramiko.PKey.from_path(key_file))
            else:
                self._transport.auth_password(user, unquote(parts.password or ""))
            self._transport.set_keepalive(15)
            sftp = paramiko.SFTPClient.from_transport(self._transport)
            if sftp is None:  # pragma: no cover - paramiko returns None only on a closed channel
                raise SftpError("the SFTP subsystem could not be opened")
            channel = sftp.get_channel()
            assert channel is not None  # from_transport opened it
            channel.settimeout(TIMEOUT)
            self._sftp = sftp
        except paramiko.AuthenticationException as exc:
            self._transport.close()
            raise SftpError(f"SFTP login to {self.host}:{self.port} refused: {exc}") from exc
        except BaseException:
            self._transport.close()
            raise

    def _check_host_key(self, known_hosts: Path | None) -> None:
        if known_hosts is None:
            return
        keys = paramiko.HostKeys(str(known_hosts))
        server_key = self._transport.get_remote_server_key()
        name = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
        if not keys.check(name, server_key):
            raise SftpError(f"host key of {name} is not in {known_hosts}")

    def listing(self) -> list[RemoteFile]:
        """Every entry of the directory by name (`.` and `..` left out); those that are not
        regular files, or are dot files, carry the reason they are not taken (`skip`)."""
        entries = self._sftp.listdir_attr(self.directory)
        files = [
            RemoteFile(
                e.filename, e.st_size or 0, e.st_mtime or 0, skip_reason(e.filename, e.st_mode)
            )
            for e in entries
            if e.filename not in (".", "..")
        ]
        return sorted(files, key=lambda f: f.name)

    def read(self, name: str, size_hint: int = 0) -> bytes:
        """The whole content of `name` as it is now (it may have grown since it was listed).

        `size_hint` is the listed size: a file of up to `READ_REQUEST_SIZE` is asked for in one
        request (and one more that finds the end), a larger one pipelined (paramiko's prefetch).
        """
        with self._sftp.open(posixpath.join(self.directory, name), "rb") as handle:
            if size_hint > READ_REQUEST_SIZE:
                handle.prefetch(size_hint)  # paramiko's own 32 KiB requests, pipelined
                return handle.read()
            handle.MAX_REQUEST_SIZE = READ_REQUEST_SIZE
            parts = [handle.read(READ_REQUEST_SIZE)]  # reads on until full or at the end
            while len(parts[-1]) == READ_REQUEST_SIZE:
                parts.append(handle.read(READ_REQUEST_SIZE))
            return b"".join(parts)

    def close(self) -> None:
        self._transport.close()
