"""The embedded local stack: Postgres, Redis and an OpenSSH SFTP server on loopback.

    python -m ops.stack start     # set up what is missing, start it all, bootstrap the databases
    python -m ops.stack status    # what runs, where
    python -m ops.stack stop      # stop the project's processes and the servers, gracefully

Everything lives under the state folder (`.wtc/` by default). Starting and stopping are
idempotent. When run as root, Postgres and Redis run as an unprivileged service user and the
SFTP server (OpenSSH's `internal-sftp`) logs in the stack's own OS user (by password or key),
chrooted to a root-owned drop root under /var/lib/wtc-analytics/ that holds the drop folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

from common.settings import CDR_DROP, CONTRACTS_DIR, PROJECT_ROOT, StackSettings
from ingestion.crm_cdc import CdcSettings
from ops.stack import pg_roles
from ops.stack.monitoring import Monitoring
from ops.stack.process import (
    Component,
    StackError,
    alive,
    free_port,
    is_root,
    port_open,
    read_pid,
    terminate,
    wait_until,
)
from ops.stack.redis_acl import ROLES, acl_file

log = logging.getLogger("ops.stack")

SSHD = Path("/usr/sbin/sshd")
DEBIAN_PACKAGES = {"redis-server": "redis-server", str(SSHD): "openssh-server"}


SFTP_USER_MARK = "wtc-analytics sftp drop of "
"""The start of the comment (GECOS) of an SFTP login made by a stack, followed by the stack's
state folder: a login whose folder is gone belongs to a stack that is gone, and is reaped."""


def authorized_keys_file(base: Path, user: str) -> Path:
    """The public keys that may log in as `user`: root-owned, beside its chroot (not inside)."""
    return base / f"{user}.authorized_keys"


def _check_chroot_path(root: Path) -> None:
    """OpenSSH refuses a chroot unless every component of its path is root-owned and writable
    by no one else: say so before it does (its own message only reaches its log)."""
    for part in [root, *root.parents]:
        st = part.stat()
        if st.st_uid != 0 or st.st_mode & 0o022:
            raise StackError(
                f"{part} must be owned by root and writable by no one else to hold the SFTP "
                "chroot; set WTC_SFTP_CHROOT_BASE to such a folder"
            )


def remove_sftp_user(user: str, base: Path) -> None:
    """Delete the SFTP login `user` made by a stack, with its chroot under `base` and its keys."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        entry = None
    if entry is not None:
        if not entry.pw_gecos.startswith(SFTP_USER_MARK):
            raise StackError(f"refusing to delete {user}: not an SFTP login made by a stack")
        log.info("deleting sftp login", extra={"user": user})
        subprocess.run(["userdel", user], check=True)
    root = base / user
    if root.parent == base and root.is_dir():
        shutil.rmtree(root)
    authorized_keys_file(base, user).unlink(missing_ok=True)


def reap_stale_sftp_users(base: Path) -> None:
    """Delete the SFTP logins (and chroots) of stacks whose state folder no longer exists, so
    that machines which run many throwaway stacks (CI, the tests) do not collect users."""
    for entry in pwd.getpwall():
        state = entry.pw_gecos.removeprefix(SFTP_USER_MARK)
        if entry.pw_gecos.startswith(SFTP_USER_MARK) and state and not Path(state).exists():
            remove_sftp_user(entry.pw_name, base)


