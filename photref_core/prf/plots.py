"""Plots of the PRF model (SPEC 6 ``plot_shape_model``), for the UI and the README."""

from __future__ import annotations

import numpy as np
from astropy.wcs.utils import proj_plane_pixel_area

from .._atomic import atomic_savefig

__all__ = [
    "CHI_RANGE",
    "PLOT_POINTS",
    "plot_chi_image",
    "plot_shape_model",
    "plot_time_model",
]

#: Shape-fit points drawn at most (a random subset of the model's ``shape_data``; 30,000 points took 2.4 s).
PLOT_POINTS = 8000


def plot_shape_model(model, path, dpi=110):
    """Write a PNG of the shape-fit data, the model and their difference, in (r, phi) and on the sky.

    Uses matplotlib's object API with the Agg canvas (no pyplot, no change of the global backend).

    Parameters
    ----------
    model : PRFModel
        A built model (with its shape-fit data).
    path : str or os.PathLike
        Output PNG.
    dpi : int

    Returns
    -------
    str
        The path written.
    """
    from matplotlib.figure import Figure  # no pyplot: the Agg canvas, no global backend change

    d = model.shape_data
    if d is None or d["r"].size == 0:
        raise ValueError("no shape-fit data to plot (build the model first)")
    if d["r"].size > PLOT_POINTS:  # drawing the points is most of the plot's time; the pattern shows as well
        keep = np.sort(np.random.default_rng(0).choice(d["r"].size, PLOT_POINTS, replace=False))
        d = {k: np.asarray(v)[keep] for k, v in d.items()}
    sm = model.shape
    # Normalised model: log10 of the fraction of the source flux (inside rmax) in a pixel.
    lognorm = np.log10(proj_plane_pixel_area(model.wcs.celestial) * 3600.0**2 / sm.norm)
    model_y = sm.log_value(d["r"], d["phi"]) + lognorm
    resid = d["y"] - model_y
    vmin, vmax = np.percentile(d["y"], [2, 99.8])
    rlim = max(float(np.percentile(np.abs(resid), 95)), 1e-3)
    # Fixed margins, not constrained_layout (which measured every tick label: 0.7 s of a 2.4 s plot).
    fig = Figure(figsize=(15, 9))
    axes = fig.subplots(2, 3)
    fig.subplots_adjust(left=0.05, right=0.93, bottom=0.07, top=0.95, wspace=0.28, hspace=0.3)
    kw = dict(s=2, cmap="viridis", vmin=vmin, vmax=vmax)
    kr = dict(s=2, cmap="RdBu_r", vmin=-rlim, vmax=rlim)
    deg = np.rad2deg(d["phi"])
    sky = dict(xlabel="xi (east) [arcsec]", ylabel="eta (north) [arcsec]", aspect="equal")
    polar = dict(xlabel="r [arcsec]", ylabel="phi [deg]")
    axes[0, 0].scatter(d["r"], deg, c=d["y"], **kw)
    axes[0, 0].set(title="data: log10(pixel flux / source flux)", **polar)
    im = axes[0, 1].scatter(d["r"], deg, c=model_y, **kw)
    axes[0, 1].set(title=f'model (normalised over r <= {sm.rmax:g}")', **polar)
    imr = axes[0, 2].scatter(d["r"], deg, c=resid, **kr)
    axes[0, 2].set(title="data - model [dex]", **polar)
    axes[1, 0].scatter(d["xi"], d["eta"], c=d["y"], **kw)
    axes[1, 0].set(title="data on the sky", **sky)
    g = np.linspace(-sm.rmax, sm.rmax, 201)
    gx, gy = np.meshgrid(g, g)
    mv = sm.log_value(np.hypot(gx, gy), np.arctan2(gy, gx)) + lognorm
    axes[1, 1].pcolormesh(gx, gy, mv, cmap="viridis", vmin=vmin, vmax=vmax, shading="auto")
    axes[1, 1].set(title="model on the sky", **sky)
    axes[1, 2].scatter(d["xi"], d["eta"], c=resid, **kr)
    axes[1, 2].set(title="data - model on the sky [dex]", **sky)
    fig.colorbar(im, ax=axes[:, :2], shrink=0.6, pad=0.02, label="log10(pixel flux / source flux in rmax)")
    fig.colorbar(imr, ax=axes[:, 2], shrink=0.6, pad=0.02, label="residual [dex]")
    return str(atomic_savefig(fig, path, dpi=dpi))


#: The chi image's colour range: |chi| beyond it saturates the colour.
CHI_RANGE = 5.0


