"""A corpus of bad inputs (SPEC 8), each with the message it must get.

Frames (``FRAME_CASES``): each bad file is ingested beside good frames with the core calls the flow makes
(plan_ingestion, ingest_batch per batch, finalize_ingestion): the bad file is quarantined, listed by
``frame_table`` with its reason, every good frame is ingested exactly, and strict mode raises a
BadInputError whose message is ``<the file>: <the problem>``. The problem must match the case's pattern,
which names the problem in an operator's words rather than one library's wording where it can (so a
change of FITS reader keeps the tests meaningful), in at most two lines and 300 characters. The message is
checked last, so a case with an unclear message fails only on that (such cases are marked xfail with the
reason). The whole corpus then
goes through the Prefect master flow at once: the master equals the clean run's, INMASTER lists every bad
file as not included, and strict mode fails the run.

Other inputs (``OTHER_CASES``): catalogs, fit-terms expressions and stores, each given to the master flow,
which must refuse before any work, with a message naming the offending file or text.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zarr
from astropy.io import fits
from astropy.table import Table
from pydantic import ValidationError
from relutil import assert_same_master, master_snapshot

from photref_core.catalog import read_catalog
from photref_core.errors import BadInputError, FitTermsError, StoreError
from photref_core.ingest.photometry import finalize_ingestion, ingest_batch, plan_ingestion
from photref_core.ingest.readers import read_frame
from photref_core.master.parameters import MasterParameters
from photref_core.store.frames import frame_table
from photref_core.store.schema import INGESTED, open_store

N_GOOD = 5


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable  # (directory, template Table, good frame paths) -> path of the bad input
    expected: str  # regular expression the problem must match
    bug: str | None = None  # why the message is not good enough (the case is then xfail)


def _fits(directory: Path, name: str, table: Table, **meta) -> Path:
    table = table.copy()
    table.meta.update(meta)
    path = directory / name
    fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(table)]).writeto(path)
    return path


def _variant(name: str, mutate: Callable[[Table], Table | None]):
    """A FITS frame made from the template by ``mutate`` (with a FRAMEID of its own)."""

    def build(directory, template, good):
        table = template.copy()
        result = mutate(table)  # a Table of no rows is falsy: no `or` here
        table = table if result is None else result
        return _fits(directory, f"{name}.fits", table, FRAMEID=f"bad-{name}")

    return build


def _truncated(name: str, where: str):
    def build(directory, template, good):
        path = _fits(directory, f"{name}.fits", template, FRAMEID=f"bad-{name}")
        data = path.read_bytes()
        with fits.open(path) as hdul:
            start = hdul[1]._data_offset
            size = hdul[1].header["NAXIS1"] * hdul[1].header["NAXIS2"]  # without the padding
        cut = {"data": start + size // 3, "table-header": 2880 + 1000, "padding": start + size + 10}[where]
        path.write_bytes(data[:cut])
        return path

    return build


def _raw(name: str, content: bytes):
    def build(directory, template, good):
        path = directory / name
        path.write_bytes(content)
        return path

    return build


def _primary_only(directory, template, good):
    path = directory / "primary-only.fits"
    fits.PrimaryHDU(np.zeros((8, 8), np.float32)).writeto(path)
    return path


def _scalar_gap(directory, template, good):
    table = Table({"source_id": template["source_id"]})
    for i in (0, 2):
        table[f"mag_{i}"] = template["mag"][:, i]
        table[f"mag_err_{i}"] = template["mag_err"][:, i]
    return _fits(directory, "scalar-gap.fits", table, FRAMEID="bad-scalar-gap", JD=template.meta["JD"])


def _non_numeric_mag(directory, template, good):
    table = Table({"source_id": template["source_id"]})
    for i in range(3):
        table[f"mag_{i}"] = template["mag"][:, i] if i != 1 else np.full(len(template), "n/a")
        table[f"mag_err_{i}"] = template["mag_err"][:, i]
    return _fits(directory, "non-numeric-mag.fits", table, FRAMEID="bad-non-numeric-mag")


def _bad_time(key: str, value: str, name: str):
    def build(directory, template, good):
        table = template.copy()
        del table.meta["JD"]
        table.meta[key] = value
        return _fits(directory, f"{name}.fits", table, FRAMEID=f"bad-{name}")

    return build


def _missing(directory, template, good):
    return directory / "never-written.fits"


def _directory(name: str):
    def build(directory, template, good):
        path = directory / name
        path.mkdir()
        return path

    return build


def _broken_ecsv(directory, template, good):
    path = directory / "broken-header.ecsv"
    table = template.copy()
    table.meta["FRAMEID"] = "bad-broken-ecsv"
    table.write(path)
    text = path.read_text().replace(
        "# %ECSV 1.0", "# %ECSV 1.0\n# ---\n#  - {name: source_id, datatype: [", 1
    )
    path.write_text(text)
    return path


def _truncated_gzip(directory, template, good):
    raw = _fits(directory, "for-gzip.fits", template, FRAMEID="bad-gzip").read_bytes()
    os.unlink(directory / "for-gzip.fits")
    packed = gzip.compress(raw)
    path = directory / "truncated.fits.gz"
    path.write_bytes(packed[: len(packed) // 2])
    return path


def _truncated_parquet(directory, template, good):
    path = directory / "truncated.parquet"
    table = template.copy()
    table.meta.clear()
    table.write(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _same_frameid(directory, template, good):
    path = directory / "copy-of-a-good-frame.fits"
    shutil.copyfile(good[0], path)
    return path


def _set(column, value):
    def mutate(t):
        t[column][:] = value

    return mutate


def _drop(column):
    def mutate(t):
        t.remove_column(column)

    return mutate


def _ids(transform):
    def mutate(t):
        t["source_id"] = transform(t["source_id"])

    return mutate


def _wrong_p(t):
    t["mag"] = t["mag"][:, :2]
    t["mag_err"] = t["mag_err"][:, :2]


def _p_mismatch(t):
    t["mag_err"] = t["mag_err"][:, :2]


def _duplicate_ids(t):
    t["source_id"][1] = t["source_id"][0]


def _err_not_positive(t):
    t["mag_err"][:] = np.where(np.arange(t["mag_err"].size).reshape(t["mag_err"].shape) % 2, 0.0, -1.0)


def _empty(t):
    return t[:0]


FRAME_CASES = [
    # The first eight cases were bugs of the fitsio reader (raw multi-line cfitsio status text, stale
    # messages of earlier files, directories and empty files unrecognised); io.check_fits_file now
    # checks the cheap cases first and io.cfitsio_problem keeps one status line.
    Case("truncated-in-data", _truncated("truncated-in-data", "data"), r"(?i)truncated"),
    Case(
        "truncated-in-table-header", _truncated("truncated-in-table-header", "table-header"), r"(?i)truncated"
    ),
    Case("truncated-in-padding", _truncated("truncated-in-padding", "padding"), r"(?i)truncated"),
    Case("truncated-gzip-fits", _truncated_gzip, r"(?i)truncated|corrupt"),
    Case("truncated-parquet", _truncated_parquet, r"(?i)parquet.*(corrupt|magic bytes)"),
    Case("zero-bytes", _raw("zero-bytes.fits", b""), r"(?i)\bempty\b|\b0 bytes\b"),
    Case(
        "not-a-fits-file",
        _raw("not-a-fits-file.fits", b"source_id,mag\n1,12.5\n"),
        r"(?i)not (appear to be )?a (valid )?FITS|no SIMPLE card",
    ),
    Case("missing-file", _missing, r"^file does not exist$"),
    Case("directory-named-like-a-frame", _directory("directory.fits"), r"(?i)is a directory"),
    Case("directory-of-frames", _directory("night-2024-01-01"), r"(?i)is a directory"),
    Case(
        "ecsv-broken-header",
        _broken_ecsv,
        r"^cannot read the table \(InconsistentTableError: unable to parse yaml in meta header\)$",
    ),
    Case("frameid-of-another-file", _same_frameid, r"^FRAMEID 'sim-\d+-\d+' is also used by /.+\.fits$"),
]


def assert_clear(reason: str, expected: str) -> None:
    """The reason states the problem (``expected``) in a line or two, without a dump of unrelated text."""
    assert re.search(expected, reason), f"{reason!r} does not match {expected!r}"
    assert len(reason) <= 300 and reason.count("\n") <= 1, f"not a short, clear message: {reason!r}"


def _frame_param(case: Case):
    marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=case.bug)] if case.bug else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.fixture(scope="module")
def template(rel_field) -> Table:
    """A good frame, to damage."""
    return Table.read(rel_field.frames[0])


def _reasons(plan, results) -> dict[str, str]:
    reasons = {path: q["reason"] for path, q in plan.quarantined.items()}
    reasons.update({r.path: r.reason for r in results if r.reason})
    return reasons


def _ingest(store, paths, catalog, strict=False):
    plan = plan_ingestion(store, paths, catalog=catalog, strict=strict)
    results = [r for batch in plan.batches for r in ingest_batch(store, batch, strict=strict)]
    return plan, results, finalize_ingestion(store, results)


def test_the_corpus_is_big_enough():
    assert len(FRAME_CASES) + len(OTHER_CASES) >= 20
    assert len({c.id for c in FRAME_CASES}) == len(FRAME_CASES)


@pytest.mark.parametrize("case", [_frame_param(c) for c in FRAME_CASES])
def test_bad_frame_is_quarantined_with_a_clear_reason(case, rel_field, template, tmp_path):
    good = rel_field.frames[:N_GOOD]
    directory = tmp_path / "bad"
    directory.mkdir()
    bad = os.path.abspath(case.build(directory, template, good))
    catalog = read_catalog(rel_field.catalog)

    # Quarantine, not failure: the bad file is set aside, every good frame is ingested exactly.
    store = tmp_path / "store.zarr"
    plan, results, summary = _ingest(store, good + [bad], catalog)
    reasons = _reasons(plan, results)
    assert set(reasons) == {bad}, reasons
    assert summary["ingested_now"] == len(good)
    group = open_store(store)
    slot = {str(f): k for k, f in enumerate(group["frame_id"][:])}
    ids = group["source_id"][:]
    mag, err, state = group["mag"][:], group["mag_err"][:], group["frame_state"][:]
    for path in good:
        frame = read_frame(path)
        k = slot[frame.header.frame_id]
        assert state[k] == INGESTED
        columns = np.searchsorted(ids, frame.header.source_id, sorter=np.argsort(ids))
        np.testing.assert_array_equal(mag[k][np.argsort(ids)[columns]], frame.mag)
        np.testing.assert_array_equal(err[k][np.argsort(ids)[columns]], frame.mag_err)
    listed = {row["path"]: row for row in frame_table(store)}
    assert listed[bad]["state"] == "quarantined" and listed[bad]["reason"] == reasons[bad]

    # Strict mode: the first bad file fails the run, named in the message.
    with pytest.raises(BadInputError) as failure:
        _ingest(tmp_path / "strict.zarr", good + [bad], catalog, strict=True)
    assert failure.value.path == bad
    assert str(failure.value) == f"{bad}: {failure.value.problem}"
    assert failure.value.problem == reasons[bad]

    # The message says what is wrong (checked last: an unclear message is the only failure of its case).
    assert_clear(reasons[bad], case.expected)


def test_the_whole_corpus_through_the_master_flow(prefect_server, rel_field, clean_run, template, tmp_path):
    """Every bad frame at once, beside the 40 good ones: the master is the clean run's, strict mode fails."""
    from flows.master_photref import build_master_photref

    directory = tmp_path / "zz-bad"  # sorts after the field's directory: the good frame keeps its FRAMEID
    directory.mkdir()
    bad = {os.path.abspath(case.build(directory, template, rel_field.frames)): case for case in FRAME_CASES}
    store, output = tmp_path / "store.zarr", tmp_path / "master.fits"
    frames = rel_field.frames + sorted(bad)
    products = build_master_photref(
        store=str(store), catalog=rel_field.catalog, output=str(output), frames=frames, plots=False
    )
    assert products["frames_included"] == len(rel_field.frames)
    assert products["frames_excluded"] == len(bad)

    got, clean = master_snapshot(output), master_snapshot(clean_run.master)
    assert_same_master(got[:-1], clean[:-1], differ=("STORE",))  # every HDU but INMASTER
    rows = set(zip(*(got[-1]["columns"][c] for c in ("frame_id", "path", "included")), strict=True))
    clean_rows = set(zip(*(clean[-1]["columns"][c] for c in ("frame_id", "path", "included")), strict=True))
    assert clean_rows <= rows
    excluded = {str(path) for _, path, included in rows - clean_rows if not included}
    assert excluded == set(bad) and len(rows - clean_rows) == len(bad)

    reasons = {row["path"]: row["reason"] for row in frame_table(store) if row["state"] == "quarantined"}
    assert set(reasons) == set(bad)
    for path, case in bad.items():
        if case.bug is None:
            assert_clear(reasons[path], case.expected)

    with pytest.raises(BadInputError) as failure:
        build_master_photref(
            store=str(tmp_path / "strict.zarr"),
            catalog=rel_field.catalog,
            output=str(tmp_path / "strict.fits"),
            frames=frames,
            strict=True,
            plots=False,
        )
    assert failure.value.path in bad
    assert not (tmp_path / "strict.fits").exists()


