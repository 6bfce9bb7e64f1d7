"""The SFTP login through the real OpenSSH server: its own OS user per stack, chrooted to the
drop root, nothing but SFTP (no shell, no terminal, no forwarding), by password and by key; and
the logins of stacks that are gone do not pile up on the machine."""

from __future__ import annotations

import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from common.settings import CDR_DROP, StackSettings
from ingestion.cdr_sftp import CdrSftp
from ops.stack import Stack, free_port
from ops.stack.local import reap_stale_sftp_users, remove_sftp_user
from ops.stack.process import is_root

pytestmark = pytest.mark.skipif(not is_root(), reason="the SFTP server is started as root")


@pytest.fixture(scope="module")
def client_key() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="wtc-key-"))
    try:
        key_file = folder / "id_ed25519"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key_file)], check=True
        )
        yield key_file
    finally:
        shutil.rmtree(folder)


@pytest.fixture(scope="module")
def sftp_stack(client_key: Path) -> Iterator[Stack]:
    """An SFTP server of its own (no Postgres or Redis), whose login also accepts a key."""
    state_dir = Path(tempfile.mkdtemp(prefix="wtc-sftp-"))
    state_dir.chmod(0o755)
    settings = StackSettings(
        state_dir=state_dir,
        sftp_port=free_port(),
        sftp_authorized_keys=client_key.with_suffix(".pub").read_text(),
    )
    stack = Stack(settings)
    try:
        stack.setup()
        stack.start_sftp()
        yield stack
    finally:
        stack.stop_sftp()
        stack.remove_sftp_user()
        shutil.rmtree(state_dir)


def connect(stack: Stack, key: Path | None = None) -> paramiko.Transport:
    transport = paramiko.Transport((stack.s.host, stack.s.sftp_port))
    if key is None:
        transport.connect(username=stack.s.sftp_user, password=stack.s.sftp_password)
    else:
        transport.connect(username=stack.s.sftp_user, pkey=paramiko.PKey.from_path(key))
    return transport


@pytest.fixture
def sftp(sftp_stack: Stack) -> Iterator[paramiko.SFTPClient]:
    transport = connect(sftp_stack)
    try:
        client = paramiko.SFTPClient.from_transport(transport)
        assert client is not None
        yield client
    finally:
        transport.close()


def test_each_stack_has_a_login_of_its_own_derived_from_its_state_folder(tmp_path) -> None:
    one = StackSettings(state_dir=tmp_path / "one")
    again = StackSettings(state_dir=tmp_path / "one")
    other = StackSettings(state_dir=tmp_path / "two")
    assert one.sftp_user == again.sftp_user != other.sftp_user
    assert len(one.sftp_user) <= 32  # useradd's limit
    assert StackSettings(state_dir=tmp_path, sftp_user="cdr_drop").sftp_user == "cdr_drop"
    assert one.cdr_dir == one.sftp_chroot_base / one.sftp_user / CDR_DROP.lstrip("/")


def test_the_chroot_is_root_owned_and_the_drop_folder_the_logins(sftp_stack: Stack) -> None:
    s = sftp_stack.s
    login = pwd.getpwnam(s.sftp_user)
    for part in [s.sftp_root, *s.sftp_root.parents]:
        assert part.stat().st_uid == 0 and not part.stat().st_mode & 0o022, part
    assert s.cdr_dir.stat().st_uid == login.pw_uid
    assert login.pw_shell == "/usr/sbin/nologin"


def test_password_and_key_both_log_in_and_land_in_the_drop_folder(
    sftp_stack: Stack, client_key: Path
) -> None:
    for key in (None, client_key):
        transport = connect(sftp_stack, key)
        try:
            client = paramiko.SFTPClient.from_transport(transport)
            assert client.normalize(".") == CDR_DROP
            with client.open("probe.txt", "w") as remote:
                remote.write(f"via {'key' if key else 'password'}")
        finally:
            transport.close()
        probe = sftp_stack.s.cdr_dir / "probe.txt"
        assert probe.read_text() == f"via {'key' if key else 'password'}"
        probe.unlink()


def test_the_loaders_client_logs_in_by_key(sftp_stack: Stack, client_key: Path) -> None:
    (sftp_stack.s.cdr_dir / "cdr_by_key.csv").write_text("x\n")
    url = f"sftp://{sftp_stack.s.sftp_user}@{sftp_stack.s.host}:{sftp_stack.s.sftp_port}/"
    try:
        with CdrSftp(url, CDR_DROP, key_file=client_key) as client:
            assert [f.name for f in client.listing()] == ["cdr_by_key.csv"]
            assert client.read("cdr_by_key.csv") == b"x\n"
    finally:
        (sftp_stack.s.cdr_dir / "cdr_by_key.csv").unlink()


