"""A persistent local Prefect server for photref: ``photref server start|stop|status``.

Without a server, every ``photref`` command starts Prefect's temporary server and stops it at exit, 4-8 s
of a run that may have nothing to do. The command starts that server's process first thing, before it
imports Prefect and the flows (:class:`TemporaryServer`), so that its start overlaps the command's own ~2 s of
imports, and without importing Prefect's server application into the command (another ~2 s).

``photref server start`` runs ``prefect server start`` in the background (detached, its output in
``$PREFECT_HOME/server.log``) on 127.0.0.1 for this ``PREFECT_HOME`` (one server per home) and records its
address in
``$PREFECT_HOME/photref-server.json``; every later photref command with the same home finds it there,
checks that it answers, and uses it (one line on stderr says so). When none answers, the command falls back
to the temporary server with a one-line hint.

The server's database: SQLite (``$PREFECT_HOME/prefect.db``, Prefect's default), or PostgreSQL:
``--postgres`` makes and starts a local cluster under ``$PREFECT_HOME/postgres`` (:mod:`flows.postgres`),
``--database-url`` names an existing server. The choice is kept in ``$PREFECT_HOME/photref-database.json``
(readable by its owner only: a URL may hold a password), so that a later ``photref server start`` comes
back on the same database with its runs; ``--sqlite`` goes back to SQLite. ``stop`` stops the local cluster
too.

This module imports nothing of Prefect: it runs before Prefect reads its settings (``PREFECT_API_URL``
must be in the environment by then).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from flows._ports import free_port, port_free
from flows.postgres import LocalCluster, PostgresError, redact
from photref_core._atomic import pid_alive

__all__ = [
    "BACKENDS",
    "DEFAULT_PORT",
    "TemporaryServer",
    "connect_to_server",
    "database_choice",
    "describe_database",
    "prefect_home",
    "running_database",
    "running_server",
    "server_answers",
    "start_server",
    "start_temporary_server",
    "stop_server",
    "temporary_server_of_this_command",
]

DEFAULT_PORT = 4200
_STATE_FILE = "photref-server.json"
_PID_FILE = "server.pid"  # Prefect's own record of its background server
#: The server's output (its errors), in the Prefect home.
SERVER_LOG = "server.log"
_DATABASE_FILE = "photref-database.json"
#: Prefect's settings for its server's database URL (the second is the older alias; both are read).
_DATABASE_URL_SETTINGS = ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL")
#: The backends of ``photref server start``.
BACKENDS = ("sqlite", "postgres", "url")


def prefect_home() -> Path:
    """The Prefect home in use (``PREFECT_HOME``, else Prefect's default ``~/.prefect``)."""
    return Path(os.path.expanduser(os.environ.get("PREFECT_HOME", "~/.prefect"))).resolve()


def _state_path() -> Path:
    return prefect_home() / _STATE_FILE


def server_answers(api_url: str, timeout: float = 1.0) -> bool:
    """Whether a Prefect API answers its health check at ``api_url`` (``http://host:port/api``)."""
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False


def _read_state() -> dict:
    """What ``photref server start`` recorded for this home (empty when nothing is recorded)."""
    with contextlib.suppress(OSError, ValueError):
        return json.loads(_state_path().read_text())
    return {}


def _running_state() -> dict | None:
    """The record of this home's server when the server answers at its recorded address; else None."""
    state = _read_state()
    url = state.get("api_url")
    return state if url and server_answers(url, timeout=0.5) else None


def running_server() -> str | None:
    """The API URL of the photref server of this Prefect home, when it answers; else None."""
    state = _running_state()
    return state["api_url"] if state else None


def _profile_sets_api_url() -> bool:
    """Whether the Prefect profile of this home names an API (then Prefect uses it, not a temporary one)."""
    with contextlib.suppress(OSError):
        return "PREFECT_API_URL" in (prefect_home() / "profiles.toml").read_text()
    return False


def connect_to_server(stream=None, launch_temporary: bool = False) -> str | None:
    """Point this process at a running Prefect server before Prefect starts, and say which one.

    ``PREFECT_API_URL`` (environment or profile) wins; else the server of ``photref server start`` for
    this home; else Prefect's temporary server, with a hint. Returns the API URL, None for the temporary
    server.

    ``launch_temporary``: start the temporary server's process now (:func:`launch_temporary_server`) and
    point ``PREFECT_API_URL`` at it; the first run waits until it answers.
    """
    stream = stream or sys.stderr  # looked up per call: a default bound at import goes stale
    url = os.environ.get("PREFECT_API_URL")
    if url:
        print(f"photref: Prefect server {url} (PREFECT_API_URL)", file=stream)
        return url
    if _profile_sets_api_url():
        print("photref: the Prefect server of the profile (PREFECT_API_URL in profiles.toml)", file=stream)
        return None
    url = running_server()
    if url:
        os.environ["PREFECT_API_URL"] = url
        ui = url.removesuffix("/api")
        print(f"photref: Prefect server {ui} (`photref server stop` ends it)", file=stream)
        return url
    print(
        "photref: no Prefect server running; using a temporary one (about 4 s more a command; "
        "`photref server start` keeps one)",
        file=stream,
    )
    if launch_temporary:
        launch_temporary_server()
    return None


def _prefect_command() -> list[str]:
    """The ``prefect`` CLI of this environment (beside this Python, else on PATH)."""
    beside = Path(sys.executable).with_name("prefect")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("prefect")
    if found is None:
        raise RuntimeError("the prefect command is not installed in this environment")
    return [found]


def _server_pid() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int((prefect_home() / _PID_FILE).read_text().strip())
    return None


def database_choice(backend: str | None = None, database_url: str | None = None) -> dict:
    """The database of this home's server: the one asked for, else the one it last ran on, else SQLite.

    Parameters
    ----------
    backend : {"sqlite", "postgres", "url"}, optional
        Asked for (``--sqlite``, ``--postgres``, ``--database-url``); None: the home's last choice.
    database_url : str, optional
        The ``postgresql+asyncpg://`` URL of an existing server (backend "url").

    Returns
    -------
    dict
        ``{"backend": ..., "url": ...}`` (``url`` for "url" only).
    """
    if backend is None:
        with contextlib.suppress(OSError, ValueError):
            return json.loads((prefect_home() / _DATABASE_FILE).read_text())
        return {"backend": "sqlite"}
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    if backend == "url":
        if not database_url or not database_url.startswith("postgresql"):
            raise RuntimeError(
                f"--database-url must be a PostgreSQL URL, postgresql+asyncpg://USER:PASSWORD@HOST:PORT/DB; "
                f"got {redact(database_url or '')!r}"
            )
        # Prefect's server needs the async driver; a plain postgresql:// URL means asyncpg here.
        scheme, _, rest = database_url.partition("://")
        return {
            "backend": "url",
            "url": f"postgresql+asyncpg://{rest}" if scheme == "postgresql" else database_url,
        }
    return {"backend": backend}


def _remember_database(choice: dict) -> None:
    path = prefect_home() / _DATABASE_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # a URL may hold a password
    with os.fdopen(fd, "w") as out:
        json.dump(choice, out)


def describe_database(choice: dict, url: str | None = None) -> str:
    """One line naming a server's database, without its password."""
    if choice["backend"] == "postgres":
        location = redact(url).rpartition("@")[2] if url else "not started"
        return f"PostgreSQL {location} (the cluster in {prefect_home() / 'postgres'})"
    if choice["backend"] == "url":
        return f"PostgreSQL {redact(choice['url'])}"
    setting = next((k for k in _DATABASE_URL_SETTINGS if os.environ.get(k)), None)
    if setting:
        return f"{redact(os.environ[setting])} ({setting})"
    return f"SQLite {prefect_home() / 'prefect.db'}"


def running_database() -> str | None:
    """The database line of the running server of this home (None when none runs)."""
    state = _running_state()
    return state.get("database") if state else None


def start_server(
    host: str = "127.0.0.1",
    port: int | None = None,
    timeout: float = 90.0,
    backend: str | None = None,
    database_url: str | None = None,
) -> str:
    """Start the photref Prefect server of this home in the background (or find it running).

    Parameters
    ----------
    host : str
        Address to listen on (127.0.0.1: this machine only).
    port : int, optional
        Port; default 4200, or a free one when 4200 is taken.
    timeout : float
        Seconds to wait for the server to answer.
    backend : {"sqlite", "postgres", "url"}, optional
        Its database (:func:`database_choice`): SQLite, a local PostgreSQL cluster under
        ``$PREFECT_HOME/postgres`` (made at the first start), or the PostgreSQL of ``database_url``.
        Default: the database this home's server last ran on (SQLite the first time).
    database_url : str, optional
        For backend "url".

    Returns
    -------
    str
        The API URL (``http://host:port/api``).

    Raises
    ------
    RuntimeError
        When the server cannot start (a :class:`flows.postgres.PostgresError` for the cluster), or one
        runs already on another database than the one asked for.
    """
    choice = database_choice(backend, database_url)
    running = _running_state()
    if running:
        if backend is not None and running.get("backend", "sqlite") != choice["backend"]:
            raise RuntimeError(
                f"the Prefect server of {prefect_home()} runs on {running.get('database')}; "
                "stop it first (`photref server stop`) to start it on another database"
            )
        return running["api_url"]
    pid = _server_pid()
    if pid is not None and not pid_alive(pid):  # a server that died: Prefect would refuse to start another
        (prefect_home() / _PID_FILE).unlink(missing_ok=True)
    elif pid is not None:
        raise RuntimeError(
            f"a Prefect server (pid {pid}) runs in the background for {prefect_home()} but does not answer "
            "on its recorded address; stop it with `photref server stop`"
        )
    if port is None:
        port = DEFAULT_PORT if port_free(host, DEFAULT_PORT) else free_port(host)
    elif not port_free(host, port):
        raise RuntimeError(f"port {port} on {host} is in use; choose another with --port")
    prefect_home().mkdir(parents=True, exist_ok=True)
    env = os.environ | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(prefect_home())}
    env |= _ui_settings(host, port)
    env.pop("PREFECT_API_URL", None)
    database = None
    if choice["backend"] == "postgres":
        database = LocalCluster(prefect_home()).start()
    elif choice["backend"] == "url":
        database = choice["url"]
    if database is not None:
        for setting in _DATABASE_URL_SETTINGS:
            env.pop(setting, None)
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database
    # `prefect server start` in the foreground, detached, its output in server.log: `--background` pipes
    # the server's output to a parent that exits at once, so its errors were lost. Prefect's own pid file
    # is written as `--background` writes it: `prefect server stop` stops this server too.
    log_path = prefect_home() / SERVER_LOG
    command = [*_prefect_command(), "server", "start", "--host", host, "--port", str(port)]
    with open(log_path, "ab") as log:
        offset = log.tell()
        process = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    (prefect_home() / _PID_FILE).write_text(str(process.pid))
    url = f"http://{host}:{port}/api"
    deadline = time.monotonic() + timeout
    while not server_answers(url):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_server()
            ended = (
                f"ended with {process.returncode}"
                if process.poll() is not None
                else (f"did not answer at {url} within {timeout:.0f} s")
            )
            raise RuntimeError(
                f"the Prefect server {ended}: {_log_reason(log_path, offset)} (log: {log_path})"
            )
        time.sleep(0.25)
    state = {"api_url": url, "pid": _server_pid(), "home": str(prefect_home()), "backend": choice["backend"]}
    state["database"] = describe_database(choice, database)
    _state_path().write_text(json.dumps(state))
    _remember_database(choice)
    return url


