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


def _grid(n: int):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat


def plot_scatter_fits(results, params, path) -> Path:
    """log10(scatter) against magnitude per photometry: stars in the fit, rejected, outside; the fit, the
    fit's rejection band and the master's cut (both from ``params.fit_outlier_threshold``).

    The fitted curve is drawn as the model evaluated at each star (sorted by magnitude), since the fit
    terms may depend on more than the magnitude.
    """
    nphot = results.sizes["photometry"]
    fig, axes = _grid(nphot)
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
        if finite.any():
            # The two rules of the threshold (scatter.fit_scatter): a star leaves the fit beyond
            # +-thr x sqrt(avg r^2) of the stars kept, and enters the master below thr x avg |excess|.
            kept = excess[finite & in_fit]
            band = params.fit_outlier_threshold * math.sqrt(average(kept**2)) if kept.size else math.nan
            cut = params.fit_outlier_threshold * average(np.abs(excess[finite]))
            curve_x, curve = mag[ok][order], model[ok][order]
            ax.plot(curve_x, curve + cut, c="tab:red", lw=1, ls="--", label=f"master cut +{cut:.3f} dex")
            if np.isfinite(band):
                ax.plot(curve_x, curve + band, c="0.3", lw=0.8, ls=":", label=f"fit rejection +-{band:.3f}")
                ax.plot(curve_x, curve - band, c="0.3", lw=0.8, ls=":")
        ax.set_xlabel("magnitude")
        ax.set_ylabel(f"log10 {params.scatter_quantity}")
        ax.set_title(f"photometry {p}: {int(r['in_master'].sum())} stars in master")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(
        f"Scatter fit: {params.fit_terms}; threshold {params.fit_outlier_threshold:g} x the "
        f"{params.fit_outlier_average}",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    atomic_savefig(fig, path, dpi=90)
    plt.close(fig)
    return path


def plot_excess_histogram(results, params, path) -> Path:
    """Histogram of scatter_excess per photometry, with the master's one-sided cut."""
    nphot = results.sizes["photometry"]
    fig, axes = _grid(nphot)
    average = np.median if params.fit_outlier_average == "median" else np.mean
    for p, ax in zip(range(nphot), axes, strict=False):
        excess = results["scatter_excess"].values[:, p]
        finite = excess[np.isfinite(excess)]
        if finite.size:
            ax.hist(finite, bins=60, color="tab:blue", alpha=0.8)
            cut = params.fit_outlier_threshold * average(np.abs(finite))
            ax.axvline(cut, c="tab:red", ls="--", label=f"cut {cut:.3f} dex")
            ax.legend(fontsize=7)
        ax.set_xlabel("scatter excess (dex)")
        ax.set_ylabel("stars")
        ax.set_title(f"photometry {p}")
    fig.tight_layout()
    path = Path(path)
    atomic_savefig(fig, path, dpi=90)
    plt.close(fig)
    return path