class Stack:
    """Start, report and stop the local servers under one state folder."""

    def __init__(self, settings: StackSettings | None = None) -> None:
        self.s = settings or StackSettings()
        self.state = self.s.state_dir.resolve()
        self.pg_dir = self.state / "pg"
        self.pg_data = self.pg_dir / "data"
        self.redis_dir = self.state / "redis"
        self.sftp_dir = self.state / "sftp"
        self.run_dir = self.state / "run"
        self.monitoring = Monitoring(self.s)

    # -- set-up --------------------------------------------------------------------------------

    def missing_packages(self) -> list[str]:
        missing = [pkg for binary, pkg in DEBIAN_PACKAGES.items() if not shutil.which(binary)]
        if not (self.s.pg_bin_dir / "postgres").exists():
            missing.append("postgresql-15")
        if self.s.monitoring:
            missing += self.monitoring.missing_packages()
        return missing

    def setup(self) -> None:
        """Install missing Debian packages (as root on Debian) and create the OS users."""
        missing = self.missing_packages()
        if missing:
            command = f"apt-get update && apt-get install -y {' '.join(missing)}"
            if not (is_root() and Path("/etc/debian_version").exists()):
                raise StackError(f"missing packages {missing}; install them with: sudo {command}")
            log.info("installing Debian packages", extra={"packages": missing})
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            subprocess.run(["sh", "-c", command], check=True, env=env, stdout=subprocess.DEVNULL)
        self.state.mkdir(parents=True, exist_ok=True)
        for directory in (self.run_dir, self.pg_dir, self.redis_dir, self.sftp_dir):
            directory.mkdir(parents=True, exist_ok=True)
        if is_root():
            for os_user, directory in (
                (self.s.pg_os_user, self.pg_dir),
                (self.s.redis_os_user, self.redis_dir),
            ):
                self._ensure_user(os_user, home=Path("/nonexistent"))
                user = pwd.getpwnam(os_user)
                os.chown(directory, user.pw_uid, user.pw_gid)
            reap_stale_sftp_users(self.s.sftp_chroot_base)
            self._setup_sftp_user()
        else:
            self.s.cdr_dir.mkdir(parents=True, exist_ok=True)
        self.redis_dir.chmod(0o700)

    def _setup_sftp_user(self) -> None:
        """The stack's SFTP login: an OS user of its own, chrooted to a root-owned drop root
        that holds the drop folder it may write, logging in by password and by key."""
        s = self.s
        base, root = s.sftp_chroot_base, s.sftp_root
        base.mkdir(mode=0o755, parents=True, exist_ok=True)
        root.mkdir(mode=0o755, exist_ok=True)
        os.chown(root, 0, 0)
        root.chmod(0o755)
        _check_chroot_path(root)
        comment = f"{SFTP_USER_MARK}{self.state}" if ":" not in str(self.state) else SFTP_USER_MARK
        self._ensure_user(s.sftp_user, home=root, comment=comment)
        subprocess.run(
            ["chpasswd"], input=f"{s.sftp_user}:{s.sftp_password}\n", text=True, check=True
        )
        login = pwd.getpwnam(s.sftp_user)
        s.cdr_dir.mkdir(exist_ok=True)
        os.chown(s.cdr_dir, login.pw_uid, login.pw_gid)
        s.cdr_dir.chmod(0o755)
        keys = authorized_keys_file(base, s.sftp_user)
        keys.write_text(s.sftp_authorized_keys.strip() + "\n" if s.sftp_authorized_keys else "")
        os.chown(keys, 0, 0)
        keys.chmod(0o644)

    def remove_sftp_user(self) -> None:
        """Delete the stack's SFTP login, its chroot and its keys (stop the server first)."""
        remove_sftp_user(self.s.sftp_user, self.s.sftp_chroot_base)

    @staticmethod
    def _ensure_user(name: str, home: Path, comment: str = "") -> None:
        try:
            pwd.getpwnam(name)
        except KeyError:
            log.info("creating system user", extra={"user": name})
            subprocess.run(
                [
                    "useradd",
                    "--system",
                    "--no-create-home",
                    "--home-dir",
                    str(home),
                    "--shell",
                    "/usr/sbin/nologin",
                    *(["--comment", comment] if comment else []),
                    name,
                ],
                check=True,
            )

    def _as_service_user(self, argv: list[str], os_user: str | None = None) -> list[str]:
        """`argv` run as the service user `os_user` (Postgres' by default) when we are root,
        with umask 077: what it creates is its own alone."""
        private = ["sh", "-c", 'umask 077 && exec "$@"', "sh", *argv]
        if is_root():
            return ["runuser", "-u", os_user or self.s.pg_os_user, "--", *private]
        return private

    # -- Postgres ------------------------------------------------------------------------------

    def _pg(self, tool: str) -> str:
        return str(self.s.pg_bin_dir / tool)

    def start_postgres(self) -> None:
        if self.postgres_pid() is not None:
            log.info("postgres already running", extra={"port": self.s.pg_port})
            return
        self._check_port_free(self.s.pg_port, "postgres")
        if not (self.pg_data / "PG_VERSION").exists():
            self._initdb()
        (self.pg_data / "wtc.conf").write_text(
            "\n".join(
                [
                    f"listen_addresses = '{self.s.host}'",
                    f"port = {self.s.pg_port}",
                    f"unix_socket_directories = '{self.pg_dir}'",
                    "wal_level = logical",
                    "max_replication_slots = 10",
                    "max_wal_senders = 10",
                    "timezone = 'UTC'",
                    "log_timezone = 'UTC'",
                    "shared_buffers = 256MB",
                    "max_wal_size = 2GB",
                    "work_mem = 64MB",
                    # short analytical queries: compiling them costs more than it saves
                    "jit = off",
                    "maintenance_work_mem = 256MB",
                    "",
                ]
            )
        )
        log.info("starting postgres", extra={"port": self.s.pg_port})
        started = subprocess.run(
            self._as_service_user(
                [
                    self._pg("pg_ctl"),
                    "start",
                    "-D",
                    str(self.pg_data),
                    "-w",
                    "-t",
                    "60",
                    "-l",
                    str(self.pg_dir / "postgres.log"),
                ]
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if started.returncode != 0:
            tail = (self.pg_dir / "postgres.log").read_text().splitlines()[-3:]
            raise StackError("postgres did not start: " + " | ".join(tail))

    def _initdb(self) -> None:
        log.info("initialising postgres data directory", extra={"path": str(self.pg_data)})
        pwfile = self.pg_dir / "initdb.pw"
        pwfile.write_text(self.s.pg_password + "\n")
        if is_root():
            user = pwd.getpwnam(self.s.pg_os_user)
            os.chown(pwfile, user.pw_uid, user.pw_gid)
        pwfile.chmod(0o600)
        try:
            subprocess.run(
                self._as_service_user(
                    [
                        self._pg("initdb"),
                        "-D",
                        str(self.pg_data),
                        "-U",
                        self.s.pg_user,
                        "--pwfile",
                        str(pwfile),
                        "--auth-local=peer",
                        "--auth-host=scram-sha-256",
                        "-E",
                        "UTF8",
                        "--no-locale",
                    ]
                ),
                check=True,
                stdout=subprocess.DEVNULL,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        with (self.pg_data / "postgresql.conf").open("a") as conf:
            conf.write("\ninclude_if_exists = 'wtc.conf'\n")

    def postgres_pid(self) -> int | None:
        return read_pid(self.pg_data / "postmaster.pid")

    def stop_postgres(self) -> None:
        pid = self.postgres_pid()
        if pid is None:
            return
        log.info("stopping postgres")
        subprocess.run(
            self._as_service_user(
                [self._pg("pg_ctl"), "stop", "-D", str(self.pg_data), "-m", "fast", "-w"]
            ),
            check=True,
            stdout=subprocess.DEVNULL,
        )
        # pg_ctl returns once postmaster.pid is gone, which the postmaster removes just before
        # it exits: wait for the process itself, so that a stopped stack has nothing left running
        wait_until(lambda: not alive(pid), "postgres to exit")

    def bootstrap(self) -> None:
        """Create the databases, the job roles, apply the CRM source tables and the raw-layer
        contract, and grant each role its rights (ops/stack/pg_roles.py)."""
        with psycopg.connect(self.s.pg_dsn("postgres"), autocommit=True) as conn:
            existing = {r[0] for r in conn.execute("select datname from pg_database")}
            for database in ("wtc_prod", "wtc_analytics"):
                if database not in existing:
                    log.info("creating database", extra={"database": database})
                    conn.execute(f'create database "{database}"')
            pg_roles.ensure_roles(
                conn, {role: getattr(self.s, f"pg_{role}_password") for role in pg_roles.ROLES}
            )
        for database, script in (
            ("wtc_prod", "wtc_prod.sql"),
            ("wtc_analytics", "wtc_analytics.sql"),
        ):
            with psycopg.connect(self.s.pg_dsn(database)) as conn:
                conn.execute((CONTRACTS_DIR / script).read_text())
        cdc = CdcSettings()
        with psycopg.connect(self.s.pg_dsn("wtc_prod")) as conn:
            pg_roles.grant_prod(conn, cdc.publication, list(cdc.tables))
        with psycopg.connect(self.s.pg_dsn("wtc_analytics")) as conn:
            pg_roles.grant_analytics(conn)

    # -- Redis ---------------------------------------------------------------------------------

    @property
    def redis_pidfile(self) -> Path:
        return self.redis_dir / "redis.pid"

    def start_redis(self) -> None:
        if read_pid(self.redis_pidfile) is not None:
            log.info("redis already running", extra={"port": self.s.redis_port})
            return
        self._check_port_free(self.s.redis_port, "redis")
        log.info("starting redis", extra={"port": self.s.redis_port})
        acl = self.redis_dir / "users.acl"
        acl.write_text(acl_file({role: self.s.redis_password(role) for role in ROLES}))
        acl.chmod(0o600)
        if is_root():
            user = pwd.getpwnam(self.s.redis_os_user)
            os.chown(acl, user.pw_uid, user.pw_gid)
        subprocess.run(
            self._as_service_user(
                [
                    "redis-server",
                    "--aclfile",
                    str(acl),
                    "--bind",
                    self.s.host,
                    "--port",
                    str(self.s.redis_port),
                    "--dir",
                    str(self.redis_dir),
                    "--daemonize",
                    "yes",
                    "--pidfile",
                    str(self.redis_pidfile),
                    "--logfile",
                    str(self.redis_dir / "redis.log"),
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "everysec",
                    "--save",
                    "",
                    "--protected-mode",
                    "yes",
                    "--maxmemory",
                    f"{self.s.redis_maxmemory_mb}mb",
                    "--maxmemory-policy",
                    "noeviction",
                ],
                self.s.redis_os_user,
            ),
            check=True,
        )
        wait_until(self._redis_ready, "redis to accept connections and load its data")

    def _redis_ready(self) -> bool:
        """Redis answers PING as the admin user: the port is open and the append-only file is
        loaded (until then every command gets LOADING)."""
        import redis

        if not port_open(self.s.host, self.s.redis_port):
            return False
        client = redis.Redis.from_url(self.s.redis_url_for("admin"), socket_timeout=5)
        try:
            return bool(client.ping())
        except redis.BusyLoadingError:
            return False
        finally:
            client.close()

    def stop_redis(self) -> None:
        terminate({self.redis_pidfile: "redis"})

    # -- SFTP ----------------------------------------------------------------------------------

    @property
    def sshd_pidfile(self) -> Path:
        return self.sftp_dir / "sshd.pid"

    def start_sftp(self) -> None:
        if read_pid(self.sshd_pidfile) is not None:
            log.info("sftp server already running", extra={"port": self.s.sftp_port})
            return
        if not is_root():
            raise StackError(
                "the SFTP server (OpenSSH) logs users in by password and must be started as root"
            )
        self._check_port_free(self.s.sftp_port, "sftp")
        root = self.s.sftp_root
        keys = authorized_keys_file(self.s.sftp_chroot_base, self.s.sftp_user)
        if any(ch.isspace() or ch == "%" for ch in f"{root}{keys}"):
            raise StackError(f"the SFTP chroot path must not contain spaces or '%': {root}")
        host_key = self.sftp_dir / "ssh_host_ed25519_key"
        if not host_key.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True
            )
        config = self.sftp_dir / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"Port {self.s.sftp_port}",
                    f"ListenAddress {self.s.host}",
                    f"HostKey {host_key}",
                    f"PidFile {self.sshd_pidfile}",
                    "PasswordAuthentication yes",
                    "KbdInteractiveAuthentication no",
                    "PubkeyAuthentication yes",
                    f"AuthorizedKeysFile {keys}",
                    "UsePAM no",
                    "PermitRootLogin no",
                    f"AllowUsers {self.s.sftp_user}",
                    "StrictModes yes",
                    # nothing but SFTP: no forwarding of any kind, no terminal, no rc files
                    "DisableForwarding yes",
                    "AllowTcpForwarding no",
                    "AllowAgentForwarding no",
                    "AllowStreamLocalForwarding no",
                    "X11Forwarding no",
                    "PermitTunnel no",
                    "GatewayPorts no",
                    "PermitTTY no",
                    "PermitUserRC no",
                    "PermitUserEnvironment no",
                    "MaxStartups 50:30:100",
                    "Subsystem sftp internal-sftp",
                    f"ChrootDirectory {root}",
                    f"ForceCommand internal-sftp -d {CDR_DROP}",
                    "",
                ]
            )
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        log.info("starting sftp server", extra={"port": self.s.sftp_port})
        subprocess.run(
            [str(SSHD), "-f", str(config), "-E", str(self.sftp_dir / "sshd.log")], check=True
        )
        wait_until(lambda: port_open(self.s.host, self.s.sftp_port), "sftp to accept connections")

    def stop_sftp(self) -> None:
        terminate({self.sshd_pidfile: "sftp server"})

    # -- the project's own background processes (API, consumers, docs) -------------------------

    def start_process(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
        """Start a project process in the background, its pid in `run/<name>.pid`."""
        pidfile = self.run_dir / f"{name}.pid"
        pid = read_pid(pidfile)
        if pid is not None:
            log.info("already running", extra={"service": name, "pid": pid})
            return pid
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # The child keeps its own copy of the log's descriptor; ours closes at once.
        with (self.run_dir / f"{name}.log").open("ab") as logfile:
            proc = subprocess.Popen(
                argv,
                cwd=PROJECT_ROOT,
                env={**os.environ, **(env or {})},
                stdout=logfile,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        pidfile.write_text(f"{proc.pid}\n")
        log.info("started", extra={"service": name, "pid": proc.pid})
        return proc.pid

    def stop_processes(self) -> None:
        terminate({pidfile: pidfile.stem for pidfile in sorted(self.run_dir.glob("*.pid"))})

    # -- whole stack ---------------------------------------------------------------------------

    def _check_port_free(self, port: int, what: str) -> None:
        if port_open(self.s.host, port):
            raise StackError(
                f"port {port} for {what} is taken by another program; "
                f"set WTC_{what.upper()}_PORT to a free port"
            )

    def start(self) -> None:
        self.setup()
        self.start_postgres()
        self.start_redis()
        self.start_sftp()
        self.bootstrap()
        if self.s.monitoring:
            self.monitoring.start()

    def stop(self) -> None:
        self.monitoring.stop()
        self.stop_processes()
        self.stop_sftp()
        self.stop_redis()
        self.stop_postgres()

    def status(self) -> list[Component]:
        components = [
            Component(
                "postgres",
                self.s.pg_port,
                self.postgres_pid() is not None,
                self.postgres_pid(),
                str(self.pg_data),
            ),
            Component(
                "redis",
                self.s.redis_port,
                read_pid(self.redis_pidfile) is not None,
                read_pid(self.redis_pidfile),
                str(self.redis_dir),
            ),
            Component(
                "sftp",
                self.s.sftp_port,
                read_pid(self.sshd_pidfile) is not None,
                read_pid(self.sshd_pidfile),
                str(self.s.cdr_dir),
            ),
        ]
        for pidfile in sorted(self.run_dir.glob("*.pid")):
            pid = read_pid(pidfile)
            components.append(Component(pidfile.stem, 0, pid is not None, pid))
        if self.s.monitoring:
            components += self.monitoring.status()
        return components


@contextlib.contextmanager
def running(settings: StackSettings) -> Iterator[Stack]:
    """A started, bootstrapped stack that is stopped on exit."""
    stack = Stack(settings)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def scratch_settings(state_dir: Path, **overrides: Any) -> StackSettings:
    """Settings for a stack of its own in `state_dir`, every port a free one."""
    return StackSettings(
        **overrides,
        state_dir=state_dir,
        pg_port=free_port(),
        redis_port=free_port(),
        sftp_port=free_port(),
        api_port=free_port(),
        docs_port=free_port(),
        monitoring=False,  # a test that wants it starts its own (tests/test_monitoring_e2e.py)
    )


@contextlib.contextmanager
def throwaway(prefix: str = "wtc-", **overrides: Any) -> Iterator[Stack]:
    """A started stack on free ports in a new temporary folder, stopped and removed on exit
    (the tests' and the benchmarks' servers); `overrides` are settings of it (not its ports)."""
    state_dir = Path(tempfile.mkdtemp(prefix=prefix))
    state_dir.chmod(0o755)  # mkdtemp's folders are private; the service users must traverse it
    settings = scratch_settings(state_dir, **overrides)
    try:
        with running(settings) as stack:
            yield stack
    finally:
        if is_root():
            remove_sftp_user(settings.sftp_user, settings.sftp_chroot_base)
        shutil.rmtree(state_dir, ignore_errors=True)