# --------------------------------------------------------------------------------------------------
# Catalogs, fit-terms expressions, stores: refused by the master flow before any work
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Other:
    id: str
    kind: str  # "catalog", "fit_terms" or "store"
    make: Callable  # (directory, catalog Table) -> catalog path | expression | store path
    error: type
    expected: str  # regular expression; "{}" stands for the escaped offending path or expression
    bug: str | None = None


def _catalog(name: str, mutate: Callable[[Table], Table | None]):
    def make(directory, catalog):
        table = catalog.copy()
        result = mutate(table)  # a Table of no rows is falsy: no `or` here
        table = table if result is None else result
        path = directory / name
        table.write(path)
        return path

    return make


def _catalog_raw(name: str, how: str):
    def make(directory, catalog):
        path = directory / name
        if how == "text":
            path.write_text("source_id ra dec\n1 2 3\n")
        elif how == "truncated":
            catalog.write(path)
            data = path.read_bytes()
            with fits.open(path) as hdul:
                cut = hdul[1]._data_offset + hdul[1].header["NAXIS1"] * hdul[1].header["NAXIS2"] // 2
            path.write_bytes(data[:cut])
        return path

    return make


def _expression(text: str):
    return lambda directory, catalog: text


def _store(version):
    def make(directory, catalog):
        path = directory / "store.zarr"
        group = zarr.open_group(str(path), mode="w")
        if version is None:
            group.create_array("x", shape=(2,), dtype="f8")
        else:
            group.attrs["photref_schema"] = version
        return path

    return make


