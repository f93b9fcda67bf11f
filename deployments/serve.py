"""Serve the photref deployments without a work pool or a worker (Prefect's ``serve`` path).

One long-running process registers the deployments with the Prefect server (``PREFECT_API_URL``) and runs
their flow runs itself, as subprocesses, when they are scheduled or triggered:

* ``nightly-master/nightly-served``: :func:`flows.nightly.nightly_master` on a cron schedule (default
  ``0 6 * * *``, in UTC): ingest the frames that arrived, then rebuild the master;
* ``master-photref/manual-served``: :func:`flows.master_photref.build_master_photref`, no schedule, for
  runs started by hand from the UI or the API (``--no-manual`` leaves it out);
* ``<prf flow>/manual-served`` for every flow defined in ``flows/prf.py``, when that module exists: no
  schedule, no default parameters (the run form asks for them).

Usage::

    python deployments/serve.py --store /data/f1/field.zarr --catalog /data/f1/catalog.fits \\
        --frames '/data/f1/frames/*.fits' --output /data/f1/master.fits [--cron '0 6 * * *'] \\
        [--timezone UTC] [--set fit_terms='O2{phot_g_mean_mag}' --set outlier_threshold=4] \\
        [--dask-address tcp://host:8786]

Every option has an environment-variable default (``PHOTREF_STORE``, ``PHOTREF_CATALOG``,
``PHOTREF_FRAMES``, ``PHOTREF_OUTPUT``, ``PHOTREF_NIGHTLY_CRON``, ``PHOTREF_TIMEZONE``,
``PHOTREF_DASK_ADDRESS``). The settings are validated (:class:`flows.nightly.NightlySettings`) before
anything is registered, so a bad value stops the server at once with a message naming the field.
Stopping the process (Ctrl-C, SIGTERM) pauses the schedule.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Runnable as a script from anywhere: the repository root must be importable (flows/, photref_core/).
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

DEFAULT_CRON = "0 6 * * *"
DEFAULT_TIMEZONE = "UTC"
NIGHTLY_NAME = "nightly-served"
MANUAL_NAME = "manual-served"
TAGS = ["photref"]


def _setting(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` -> (key, value); the value is JSON when it parses as JSON, else the plain string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``deployments/serve.py``.

    Returns
    -------
    argparse.ArgumentParser
        Paths of the field, schedule, extra settings and execution options, with environment defaults.
    """
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="serve.py", description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter
    )
    field = parser.add_argument_group("field (required, or from the environment)")
    field.add_argument("--store", default=env("PHOTREF_STORE"), help="zarr store [PHOTREF_STORE]")
    field.add_argument("--catalog", default=env("PHOTREF_CATALOG"), help="catalog file [PHOTREF_CATALOG]")
    field.add_argument(
        "--frames", default=env("PHOTREF_FRAMES"), help="glob of the frame files, quoted [PHOTREF_FRAMES]"
    )
    field.add_argument("--output", default=env("PHOTREF_OUTPUT"), help="master FITS path [PHOTREF_OUTPUT]")
    sched = parser.add_argument_group("schedule")
    sched.add_argument(
        "--cron",
        default=env("PHOTREF_NIGHTLY_CRON", DEFAULT_CRON),
        help=f"cron of the nightly run [PHOTREF_NIGHTLY_CRON, default {DEFAULT_CRON!r}]",
    )
    sched.add_argument(
        "--timezone",
        default=env("PHOTREF_TIMEZONE", DEFAULT_TIMEZONE),
        help=f"IANA time zone of the cron [PHOTREF_TIMEZONE, default {DEFAULT_TIMEZONE}]",
    )
    sched.add_argument("--paused", action="store_true", help="register the schedule paused")
    sched.add_argument("--name", default=NIGHTLY_NAME, help=f"nightly deployment name [{NIGHTLY_NAME}]")
    sched.add_argument("--no-manual", action="store_true", help="do not serve the manual master deployment")
    params = parser.add_argument_group("parameters")
    params.add_argument(
        "--set",
        dest="settings",
        metavar="KEY=VALUE",
        type=_setting,
        action="append",
        default=[],
        help="any other NightlySettings field (JSON value), e.g. --set outlier_threshold=4; repeatable",
    )
    execution = parser.add_argument_group("execution")
    execution.add_argument(
        "--dask-address",
        default=env("PHOTREF_DASK_ADDRESS"),
        help="run the tasks on this Dask scheduler, tcp://host:8786 [PHOTREF_DASK_ADDRESS]",
    )
    execution.add_argument("--max-workers", type=int, default=None, help="threads of the local task runner")
    execution.add_argument("--limit", type=int, default=None, help="most flow runs at a time in this process")
    return parser