def _log_reason(path: Path, offset: int) -> str:
    """Why the server failed, from its log since ``offset``: the last exception line (a database that
    refuses the connection: ``ConnectionRefusedError: ... ('127.0.0.1', 9)``), else its last lines."""
    with contextlib.suppress(OSError):
        with open(path, "rb") as log:
            log.seek(offset)
            lines = log.read().decode(errors="replace").splitlines()
        errors = [line for line in lines if re.match(r"[\w.]+(Error|Exception)\b.*: ", line)]
        return (
            errors[-1].strip() if errors else " | ".join(line.strip() for line in lines[-3:] if line.strip())
        )
    return ""


def _ui_settings(host: str, port: int) -> dict[str, str]:
    """The server's own address, for its UI: the page calls the API named in its ``/ui-settings``, which
    Prefect builds from ``PREFECT_SERVER_API_HOST`` / ``_PORT`` (default 127.0.0.1:4200), not from the
    ``--port`` of ``prefect server start``; a server on another port served a UI that called port 4200.
    A server listening on every interface gives this machine's name (a browser elsewhere cannot reach
    0.0.0.0)."""
    public = socket.getfqdn() if host in ("0.0.0.0", "::", "") else host
    return {
        "PREFECT_SERVER_API_HOST": host,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_API_URL": f"http://{public}:{port}/api",
        "PREFECT_UI_URL": f"http://{public}:{port}",
    }


