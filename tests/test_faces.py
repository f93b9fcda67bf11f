"""The subpackage faces: every public name of every module, generated from the modules' ``__all__``."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

import photref_core
from photref_core._lazy import public_names

PACKAGES = sorted(p.parent.name for p in Path(photref_core.__file__).parent.glob("*/__init__.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_face_lists_every_public_name_of_its_modules(package):
    face = importlib.import_module(f"photref_core.{package}")
    modules = sorted(p.stem for p in Path(face.__file__).parent.glob("*.py") if not p.name.startswith("_"))
    expected = set()
    for stem in modules:
        module = importlib.import_module(f"photref_core.{package}.{stem}")
        for name in module.__all__:  # the text the face read is the module's real __all__
            assert hasattr(module, name), f"{module.__name__}.__all__ names {name!r}, which it lacks"
            assert getattr(face, name) is getattr(module, name)
        expected |= set(module.__all__)
    assert set(face.__all__) == expected == set(dir(face))
    with pytest.raises(AttributeError):
        face.no_such_name  # noqa: B018


def test_a_name_exported_twice_is_refused(tmp_path):
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "a.py").write_text('__all__ = ["f"]\n')
    (tmp_path / "b.py").write_text('__all__ = (\n    "f",\n)\n')
    with pytest.raises(ImportError, match="'f' is exported by both .a and .b"):
        public_names(str(tmp_path / "__init__.py"))