def nightly_settings(args: argparse.Namespace):
    """The validated :class:`~flows.nightly.NightlySettings` of the command line.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed command line.

    Returns
    -------
    flows.nightly.NightlySettings

    Raises
    ------
    pydantic.ValidationError
        A missing path or a bad parameter (the message names the field).
    """
    from flows.nightly import NightlySettings

    fields = {"store": args.store, "catalog": args.catalog, "frames_glob": args.frames, "output": args.output}
    fields = {k: v for k, v in fields.items() if v is not None}
    return NightlySettings(**fields, **dict(args.settings))


def build_deployments(args: argparse.Namespace) -> list:
    """The runner deployments to serve.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed command line.

    Returns
    -------
    list of prefect.deployments.runner.RunnerDeployment
        The scheduled nightly deployment, then (unless ``--no-manual``) the manual master deployment and
        the manual deployments of the flows of ``flows/prf.py`` when it exists.
    """
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    from flows.master_photref import build_master_photref
    from flows.nightly import nightly_master

    settings = nightly_settings(args)
    nightly_params = {"settings": settings.model_dump(mode="json")}
    if args.dask_address:
        nightly_params["dask_address"] = args.dask_address
    if args.max_workers:
        nightly_params["max_workers"] = args.max_workers
    # Module-path entrypoints: the runner imports flows.* (installed, or the repository root on the path)
    # instead of loading the files as scripts.
    deployments = [
        nightly_master.to_deployment(
            name=args.name,
            schedule=Cron(args.cron, timezone=args.timezone),
            paused=args.paused,
            parameters=nightly_params,
            description="Nightly: ingest the new frames of the field, then rebuild its master.",
            tags=[*TAGS, "nightly"],
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
    ]
    if not args.no_manual:
        master_params = settings.master_parameters()
        # A deployment's parameters are JSON: the form of the master parameters object.
        master_params["params"] = master_params["params"].model_dump(mode="json")
        deployments.append(
            build_master_photref.to_deployment(
                name=MANUAL_NAME,
                parameters=master_params,
                description="Build the master of the field on demand (edit the parameters in the run form).",
                tags=[*TAGS, "manual"],
                entrypoint_type=EntrypointType.MODULE_PATH,
            )
        )
        deployments += _prf_deployments()
    return deployments


def _prf_deployments() -> list:
    """Manual deployments of the flows of ``flows/prf.py``, if the module exists (none otherwise)."""
    import importlib

    from prefect import Flow
    from prefect.deployments.runner import EntrypointType

    try:
        module = importlib.import_module("flows.prf")
    except ModuleNotFoundError as exc:
        if exc.name != "flows.prf":
            print(f"serve.py: warning: flows/prf.py not served: {exc}", file=sys.stderr)
        return []
    except Exception as exc:  # a broken module must not stop the nightly deployment
        print(f"serve.py: warning: flows/prf.py not served: {type(exc).__name__}: {exc}", file=sys.stderr)
        return []
    flows = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, Flow) and getattr(obj.fn, "__module__", None) == module.__name__
    ]
    return [
        f.to_deployment(
            name=MANUAL_NAME,
            description=f"{f.name} on demand (fill in the parameters in the run form).",
            tags=[*TAGS, "manual", "prf"],
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        for f in flows
    ]


def main(argv: list[str] | None = None) -> int:
    """Validate the settings, register the deployments and serve them until interrupted.

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status: 0 after a clean shutdown, 2 on bad settings.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    from pydantic import ValidationError

    try:
        deployments = build_deployments(args)
    except ValidationError as exc:
        parser.exit(2, f"serve.py: error: bad settings or schedule:\n{exc}\n")
    from prefect import serve

    serve(*deployments, limit=args.limit)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
