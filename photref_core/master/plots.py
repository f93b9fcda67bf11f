"""PNG plots of the master-reference fit, for the Prefect UI and the README (matplotlib, Agg)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .._atomic import atomic_savefig  # noqa: E402

__all__ = ["plot_excess_histogram", "plot_scatter_fits"]


def _grid(n: int, **share):
    """A grid of ``n`` panels, at most 3 a row. Margins are fixed in inches (tight_layout measures every tick
    label of every panel: most of the drawing time of a grid)."""
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    width, height = 4.6 * cols, 3.6 * rows
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False, **share)
    fig.subplots_adjust(
        left=0.85 / width,
        right=1 - 0.15 / width,
        bottom=0.7 / height,
        top=1 - 0.6 / height,
        wspace=0.2,
        hspace=0.3,
    )
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax in axes.flat[max(0, n - cols) : n]:  # the lowest panel of each column shows its x tick labels
        ax.tick_params(labelbottom=True)
    return fig, axes.flat


def plot_scatter_fits(results, params, path) -> Path:
    """log10(scatter) against magnitude per photometry: stars in the fit, rejected, outside; the fit, the
    fit's rejection band and the master's cut (both from ``params.fit_outlier_threshold``).

    The fitted curve is drawn as the model evaluated at each star (sorted by magnitude), since the fit
    terms may depend on more than the magnitude.
    """
    nphot = results.sizes["photometry"]
    fig, axes = _grid(nphot, sharex=True, sharey=True)
    average = np.median if params.fit_outlier_average == "median" else np.mean
    for p, ax in zip(range(nphot), axes, strict=False):
        r = results.isel(photometry=p)
        mag = r["magnitude"].values
        with np.errstate(divide="ignore", invalid="ignore"):
            y = np.log10(r[params.scatter_quantity].values)
        in_fit = r["in_fit"].values
        usable = r["usable"].values
        rejected = usable & ~in_fit
        other = np.isfinite(y) & ~usable
        model = y - r["scatter_excess"].values
        ax.scatter(mag[other], y[other], s=4, c="0.75", label="not fitted")
        ax.scatter(mag[in_fit], y[in_fit], s=5, c="tab:blue", label="in fit")
        ax.scatter(mag[rejected], y[rejected], s=12, c="tab:red", marker="x", label="rejected by fit")
        ok = np.isfinite(model) & np.isfinite(mag)
        order = np.argsort(mag[ok])
        ax.plot(mag[ok][order], model[ok][order], c="k", lw=1, label="fit")
        excess = r["scatter_excess"].values
        finite = np.isfinite(excess)
        # numpy, not an xarray reduction: the first xarray reduction in a process imports dask (~0.7 s) to
        # ask whether the values are a dask array.
        title = f"photometry {p}: {int(np.count_nonzero(r['in_master'].values))} in master"
        if finite.any():
            # The two rules of the threshold (scatter.fit_scatter): a star leaves the fit beyond
            # +-thr x sqrt(avg r^2) of the stars kept, and enters the master below thr x avg |excess|.
            kept = excess[finite & in_fit]
            band = params.fit_outlier_threshold * math.sqrt(average(kept**2)) if kept.size else math.nan
            cut = params.fit_outlier_threshold * average(np.abs(excess[finite]))
            curve_x, curve = mag[ok][order], model[ok][order]
            ax.plot(curve_x, curve + cut, c="tab:red", lw=1, ls="--", label="master cut")
            title += f", cut +{cut:.3f}"
            if np.isfinite(band):
                ax.plot(curve_x, curve + band, c="0.3", lw=0.8, ls=":", label="fit rejection band")
                ax.plot(curve_x, curve - band, c="0.3", lw=0.8, ls=":")
                title += f", band +-{band:.3f}"
        # A fixed title height (y=) skips matplotlib's search for one over every tick label, most of the
        # drawing time of a grid of panels; one legend (the symbols are the same in every panel).
        ax.set_title(title + (" dex" if finite.any() else ""), fontsize=8, y=1.0)
        if p == 0:
            ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(
        f"Scatter fit: {params.fit_terms}; threshold {params.fit_outlier_threshold:g} x the "
        f"{params.fit_outlier_average}",
        fontsize=10,
    )
    fig.supxlabel("magnitude", fontsize=9)
    fig.supylabel(f"log10 {params.scatter_quantity}", fontsize=9)
    path = Path(path)
    atomic_savefig(fig, path, dpi=90)
    plt.close(fig)
    return path


def plot_excess_histogram(results, params, path) -> Path:
    """Histogram of scatter_excess per photometry, with the master's one-sided cut."""
    nphot = results.sizes["photometry"]
    fig, axes = _grid(nphot, sharex=True)
    average = np.median if params.fit_outlier_average == "median" else np.mean
    for p, ax in zip(range(nphot), axes, strict=False):
        excess = results["scatter_excess"].values[:, p]
        finite = excess[np.isfinite(excess)]
        if finite.size:
            counts, edges = np.histogram(finite, bins=60)
            ax.stairs(counts, edges, fill=True, color="tab:blue", alpha=0.8)  # one artist, not 60 bars
            cut = params.fit_outlier_threshold * average(np.abs(finite))
            ax.axvline(cut, c="tab:red", ls="--")
            title = f"photometry {p}: master cut {cut:.3f} dex"
        else:
            title = f"photometry {p}: no finite excess"
        ax.set_title(title, fontsize=9, y=1.0)
    fig.supxlabel("scatter excess (dex); dashed: the master's cut", fontsize=9)
    fig.supylabel("stars", fontsize=9)
    path = Path(path)
    atomic_savefig(fig, path, dpi=90)
    plt.close(fig)
    return path