#: Seconds the temporary server is given to start: Prefect's own setting first, then this once more.
TEMPORARY_SERVER_RETRY_TIMEOUT = 90
#: Prefect's default of ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``.
_PREFECT_STARTUP_TIMEOUT = 20
#: The environment Prefect gives its own temporary server's process (``SubprocessASGIServer`` in
#: ``prefect/server/api/server.py``, Prefect 3.8): no UI, and a server that knows it is temporary.
_TEMPORARY_SERVER_ENV = {
    "PREFECT_UI_ENABLED": "0",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT__SERVER_FINAL": "1",
}


class TemporaryServer:
    """Prefect's temporary server for one ``photref`` command, started before the command imports Prefect.

    The same process Prefect's ``SubprocessASGIServer`` runs (uvicorn serving Prefect's API application on a
    free port of 127.0.0.1, with :data:`_TEMPORARY_SERVER_ENV`), and the same methods, so that
    :func:`start_temporary_server` drives either: :meth:`launch` starts the process without waiting,
    :meth:`start` waits until it answers, :meth:`stop` ends it. Prefect's class cannot be used this early:
    importing it imports Prefect and its whole server application, ~3 s here, which is what this saves.

    Parameters
    ----------
    command : list of str, optional
        The server command (tests give a stand-in); default uvicorn with Prefect's application.
    """

    def __init__(self, command: list[str] | None = None):
        self.port = free_port("127.0.0.1")
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self._command = command
        self._process: subprocess.Popen | None = None

    def _server_command(self) -> list[str]:
        if self._command is not None:
            return self._command
        return [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "prefect.server.api.server:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "error",
            "--lifespan",
            "on",
        ]

    def launch(self) -> None:
        """Start the server's process (once) and return at once."""
        if self._process is None:
            self._process = subprocess.Popen(self._server_command(), env=os.environ | _TEMPORARY_SERVER_ENV)

    def start(self, timeout: float | None = None) -> None:
        """Launch the process if needed and wait until the API answers.

        Raises
        ------
        RuntimeError
            "Timed out ..." when it does not answer within ``timeout`` seconds (or its process ended).
        """
        self.launch()
        deadline = time.monotonic() + (timeout or _PREFECT_STARTUP_TIMEOUT)
        while not server_answers(self.api_url, timeout=1.0):
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"Timed out while attempting to connect to the temporary Prefect server at {self.api_url}"
                    + (
                        f" (its process exited with {self._process.returncode})"
                        if self._process.poll() is not None
                        else ""
                    )
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """End the server's process (terminate, then kill after 5 s)."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


_this_command: TemporaryServer | None = None


def _temporary_server():
    """Prefect's temporary server (one per process: what its client would start at the first API call)."""
    from prefect.server.api.server import SubprocessASGIServer

    return SubprocessASGIServer()


