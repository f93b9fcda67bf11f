"""photref_core.prf.plots: the shape-model plot."""

from __future__ import annotations


def test_plot_shape_model(main, tmp_path):
    out = main["model"].plot_shape_model(tmp_path / "shape.png")
    with open(out, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
