"""The ``photref`` command line.

Subcommands::

    photref simulate photometry DIR --frames N --stars S --photometries P --seed K
    photref simulate images DIR --frames N --stars S --size PIX --pixscale ARCSEC --seed K
    photref ingest STORE FRAMES... [--catalog CAT] [--strict]
    photref master STORE --catalog CAT --output MASTER.fits [statistics / fit options]
    photref magfit STORE [FRAMES...] --catalog CAT --output MASTER.fits [magfit options] [master options]
    photref lightcurves STORE --output LC.fits [--format fits|parquet] [--per-star DIR] [--sources IDS.txt]
                        [--raw]
    photref prf STORE IMAGES... --catalog CAT --output FLUXES.fits [PRF options]
    photref demo DIR
    photref server start|stop|status

Every subcommand that runs a flow uses the Prefect server of ``PREFECT_API_URL``, else the one of
``photref server start`` for this ``PREFECT_HOME``, else a temporary one (:mod:`flows.server`).

Every subcommand that runs a flow takes ``--max-workers`` and ``--dask-address``.
"""

from __future__ import annotations

import argparse
import os
import sys
import types
import typing

from flows.report import (
    ingest_lines,
    lightcurves_lines,
    magfit_lines,
    master_lines,
    prf_lines,
    print_result,
)
from photref_core.master.outofcore import DEFAULT_BLOCK_MIB
from photref_core.master.parameters import MasterParameters
from photref_core.prf.parameters import PRF_DEFAULTS, PSF_ZERO_POINT, TRANSFORM_TERMS


def _runner_options(parser: argparse.ArgumentParser) -> None:
    """The options of every command that runs a flow: its task runner, and ``--json``."""
    parser.add_argument(
        "--json", action="store_true", help="print the whole result as JSON instead of a short summary"
    )
    group = parser.add_argument_group("execution")
    group.add_argument("--max-workers", type=int, default=None, help="threads of the local task runner")
    group.add_argument(
        "--dask-address", default=None, help="run the tasks on this Dask scheduler (tcp://host:8786)"
    )


def _model_options(group, model, aliases: dict[str, str] | None = None) -> None:
    """One ``--option`` per field of a pydantic parameters model: its name, type, choices (a ``Literal``),
    default and description, all read from the model (the one place they are written). ``aliases``: a
    shorter second spelling of some options, by field name."""
    aliases = aliases or {}
    for name, info in model.model_fields.items():
        kind = info.annotation
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # ``str | None``: its one type
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
        help_text = (info.description or "").rstrip(".")
        spellings = ["--" + name.replace("_", "-")] + (["--" + aliases[name]] if name in aliases else [])
        group.add_argument(
            *spellings,
            dest=name,
            type=None if choices else kind,
            choices=choices,
            default=info.default,
            help=f"{help_text} (default: %(default)s)",
        )


def _parameters(cls, **values):
    """``cls(**values)`` for a parameters object; a bad value becomes a :class:`PhotrefError` with the
    object's own message (``photref: error: ...``, exit 2, before any work)."""
    from photref_core.errors import PhotrefError

    try:
        return cls(**values)
    except ValueError as exc:  # pydantic's ValidationError is one too
        raise PhotrefError(str(exc)) from exc


def _parameters_from(cls, args):
    """The parameters object ``cls`` from the options :func:`_model_options` added for it."""
    return _parameters(cls, **{name: getattr(args, name) for name in cls.model_fields})


def _master_options(parser, title: str) -> None:
    """The options of the master a command builds: every MasterParameters field, the out-of-core block
    size and ``--no-plots``."""
    _model_options(parser.add_argument_group(title), MasterParameters)
    parser.add_argument(
        "--block-mib",
        type=float,
        default=DEFAULT_BLOCK_MIB,
        help="memory budget of one out-of-core source block, in MiB (default: %(default)s)",
    )
    parser.add_argument("--no-plots", action="store_true")


def _frame_index(text: str):
    """``--frame-index``: 'mean' or a frame index."""
    return text if text == "mean" else int(text)