def launch_temporary_server() -> TemporaryServer:
    """Start this command's temporary server process now and point ``PREFECT_API_URL`` at it (before
    Prefect reads its settings); it is stopped at exit. :func:`temporary_server_of_this_command` waits."""
    global _this_command
    server = TemporaryServer()
    server.launch()
    atexit.register(server.stop)
    os.environ["PREFECT_API_URL"] = server.api_url
    _this_command = server
    return server


def temporary_server_of_this_command() -> TemporaryServer | None:
    """The temporary server this command launched (None when it uses another server)."""
    return _this_command


def start_temporary_server(temporary=None) -> str:
    """Start Prefect's temporary server before a run needs it; a slow start is retried once.

    On a loaded machine the server may not answer within Prefect's startup timeout
    (``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``, 20 s), and Prefect's client then fails the
    command with a traceback. Here the half-started server is stopped and started again with
    :data:`TEMPORARY_SERVER_RETRY_TIMEOUT`; a second failure is a :class:`PhotrefError` that says what to
    do instead.

    Parameters
    ----------
    temporary : SubprocessASGIServer or TemporaryServer, optional
        The server (default: the one this command launched, else the process's own Prefect one).

    Returns
    -------
    str
        Its API URL.
    """
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    from photref_core.errors import PhotrefError

    temporary = temporary or _this_command or _temporary_server()
    first = int(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    for timeout in (first, max(first, TEMPORARY_SERVER_RETRY_TIMEOUT)):
        try:
            temporary.start(timeout=timeout)
        except RuntimeError as exc:
            if "Timed out" not in str(exc):
                raise
            temporary.stop()
            continue
        return getattr(temporary, "api_url", "")
    raise PhotrefError(
        f"Prefect's temporary server did not start within {first} s, nor {TEMPORARY_SERVER_RETRY_TIMEOUT} s "
        "on a second try (a loaded machine?): start a server once with `photref server start` (every "
        "photref command then uses it), or set PREFECT_API_URL"
    )


def stop_server() -> list[str]:
    """Stop the photref Prefect server of this home, then its PostgreSQL cluster when one runs.

    Returns
    -------
    list of str
        What was stopped ("Prefect server", "PostgreSQL cluster"), empty when nothing ran.
    """
    stopped = []
    pid = _server_pid()
    _state_path().unlink(missing_ok=True)
    if pid is not None:
        env = os.environ | {"PREFECT_HOME": str(prefect_home())}
        subprocess.run([*_prefect_command(), "server", "stop"], env=env, capture_output=True, check=False)
        deadline = time.monotonic() + 15
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        stopped.append("Prefect server")
    cluster = LocalCluster(prefect_home())
    if cluster.stop():  # after the server: it holds connections to it
        stopped.append("PostgreSQL cluster")
    return stopped


def _cmd_server(args) -> int:
    home = prefect_home()
    if args.action == "start":
        backend = (
            "postgres" if args.postgres else "url" if args.database_url else "sqlite" if args.sqlite else None
        )
        try:
            url = start_server(args.host, args.port, backend=backend, database_url=args.database_url)
        except (RuntimeError, PostgresError) as exc:
            print(f"photref: error: {exc}", file=sys.stderr)
            return 1
        ui = url.removesuffix("/api")
        print(f"Prefect server running at {ui} (UI and API) for PREFECT_HOME={home}")
        print(f"database: {_read_state().get('database')}")  # start_server just recorded it
        print(f"photref commands with this PREFECT_HOME use it; elsewhere: export PREFECT_API_URL={url}")
        return 0
    if args.action == "stop":
        try:
            stopped = stop_server()
        except PostgresError as exc:
            print(f"photref: error: {exc}", file=sys.stderr)
            return 1
        print(
            f"{' and '.join(stopped)} stopped" if stopped else f"no photref Prefect server running for {home}"
        )
        return 0
    state = _running_state()
    if state is None:
        print(f"not running ({home})")
        return 3
    ui = state["api_url"].removesuffix("/api")
    print(f"running at {ui} (PREFECT_HOME={home}); database: {state.get('database')}")
    return 0


def add_subcommand(sub) -> None:
    """Add ``photref server start|stop|status`` to the ``photref`` parser."""
    p = sub.add_parser(
        "server",
        help="a persistent local Prefect server that photref commands use",
        description="start: the server on the database it last ran on (SQLite the first time), or the one "
        "of --postgres / --database-url / --sqlite; stop: the server and its PostgreSQL cluster; status: "
        "its address and database (exit 3 when none runs).",
    )
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=None, help=f"default {DEFAULT_PORT}, or a free one")
    database = p.add_mutually_exclusive_group()
    database.add_argument(
        "--postgres",
        action="store_true",
        help="start: PostgreSQL, a local cluster under $PREFECT_HOME/postgres (made the first time)",
    )
    database.add_argument(
        "--database-url", metavar="URL", help="start: an existing PostgreSQL (postgresql+asyncpg://...)"
    )
    database.add_argument(
        "--sqlite", action="store_true", help="start: SQLite ($PREFECT_HOME/prefect.db, the first default)"
    )
    p.set_defaults(func=_cmd_server, needs_prefect=False)
