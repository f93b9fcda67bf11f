"""A local PostgreSQL cluster for photref's Prefect server: ``photref server start --postgres``.

Prefect's SQLite backend answers "database is locked" when a flow run starts within ~50 ms of the previous
one's end (its client then backs off 2 s); PostgreSQL has no such lock. This module makes a PostgreSQL
cluster under ``$PREFECT_HOME/postgres`` with the machine's own PostgreSQL binaries (``initdb``, ``pg_ctl``,
``createdb``), once, and starts and stops it:

* ``$PREFECT_HOME/postgres/data``: the cluster (``initdb``, superuser ``prefect``, password authentication
  only, a random password kept in ``$PREFECT_HOME/postgres/photref.json``, readable by its owner only);
* it listens on 127.0.0.1 only, on a free port chosen at each start (the last one when it is still free),
  no unix socket (the path of one under a deep ``PREFECT_HOME`` can pass the 107-byte limit);
* one database ``prefect``; the log is ``$PREFECT_HOME/postgres/postgres.log``.

PostgreSQL refuses to run as root. When photref runs as root (a container, a CI machine), the cluster
directory belongs to an unprivileged user, ``postgres`` where the PostgreSQL packages made one, else
``nobody``, and every PostgreSQL command runs as that user (``subprocess``'s ``user=``): nothing to do by
hand. That user must be able to reach ``$PREFECT_HOME``; where a parent directory is closed to other
users, :class:`PostgresError` names it.

Like :mod:`flows.server`, this module imports nothing of Prefect.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
from pathlib import Path

from flows._ports import free_port, port_free
from photref_core.errors import PhotrefError

__all__ = [
    "DATABASE",
    "DB_USER",
    "LocalCluster",
    "PostgresError",
    "postgres_bindir",
    "redact",
]

#: The database and the superuser photref creates in its cluster.
DATABASE = "prefect"
DB_USER = "prefect"
#: Where Debian/Ubuntu's packages put the binaries (one directory per major version).
_DEBIAN_BINDIRS = "/usr/lib/postgresql/*/bin"
#: Seconds ``pg_ctl`` waits for the cluster to start or stop.
_PG_CTL_WAIT_S = 60
#: Users the cluster runs as when photref runs as root, in order of preference.
_UNPRIVILEGED_USERS = ("postgres", "nobody")


class PostgresError(PhotrefError):
    """The local PostgreSQL cluster cannot be made, started or stopped (the message says why)."""


def postgres_bindir() -> Path:
    """The directory of PostgreSQL's server binaries (``initdb``, ``pg_ctl``).

    ``PHOTREF_POSTGRES_BIN`` when set; else the newest ``/usr/lib/postgresql/<version>/bin`` (Debian and
    Ubuntu keep the server binaries off ``PATH``); else the directory of ``initdb`` on ``PATH``.

    Raises
    ------
    PostgresError
        When none has both ``initdb`` and ``pg_ctl``.
    """
    given = os.environ.get("PHOTREF_POSTGRES_BIN")
    if given:
        candidates = [Path(given)]
    else:
        versions = sorted(glob.glob(_DEBIAN_BINDIRS), key=lambda p: _version_key(Path(p).parent.name))
        candidates = [Path(p) for p in reversed(versions)]
        on_path = shutil.which("initdb")
        if on_path:
            candidates.append(Path(on_path).parent)
    for directory in candidates:
        if all(os.access(directory / name, os.X_OK) for name in ("initdb", "pg_ctl", "createdb")):
            return directory
    where = f"PHOTREF_POSTGRES_BIN={given}" if given else f"{_DEBIAN_BINDIRS} nor on PATH"
    raise PostgresError(
        f"PostgreSQL's server programs (initdb, pg_ctl, createdb) are not in {where}: install PostgreSQL "
        "(Debian: apt-get install postgresql), set PHOTREF_POSTGRES_BIN to their directory, or give an "
        "existing server with --database-url"
    )


def _version_key(name: str) -> tuple:
    return tuple(int(part) if part.isdigit() else 0 for part in name.split("."))


def redact(url: str) -> str:
    """A database URL with its password replaced by ``***`` (for messages and status lines)."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, location = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{location}" if ":" in credentials else url