def _time_mask(text: str) -> list[bool]:
    """``--time-mask``: comma-separated 0/1 per frame."""
    return [bool(int(v)) for v in text.split(",")]


def _cmd_simulate_photometry(args) -> int:
    from photref_core.simulate.photometry import simulate_photometry

    sim = simulate_photometry(
        args.directory,
        frames=args.frames,
        stars=args.stars,
        photometries=args.photometries,
        seed=args.seed,
        fmt=args.format,
    )
    print(f"wrote {len(sim.frames)} frames under {os.path.dirname(sim.frames[0])}")
    print(f"catalog: {sim.catalog}\ntruth:   {sim.truth}")
    return 0


def _cmd_simulate_images(args) -> int:
    from photref_core.simulate.images import simulate_images

    out = simulate_images(
        args.directory,
        n_frames=args.frames,
        n_stars=args.stars,
        size=args.size,
        pixscale=args.pixscale,
        min_separation=args.min_separation,
        seed=args.seed,
    )
    print(f"wrote {len(out['paths'])} images; catalog: {out['catalog']}; truth: {out['truth']}")
    return 0


def _run_and_print(args, run, lines, *positional, hide=(), **parameters) -> int:
    """Run a flow by hand (``run``: ``run_master``...) on the command's task runner, then print its result
    (``lines``: the short summary; ``--json``: everything but the keys in ``hide``)."""
    state = run(
        *positional,
        max_workers=args.max_workers,
        dask_address=args.dask_address,
        return_state=True,
        **parameters,
    )
    result = {k: v for k, v in state.result().items() if k not in hide}
    print_result(result, lines, args.json, state.state_details.flow_run_id)
    return 0


def _cmd_ingest(args) -> int:
    from flows.ingest import run_ingest

    return _run_and_print(
        args,
        run_ingest,
        ingest_lines,
        args.store,
        args.frames,
        catalog=args.catalog,
        strict=args.strict,
        dtype=args.dtype,
        frames_per_chunk=args.frames_per_chunk,
    )


def _cmd_master(args) -> int:
    from flows.master_photref import run_master

    return _run_and_print(
        args,
        run_master,
        master_lines,
        args.store,
        args.catalog,
        args.output,
        params=_parameters_from(MasterParameters, args),
        frames=args.frames,
        strict=args.strict,
        block_mib=args.block_mib,
        plots=not args.no_plots,
    )


def _cmd_magfit(args) -> int:
    from flows.magfit import run_magfit
    from photref_core.magfit.parameters import MagfitParameters

    return _run_and_print(
        args,
        run_magfit,
        magfit_lines,
        args.store,
        args.catalog,
        args.output,
        params=_parameters_from(MagfitParameters, args),
        master=_parameters_from(MasterParameters, args),
        frames=args.frames or None,
        strict=args.strict,
        block_mib=args.block_mib,
        plots=not args.no_plots,
    )


def _cmd_lightcurves(args) -> int:
    from flows.lightcurves import run_lightcurves

    return _run_and_print(
        args,
        run_lightcurves,
        lightcurves_lines,
        args.store,
        args.output,
        hide=("files",),
        format=args.format,
        per_star=args.per_star,
        sources=args.sources,
        raw=args.raw,
        block_mib=args.block_mib,
    )