def test_nothing_outside_the_drop_root_can_be_listed(sftp: paramiko.SFTPClient) -> None:
    for path in ("/", "/..", "..", "../..", "../../../..", f"{CDR_DROP}/../../.."):
        assert sftp.listdir(path) == ["cdr"], path
    for path in ("/etc", "/tmp", "/var/lib", "/root", "/proc", "../etc"):
        with pytest.raises(FileNotFoundError):
            sftp.listdir(path)


def test_nothing_outside_the_drop_root_can_be_read(
    sftp_stack: Stack, sftp: paramiko.SFTPClient
) -> None:
    secrets = ["/etc/passwd", "/etc/shadow", "../../etc/passwd", str(sftp_stack.sftp_dir)]
    secrets.append(str(sftp_stack.sftp_dir / "ssh_host_ed25519_key"))
    for path in secrets:
        with pytest.raises(FileNotFoundError):
            sftp.stat(path)
        with pytest.raises(FileNotFoundError):
            sftp.open(path).read()


def test_symlinks_do_not_lead_out(sftp_stack: Stack, sftp: paramiko.SFTPClient) -> None:
    drop = sftp_stack.s.cdr_dir
    # made on the server's side (as a careless operator might), and made by the login itself
    (drop / "host_link").symlink_to("/etc/passwd")
    (drop / "host_dir_link").symlink_to(sftp_stack.state)
    try:
        sftp.symlink("/etc/passwd", "own_link")
        sftp.symlink("../../../../../etc", "own_dir_link")
        for link in ("host_link", "own_link"):
            with pytest.raises(FileNotFoundError):
                sftp.open(link).read()
        for link in ("host_dir_link", "own_dir_link"):
            with pytest.raises(FileNotFoundError):
                sftp.listdir(link)
    finally:
        for name in ("host_link", "host_dir_link", "own_link", "own_dir_link"):
            (drop / name).unlink(missing_ok=True)


def test_the_drop_root_itself_is_not_writable(sftp: paramiko.SFTPClient) -> None:
    with pytest.raises(PermissionError):
        sftp.open("/planted.txt", "w").close()
    with pytest.raises(PermissionError):
        sftp.mkdir("/etc")
    with pytest.raises(PermissionError):
        sftp.rename(CDR_DROP, "/elsewhere")


def test_no_shell_no_terminal_no_command(sftp_stack: Stack) -> None:
    transport = connect(sftp_stack)
    try:
        with pytest.raises(paramiko.SSHException):
            transport.open_session().get_pty()
        # ForceCommand: whatever is asked for, the channel runs internal-sftp, not a command
        channel = transport.open_session(timeout=10)
        channel.settimeout(10)
        channel.exec_command("cat /etc/passwd; id")
        channel.shutdown_write()
        output = b""
        while chunk := channel.recv(65536):
            output += chunk
        assert b"root:" not in output and b"uid=" not in output
        assert channel.recv_exit_status() != 0 or output == b""
    finally:
        transport.close()


def test_no_forwarding_of_any_kind(sftp_stack: Stack) -> None:
    transport = connect(sftp_stack)
    target = (sftp_stack.s.host, sftp_stack.s.sftp_port)
    try:
        with pytest.raises(paramiko.ChannelException):
            transport.open_channel("direct-tcpip", target, ("127.0.0.1", 0), timeout=10)
        with pytest.raises(paramiko.SSHException):
            transport.request_port_forward("127.0.0.1", 0)
    finally:
        transport.close()


def test_logins_of_stacks_that_are_gone_are_reaped() -> None:
    state_dir = Path(tempfile.mkdtemp(prefix="wtc-gone-"))
    state_dir.chmod(0o755)
    stack = Stack(StackSettings(state_dir=state_dir))
    user, root = stack.s.sftp_user, stack.s.sftp_root
    try:
        stack.setup()
        assert pwd.getpwnam(user).pw_dir == str(root)
        reap_stale_sftp_users(stack.s.sftp_chroot_base)
        assert pwd.getpwnam(user)  # its folder is still there: kept
        shutil.rmtree(state_dir)
        reap_stale_sftp_users(stack.s.sftp_chroot_base)
        with pytest.raises(KeyError):
            pwd.getpwnam(user)
        assert not root.exists()
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
        remove_sftp_user(user, stack.s.sftp_chroot_base)