class LocalCluster:
    """The PostgreSQL cluster of one Prefect home (``$PREFECT_HOME/postgres``).

    Parameters
    ----------
    home : path
        The Prefect home.
    """

    def __init__(self, home):
        self.directory = Path(home) / "postgres"
        self.data = self.directory / "data"
        self.log = self.directory / "postgres.log"
        self._state_file = self.directory / "photref.json"

    @functools.cached_property
    def bindir(self) -> Path:
        """PostgreSQL's programs (:func:`postgres_bindir`), looked up once per cluster object."""
        return postgres_bindir()

    # -- who runs it ------------------------------------------------------------------------------
    @staticmethod
    def os_user() -> pwd.struct_passwd | None:
        """The user the cluster's commands run as: None (this user) unless this process is root."""
        if os.geteuid() != 0:
            return None
        for name in _UNPRIVILEGED_USERS:
            with contextlib.suppress(KeyError):
                return pwd.getpwnam(name)
        raise PostgresError(
            "PostgreSQL refuses to run as root and this machine has neither a 'postgres' nor a 'nobody' user "
            "to run it as: run photref as an ordinary user, or give an existing server with --database-url"
        )

    def _run(
        self, args: list[str], env: dict | None = None, check: bool = True
    ) -> subprocess.CompletedProcess:
        user = self.os_user()
        kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}
        done = subprocess.run(
            args,
            env=(env or os.environ) | {"LC_ALL": "C"},
            cwd=self.directory,
            capture_output=True,
            text=True,
            check=False,
            **kwargs,
        )
        if check and done.returncode != 0:
            message = (done.stderr or done.stdout).strip().splitlines()
            raise PostgresError(
                f"{Path(args[0]).name} failed for the cluster {self.data}: {' '.join(message[-3:])}"
                + (f" (log: {self.log})" if self.log.exists() else "")
            )
        return done

    def _check_reachable(self, user: pwd.struct_passwd) -> None:
        """Raise when ``user`` cannot enter the cluster's directory (a closed parent directory)."""
        probe = subprocess.run(
            ["/bin/sh", "-c", 'cd "$0"', str(self.directory)],
            user=user.pw_uid,
            group=user.pw_gid,
            extra_groups=[],
            capture_output=True,
            check=False,
        )
        if probe.returncode == 0:
            return
        closed = next(
            (
                parent
                for parent in reversed(self.directory.parents)
                if not parent.stat().st_mode & stat.S_IXOTH
            ),
            self.directory.parent,
        )
        raise PostgresError(
            f"PostgreSQL refuses to run as root, so photref runs the cluster as the user '{user.pw_name}', "
            f"which cannot reach {self.directory}: {closed} is closed to other users. Use a PREFECT_HOME "
            f"that other users can reach (its parents with o+x), or give a server with --database-url"
        )

    # -- state -----------------------------------------------------------------------------------
    def _state(self) -> dict:
        with contextlib.suppress(OSError, ValueError):
            return json.loads(self._state_file.read_text())
        return {}

    def _write_state(self, state: dict) -> None:
        tmp = self._state_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the password
        with os.fdopen(fd, "w") as out:
            json.dump(state, out)
        os.replace(tmp, self._state_file)

    def running_port(self) -> int | None:
        """The port of the running cluster (its ``postmaster.pid``), None when it is not running."""
        if self._run([str(self.bindir / "pg_ctl"), "status", "-D", str(self.data)], check=False).returncode:
            return None
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.data / "postmaster.pid").read_text().splitlines()[3])
        return None

    def url(self, port: int) -> str:
        """The SQLAlchemy URL Prefect's server uses (``postgresql+asyncpg://...``)."""
        password = self._state()["password"]
        return f"postgresql+asyncpg://{DB_USER}:{password}@127.0.0.1:{port}/{DATABASE}"

    # -- lifecycle -------------------------------------------------------------------------------
    def _init(self) -> None:
        """``initdb`` (once): the data directory, superuser ``prefect`` with a random password."""
        user = self.os_user()
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        if user:
            os.chown(self.directory, user.pw_uid, user.pw_gid)
            self._check_reachable(user)
        state = self._state()
        if "password" not in state:
            state = {"password": secrets.token_urlsafe(24)}
            self._write_state(state)
        if (self.data / "PG_VERSION").exists():
            return
        shutil.rmtree(self.data, ignore_errors=True)  # a half-made one (initdb removes its own on failure)
        password_file = self.directory / "initdb-password"
        fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(state["password"] + "\n")
        if user:
            os.chown(password_file, user.pw_uid, user.pw_gid)
        try:
            self._run(
                [
                    str(self.bindir / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    DB_USER,
                    f"--pwfile={password_file}",
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    "--no-locale",
                ]
            )
        finally:
            password_file.unlink(missing_ok=True)

    def start(self) -> str:
        """Make the cluster if needed, start it (or find it running) and return Prefect's URL for it."""
        pg_ctl = str(self.bindir / "pg_ctl")  # its programs first: the plainest of the errors
        port = self.running_port() if self.data.exists() else None
        if port is None:
            self._init()
            state = self._state()
            port = state.get("port")
            if not port or not port_free("127.0.0.1", port):
                port = free_port()
            self._run(
                [
                    pg_ctl,
                    "start",
                    "-D",
                    str(self.data),
                    "-l",
                    str(self.log),
                    "-w",
                    "-t",
                    str(_PG_CTL_WAIT_S),
                    "-o",
                    f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''",
                ]
            )
            self._write_state(self._state() | {"port": port})
        if not self._state().get("database_created"):
            self._create_database(port)
        return self.url(port)

    def _create_database(self, port: int) -> None:
        env = os.environ | {"PGPASSWORD": self._state()["password"]}
        done = self._run(
            [
                str(self.bindir / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                DB_USER,
                DATABASE,
            ],
            env=env,
            check=False,
        )
        if done.returncode != 0 and "already exists" not in done.stderr:
            raise PostgresError(
                f"createdb {DATABASE} failed on the cluster {self.data}: {done.stderr.strip()}"
            )
        self._write_state(self._state() | {"database_created": True})

    def stop(self) -> bool:
        """Stop the cluster (fast shutdown: open sessions are ended). Returns whether it was running."""
        if not self.data.exists() or self.running_port() is None:
            return False
        self._run(
            [
                str(self.bindir / "pg_ctl"),
                "stop",
                "-D",
                str(self.data),
                "-m",
                "fast",
                "-w",
                "-t",
                str(_PG_CTL_WAIT_S),
            ]
        )
        return True
