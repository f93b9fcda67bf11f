"""The ``photref`` command line: its master options are made from the parameters object."""

from __future__ import annotations

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
        return {}

    monkeypatch.setattr(flows.prf, "run_prf", run_prf)
    prf = ["prf", str(tmp_path / "s.zarr"), "i.fits", "--catalog", "c.fits", "--output", "f.fits"]
    assert main(prf + ["--rmax", "1.1", "--time-mask", "1,0,1", "--frame-index", "2", "--as-photometry"]) == 0
    params = seen["params"]
    assert isinstance(params, PRFParameters)
    assert (params.rmax, params.frame_index, params.time_mask.tolist()) == (1.1, 2, [True, False, True])
    assert params.n_r_knots == PRF_DEFAULTS["n_r_knots"] and seen["as_photometry"] is True
    assert main(prf + ["--rmin", "3", "--rmax", "1"]) == 2
    err = capsys.readouterr().err
    assert "photref: error: " in err and "rmin" in err
    assert not any(tmp_path.iterdir())