def _cmd_prf(args) -> int:
    from flows.prf import run_prf
    from photref_core.prf.parameters import PRFParameters

    # The PRF parameters the command line exposes (the other fields keep their PRFParameters defaults).
    names = (
        "sources_flux_column",
        "n_r_knots",
        "n_phi_knots",
        "rmin",
        "rmax",
        "cut_r",
        "sparse_dist_lim",
        "flux_cut_off",
        "prior_mu",
        "prior_sigma",
        "fit_background",
        "refine_iterations",
        "time_model",
        "transform",
        "time_rounds",
        "time_build_frames",
        "time_iterations",
        "time_core_radius",
        "time_max_shift",
        "perturbation",
        "time_nknots",
        "time_resolution",
        "time_radius",
    )
    from photref_core.errors import PhotrefError

    if args.output_fluxes == "time" and not args.time_model:
        raise PhotrefError("--output-fluxes time needs --time-model")
    if args.perturbation and not args.time_model:
        raise PhotrefError("--perturbation needs --time-model (it is applied after the transform)")
    params = _parameters(
        PRFParameters,
        frame_index=args.frame_index,
        time_mask=args.time_mask,
        bin_data=args.bin_data or False,
        **{n: getattr(args, n) for n in names},
    )
    return _run_and_print(
        args,
        run_prf,
        prf_lines,
        args.store,
        args.images,
        args.catalog,
        args.output,
        params=params,
        strict=args.strict,
        as_photometry=args.as_photometry,
        zero_point=args.zero_point,
        plot=not args.no_plot,
        output_fluxes=args.output_fluxes,
        model_output=args.model_output,
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``photref`` (other modules add their subcommands here)."""
    parser = argparse.ArgumentParser(prog="photref", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="write a simulated field")
    sim_sub = sim.add_subparsers(dest="what", required=True)
    p = sim_sub.add_parser("photometry", help="frame photometry files + catalog + truth (SPEC 1.1, 1.2)")
    p.add_argument("directory")
    p.add_argument("--frames", type=int, default=40)
    p.add_argument("--stars", type=int, default=300)
    p.add_argument("--photometries", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=["fits", "ecsv", "parquet"], default="fits")
    p.set_defaults(func=_cmd_simulate_photometry)
    p = sim_sub.add_parser("images", help="pixel frames + catalog + truth (SPEC 1.3)")
    p.add_argument("directory")
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--stars", type=int, default=40)
    p.add_argument("--size", type=int, default=200, help="pixels on a side")
    p.add_argument("--pixscale", type=float, default=0.11, help="arcsec per pixel")
    p.add_argument("--min-separation", type=float, default=24.0, help="pixels between unpaired stars")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_simulate_images)
    sim.set_defaults(needs_prefect=False)

    p = sub.add_parser("ingest", help="ingest frame photometry into a store")
    p.add_argument("store")
    p.add_argument("frames", nargs="+", help="frame files or glob patterns (quote them)")
    p.add_argument("--catalog", default=None)
    p.add_argument("--strict", action="store_true", help="fail on the first bad frame")
    p.add_argument("--dtype", default="f8", choices=["f8", "f4"])
    p.add_argument("--frames-per-chunk", type=int, default=None, help="default: ~2 MiB chunks")
    _runner_options(p)
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("master", help="build the master photometric reference of a store")
    p.add_argument("store")
    p.add_argument("--catalog", required=True)
    p.add_argument("--output", required=True, help="master FITS path (statistics table and plots beside it)")
    p.add_argument("--frames", nargs="+", default=None, help="frame files or globs to ingest first")
    p.add_argument("--strict", action="store_true", help="fail on the first bad frame")
    _master_options(p, "SPEC 3-5 parameters")
    _runner_options(p)
    p.set_defaults(func=_cmd_master)

    from photref_core.magfit.parameters import MagfitParameters

    p = sub.add_parser(
        "magfit",
        help="magnitude fitting: fit every frame against a reference, rebuild the master until converged",
    )
    p.add_argument("store")
    p.add_argument("frames", nargs="*", help="raw frame files or glob patterns to ingest first (quote them)")
    p.add_argument("--catalog", required=True)
    p.add_argument(
        "--output",
        required=True,
        help="final master FITS path (iterations, statistics and summary beside it)",
    )
    p.add_argument("--strict", action="store_true", help="fail on the first bad frame or failed fit")
    _model_options(
        p.add_argument_group("SPEC 9 parameters (the loop and the per-frame fit)"),
        MagfitParameters,
        aliases={"max_magfit_iterations": "max-iterations"},
    )
    _master_options(p, "SPEC 3-5 parameters (the master of every iteration)")
    _runner_options(p)
    p.set_defaults(func=_cmd_magfit)

    from photref_core.magfit.lightcurves import LIGHT_CURVE_FORMATS

    p = sub.add_parser(
        "lightcurves",
        help="light curves: one row per frame and source, from the last magfit run (or raw magnitudes)",
        description="Columns: frame_id, time (JD), source_id, mag and mag_err (one value per photometry), "
        "flag (bits per photometry: 1 frame quarantined by the fit, 2 outlier of the master, 4 star not in "
        "the master, 8 no magnitude); sorted by source, then time.",
    )
    p.add_argument("store")
    p.add_argument("--output", default=None, help="the file of all rows (.fits or .parquet)")
    p.add_argument(
        "--format", choices=LIGHT_CURVE_FORMATS, default=None, help="default: from the --output name"
    )
    p.add_argument("--per-star", default=None, metavar="DIR", help="also one file per star: DIR/<source_id>")
    p.add_argument("--sources", default=None, metavar="IDS", help="text file of source ids: only those")
    p.add_argument("--raw", action="store_true", help="the raw magnitudes, not the fitted ones")
    p.add_argument(
        "--block-mib",
        type=float,
        default=DEFAULT_BLOCK_MIB,
        help="working memory of a block of sources, MiB (default: %(default)s)",
    )
    _runner_options(p)
    p.set_defaults(func=_cmd_lightcurves)

    p = sub.add_parser("prf", help="PRF photometry: ingest images, build the shape model, fit all fluxes")
    p.add_argument("store")
    p.add_argument("images", nargs="+", help="image files or glob patterns (quote them)")
    p.add_argument("--catalog", required=True)
    p.add_argument("--output", required=True, help="long-format flux table (FITS)")
    p.add_argument(
        "--model-output",
        default=None,
        metavar="MODEL.fits",
        help="every frame's model image and residual image (data - model), HDUs MODEL and RESID per frame",
    )
    p.add_argument("--flux-column", dest="sources_flux_column", default=PRF_DEFAULTS["sources_flux_column"])
    p.add_argument("--n-r-knots", type=int, default=PRF_DEFAULTS["n_r_knots"])
    p.add_argument("--n-phi-knots", type=int, default=PRF_DEFAULTS["n_phi_knots"])
    p.add_argument("--rmin", type=float, default=PRF_DEFAULTS["rmin"], help="arcsec")
    p.add_argument("--rmax", type=float, default=PRF_DEFAULTS["rmax"], help="arcsec")
    p.add_argument("--cut-r", type=float, default=PRF_DEFAULTS["cut_r"], help="arcsec")
    p.add_argument("--sparse-dist-lim", type=float, default=PRF_DEFAULTS["sparse_dist_lim"], help="arcsec")
    p.add_argument(
        "--time-mask",
        type=_time_mask,
        default=None,
        help="comma-separated 0/1 per frame: frames for the shape model",
    )
    p.add_argument("--flux-cut-off", type=float, default=None, help="data units")
    p.add_argument(
        "--frame-index",
        type=_frame_index,
        default=PRF_DEFAULTS["frame_index"],
        help="'mean' or a frame index",
    )
    p.add_argument("--bin-data", type=int, default=0, help="bin the shape fit on an NxN grid (0: off)")
    p.add_argument("--prior-mu", type=float, default=None)
    p.add_argument("--prior-sigma", type=float, default=None)
    p.add_argument("--fit-background", action="store_true")
    p.add_argument(
        "--refine-iterations",
        type=int,
        default=PRF_DEFAULTS["refine_iterations"],
        help="most iterations of the joint all-pixel shape refinement (0: off)",
    )
    tm = p.add_argument_group("time model (drift, plate scale and PRF shape changes; off by default)")
    tm.add_argument(
        "--time-model",
        action="store_true",
        help="fit each frame's transform of the source positions with its fluxes, the shape re-centred",
    )
    tm.add_argument(
        "--transform",
        choices=tuple(TRANSFORM_TERMS),
        default=PRF_DEFAULTS["transform"],
        help="the per-frame transform (default: %(default)s)",
    )
    tm.add_argument("--time-rounds", type=int, default=PRF_DEFAULTS["time_rounds"], help="re-centring rounds")
    tm.add_argument(
        "--time-build-frames",
        type=int,
        default=PRF_DEFAULTS["time_build_frames"],
        help="most frames the time model's shape is rebuilt on",
    )
    tm.add_argument(
        "--time-iterations",
        type=int,
        default=PRF_DEFAULTS["time_iterations"],
        help="most Gauss-Newton steps of a frame's transform",
    )
    tm.add_argument("--time-core-radius", type=float, default=None, help="arcsec (default: 0.3 x rmax)")
    tm.add_argument(
        "--time-max-shift",
        type=float,
        default=PRF_DEFAULTS["time_max_shift"],
        help="pixels: the margin of each source's pixel set (default: %(default)s)",
    )
    tm.add_argument(
        "--perturbation",
        action="store_true",
        help="with --time-model, also fit the PRF's shape change over time (focus): a perturbation of the "
        "PRF per source offset and time",
    )
    tm.add_argument(
        "--time-nknots",
        type=int,
        default=PRF_DEFAULTS["time_nknots"],
        help="the perturbation's B-spline breakpoints per axis (default: %(default)s)",
    )
    tm.add_argument(
        "--time-resolution",
        type=int,
        default=PRF_DEFAULTS["time_resolution"],
        help="frames a time bin of the perturbation's fit; fewer frames, smaller bins (default: %(default)s)",
    )
    tm.add_argument(
        "--time-radius",
        type=float,
        default=None,
        help="arcsec: half-width of the offsets the perturbation is fitted on (default: rmax / 2)",
    )
    tm.add_argument(
        "--output-fluxes",
        choices=("time", "static"),
        default=None,
        help="with --time-model, the flux set --output writes (default: time; both are in the store)",
    )
    p.add_argument("--strict", action="store_true")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--as-photometry",
        action="store_true",
        help="add the PSF magnitudes to the store's photometry (one more photometry, 'psf')",
    )
    p.add_argument(
        "--zero-point",
        type=float,
        default=PSF_ZERO_POINT,
        help="of the --as-photometry magnitudes (default: %(default)s)",
    )
    _runner_options(p)
    p.set_defaults(func=_cmd_prf)

    from flows import demo, server

    demo.add_subcommand(sub)
    server.add_subcommand(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``photref`` console script."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "lightcurves" and args.output is None and args.per_star is None:
        parser.error("lightcurves: give --output, --per-star, or both")
    if getattr(args, "needs_prefect", True):
        from flows.server import connect_to_server

        # The temporary server's process starts now, its start overlapping the imports of the command;
        # not for Dask workers, whose server is chosen with the task runner (flows.runners).
        connect_to_server(launch_temporary=not getattr(args, "dask_address", None))
    from photref_core.errors import PhotrefError

    try:
        return args.func(args)
    except PhotrefError as exc:  # a bad input file or a bad parameter value
        print(f"photref: error: {exc}", file=sys.stderr)
        return 2


def console_main() -> None:
    """The ``photref`` console script: :func:`main`, then a quick exit.

    Python's own teardown of a process that imported Prefect, astropy, zarr and numpy takes ~0.5 s here
    (module teardown and garbage collection of everything), a quarter of a cached run. By the time
    :func:`main` returns everything photref wrote is on disk and closed, so the process runs Prefect's
    exit hooks (they deliver the run's last events and logs to the server: ``threading``'s exit hooks, then
    ``atexit``), flushes its streams and leaves. On an exception the normal exit runs.
    """
    code = main()
    import atexit
    import logging
    import threading

    shutdown = getattr(threading, "_shutdown", None)  # joins threads and runs their exit hooks
    if shutdown is None:  # pragma: no cover - another Python: the normal exit
        sys.exit(code)
    # "Still processing items: N remaining" is Prefect's events worker delivering the run's last events
    # while it drains, which is what is wanted here; the line would only alarm.
    logging.getLogger("EventsWorker").setLevel(logging.ERROR)
    shutdown()
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    console_main()
