"""``photref prf --model-output``: every frame's model and residual image; the reference frame's chi image
and its chi^2 per degree of freedom; a bad ``--model-output`` refused before any work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from photref_core.prf.residuals import CHI2_1_MEDIAN, robust_chi2_per_dof
from photref_core.simulate.fields import load_frames, simulate_field
from photref_core.simulate.images import prf_design


@pytest.fixture(scope="module")
def roman_field(tmp_path_factory):
    """A well-sampled (Roman-like, FWHM 2.2 px) field with known truth."""
    return simulate_field(
        tmp_path_factory.mktemp("model-output"), "roman", seed=5, n_frames=3, n_stars=40, size=96
    )


def _command(sim, tmp_path, *extra):
    radii = [f"--{k.replace('_', '-')}={v}" for k, v in sim["prf_params"].items()]
    frames = str(Path(sim["paths"][0]).parent / "*.fits")
    return ["prf", str(tmp_path / "s.zarr"), frames, "--catalog", sim["catalog"], *radii, *extra]


def noiseless_frames(sim, shape):
    """The true frames without noise: every star's true flux x the true PRF at its true position."""
    truth = Table.read(sim["truth"])
    frames = []
    for frame_id in dict.fromkeys(truth["frame_id"]):
        t = truth[truth["frame_id"] == frame_id]
        design = prf_design(np.asarray(t["x"]), np.asarray(t["y"]), shape, sim["prf"])
        frames.append((design @ np.asarray(t["flux"], float)).reshape(shape))
    return np.array(frames)


@pytest.mark.slow
def test_model_images_follow_the_truth(prefect_server, roman_field, tmp_path, monkeypatch, capsys):
    """MODEL and RESID per frame with the frame's WCS and FRAMEID; RESID is data - model; the model
    equals the noiseless truth within the noise, chi^2/dof of data - model over source pixels in
    [0.9, 1.2], also as the products' robust figure; the chi image in the products."""
    from flows.cli import main

    monkeypatch.setenv("PREFECT_API_URL", prefect_server)
    sim = roman_field
    model_path, output = tmp_path / "out" / "model.fits", tmp_path / "fluxes.fits"
    assert main(_command(sim, tmp_path, "--output", str(output), "--model-output", str(model_path))) == 0
    printed = capsys.readouterr().out
    assert f"model and residual images: {model_path}" in printed and "chi^2/dof over source pixels" in printed
    assert (tmp_path / "fluxes_chi.png").stat().st_size > 10_000
    robust = float(printed.split("(robust ")[1].split(")")[0])
    assert 0.9 <= robust <= 1.2

    flux, err, mask, wcs = load_frames(sim["paths"])
    T, ny, nx = flux.shape
    truth = noiseless_frames(sim, (ny, nx))
    headers = [fits.getheader(p) for p in sim["paths"]]
    with fits.open(model_path) as hdul:
        assert hdul[0].header["FLUXSET"] == "static"
        assert [h.name for h in hdul[1:]] == ["MODEL", "RESID"] * T
        by_frame = {h.header["FRAMEID"]: k for k, h in enumerate(hdul[1::2])}
        models = np.array([hdul["MODEL", by_frame[h["FRAMEID"]] + 1].data for h in headers], float)
        resids = np.array([hdul["RESID", by_frame[h["FRAMEID"]] + 1].data for h in headers], float)
        ext_wcs = WCS(hdul["MODEL", by_frame[headers[1]["FRAMEID"]] + 1].header)
    # The frame's WCS: the same sky at every corner.
    corners = np.array([[0, 0], [nx - 1, 0], [0, ny - 1], [nx - 1, ny - 1]], float)
    np.testing.assert_allclose(ext_wcs.all_pix2world(corners, 0), wcs[1].all_pix2world(corners, 0), atol=1e-9)
    good = ~mask & np.isfinite(flux)
    np.testing.assert_allclose(resids[good], (flux - models)[good], rtol=1e-5, atol=1e-3 * np.median(err))
    assert np.all(np.isnan(resids[~good]))

    # Source pixels: where the true light is at least the error (as the products' chi^2/dof takes them).
    src = good & (truth >= err)
    assert src.sum() > 1000
    chi_data = ((flux - models) / err)[src]
    assert 0.9 <= np.mean(chi_data**2) <= 1.2
    chi_truth = ((models - truth) / err)[src]
    assert np.sqrt(np.mean(chi_truth**2)) < 0.3  # the model is much closer to the truth than the noise


def test_robust_chi2_per_dof_matches_gaussian_noise():
    """Unit normal residuals give ~1; a few huge outliers do not move it; parameters are degrees lost."""
    chi = np.random.default_rng(1).standard_normal(200_000)
    assert robust_chi2_per_dof(chi) == pytest.approx(1.0, abs=0.01)
    chi[:100] = 1e3
    assert robust_chi2_per_dof(chi) == pytest.approx(1.0, abs=0.01)
    assert robust_chi2_per_dof(chi[:10], n_parameters=5) == pytest.approx(
        np.median(chi[:10] ** 2) / CHI2_1_MEDIAN * 2
    )
    assert np.isnan(robust_chi2_per_dof(chi[:3], n_parameters=3))


@pytest.mark.parametrize(
    "bad, problem",
    [
        ("dir", "is a directory"),
        ("model.png", "must be a FITS file name"),
        ("file/model.fits", "is not a directory"),
        ("fluxes.fits", "are the same file"),
    ],
)
def test_bad_model_output_fails_before_any_work(
    prefect_server, roman_field, tmp_path, monkeypatch, capsys, bad, problem
):
    """The path is refused with a message naming it and the problem; no store, no flux table."""
    from flows.cli import main

    monkeypatch.setenv("PREFECT_API_URL", prefect_server)
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("not a directory")
    output = tmp_path / "fluxes.fits"
    code = main(
        _command(roman_field, tmp_path, "--output", str(output), "--model-output", str(tmp_path / bad))
    )
    err = capsys.readouterr().err
    assert code != 0
    assert str(tmp_path / bad) in err and problem in err
    assert not (tmp_path / "s.zarr").exists() and not output.exists()
