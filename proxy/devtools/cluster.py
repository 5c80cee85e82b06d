"""Throwaway PostgreSQL clusters from the system's binaries, for tests, benchmarks and the demo.

``Cluster`` runs initdb and pg_ctl on a free port in a temporary directory. As
root it runs them as the ``postgres`` user (PostgreSQL refuses to run as root).
It sets up password authentication over TCP (scram-sha-256 by default, md5 and
trust users as well) and, when asked, TLS with a self-signed certificate.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PG_BIN_CANDIDATES = ["/usr/lib/postgresql/{v}/bin".format(v=v) for v in (17, 16, 15, 14, 13)]


def find_pg_bin() -> Path | None:
    """The directory holding initdb/pg_ctl/postgres, or None."""
    env = os.environ.get("PG_BIN")
    if env and (Path(env) / "initdb").exists():
        return Path(env)
    for cand in PG_BIN_CANDIDATES:
        if (Path(cand) / "initdb").exists():
            return Path(cand)
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
        if (Path(out) / "initdb").exists():
            return Path(out)
    except (OSError, subprocess.CalledProcessError):
        pass
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def make_self_signed_cert(directory: Path, cn: str = "localhost") -> tuple[Path, Path]:
    """Write server.crt/server.key (self-signed, SAN localhost and 127.0.0.1) into ``directory``."""
    crt, key = directory / "server.crt", directory / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
         "-subj", f"/CN={cn}", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(crt)],
        check=True, capture_output=True,
    )
    os.chmod(key, 0o600)
    return crt, key


@dataclass
class User:
    name: str
    password: str | None
    method: str  # scram-sha-256 | md5 | password | trust
    superuser: bool = False


DEFAULT_USERS = [
    User("app", "app-secret", "scram-sha-256"),
    User("md5user", "md5-secret", "md5"),
    User("pwuser", "pw-secret", "password"),
    User("trustuser", None, "trust"),
]


@dataclass
class Cluster:
    """A running throwaway cluster. Use as a context manager or call start()/stop()."""

    port: int = 0
    host: str = "127.0.0.1"
    tls: bool = False
    users: list[User] = field(default_factory=lambda: list(DEFAULT_USERS))
    settings: dict[str, str] = field(default_factory=dict)
    base_dir: Path | None = None
    bin_dir: Path | None = None

    def __post_init__(self) -> None:
        self.bin_dir = self.bin_dir or find_pg_bin()
        if self.bin_dir is None:
            raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found; install the postgresql package")
        self._own_dir = self.base_dir is None
        self.base_dir = Path(self.base_dir or tempfile.mkdtemp(prefix="purpose-proxy-pg-"))
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "sock"
        self.log_file = self.base_dir / "postgres.log"
        self.port = self.port or free_port(self.host)
        self.cert: Path | None = None
        self._as_postgres = os.geteuid() == 0

    # --- process control ----------------------------------------------------------

    def _run(self, args: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        if self._as_postgres:
            pw = pwd.getpwnam("postgres")

            def demote() -> None:
                os.setgid(pw.pw_gid)
                os.setuid(pw.pw_uid)

            kw["preexec_fn"] = demote
            kw.setdefault("env", {**os.environ, "HOME": pw.pw_dir, "USER": "postgres"})
        return subprocess.run(args, check=check, capture_output=True, text=True, cwd="/", **kw)

    def start(self) -> "Cluster":
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        if self._as_postgres:
            pw = pwd.getpwnam("postgres")
            for p in (self.base_dir, self.socket_dir):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        pwfile = self.base_dir / "pwfile"
        pwfile.write_text("postgres-secret\n")
        if self._as_postgres:
            os.chown(pwfile, pwd.getpwnam("postgres").pw_uid, -1)
        self._run([str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", "postgres", "--pwfile", str(pwfile),
                   "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"])
        pwfile.unlink()
        conf = {
            "listen_addresses": f"'{self.host}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "300",
            "shared_buffers": "128MB",
            "password_encryption": "'scram-sha-256'",
            **self.settings,
        }
        if self.tls:
            self.cert, key = make_self_signed_cert(self.data_dir)
            if self._as_postgres:
                pw = pwd.getpwnam("postgres")
                for p in (self.cert, key):
                    os.chown(p, pw.pw_uid, pw.pw_gid)
            conf.update({"ssl": "on", "ssl_cert_file": "'server.crt'", "ssl_key_file": "'server.key'"})
        with open(self.data_dir / "postgresql.conf", "a") as f:
            for k, v in conf.items():
                f.write(f"{k} = {v}\n")
        hba = ["local all all trust"]
        for u in self.users:
            hba.append(f"host all {u.name} 127.0.0.1/32 {u.method}")
            hba.append(f"host all {u.name} ::1/128 {u.method}")
        hba.append("host all postgres 127.0.0.1/32 trust")
        hba.append("host all all 127.0.0.1/32 scram-sha-256")
        (self.data_dir / "pg_hba.conf").write_text("\n".join(hba) + "\n")
        self._run([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file),
                   "-w", "-t", "60", "start"])
        for u in self.users:
            self._create_user(u)
        return self

    def _create_user(self, u: User) -> None:
        attrs = "SUPERUSER" if u.superuser else ""
        enc = "md5" if u.method == "md5" else "scram-sha-256"
        pw = "NULL" if u.password is None else "'" + u.password.replace("'", "''") + "'"
        self.psql_admin(
            f"SET password_encryption = '{enc}'; CREATE ROLE \"{u.name}\" LOGIN {attrs} PASSWORD {pw};"
        )
        # CREATE DATABASE cannot share an implicit transaction with other statements.
        self.psql_admin(f"CREATE DATABASE \"{u.name}\" OWNER \"{u.name}\"")

    def psql_admin(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL as the postgres superuser over the unix socket; return stdout."""
        psql = str(self.bin_dir / "psql") if (self.bin_dir / "psql").exists() else "psql"
        r = self._run([psql,
                       "-h", str(self.socket_dir), "-p", str(self.port), "-U", "postgres", "-d", dbname,
                       "-v", "ON_ERROR_STOP=1", "-X", "-q", "-At", "-c", sql])
        return r.stdout

    def stop(self, mode: str = "fast") -> None:
        if self.data_dir.exists():
            self._run([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop"], check=False)

    def restart(self) -> None:
        self._run([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file),
                   "-m", "fast", "-w", "restart"])

    def cleanup(self) -> None:
        self.stop("immediate")
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def postmaster_pid(self) -> int:
        return int((self.data_dir / "postmaster.pid").read_text().split()[0])

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()

    # --- connection strings ---------------------------------------------------------

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def dsn(self, user: str = "app", dbname: str | None = None, host: str | None = None,
            port: int | None = None, **extra: str) -> str:
        """A libpq keyword/value DSN for ``user`` (its password filled in)."""
        u = next((x for x in self.users if x.name == user), None)
        parts = {"host": host or self.host, "port": str(port or self.port), "user": user,
                 "dbname": dbname or user}
        if u is not None and u.password:
            parts["password"] = u.password
        parts.update(extra)
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def url(self, user: str = "app", dbname: str | None = None, host: str | None = None,
            port: int | None = None) -> str:
        u = next((x for x in self.users if x.name == user), None)
        cred = user + (f":{u.password}" if u is not None and u.password else "")
        return f"postgresql://{cred}@{host or self.host}:{port or self.port}/{dbname or user}"