def _catalog_float_ids(t):
    t["source_id"] = t["source_id"].astype(float)


def _catalog_dup_ids(t):
    t["source_id"][1] = t["source_id"][0]


# A fit-terms grammar error is refused when MasterParameters is built: pydantic names the field, then the
# parser's message follows.
IN_PARAMETERS = r"fit_terms\n  Value error, "

OTHER_CASES = [
    Other(
        "catalog-empty",
        "catalog",
        _catalog("empty.fits", lambda t: t[:0]),
        BadInputError,
        r"^{}: catalog is empty$",
    ),
    Other(
        "catalog-without-source_id",
        "catalog",
        _catalog("no-id.fits", lambda t: t.remove_column("source_id")),
        BadInputError,
        r"^{}: catalog has no 'source_id' column$",
    ),
    Other(
        "catalog-missing-file",
        "catalog",
        lambda directory, catalog: directory / "nowhere.fits",
        BadInputError,
        r"^{}: catalog file does not exist$",
    ),
    Other(
        "catalog-duplicate-ids",
        "catalog",
        _catalog("dup.fits", _catalog_dup_ids),
        BadInputError,
        r"^{}: duplicate source_id in the catalog \(1 ids repeated",
    ),
    Other(
        "catalog-float-ids",
        "catalog",
        _catalog("float.fits", _catalog_float_ids),
        BadInputError,
        r"^{}: column 'source_id' must be integer",
    ),
    Other(
        "catalog-not-a-table",
        "catalog",
        _catalog_raw("text.fits", "text"),
        BadInputError,
        r"^{}: not a FITS file \(it does not start with a SIMPLE card\)$",
    ),
    Other(
        "catalog-truncated",
        "catalog",
        _catalog_raw("truncated.fits", "truncated"),
        BadInputError,
        r"^{}: .*truncated",
    ),
    Other(
        "fit-terms-unknown-column",
        "fit_terms",
        _expression("O2{phot_g_mean_mag}*{1,colour}"),
        FitTermsError,
        r"^fit-terms expression {} uses unknown column\(s\) 'colour'; available columns: bp_rp, dec",
    ),
    Other(
        "fit-terms-dunder-attribute",
        "fit_terms",
        _expression("O1{phot_g_mean_mag.__class__}"),
        ValidationError,
        IN_PARAMETERS + r"fit-terms expression {}: the name '__class__' is not allowed",
    ),
    Other(
        "fit-terms-import",
        "fit_terms",
        _expression("{exec('import os')}"),
        ValidationError,
        IN_PARAMETERS + r"fit-terms expression {}: the name 'import' is not allowed",
    ),
    Other(
        "fit-terms-attribute-access",
        "fit_terms",
        _expression("{os.system}"),
        ValidationError,
        IN_PARAMETERS
        + r"fit-terms expression {}: cannot parse at position 3: unexpected '\.system}}' \(attribute access",
    ),
    Other(
        "fit-terms-subscript",
        "fit_terms",
        _expression("{phot_g_mean_mag[0]}"),
        ValidationError,
        IN_PARAMETERS
        + r"fit-terms expression {}: cannot parse at position 16: unexpected '\[0\]}}' \(subscripts",
    ),
    Other(
        "fit-terms-lambda",
        "fit_terms",
        _expression("{lambda: 1}"),
        ValidationError,
        IN_PARAMETERS + r"fit-terms expression {}: the name 'lambda' is not allowed",
    ),
    Other(
        "fit-terms-unknown-function",
        "fit_terms",
        _expression("O1{system(ra)}"),
        ValidationError,
        IN_PARAMETERS
        + r"fit-terms expression {}: unknown function 'system'; allowed functions: log10, log, exp",
    ),
    Other(
        "fit-terms-huge-expansion",
        "fit_terms",
        _expression("O20{ra,dec,bp_rp,pmra,pmdec}"),
        ValidationError,
        IN_PARAMETERS + r"fit-terms expression {}: expands to more than 1000 columns",
    ),
    Other(
        "store-of-another-schema-version",
        "store",
        _store(0),
        StoreError,
        r"^{}: store schema version 0, this photref reads version 1; re-ingest the frames into a new store$",
    ),
    Other(
        "store-location-not-a-photref-store",
        "store",
        _store(None),
        StoreError,
        r"^{}: exists and is not a photref store; choose an empty location$",
    ),
]