def plot_chi_image(residuals, path, dpi=110):
    """Write a PNG of a reference frame's chi image (:func:`~.residuals.residual_map`).

    (data - model) / error on the pixel grid (blue: the model is too bright, red: too faint), masked
    pixels (saturated, bad, collateral: whatever the frame's mask holds) in grey, every source marked (a
    cross where its flux is not reported), and the chi^2 per degree of freedom over the source pixels.

    Parameters
    ----------
    residuals : ResidualMap
    path : str or os.PathLike
        Output PNG.
    dpi : int

    Returns
    -------
    str
        The path written.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    ny, nx = residuals.chi.shape
    width = 7.5
    fig = Figure(figsize=(width, max(3.0, width * ny / nx * 0.9)))
    ax = fig.subplots()
    fig.subplots_adjust(left=0.1, right=0.88, bottom=0.1, top=0.9)
    cmap = colormaps["RdBu_r"].with_extremes(bad="0.55")
    im = ax.imshow(
        np.ma.masked_invalid(residuals.chi),
        origin="lower",
        cmap=cmap,
        vmin=-CHI_RANGE,
        vmax=CHI_RANGE,
        interpolation="nearest",
    )
    kept = ~residuals.flagged
    ax.scatter(residuals.x[kept], residuals.y[kept], s=12, facecolors="none", edgecolors="k", linewidths=0.5)
    if residuals.flagged.any():
        ax.scatter(residuals.x[~kept], residuals.y[~kept], s=40, marker="x", c="m", linewidths=1.2)
    ax.set(xlim=(-0.5, nx - 0.5), ylim=(-0.5, ny - 0.5), xlabel="x [pix]", ylabel="y [pix]")
    ax.set_title(
        f"(data - model) / error, mean of {residuals.n_frames} frame(s): chi^2/dof over source pixels "
        f"{residuals.chi2_per_dof:.3g} (robust {residuals.robust_chi2_per_dof:.3g})",
        fontsize=8,
    )
    fig.colorbar(im, ax=ax, shrink=0.8, pad=0.02, label="chi (grey: masked; x: source not reported)")
    return str(atomic_savefig(fig, path, dpi=dpi))


#: Epochs at which :func:`plot_time_model` draws the perturbation.
TIME_MODEL_EPOCHS = 4
#: Stars whose light curves :func:`plot_time_model` draws.
TIME_MODEL_STARS = 4


def plot_time_model(model, times, static, moving, path, dpi=110):
    """Write a PNG of the time model: the perturbation ``P - 1`` at a few epochs (with a perturbation) and a
    few bright stars' light curves with and without the time model.

    The stars are the brightest whose fluxes are finite in every frame with both models (each curve over
    its median, offset for clarity): without the time model (grey) a drift or a focus change shows as a
    trend or a scatter the time model (colour) removes.

    Parameters
    ----------
    model : PRFModel
        With a time model.
    times : numpy.ndarray
        (T,) frame times.
    static, moving : numpy.ndarray
        (T, nsources) fluxes without and with the time model.
    path : str or os.PathLike
        Output PNG.
    dpi : int

    Returns
    -------
    str
        The path written.
    """
    from matplotlib.figure import Figure

    pert = model.time_model.perturbation
    times = np.asarray(times, dtype=float)
    order = np.argsort(times)
    times, static, moving = times[order], np.asarray(static)[order], np.asarray(moving)[order]
    fig = Figure(figsize=(10.0, 6.5 if pert is not None else 3.6))
    if pert is not None:
        grid = fig.add_gridspec(2, TIME_MODEL_EPOCHS, height_ratios=[1.0, 1.1])
        axes = [fig.add_subplot(grid[0, k]) for k in range(TIME_MODEL_EPOCHS)]
        lc_ax = fig.add_subplot(grid[1, :])
        epochs = np.quantile(times, np.linspace(0.0, 1.0, TIME_MODEL_EPOCHS))
        side = np.linspace(-pert.radius, pert.radius, 121)
        xi, eta = np.meshgrid(side, side)
        maps = [pert.factor(xi.ravel(), eta.ravel(), t).reshape(xi.shape) - 1.0 for t in epochs]
        limit = max(float(np.max(np.abs(m))) for m in maps) or 1e-3
        for ax, m, t in zip(axes, maps, epochs, strict=True):
            im = ax.imshow(
                m,
                origin="lower",
                extent=(-pert.radius, pert.radius, -pert.radius, pert.radius),
                cmap="RdBu_r",
                vmin=-limit,
                vmax=limit,
            )
            ax.set_title(f"P - 1 at t = {t - times[0]:.4g}", fontsize=8)
            ax.set_xlabel('xi ["]', fontsize=8)
            ax.tick_params(labelsize=7)
        axes[0].set_ylabel('eta ["]', fontsize=8)
        fig.colorbar(im, ax=axes, shrink=0.8, pad=0.01, label="perturbation")
    else:
        lc_ax = fig.add_subplot()
    good = np.all(np.isfinite(static) & np.isfinite(moving) & (static > 0) & (moving > 0), axis=0)
    # Brightness of the stars usable in both sets (every frame finite and positive); the others rank last.
    level = np.where(good, np.median(np.where(good, moving, 0.0), axis=0), -np.inf)
    stars = np.argsort(-level)[: min(TIME_MODEL_STARS, int(good.sum()))]
    curves = [(static[:, i] / np.median(static[:, i]), moving[:, i] / np.median(moving[:, i])) for i in stars]
    step = max([0.01] + [4.0 * float(np.std(c)) for pair in curves for c in pair])
    for k, (s, m) in enumerate(curves):
        lc_ax.plot(times - times[0], s - k * step, ".", color="0.6", ms=3, label="static" if k == 0 else None)
        lc_ax.plot(times - times[0], m - k * step, ".-", ms=3, lw=0.6, label="time model" if k == 0 else None)
    lc_ax.set(xlabel="time - first frame's", ylabel="flux / median (offset)")
    lc_ax.set_title(f"the {len(stars)} brightest stars' light curves", fontsize=8)
    lc_ax.legend(fontsize=7, loc="upper right")
    return str(atomic_savefig(fig, path, dpi=dpi))
