"""Tests of photref_core.master: the master photometric reference and the statistics table files."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import xarray as xr
from astropy.io import fits
from astropy.table import MaskedColumn, Table

from photref_core import SOFTWARE
from photref_core import _atomic as atomic_mod
from photref_core.errors import BadInputError, PhotrefError
from photref_core.master.fits import (
    HEADER_KEYS,
    STAT_VECTOR_COLUMNS,
    read_master,
    statistics_table,
    write_master,
    write_statistics_table,
)

P = 3

# Typical Gaia DR3 ids (up to ~7e18), small ids, and ids at and above 2**63 (not representable as int64,
# nor exactly as float64).
SOURCE_IDS = [
    6917528997577384320,
    4295806720,
    2**63,
    2**64 - 1,
    2**63 - 1,
    2**63 + 12345,
    1,
    5853498713190525696,
    4611686018427387905,  # 2**62 + 1: differs from its float64 rounding
    6917528997577384321,  # neighbour of the first: a float would merge them
    12345678901234567890,
    42,
]
N = len(SOURCE_IDS)
NOT_IN_CATALOG = 5853498713190525696

LONG_FITTERMS = "O3{phot_g_mean_mag, bp_rp, ra * cos(dec / 57.29577951308232)} + " + " + ".join(
    f"{{log10(abs(pmra) + {k})}}" for k in range(12)
)
LONG_STORE = (
    "/data/survey/" + "/".join(f"field_{k:03d}_with_a_long_directory_name" for k in range(8)) + "/s.zarr"
)


def _in_master() -> np.ndarray:
    """The (source, photometry) master membership, in SOURCE_IDS order."""
    flags = np.ones((N, P), dtype=bool)
    flags[1, 0] = False
    flags[2, 1] = False
    flags[3, 2] = False
    flags[11, :] = False  # in no master
    flags[SOURCE_IDS.index(NOT_IN_CATALOG), :] = False  # not in the catalog: never in the master
    flags[10, 0] = flags[10, 2] = False
    return flags


def make_stats(id_dtype=np.uint64, ids=None, seed=3) -> xr.Dataset:
    """A hand-made statistics Dataset, sources in a random order."""
    ids = SOURCE_IDS if ids is None else ids
    n = len(ids)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    source_ids = np.array(ids, dtype=np.uint64)[perm].astype(id_dtype)

    def ints(low, high):
        return rng.integers(low, high, size=(n, P)).astype(np.int64)

    def floats(low, high):
        return rng.uniform(low, high, size=(n, P))

    in_master = _in_master()[perm]
    in_catalog = np.array([ids[k] != NOT_IN_CATALOG for k in perm])
    dims = ("source", "photometry")
    data = {
        "full_count": (dims, ints(50, 100)),
        "rejected_count": (dims, ints(30, 50)),
        "magnitude": (dims, floats(8, 16)),
        "mediandev": (dims, floats(0.001, 0.1)),
        "medianmeddev": (dims, floats(0.001, 0.1)),
        "mag_err_full_count": (dims, ints(50, 100)),
        "mag_err_rejected_count": (dims, ints(30, 50)),
        "mag_err": (dims, floats(0.001, 0.05)),
        "mag_err_mediandev": (dims, floats(0.0001, 0.01)),
        "mag_err_medianmeddev": (dims, floats(0.0001, 0.01)),
        "enough": (dims, in_master | (rng.uniform(size=(n, P)) > 0.5)),
        "scatter_excess": (dims, floats(-0.5, 0.5)),
        "in_master": (dims, in_master),
        "in_catalog": (("source",), in_catalog),
    }
    return xr.Dataset(data, coords={"source_id": (("source",), source_ids)})


def make_frames() -> Table:
    return Table(
        {
            "frame_id": ["f001", "f002", "frame-é-003"],
            "path": ["/data/raw/f001.fits", "/data/raw/f002.fits", "/data/raw/été/f003.fits"],
            "included": [True, False, True],
        }
    )


def make_header() -> dict:
    return {
        "FITTERMS": LONG_FITTERMS,
        "MINOBSFR": 0.5,
        "OUTL_AVG": "median",
        "OUTL_THR": 5.0,
        "MAXREJIT": 20,
        "STATTHR": 5.0,
        "STATITER": 10,
        "STATCEN": "median",
        "STATUNIT": "meddev",
        "SCATQTY": "medianmeddev",
        "NFRAMES": 2,
        "SOFTWARE": SOFTWARE,
        "STORE": LONG_STORE,
    }


def make_catalog() -> Table:
    ids = [i for i in SOURCE_IDS if i != NOT_IN_CATALOG] + [777]  # 777: catalog star never seen
    n = len(ids)
    rng = np.random.default_rng(7)
    return Table(
        {
            "source_id": np.array(ids, dtype=np.uint64)[::-1],
            "phot_g_mean_mag": rng.uniform(8, 16, n),
            "bp_rp": rng.uniform(0, 2, n),
            "nobs": np.arange(n, dtype=np.int64),
            "flagname": [f"q{k}" for k in range(n)],
        }
    )


@pytest.fixture
def stats():
    return make_stats()


@pytest.fixture
def master_path(tmp_path, stats):
    path = tmp_path / "master_iter000.fits"
    write_master(
        path,
        stats,
        make_frames(),
        make_header(),
        extra_header={"FIELD": ("TEST01", "field name"), "EXPTIME": 30.0, "NAXIS": 2},
    )
    return path


def _by_id(stats: xr.Dataset) -> dict[int, int]:
    """Map source id (Python int) -> position in the dataset."""
    return {int(v): k for k, v in enumerate(stats["source_id"].values)}


# --------------------------------------------------------------------------------------------------------
# layout and header


def test_hdu_layout(master_path):
    with fits.open(master_path) as hdul:
        assert len(hdul) == P + 2
        assert isinstance(hdul[0], fits.PrimaryHDU)
        assert hdul[0].data is None
        assert hdul[0].header["NAXIS"] == 0
        for p in range(P):
            hdu = hdul[p + 1]
            assert isinstance(hdu, fits.BinTableHDU)
            assert hdu.header["EXTNAME"] == "MPHOTREF"
            assert hdu.header["EXTVER"] == p + 1
            assert hdul["MPHOTREF", p + 1] is hdu
        assert hdul[-1].name == "INMASTER"
        assert isinstance(hdul[-1], fits.BinTableHDU)
    assert master_path.exists()
    assert os.listdir(master_path.parent) == [master_path.name]  # no temporary file left behind


def test_primary_header(master_path):
    with fits.open(master_path) as hdul:
        header = hdul[0].header
        raw = header.tostring()
    expected = make_header()
    for key in HEADER_KEYS:
        assert header[key] == expected[key], key
        assert header.comments[key], key  # every keyword documented
    # Long strings survive through the CONTINUE convention.
    assert len(LONG_FITTERMS) > 300 and len(LONG_STORE) > 300
    assert "CONTINUE" in raw
    # extra_header first (structural keywords dropped), then the keywords in order.
    keys = [
        k for k in header.keys() if k not in ("SIMPLE", "BITPIX", "NAXIS", "EXTEND", "CHECKSUM", "DATASUM")
    ]
    assert keys[:2] == ["FIELD", "EXPTIME"]
    assert keys[2 : 2 + len(HEADER_KEYS)] == list(HEADER_KEYS)
    assert header["FIELD"] == "TEST01" and header.comments["FIELD"] == "field name"
    assert header["EXPTIME"] == 30.0


def test_header_from_fits_header_and_software_default(tmp_path, stats):
    extra = fits.Header()
    extra["OBSERVER"] = ("someone", "who")
    extra["BITPIX"] = 16
    extra["NAXIS1"] = 100
    extra["HISTORY"] = "made by hand"
    header = make_header()
    del header["SOFTWARE"]
    header["MYKEY"] = 7
    path = write_master(tmp_path / "m.fits", stats, make_frames(), header, extra_header=extra)
    hdr = read_master(path)["header"]
    assert hdr["OBSERVER"] == "someone" and hdr.comments["OBSERVER"] == "who"
    assert hdr["BITPIX"] == 8 and "NAXIS1" not in hdr
    assert "made by hand" in str(hdr["HISTORY"])
    assert hdr["SOFTWARE"] == SOFTWARE
    assert hdr["MYKEY"] == 7


def test_missing_header_key(tmp_path, stats):
    header = make_header()
    del header["SCATQTY"]
    with pytest.raises(PhotrefError, match="SCATQTY"):
        write_master(tmp_path / "m.fits", stats, make_frames(), header)
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------------------
# photometry tables


@pytest.mark.parametrize("transpose", [False, True])
def test_rows_are_master_stars_sorted(tmp_path, stats, transpose):
    if transpose:  # dims in the other order, dask-backed: same file
        stats = stats.transpose("photometry", "source").chunk({"source": 5})
    path = write_master(tmp_path / "m.fits", stats, make_frames(), make_header())
    stats = stats.compute()
    pos = _by_id(stats)
    values = {name: stats[name].transpose("source", "photometry").values for name in STAT_VECTOR_COLUMNS}
    in_master = _in_master()
    with fits.open(path) as hdul:
        for p in range(P):
            data = hdul[p + 1].data
            ids = [int(v) for v in data["source_id"]]
            expected = sorted(i for k, i in enumerate(SOURCE_IDS) if in_master[k, p])
            assert ids == expected
            for row, source_id in enumerate(ids):
                k = pos[source_id]
                for name in (
                    "full_count",
                    "rejected_count",
                    "magnitude",
                    "mediandev",
                    "medianmeddev",
                    "scatter_excess",
                    "mag_err",
                ):
                    assert data[name][row] == values[name][k, p], name


def test_column_formats_and_dtypes(master_path):
    with fits.open(master_path) as hdul:
        for p in range(P):
            hdu = hdul[p + 1]
            columns = hdu.columns
            assert columns.names == [
                "source_id",
                "full_count",
                "rejected_count",
                "magnitude",
                "mediandev",
                "medianmeddev",
                "scatter_excess",
                "mag_err",
            ]
            formats = {c.name: c.format for c in columns}
            assert formats["source_id"] == "K" and columns["source_id"].bzero == 2**63
            assert hdu.header["TZERO1"] == 2**63
            assert formats["full_count"] == "K" and formats["rejected_count"] == "K"
            for name in ("magnitude", "mediandev", "medianmeddev", "scatter_excess", "mag_err"):
                assert formats[name] == "D"
            data = hdu.data
            assert data["source_id"].dtype == np.uint64
            assert data["full_count"].dtype.kind == "i" and data["full_count"].dtype.itemsize == 8
            assert data["magnitude"].dtype.kind == "f" and data["magnitude"].dtype.itemsize == 8


def test_ids_stored_exactly_on_disk(master_path):
    """The raw K column holds id - 2**63 as a big-endian int64: no float anywhere."""
    with fits.open(master_path) as hdul:
        nrows = [hdul[p + 1].header["NAXIS2"] for p in range(P)]
        width = [hdul[p + 1].header["NAXIS1"] for p in range(P)]
        locations = [hdul.fileinfo(p + 1)["datLoc"] for p in range(P)]
        decoded = [[int(v) for v in hdul[p + 1].data["source_id"]] for p in range(P)]
    raw = master_path.read_bytes()
    for p in range(P):
        block = np.frombuffer(raw, dtype=np.uint8, count=nrows[p] * width[p], offset=locations[p])
        stored = block.reshape(nrows[p], width[p])[:, :8].copy().view(">i8").ravel()
        assert [int(v) + 2**63 for v in stored] == decoded[p]
    everything = set().union(*map(set, decoded))
    assert {2**63, 2**64 - 1, 2**63 - 1, 2**63 + 12345, 4611686018427387905} <= everything
    assert {6917528997577384320, 6917528997577384321} <= everything


def test_int64_source_ids(tmp_path):
    ids = [i for i in SOURCE_IDS if i < 2**63]
    stats = make_stats(id_dtype=np.int64, ids=ids)
    path = write_master(tmp_path / "m.fits", stats, make_frames(), make_header())
    got = read_master(path)["photometries"]
    everything = set().union(*({int(v) for v in t["source_id"]} for t in got))
    assert 2**63 - 1 in everything and 6917528997577384321 in everything
    assert all(t["source_id"].dtype == np.uint64 for t in got)


def test_empty_photometry(tmp_path, stats):
    stats = stats.copy(deep=True)
    stats["in_master"][:, 1] = False
    path = write_master(tmp_path / "m.fits", stats, make_frames(), make_header())
    tables = read_master(path)["photometries"]
    assert [len(t) for t in tables][1] == 0
    assert tables[1].colnames[0] == "source_id"


def test_bad_source_ids(tmp_path, stats):
    negative = stats.assign_coords(source_id=("source", np.arange(-1, N - 1, dtype=np.int64)))
    with pytest.raises(BadInputError, match="negative"):
        write_master(tmp_path / "m.fits", negative, make_frames(), make_header())
    floats = stats.assign_coords(source_id=("source", np.arange(N, dtype=np.float64)))
    with pytest.raises(BadInputError, match="integers"):
        write_master(tmp_path / "m.fits", floats, make_frames(), make_header())
    duplicated = stats.assign_coords(source_id=("source", np.array([7] * N, dtype=np.uint64)))
    with pytest.raises(PhotrefError, match="duplicate"):
        write_master(tmp_path / "m.fits", duplicated, make_frames(), make_header())
    with pytest.raises(PhotrefError, match="in_master"):
        write_master(tmp_path / "m.fits", stats.drop_vars("in_master"), make_frames(), make_header())
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------------------
# INMASTER and our reader


def test_inmaster_hdu(master_path):
    with fits.open(master_path) as hdul:
        frames = hdul["INMASTER"]
        assert frames.columns.names == ["frame_id", "path", "included"]
        assert len(frames.data) == 3
        assert list(frames.data["included"]) == [True, False, True]
    got = read_master(master_path)["frames"]
    assert list(got["frame_id"]) == ["f001", "f002", "frame-é-003"]
    assert list(got["path"]) == ["/data/raw/f001.fits", "/data/raw/f002.fits", "/data/raw/été/f003.fits"]
    assert got["included"].dtype == bool


def test_relative_frame_paths_become_absolute(tmp_path, stats):
    frames = Table({"frame_id": ["a"], "path": ["rel/a.fits"], "included": [True]})
    path = write_master(tmp_path / "m.fits", stats, frames, make_header())
    assert path.is_absolute() and path.name == "m.fits"
    got = read_master(path)["frames"]
    assert got["path"][0] == os.path.abspath("rel/a.fits")


def test_read_master(master_path, stats):
    got = read_master(master_path)
    assert got["header"]["FITTERMS"] == LONG_FITTERMS
    assert len(got["photometries"]) == P
    pos = _by_id(stats)
    for p, table in enumerate(got["photometries"]):
        assert table["source_id"].dtype == np.uint64
        for row in table:
            k = pos[int(row["source_id"])]
            assert row["magnitude"] == stats["magnitude"].values[k, p]
            assert row["mag_err"] == stats["mag_err"].values[k, p]


def test_read_master_errors(tmp_path):
    with pytest.raises(BadInputError, match="nothing.fits"):
        read_master(tmp_path / "nothing.fits")
    junk = tmp_path / "junk.fits"
    junk.write_bytes(b"this is not FITS" * 200)
    with pytest.raises(BadInputError, match="junk.fits"):
        read_master(junk)
    image = tmp_path / "image.fits"
    fits.PrimaryHDU(np.zeros((4, 4))).writeto(image)
    with pytest.raises(BadInputError, match="MPHOTREF"):
        read_master(image)


# --------------------------------------------------------------------------------------------------------
# AutoWISP compatibility


def autowisp_style_reader(fname) -> dict:
    """Read a master the way AutoWISP v2.3.0's ``get_master_photref`` does (independent re-implementation).

    Mirrors ``autowisp/magnitude_fitting/util.py::get_master_photref`` (v2.3.0):
    * opens the file with ``astropy.io.fits.open`` and looks only at the HDUs after the primary whose name is
      ``MPHOTREF`` or empty (so our trailing ``INMASTER`` HDU is skipped); P = their number, and the n-th of
      them (file order) is photometry n;
    * takes ids from the ``source_id`` column (its fallback, the HAT-style IDprefix/IDfield/IDsource triple,
      is for old masters and does not apply here);
    * returns {source_id: {"mag": (1, P) array, "mag_err": (1, P) array}}, NaN where the star is not in that
      photometry's table, "mag" from column ``magnitude`` and -- note -- "mag_err" from column
      ``mediandev`` (not from our ``mag_err`` column).
    """
    out = {}
    with fits.open(fname, "readonly") as hdul:
        tables = [h for h in list(hdul)[1:] if h.name in ("MPHOTREF", "")]
        nphot = len(tables)
        for index, table in enumerate(tables):
            data = table.data
            assert "source_id" in data.dtype.names
            for sid, magnitude, mediandev in zip(
                data["source_id"], data["magnitude"], data["mediandev"], strict=True
            ):
                entry = out.setdefault(
                    sid, {"mag": np.full((1, nphot), np.nan), "mag_err": np.full((1, nphot), np.nan)}
                )
                entry["mag"][0, index] = magnitude
                entry["mag_err"][0, index] = mediandev
    return out


def test_autowisp_reader_reads_master(master_path, stats):
    result = autowisp_style_reader(master_path)
    in_master = _in_master()
    expected_ids = {i for k, i in enumerate(SOURCE_IDS) if in_master[k].any()}
    assert {int(k) for k in result} == expected_ids
    assert all(isinstance(k, np.uint64) for k in result)  # keys are the exact unsigned ids
    pos = _by_id(stats)
    for key, entry in result.items():
        k = pos[int(key)]
        kk = SOURCE_IDS.index(int(key))
        assert entry["mag"].shape == (1, P) and entry["mag_err"].shape == (1, P)
        for p in range(P):
            if in_master[kk, p]:
                assert entry["mag"][0, p] == stats["magnitude"].values[k, p]
                assert entry["mag_err"][0, p] == stats["mediandev"].values[k, p]
            else:
                assert np.isnan(entry["mag"][0, p]) and np.isnan(entry["mag_err"][0, p])
    # The Python-int spelling of an id above 2**63 finds the entry (numpy.uint64 hashes like the int).
    assert 2**64 - 1 in result and 2**63 + 12345 in result


# --------------------------------------------------------------------------------------------------------
# statistics table


def test_statistics_table(stats):
    catalog = make_catalog()
    table = statistics_table(stats, catalog)
    assert len(table) == N
    assert [int(v) for v in table["source_id"]] == sorted(SOURCE_IDS)
    assert table["source_id"].dtype == np.uint64
    assert table.colnames == [
        "source_id",
        *STAT_VECTOR_COLUMNS,
        "in_catalog",
        "phot_g_mean_mag",
        "bp_rp",
        "nobs",
        "flagname",
    ]
    pos = _by_id(stats)
    order = [pos[int(v)] for v in table["source_id"]]
    for name in STAT_VECTOR_COLUMNS:
        assert table[name].shape == (N, P), name
        np.testing.assert_array_equal(np.asarray(table[name]), stats[name].values[order])
    assert table["enough"].dtype == bool and table["in_master"].dtype == bool
    assert table["full_count"].dtype == np.int64
    missing = [int(v) for v in table["source_id"]].index(NOT_IN_CATALOG)
    assert not table["in_catalog"][missing] and table["in_catalog"].sum() == N - 1
    cat_by_id = {int(r["source_id"]): r for r in catalog}
    for row in table:
        sid = int(row["source_id"])
        if sid == NOT_IN_CATALOG:
            assert row["phot_g_mean_mag"] is np.ma.masked
            assert np.isnan(np.ma.getdata(table["phot_g_mean_mag"])[missing])
            assert row["nobs"] is np.ma.masked and row["flagname"] is np.ma.masked
        else:
            assert row["phot_g_mean_mag"] == cat_by_id[sid]["phot_g_mean_mag"]
            assert row["nobs"] == cat_by_id[sid]["nobs"]
            assert row["flagname"] == cat_by_id[sid]["flagname"]
    assert 777 not in {int(v) for v in table["source_id"]}


def test_statistics_table_without_catalog_and_name_clash(stats):
    table = statistics_table(stats, None)
    assert table.colnames == ["source_id", *STAT_VECTOR_COLUMNS, "in_catalog"]
    catalog = Table({"source_id": np.array(SOURCE_IDS, dtype=np.uint64), "magnitude": np.ones(N)})
    clash = statistics_table(stats, catalog)
    assert clash.colnames[-1] == "catalog_magnitude"
    empty = statistics_table(stats, catalog[:0])
    assert np.all(empty["catalog_magnitude"].mask)


def test_statistics_table_bad_catalog(stats):
    with pytest.raises(BadInputError, match="source_id"):
        statistics_table(stats, Table({"ra": [1.0]}))
    dup = Table({"source_id": np.array([42, 42], dtype=np.int64), "ra": [1.0, 2.0]})
    with pytest.raises(BadInputError, match="duplicate"):
        statistics_table(stats, dup)


def test_write_statistics_table(tmp_path, stats):
    catalog = make_catalog()
    catalog["flagname"][1] = "qé"  # (source 42) non-ASCII text survives (UTF-8)
    catalog["nobs"][2] = 999999  # astropy's default null value: must stay a value
    catalog["flag"] = MaskedColumn([True] * len(catalog), mask=[False] * len(catalog))
    path = write_statistics_table(tmp_path / "mfit_stat.fits", stats, catalog)
    assert os.listdir(tmp_path) == ["mfit_stat.fits"]
    with fits.open(path) as hdul:
        assert hdul[1].name == "STATISTICS"
        assert hdul[1].columns["source_id"].format == "K" and hdul[1].columns["source_id"].bzero == 2**63
    got = Table.read(path)
    expected = statistics_table(stats, catalog)
    assert [int(v) for v in got["source_id"]] == sorted(SOURCE_IDS)
    assert got.colnames == expected.colnames
    for name in STAT_VECTOR_COLUMNS:
        assert got[name].shape == (N, P)
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(expected[name]))
    missing = [int(v) for v in got["source_id"]].index(NOT_IN_CATALOG)
    assert np.isnan(got["phot_g_mean_mag"][missing]) or got["phot_g_mean_mag"].mask[missing]
    assert got["nobs"].mask[missing] and got["nobs"].mask.sum() == 1
    assert 999999 in list(got["nobs"].compressed())
    assert not got["flag"][missing] and got["flag"].sum() == N - 1  # FITS L has no null: false there
    flagnames = [v.decode("utf-8") if isinstance(v, bytes) else v for v in got["flagname"].filled(b"")]
    assert "qé" in flagnames


def test_statistics_table_single_photometry(tmp_path, stats):
    one = stats.isel(photometry=[0])
    path = write_statistics_table(tmp_path / "stat.fits", one, None)
    got = Table.read(path)
    assert got["magnitude"].shape == (N, 1)


# --------------------------------------------------------------------------------------------------------
# atomic writes


def _old_master(tmp_path):
    path = tmp_path / "master.fits"
    stats = make_stats(seed=11)
    write_master(path, stats, make_frames(), make_header())
    return path, path.read_bytes()


def test_atomic_replace_failure_keeps_old_master(tmp_path, monkeypatch):
    path, before = _old_master(tmp_path)
    seen = []

    def failing_replace(src, dst):
        seen.append(os.fspath(src))
        # The temporary file is complete and lives beside the destination.
        assert os.path.dirname(os.fspath(src)) == os.path.dirname(os.fspath(dst))
        assert len(read_master(src)["photometries"]) == P
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(atomic_mod.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        write_master(path, make_stats(seed=12), make_frames(), make_header())
    monkeypatch.undo()
    assert re.fullmatch(rf"\.master\.fits\.tmp-{os.getpid()}-[0-9a-f]+", os.path.basename(seen[0]))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["master.fits"]


def test_atomic_partial_write_keeps_old_master(tmp_path, monkeypatch):
    path, before = _old_master(tmp_path)

    def half_write(self, fileobj, *args, **kwargs):
        fileobj.write(b"SIMPLE  =                    T" + b" " * 2000)
        fileobj.flush()
        raise OSError("simulated disk full")

    monkeypatch.setattr(fits.HDUList, "writeto", half_write)
    with pytest.raises(OSError, match="disk full"):
        write_master(path, make_stats(seed=12), make_frames(), make_header())
    with pytest.raises(OSError, match="disk full"):
        write_statistics_table(tmp_path / "stat.fits", make_stats(seed=12), None)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["master.fits"]
    assert len(read_master(path)["photometries"]) == P


def test_overwrite(tmp_path):
    path, before = _old_master(tmp_path)
    with pytest.raises(FileExistsError):
        write_master(path, make_stats(seed=12), make_frames(), make_header(), overwrite=False)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["master.fits"]
    write_master(path, make_stats(seed=12), make_frames(), make_header())
    assert path.read_bytes() != before
    fresh = tmp_path / "sub" / "new.fits"
    write_master(fresh, make_stats(seed=12), make_frames(), make_header(), overwrite=False)
    assert os.listdir(fresh.parent) == ["new.fits"]


def test_write_group_lays_out_what_to_zarr_does(tmp_path):
    """Result groups are written with zarr's async API for speed; xarray must see exactly what
    ``Dataset.to_zarr`` would have written (same arrays, metadata, attributes, values)."""
    import json

    import xarray as xr
    import zarr

    from photref_core.store.groups import load_group, write_group

    rng = np.random.default_rng(3)
    values = rng.normal(size=(5, 2))
    values[1, 0] = np.nan
    ds = xr.Dataset(
        {
            "magnitude": (("source", "photometry"), values),
            "full_count": (("source", "photometry"), rng.integers(0, 9, (5, 2))),
            "enough": (("source", "photometry"), values > 0),
            "rms": ("photometry", np.array([0.1, np.nan], dtype=np.float32)),
            "coefficients": (("photometry", "term"), rng.normal(size=(2, 3))),
        },
        coords={
            "source_id": ("source", np.arange(5, dtype=np.uint64) + 10**18),
            "term_name": ("term", np.array(["1", "x", "y"], dtype=object)),
        },
        attrs={"kind": "photref statistics", "parameters": {"outlier_threshold": 5.0}},
    )
    for name in ("a", "b"):
        zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="w")
    ds.to_zarr(tmp_path / "a.zarr", group="results/g", mode="w", consolidated=False)
    write_group(tmp_path / "b.zarr", "results/g", ds)
    assert load_group(tmp_path / "b.zarr", "results/g").identical(
        load_group(tmp_path / "a.zarr", "results/g")
    )
    for variable in ds.variables:
        a, b = (json.loads((tmp_path / f"{n}.zarr/results/g/{variable}/zarr.json").read_text()) for n in "ab")
        for key in (
            "data_type",
            "shape",
            "fill_value",
            "attributes",
            "dimension_names",
            "chunk_grid",
            "codecs",
        ):
            assert a[key] == b[key], (variable, key)
    a, b = (json.loads((tmp_path / f"{n}.zarr/results/g/zarr.json").read_text()) for n in "ab")
    assert a["attributes"] == b["attributes"]