def _other_param(case: Other):
    marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=case.bug)] if case.bug else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_other_param(c) for c in OTHER_CASES])
def test_bad_catalog_expression_or_store_is_refused_before_any_work(
    prefect_server, rel_field, tmp_path, case
):
    from flows.master_photref import build_master_photref

    directory = tmp_path / "inputs"
    directory.mkdir()
    made = case.make(directory, Table.read(rel_field.catalog))
    kwargs = dict(
        store=str(tmp_path / "new.zarr"),
        catalog=rel_field.catalog,
        output=str(tmp_path / "master.fits"),
        frames=rel_field.frames,
        plots=False,
    )
    offending = str(made)
    if case.kind == "catalog":
        kwargs["catalog"] = offending
    elif case.kind == "fit_terms":
        kwargs["params"] = offending  # built inside the raises block: grammar errors are refused there
        offending = repr(offending)
    else:
        kwargs["store"] = offending
    before = sorted(p.relative_to(made) for p in Path(made).rglob("*")) if case.kind == "store" else None

    with pytest.raises(case.error) as failure:
        if case.kind == "fit_terms":
            kwargs["params"] = MasterParameters(fit_terms=kwargs["params"])
        build_master_photref(**kwargs)

    # Nothing was done: no store created, an existing store untouched, no master.
    assert not (tmp_path / "master.fits").exists()
    if case.kind == "store":
        assert sorted(p.relative_to(made) for p in Path(made).rglob("*")) == before
    else:
        assert not (tmp_path / "new.zarr").exists()
    message = str(failure.value)
    assert re.search(case.expected.format(re.escape(offending)), message), message
