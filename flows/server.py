"""A persistent local Prefect server for photref: ``photref server start|stop|status``.

Without a server, every ``photref`` command starts Prefect's temporary server and stops it at exit, 4-8 s
of a run that may have nothing to do. The command starts that server's process first thing, before it
imports Prefect and the flows (:class:`TemporaryServer`), so that its start overlaps the command's own ~2 s of
imports, and without importing Prefect's server application into the command (another ~2 s).

``photref server start`` runs ``prefect server start --background``
on 127.0.0.1 for this ``PREFECT_HOME`` (one server per home) and records its address in
``$PREFECT_HOME/photref-server.json``; every later photref command with the same home finds it there,
checks that it answers, and uses it (one line on stderr says so). When none answers, the command falls back
to the temporary server with a one-line hint.

This module imports nothing of Prefect: it runs before Prefect reads its settings (``PREFECT_API_URL``
must be in the environment by then).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from photref_core._atomic import pid_alive

__all__ = [
    "DEFAULT_PORT",
    "TemporaryServer",
    "connect_to_server",
    "prefect_home",
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


def running_server() -> str | None:
    """The API URL of the photref server of this Prefect home, when it answers; else None."""
    try:
        state = json.loads(_state_path().read_text())
    except (OSError, ValueError):
        return None
    url = state.get("api_url")
    return url if url and server_answers(url, timeout=0.5) else None


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


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


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


def start_server(host: str = "127.0.0.1", port: int | None = None, timeout: float = 90.0) -> str:
    """Start the photref Prefect server of this home in the background (or find it running).

    Parameters
    ----------
    host : str
        Address to listen on (127.0.0.1: this machine only).
    port : int, optional
        Port; default 4200, or a free one when 4200 is taken.
    timeout : float
        Seconds to wait for the server to answer.

    Returns
    -------
    str
        The API URL (``http://host:port/api``).
    """
    url = running_server()
    if url:
        return url
    pid = _server_pid()
    if pid is not None and not pid_alive(pid):  # a server that died: Prefect would refuse to start another
        (prefect_home() / _PID_FILE).unlink(missing_ok=True)
    elif pid is not None:
        raise RuntimeError(
            f"a Prefect server (pid {pid}) runs in the background for {prefect_home()} but does not answer "
            "on its recorded address; stop it with `photref server stop`"
        )
    if port is None:
        port = DEFAULT_PORT if _port_free(host, DEFAULT_PORT) else _free_port(host)
    elif not _port_free(host, port):
        raise RuntimeError(f"port {port} on {host} is in use; choose another with --port")
    prefect_home().mkdir(parents=True, exist_ok=True)
    env = os.environ | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(prefect_home())}
    env |= _ui_settings(host, port)
    env.pop("PREFECT_API_URL", None)
    command = [*_prefect_command(), "server", "start", "--background", "--host", host, "--port", str(port)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"prefect server start failed: {(done.stderr or done.stdout).strip()}")
    url = f"http://{host}:{port}/api"
    deadline = time.monotonic() + timeout
    while not server_answers(url):
        if time.monotonic() > deadline:
            stop_server()
            raise RuntimeError(f"the Prefect server did not answer at {url} within {timeout:.0f} s")
        time.sleep(0.25)
    _state_path().write_text(json.dumps({"api_url": url, "pid": _server_pid(), "home": str(prefect_home())}))
    return url


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
        self.port = _free_port("127.0.0.1")
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


def stop_server() -> bool:
    """Stop the photref Prefect server of this home. Returns whether one was running."""
    pid = _server_pid()
    _state_path().unlink(missing_ok=True)
    if pid is None:
        return False
    env = os.environ | {"PREFECT_HOME": str(prefect_home())}
    subprocess.run([*_prefect_command(), "server", "stop"], env=env, capture_output=True, check=False)
    deadline = time.monotonic() + 15
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return True


def _cmd_server(args) -> int:
    home = prefect_home()
    if args.action == "start":
        try:
            url = start_server(args.host, args.port)
        except RuntimeError as exc:
            print(f"photref: error: {exc}", file=sys.stderr)
            return 1
        ui = url.removesuffix("/api")
        print(f"Prefect server running at {ui} (UI and API) for PREFECT_HOME={home}")
        print(f"photref commands with this PREFECT_HOME use it; elsewhere: export PREFECT_API_URL={url}")
        return 0
    if args.action == "stop":
        print("Prefect server stopped" if stop_server() else f"no photref Prefect server running for {home}")
        return 0
    url = running_server()
    print(f"running at {url.removesuffix('/api')} (PREFECT_HOME={home})" if url else f"not running ({home})")
    return 0 if url else 3


def add_subcommand(sub) -> None:
    """Add ``photref server start|stop|status`` to the ``photref`` parser."""
    p = sub.add_parser("server", help="a persistent local Prefect server that photref commands use")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=None, help=f"default {DEFAULT_PORT}, or a free one")
    p.set_defaults(func=_cmd_server, needs_prefect=False)
