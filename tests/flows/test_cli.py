"""The ``photref`` command line: its master options are made from the parameters object."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from flows.cli import build_parser, main
from photref_core.master.parameters import MASTER_DEFAULTS, MasterParameters

MASTER = ["master", "s.zarr", "--catalog", "c.fits", "--output", "m.fits"]


def test_master_options_are_the_fields_of_master_parameters(capsys):
    parser = build_parser()
    args = parser.parse_args(MASTER)
    assert {name: getattr(args, name) for name in MASTER_DEFAULTS} == MASTER_DEFAULTS
    args = parser.parse_args(MASTER + ["--rejection-units", "stddev", "--fit-max-rej-iter", "7"])
    params = MasterParameters(**{name: getattr(args, name) for name in MASTER_DEFAULTS})
    assert (params.rejection_units, params.fit_max_rej_iter) == ("stddev", 7)
    with pytest.raises(SystemExit):  # a Literal's choices are the option's choices
        parser.parse_args(MASTER + ["--rejection-units", "sigma"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        parser.parse_args(["master", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, info in MasterParameters.model_fields.items():
        assert "--" + name.replace("_", "-") in text
        assert f"(default: {info.default})" in text, name  # every option says its default


def test_a_bad_master_value_is_a_clear_error_before_any_work(prefect_server, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", prefect_server)
    code = main(
        ["master", str(tmp_path / "s.zarr"), "--catalog", "c.fits", "--output", str(tmp_path / "m.fits")]
        + ["--outlier-threshold", "-1"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "\nphotref: error: " in err and "outlier_threshold" in err
    assert not any(tmp_path.iterdir())


def test_prf_options_make_one_prf_parameters(prefect_server, tmp_path, capsys, monkeypatch):
    """``photref prf`` builds one PRFParameters from its options and hands it to the flow; a bad value
    is refused before any work, naming the parameter."""
    import flows.prf
    from photref_core.prf.parameters import PRF_DEFAULTS, PRFParameters

    monkeypatch.setenv("PREFECT_API_URL", prefect_server)
    seen = {}

    def run_prf(store, images, catalog, output, **kwargs):  # stands in for the flow: what it is given
        seen.update(kwargs)
        return SimpleNamespace(result=dict, state_details=SimpleNamespace(flow_run_id=None))

    monkeypatch.setattr(flows.prf, "run_prf", run_prf)
    prf = ["prf", str(tmp_path / "s.zarr"), "i.fits", "--catalog", "c.fits", "--output", "f.fits"]
    options = ["--rmax", "1.1", "--time-mask", "1,0,1", "--frame-index", "2", "--as-photometry", "--json"]
    assert main(prf + options) == 0
    params = seen["params"]
    assert isinstance(params, PRFParameters)
    assert (params.rmax, params.frame_index, params.time_mask.tolist()) == (1.1, 2, [True, False, True])
    assert params.n_r_knots == PRF_DEFAULTS["n_r_knots"] and seen["as_photometry"] is True
    assert main(prf + ["--rmin", "3", "--rmax", "1"]) == 2
    err = capsys.readouterr().err
    assert "photref: error: " in err and "rmin" in err
    assert not any(tmp_path.iterdir())


def test_master_prints_a_short_summary_and_the_json_on_request(
    prefect_server, small_field, tmp_path, capsys, monkeypatch
):
    """What a person reads: what was written, stars in the master per photometry, cached or not, the run's
    UI link; no file-identity internals. ``--json``: the whole result."""
    monkeypatch.setenv("PREFECT_API_URL", prefect_server)
    field = tmp_path / "field"
    shutil.copytree(Path(small_field.catalog).parent, field)
    (field / "frames" / "zz_bad.fits").write_bytes(b"not FITS")
    command = ["master", str(tmp_path / "s.zarr"), "--catalog", str(field / "catalog.fits")]
    command += ["--output", str(tmp_path / "m.fits"), "--frames", str(field / "frames" / "*.fits")]
    assert main(command) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"master: {tmp_path / 'm.fits'} (written now)"
    assert out[2].startswith("stars in the master: phot 0: ") and "phot 2: " in out[2]
    assert "ingested 40 frame(s) now, 0 unchanged, 1 quarantined" in "\n".join(out)
    assert any(line.startswith("WARNING: 1 file(s) quarantined") for line in out)
    assert any("zz_bad.fits: " in line for line in out)
    ui = prefect_server.removesuffix("/api")
    assert out[-1].startswith("run: master s.zarr ") and f"{ui}/runs/flow-run/" in out[-1]
    assert len(out) < 15 and "inode" not in "\n".join(out) and "{" not in out[0]

    assert main([*command, "--json"]) == 0
    products = json.loads(capsys.readouterr().out)
    assert products["cached"] and products["master"] == str(tmp_path / "m.fits")
    assert products["flow_run_id"]
    assert main(command) == 0
    assert capsys.readouterr().out.startswith(f"master: {tmp_path / 'm.fits'} (unchanged: from the cache)")


def test_simulate_images_passes_min_separation(tmp_path, monkeypatch):
    import photref_core.simulate.images as images

    seen = {}

    def simulate_images(directory, **kwargs):
        seen.update(kwargs)
        return {"paths": [], "catalog": "c", "truth": "t"}

    monkeypatch.setattr(images, "simulate_images", simulate_images)
    assert main(["simulate", "images", str(tmp_path), "--min-separation", "7.5"]) == 0
    assert seen["min_separation"] == 7.5
