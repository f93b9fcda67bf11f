"""A simulated field of frame photometry (SPEC 1.1) with a Gaia-like catalog (SPEC 1.2) and its truth.

The field is built to exercise every branch of the master-reference science:

* magnitudes 8-16 with a noise floor plus photon-like noise that grows with magnitude, different for every
  photometry (e.g. small apertures noisier for bright stars, big ones noisier for faint stars);
* about 1.5 % outlier measurements (cosmic rays, blends: offsets of 0.1-2 mag);
* individual NaN photometries (one aperture lost, the others kept);
* stars seen in only part of the frames (edge of the field), a few never measured at all;
* a few variable stars (sinusoids of 0.05-0.3 mag) and a few stars with several times the expected scatter;
* a couple of saturated stars whose every measurement is the same value;
* stars measured in frames but missing from the catalog;
* frame files written with names unrelated to their time order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

# Gaia DR3-like source ids: large positive 64-bit integers that a float64 cannot hold exactly.
GAIA_ID_BASE = 4_295_806_720_000_000_000


__all__ = ["GAIA_ID_BASE", "SimulatedPhotometry", "noise_model", "simulate_photometry"]


@dataclass(frozen=True)
class SimulatedPhotometry:
    """Paths written by :func:`simulate_photometry`."""

    frames: list[Path]
    catalog: Path
    truth: Path


def noise_model(mag: np.ndarray, photometry: int, n_photometries: int) -> np.ndarray:
    """Expected per-measurement scatter (mag) of a star of magnitude ``mag`` in photometry ``photometry``.

    A floor (scintillation, flat field) plus a term that grows by 0.4 dex per magnitude (photon and sky
    noise); the two vary with the photometry index so every photometry has its own scatter curve.
    """
    frac = photometry / max(n_photometries - 1, 1)
    floor = 0.002 + 0.002 * (1.0 - frac)
    faint = (0.004 + 0.006 * frac) * 10.0 ** (0.4 * (mag - 12.0))
    return np.hypot(floor, faint)


def simulate_photometry(
    outdir: str | os.PathLike,
    frames: int = 40,
    stars: int = 300,
    photometries: int = 3,
    seed: int = 0,
    fmt: str = "fits",
    lost_fraction: float = 0.01,
    bad_error_fraction: float = 0.002,
) -> SimulatedPhotometry:
    """Write a simulated field: one photometry file per frame, a catalog and a truth table.

    Parameters
    ----------
    outdir : str or os.PathLike
        Directory to write into (created). Frames go to ``outdir/frames/``.
    frames, stars, photometries : int
        Number of frames, of stars in the field, and of photometries P.
    seed : int
        Seed of the random generator: the same seed writes the same files.
    fmt : {'fits', 'ecsv', 'parquet'}
        Format of the frame files (the catalog and truth are always FITS).
    lost_fraction : float
        Fraction of the measurements written as NaN magnitudes (one photometry lost, the others kept).
    bad_error_fraction : float
        Fraction of the errors written as 0, -1 or NaN. ``lost_fraction=0, bad_error_fraction=0`` writes
        frames in which every value is finite (what AutoWISP's collector needs to keep every star: it drops
        a star from a frame when any of its photometries or errors is not finite).

    Returns
    -------
    SimulatedPhotometry
        The frame paths (in no particular order), the catalog path and the truth path.
    """
    if frames < 1 or stars < 1 or photometries < 1:
        raise ValueError("frames, stars and photometries must all be at least 1")
    if not (0 <= lost_fraction < 1 and 0 <= bad_error_fraction < 1):
        raise ValueError("lost_fraction and bad_error_fraction must be in [0, 1)")
    if fmt not in ("fits", "ecsv", "parquet"):
        raise ValueError(f"fmt must be 'fits', 'ecsv' or 'parquet', not {fmt!r}")
    rng = np.random.default_rng(seed)
    outdir = Path(outdir)
    frame_dir = outdir / "frames"
    frame_dir.mkdir(parents=True, exist_ok=True)

    n_src, n_phot = stars, photometries
    source_id = np.sort(GAIA_ID_BASE + rng.choice(10**15, size=n_src, replace=False).astype(np.uint64))
    g_mag = rng.uniform(8.0, 16.0, n_src)
    bp_rp = rng.normal(0.9, 0.35, n_src)
    ra = 120.0 + rng.uniform(-0.5, 0.5, n_src)
    dec = 30.0 + rng.uniform(-0.5, 0.5, n_src)

    # Per-photometry zero points and colour terms: the measured magnitude is not the catalog's.
    zero_point = rng.uniform(-0.3, 0.3, n_phot)
    colour_term = rng.uniform(-0.05, 0.05, n_phot)
    true_mag = g_mag[:, None] + zero_point[None, :] + colour_term[None, :] * bp_rp[:, None]

    # Special stars (disjoint sets).
    order = rng.permutation(n_src)
    n_special = max(1, n_src // 50)
    variable = np.zeros(n_src, bool)
    variable[order[:n_special]] = True
    noisy = np.zeros(n_src, bool)
    noisy[order[n_special : 2 * n_special]] = True
    saturated = np.zeros(n_src, bool)
    saturated[order[2 * n_special : 2 * n_special + max(1, n_src // 150)]] = True
    g_mag[saturated] = rng.uniform(8.0, 8.3, saturated.sum())
    true_mag[saturated] = g_mag[saturated, None] + zero_point[None, :]
    never_seen = np.zeros(n_src, bool)
    never_seen[order[2 * n_special + max(1, n_src // 150) : 3 * n_special + max(1, n_src // 150)]] = True
    # Stars measured in frames but absent from the catalog (about 3 %).
    not_in_catalog = np.zeros(n_src, bool)
    not_in_catalog[rng.choice(np.flatnonzero(~never_seen), size=max(1, n_src // 33), replace=False)] = True

    scatter_factor = np.ones(n_src)
    scatter_factor[noisy] = rng.uniform(3.0, 6.0, noisy.sum())
    amplitude = np.where(variable, rng.uniform(0.05, 0.3, n_src), 0.0)
    period = rng.uniform(0.3, 5.0, n_src)
    phase = rng.uniform(0, 2 * np.pi, n_src)

    # Part-time stars: a quarter of the stars are at the field edge and seen in 30-90 % of the frames.
    seen_fraction = np.ones(n_src)
    edge = rng.random(n_src) < 0.25
    seen_fraction[edge] = rng.uniform(0.3, 0.9, edge.sum())
    seen_fraction[never_seen] = 0.0

    jd0 = 2460400.5
    times = jd0 + np.sort(rng.uniform(0, 30, frames))
    # File names are a random permutation of the time order ("frames listed in random order").
    name_order = rng.permutation(frames)

    paths = []
    for t_index, jd in enumerate(times):
        seen = rng.random(n_src) < seen_fraction
        idx = np.flatnonzero(seen)
        sigma = np.stack([noise_model(true_mag[idx, p], p, n_phot) for p in range(n_phot)], axis=1)
        sigma *= scatter_factor[idx, None]
        signal = amplitude[idx] * np.sin(2 * np.pi * (jd - jd0) / period[idx] + phase[idx])
        mag = true_mag[idx] + signal[:, None] + rng.normal(0.0, 1.0, sigma.shape) * sigma
        mag_err = noise_model(true_mag[idx], np.arange(n_phot)[None, :], n_phot) * rng.uniform(
            0.9, 1.1, sigma.shape
        )
        mag[saturated[idx]] = np.round(true_mag[idx][saturated[idx]], 3)
        outlier = rng.random(mag.shape) < 0.015
        mag[outlier] += rng.choice([-1.0, 1.0], outlier.sum()) * rng.uniform(0.1, 2.0, outlier.sum())
        lost = rng.random(mag.shape) < lost_fraction
        mag[lost] = np.nan
        bad_err = rng.random(mag.shape) < bad_error_fraction
        mag_err[bad_err] = rng.choice([0.0, -1.0, np.nan], bad_err.sum())
        # Rows in no particular order, as a photometry code might write them.
        rows = rng.permutation(idx.size)
        table = Table()
        table["source_id"] = source_id[idx][rows]
        table["mag"] = mag[rows]
        table["mag_err"] = mag_err[rows]
        frame_id = f"sim-{seed:03d}-{name_order[t_index]:05d}"
        table.meta["FRAMEID"] = frame_id
        table.meta["JD"] = float(jd)
        suffix = {"fits": ".fits", "ecsv": ".ecsv", "parquet": ".parquet"}[fmt]
        path = frame_dir / f"{frame_id}{suffix}"
        if fmt == "fits":
            fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(table)]).writeto(path, overwrite=True)
        else:
            table.write(path, overwrite=True)
        paths.append(path)

    catalog = Table()
    keep = ~not_in_catalog
    catalog["source_id"] = source_id[keep]
    catalog["ra"] = ra[keep]
    catalog["dec"] = dec[keep]
    catalog["phot_g_mean_mag"] = g_mag[keep]
    catalog["bp_rp"] = bp_rp[keep]
    catalog["phot_bp_mean_mag"] = g_mag[keep] + 0.4 * bp_rp[keep]
    catalog["phot_rp_mean_mag"] = g_mag[keep] - 0.6 * bp_rp[keep]
    catalog["pmra"] = rng.normal(0, 5, keep.sum())
    catalog["pmdec"] = rng.normal(0, 5, keep.sum())
    catalog_path = outdir / "catalog.fits"
    catalog.write(catalog_path, overwrite=True)

    truth = Table()
    truth["source_id"] = source_id
    truth["true_mag"] = true_mag
    truth["expected_scatter"] = (
        np.stack([noise_model(true_mag[:, p], p, n_phot) for p in range(n_phot)], axis=1)
        * scatter_factor[:, None]
    )
    truth["variable"] = variable
    truth["amplitude"] = amplitude
    truth["excess_noise"] = noisy
    truth["saturated"] = saturated
    truth["in_catalog"] = ~not_in_catalog
    truth["never_seen"] = never_seen
    truth["seen_fraction"] = seen_fraction
    truth_path = outdir / "truth.fits"
    truth.write(truth_path, overwrite=True)
    return SimulatedPhotometry(frames=sorted(paths), catalog=catalog_path, truth=truth_path)
