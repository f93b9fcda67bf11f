"""Raw (not yet magnitude-fitted) frame photometry with a known truth, for the magnitude-fitting loop
(SPEC 9).

Every frame sees the stars through its own transparency and detector: a zero point (tenths of a mag), a
smooth pattern over the detector (terms in x, y up to the third order, with cross terms), magnitude terms
(a colour-like non-linearity) and their cross terms with x and y, all inside the span of the default
correction ``O3{phot_g_mean_mag, x, y}``, so a perfect fit leaves only the stars' own noise. Besides:
pointing drift (each frame's x, y shift by a few pixels), 0.5 % outliers, variable stars, stars seen in
only part of the frames (coverage gaps), stars missing from the catalog (2 %: nothing to fit them
against), and ``x``, ``y`` columns in every frame file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from .photometry import GAIA_ID_BASE, noise_model

__all__ = ["SimulatedRawPhotometry", "simulate_raw_photometry"]

#: Detector size (pixels) of the simulated frames.
DETECTOR = 2048


@dataclass(frozen=True)
class SimulatedRawPhotometry:
    """Paths written by :func:`simulate_raw_photometry`."""

    frames: list[Path]
    catalog: Path
    truth: Path


def simulate_raw_photometry(
    outdir: str | os.PathLike,
    frames: int = 60,
    stars: int = 1500,
    photometries: int = 3,
    seed: int = 0,
    outlier_fraction: float = 0.005,
) -> SimulatedRawPhotometry:
    """Write raw frame photometry (FITS tables with ``x``, ``y``), a catalog and the truth.

    Parameters
    ----------
    outdir : str or os.PathLike
        Directory to write into; frames go to ``outdir/frames/``.
    frames, stars, photometries : int
        Sizes of the field.
    seed : int
        Seed: the same seed writes the same files.
    outlier_fraction : float
        Fraction of measurements offset by 0.1-1 mag.

    Returns
    -------
    SimulatedRawPhotometry
        The truth table has per star ``source_id``, ``true_mag`` (P; the instrumental magnitude the
        reference frame's system would give without its frame effects), ``noise`` (P; the injected
        per-measurement scatter), ``variable``, ``amplitude``, ``period``, ``phase``, ``seen_fraction``,
        ``in_catalog``; its meta the start of the frames' times (``JD0``).
    """
    rng = np.random.default_rng(seed)
    outdir = Path(outdir)
    frame_dir = outdir / "frames"
    frame_dir.mkdir(parents=True, exist_ok=True)
    n_src, n_phot = stars, photometries
    source_id = np.sort(GAIA_ID_BASE + rng.choice(10**15, size=n_src, replace=False).astype(np.uint64))
    g_mag = rng.uniform(8.5, 15.5, n_src)
    x0 = rng.uniform(20, DETECTOR - 20, n_src)
    y0 = rng.uniform(20, DETECTOR - 20, n_src)
    true_mag = g_mag[:, None] + rng.uniform(-0.2, 0.2, n_phot)[None, :]
    noise = np.stack([noise_model(true_mag[:, p], p, n_phot) for p in range(n_phot)], axis=1)

    variable = np.zeros(n_src, bool)
    variable[rng.choice(n_src, max(1, n_src // 100), replace=False)] = True
    amplitude = np.where(variable, rng.uniform(0.03, 0.2, n_src), 0.0)
    period = rng.uniform(0.5, 4.0, n_src)
    phase = rng.uniform(0, 2 * np.pi, n_src)
    seen_fraction = np.where(rng.random(n_src) < 0.2, rng.uniform(0.4, 0.9, n_src), 1.0)

    jd0 = 2460500.5
    times = jd0 + np.sort(rng.uniform(0, 20, frames))
    name_order = rng.permutation(frames)
    paths = []
    for t, jd in enumerate(times):
        seen = np.flatnonzero(rng.random(n_src) < seen_fraction)
        x = x0[seen] + rng.normal(0, 3)
        y = y0[seen] + rng.normal(0, 3)
        u, v, m = (x - 1024) / 1024, (y - 1024) / 1024, (g_mag[seen] - 12) / 3.5
        effect = np.empty((seen.size, n_phot))
        for p in range(n_phot):
            c = rng.normal(0, 1, 10)
            effect[:, p] = (
                rng.uniform(-0.5, 0.5)
                + 0.05 * (c[0] * u + c[1] * v)
                + 0.02 * (c[2] * u * u + c[3] * u * v + c[4] * v * v)
                + 0.01 * (c[5] * u**3 + c[6] * u * v * v)
                + 0.03 * c[7] * m
                + 0.01 * (c[8] * m * m + c[9] * m * u)
            )
        signal = amplitude[seen] * np.sin(2 * np.pi * (jd - jd0) / period[seen] + phase[seen])
        sigma = noise[seen]
        mag = true_mag[seen] + signal[:, None] + effect + rng.normal(0, 1, sigma.shape) * sigma
        bad = rng.random(mag.shape) < outlier_fraction
        mag[bad] += rng.choice([-1.0, 1.0], bad.sum()) * rng.uniform(0.1, 1.0, bad.sum())
        mag_err = sigma * rng.uniform(0.95, 1.05, sigma.shape)
        rows = rng.permutation(seen.size)
        table = Table()
        table["source_id"] = source_id[seen][rows]
        table["mag"] = mag[rows]
        table["mag_err"] = mag_err[rows]
        table["x"] = x[rows]
        table["y"] = y[rows]
        frame_id = f"raw-{seed:03d}-{name_order[t]:05d}"
        table.meta["FRAMEID"] = frame_id
        table.meta["JD"] = float(jd)
        path = frame_dir / f"{frame_id}.fits"
        fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(table)]).writeto(path, overwrite=True)
        paths.append(path)

    in_catalog = rng.random(n_src) >= 0.02
    catalog = Table()
    catalog["source_id"] = source_id[in_catalog]
    catalog["phot_g_mean_mag"] = g_mag[in_catalog]
    catalog["bp_rp"] = rng.normal(0.9, 0.3, n_src)[in_catalog]
    catalog_path = outdir / "catalog.fits"
    catalog.write(catalog_path, overwrite=True)

    truth = Table()
    truth["source_id"] = source_id
    truth["true_mag"] = true_mag
    truth["noise"] = noise
    truth["variable"] = variable
    truth["amplitude"] = amplitude
    truth["period"] = period
    truth["phase"] = phase
    truth["seen_fraction"] = seen_fraction
    truth["in_catalog"] = in_catalog
    truth.meta["JD0"] = jd0
    truth_path = outdir / "truth.fits"
    truth.write(truth_path, overwrite=True)
    return SimulatedRawPhotometry(frames=sorted(paths), catalog=catalog_path, truth=truth_path)
