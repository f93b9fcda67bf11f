"""Tests of photref_core.fitterms (SPEC 4): expansion order, evaluation, hostile input, limits."""

from __future__ import annotations

import itertools
import math
import pickle
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from photref_core.errors import FitTermsError
from photref_core.master.fitterms import DEFAULT_FIT_TERMS, MAX_TERMS, FitTerms, parse_fit_terms

RNG = np.random.default_rng(20240917)
NSTARS = 7


def random_columns(*names, n=NSTARS):
    return {name: RNG.uniform(0.5, 2.0, n) for name in names}


def check(expression, expected_names, expected_stack, columns):
    """Both the names and the evaluated columns of ``expression`` are as expected."""
    terms = parse_fit_terms(expression)
    assert terms.term_names == expected_names
    result = terms.evaluate(columns)
    assert result.dtype == np.float64
    assert result.shape == (len(next(iter(columns.values()))), len(expected_names))
    np.testing.assert_allclose(result, np.column_stack(expected_stack), rtol=1e-14, atol=0)


# --------------------------------------------------------------------------------------------------
# Expansions documented in SPEC 4
# --------------------------------------------------------------------------------------------------


def test_o2_two_variables():
    c = random_columns("x", "y")
    x, y = c["x"], c["y"]
    one = np.ones(NSTARS)
    check("O2{x,y}", ["1", "x", "y", "x^2", "x*y", "y^2"], [one, x, y, x * x, x * y, y * y], c)


def test_o3_three_variables_autowisp_order():
    c = random_columns("g", "x", "y")
    g, x, y = c["g"], c["x"], c["y"]
    one = np.ones(NSTARS)
    names = (
        "1, g, x, y, g^2, g*x, x^2, g*y, x*y, y^2, g^3, g^2*x, g*x^2, x^3, g^2*y, g*x*y, x^2*y, g*y^2, "
        "x*y^2, y^3"
    ).split(", ")
    stack = [
        one, g, x, y,
        g**2, g * x, x**2, g * y, x * y, y**2,
        g**3, g**2 * x, g * x**2, x**3, g**2 * y, g * x * y, x**2 * y, g * y**2, x * y**2, y**3,
    ]  # fmt: skip
    check("O3{g,x,y}", names, stack, c)


def test_o2_single_variable_and_o0():
    c = random_columns("x")
    x = c["x"]
    check("O2{x}", ["1", "x", "x^2"], [np.ones(NSTARS), x, x * x], c)
    check("O0{x}", ["1"], [np.ones(NSTARS)], c)
    check("O1{x}", ["1", "x"], [np.ones(NSTARS), x], c)


def test_cross_product_first_factor_fastest():
    c = random_columns("x", "a", "b")
    x, a, b = c["x"], c["a"], c["b"]
    check("{1,x}*{a,b}", ["a", "x*a", "b", "x*b"], [a, x * a, b, x * b], c)


def test_cross_product_of_polynomials():
    c = random_columns("x", "y")
    x, y = c["x"], c["y"]
    one = np.ones(NSTARS)
    check("O2{x}*O1{y}", ["1", "x", "x^2", "y", "x*y", "x^2*y"], [one, x, x * x, y, x * y, x * x * y], c)


def test_three_factor_cross_product():
    c = random_columns("a", "b", "c", "d", "e")
    a, b, cc, d, e = (c[k] for k in "abcde")
    check(
        "{a,b}*{c}*{d,e}",
        ["a*c*d", "b*c*d", "a*c*e", "b*c*e"],
        [a * cc * d, b * cc * d, a * cc * e, b * cc * e],
        c,
    )


def test_union_drops_repeated_constant_only():
    c = random_columns("x", "y", "z")
    x, y, z = c["x"], c["y"], c["z"]
    one = np.ones(NSTARS)
    check("O1{x}+O1{y}", ["1", "x", "y"], [one, x, y], c)
    # SPEC 4 deliberately differs from AutoWISP here: no constant came before, so '1' stays.
    check("{x}+O1{z}", ["x", "1", "z"], [x, one, z], c)
    check("O2{x}+{1}+O1{y}*O1{z}", ["1", "x", "x^2", "y", "z", "y*z"], [one, x, x * x, y, z, y * z], c)


def test_constant_decided_from_structure_not_values():
    # A column that happens to be all ones is not a constant column: it is kept.
    c = {"x": np.ones(NSTARS), "y": RNG.normal(size=NSTARS)}
    check("O1{x}+O1{y}", ["1", "x", "y"], [np.ones(NSTARS), c["x"], c["y"]], c)
    check("{1}+{x}+{1.0}+O1{y}", ["1", "x", "y"], [np.ones(NSTARS), c["x"], c["y"]], c)
    # A literal 2 is not the literal 1: kept.
    check("{1}+{2}", ["1", "2"], [np.ones(NSTARS), np.full(NSTARS, 2.0)], c)
    # Constant from a product of literal ones.
    check("O1{x}+{1}*{1}", ["1", "x"], [np.ones(NSTARS), c["x"]], c)


def test_default_expression():
    assert DEFAULT_FIT_TERMS == "O2{phot_g_mean_mag}"
    terms = parse_fit_terms(DEFAULT_FIT_TERMS)
    assert terms.term_names == ["1", "phot_g_mean_mag", "phot_g_mean_mag^2"]
    assert terms.variables == frozenset({"phot_g_mean_mag"})
    g = np.array([10.0, 12.5, 17.0])
    np.testing.assert_array_equal(terms.evaluate({"phot_g_mean_mag": g}), np.column_stack([g**0, g, g**2]))


def test_whitespace_ignored():
    compact = parse_fit_terms("O2{x,y}*{1,log10(z)}+{magnitude}")
    spaced = parse_fit_terms(" O 2 {\tx ,\n y } * { 1 , log10 ( z ) }\n+ { magnitude } ")
    assert compact.term_names == spaced.term_names
    c = random_columns("x", "y", "z", "magnitude")
    np.testing.assert_array_equal(compact.evaluate(c), spaced.evaluate(c))


# --------------------------------------------------------------------------------------------------
# Arithmetic inside terms
# --------------------------------------------------------------------------------------------------


def test_arithmetic_and_functions():
    c = random_columns("x", "y")
    x, y = c["x"], c["y"]
    expression = (
        "{x+y, x-y, x*y, x/y, x**y, -x, -x**2, 2**-1, (x+y)*2, 1.5e1, .5, 3., 1e-3*x,"
        " log10(x), log(x), exp(x), sqrt(x), abs(-x), sin(x), cos(x), tan(x), arctan(x),"
        " arcsin(x/4), arccos(x/4), x-y-1, x/y/2, 2**3**2}"
    )
    expected = [
        x + y, x - y, x * y, x / y, x**y, -x, -(x**2), np.full(NSTARS, 0.5), (x + y) * 2,
        np.full(NSTARS, 15.0), np.full(NSTARS, 0.5), np.full(NSTARS, 3.0), 1e-3 * x,
        np.log10(x), np.log(x), np.exp(x), np.sqrt(x), np.abs(-x), np.sin(x), np.cos(x), np.tan(x),
        np.arctan(x), np.arcsin(x / 4), np.arccos(x / 4), x - y - 1, x / y / 2, np.full(NSTARS, 512.0),
    ]  # fmt: skip
    terms = parse_fit_terms(expression)
    assert terms.variables == frozenset({"x", "y"})
    np.testing.assert_allclose(terms.evaluate(c), np.column_stack(expected), rtol=1e-14)


def test_term_names_parenthesise_compound_terms():
    terms = parse_fit_terms("O2{x + y, log10(z)}")
    assert terms.term_names == ["1", "x+y", "log10(z)", "(x+y)^2", "(x+y)*log10(z)", "log10(z)^2"]
    assert terms.variables == frozenset({"x", "y", "z"})


def test_magnitude_is_a_variable():
    terms = parse_fit_terms("O1{magnitude, bp_rp}")
    assert terms.variables == frozenset({"magnitude", "bp_rp"})
    terms.check_columns(["magnitude", "bp_rp", "ra"])


def test_invalid_values_give_nan_without_warnings():
    terms = parse_fit_terms("{log10(x), 1/x, sqrt(x)}")
    with np.errstate(all="raise"):
        out = terms.evaluate({"x": np.array([-1.0, 0.0, 4.0])})
    assert np.isnan(out[0, 0]) and out[1, 0] == -np.inf
    assert out[1, 1] == np.inf and out[2, 2] == 2.0


def test_masked_values_become_nan_and_ints_are_converted():
    terms = parse_fit_terms("O1{x}")
    masked = np.ma.masked_array([1.0, 2.0, 3.0], mask=[False, True, False])
    np.testing.assert_array_equal(terms.evaluate({"x": masked})[:, 1], [1.0, np.nan, 3.0])
    np.testing.assert_array_equal(terms.evaluate({"x": np.array([1, 2], dtype=np.int64)})[:, 1], [1.0, 2.0])


def test_constant_only_expression_takes_length_from_columns():
    out = parse_fit_terms("{1}").evaluate({"unused": np.zeros(4)})
    np.testing.assert_array_equal(out, np.ones((4, 1)))
    with pytest.raises(FitTermsError, match="number of stars"):
        parse_fit_terms("{1}").evaluate({})


def test_mismatched_column_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        parse_fit_terms("O1{x,y}").evaluate({"x": np.zeros(3), "y": np.zeros(4)})


def test_non_numeric_column():
    with pytest.raises(FitTermsError, match="'x' is not numeric"):
        parse_fit_terms("O1{x}").evaluate({"x": np.array(["a", "b"])})


# --------------------------------------------------------------------------------------------------
# Unknown columns
# --------------------------------------------------------------------------------------------------


def test_unknown_column_message_names_column_and_expression():
    terms = parse_fit_terms("O2{phot_g_mean_mag, bp_rp}*{1, foo}")
    with pytest.raises(FitTermsError) as info:
        terms.check_columns(["phot_g_mean_mag", "ra", "dec"])
    message = str(info.value)
    assert "'bp_rp'" in message and "'foo'" in message
    assert "O2{phot_g_mean_mag, bp_rp}*{1, foo}" in message
    assert "phot_g_mean_mag" in message  # the available columns are listed
    with pytest.raises(FitTermsError, match="'foo'"):
        terms.evaluate({"phot_g_mean_mag": np.zeros(2), "bp_rp": np.zeros(2)})


def test_function_name_is_not_a_variable():
    terms = parse_fit_terms("{log10(x)}")
    assert terms.variables == frozenset({"x"})
    terms.check_columns(["x"])


# --------------------------------------------------------------------------------------------------
# Hostile and broken input
# --------------------------------------------------------------------------------------------------

HOSTILE = [
    ("{__import__('os')}", "__import__"),
    ("{__import__('os').system('touch pwned')}", "__import__"),
    ("{x.__class__}", ".__class__"),
    ("{().__class__.__bases__[0].__subclasses__()}", "__class__"),
    ("{open('pwned', 'w')}", "open"),
    ("{open(x)}", "open"),
    ("{os.system}", ".system"),
    ("{system(x)}", "system"),
    ("{eval(x)}", "eval"),
    ("{exec(x)}", "exec"),
    ("{getattr(x)}", "getattr"),
    ("{compile(x)}", "compile"),
    ("{lambda: 1}", "lambda"),
    ("{lambda x: x}", "lambda"),
    ("{import os}", "import"),
    ("{x[0]}", "[0]"),
    ("{x[::-1]}", "[::-1]"),
    ("{'abc'}", "'abc'"),
    ('{"abc"}', '"abc"'),
    ("{log10(x=1)}", "=1"),
    ("{log10(x, y)}", ", y)"),
    ("{x if y else z}", "if"),
    ("{x; y}", "; y"),
    ("{x == y}", "== y"),
    ("{x @ y}", "@ y"),
    ("{x ^ 2}", "^ 2"),
    ("{x % 2}", "% 2"),
    ("{x // 2}", "/ 2"),
    ("{`x`}", "`x`"),
    ("{x}; import os", "import"),
    ("{f(x)}", "'f'"),
    ("{numpy(x)}", "numpy"),
    ("{log10}(x)", "(x)"),
    ("{x}\n__import__('os')", "__import__"),
    ("{(lambda: 0)()}", "lambda"),
    ("{x.real}", ".real"),
    ("{2x}", "x}"),
]


@pytest.mark.parametrize(("expression", "offending"), HOSTILE)
def test_hostile_expressions_refused_naming_the_text(expression, offending):
    with pytest.raises(FitTermsError) as info:
        parse_fit_terms(expression)
    assert offending in str(info.value)


BROKEN = [
    ("", "empty"),
    ("   ", "empty"),
    ("{}", "'}'"),
    ("O2{x", "end of expression"),
    ("{x", "end of expression"),
    ("{x}+", "end of expression"),
    ("{x}*", "end of expression"),
    ("{(x}", "'}'"),
    ("{x)}", ")}"),
    ("{x,,y}", ",y}"),
    ("{x,}", "}"),
    ("x", "'x'"),
    ("O{x}", "{x}"),
    ("Ox{y}", "x{y}"),
    ("O2.5{x}", ".5{x}"),
    ("({x})", "({x})"),
    ("{x}**{y}", "*{y}"),
    ("{x}-{y}", "-{y}"),
    ("{x}{y}", "{y}"),
    ("o2{x}", "o2{x}"),
    ("{1.2.3}", ".3}"),
    ("{x}}", "}"),
]


@pytest.mark.parametrize(("expression", "offending"), BROKEN)
def test_broken_expressions_refused(expression, offending):
    with pytest.raises(FitTermsError) as info:
        parse_fit_terms(expression)
    assert offending in str(info.value)


def test_syntax_error_reports_position():
    with pytest.raises(FitTermsError) as info:
        parse_fit_terms("O2{x, y.z}")
    message = str(info.value)
    assert "position 7" in message and "'.z}'" in message
    assert "O2{x, y.z}\n" in message  # the expression is echoed with a caret under the offending text
    assert message.rstrip().endswith(" " * 7 + "^")


def test_non_string_expression():
    with pytest.raises(FitTermsError, match="must be a string"):
        parse_fit_terms(["O2{x}"])


@pytest.mark.parametrize(
    "expression",
    [
        "{open('pwned', 'w')}",
        "{__import__('os').system('touch pwned')}",
        "{os.system('touch pwned')}",
        "{exec(\"open('pwned','w')\")}",
        "{(lambda: open('pwned', 'w'))()}",
    ],
)
def test_hostile_expression_has_no_side_effect(expression, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FitTermsError):
        parse_fit_terms(expression).evaluate({"x": np.zeros(2)})
    assert list(tmp_path.iterdir()) == []


def test_dunder_and_keyword_names_refused_even_as_columns():
    for expression in ["{__class__}", "{__x}", "{x + __y__}", "{None}", "{True}", "{class}"]:
        with pytest.raises(FitTermsError, match="is not allowed"):
            parse_fit_terms(expression)
    # Ordinary names that merely contain underscores, or that are numpy-ish words, are columns.
    assert parse_fit_terms("{phot_g_mean_mag, x_, _x, type, match}").variables == frozenset(
        {"phot_g_mean_mag", "x_", "_x", "type", "match"}
    )


# --------------------------------------------------------------------------------------------------
# Resource limits
# --------------------------------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_absurd_order_refused_quickly():
    started = time.perf_counter()
    with pytest.raises(FitTermsError, match=f"more than {MAX_TERMS} columns"):
        parse_fit_terms("O50{a,b,c,d,e,f,g,h}")
    with pytest.raises(FitTermsError, match="too large"):
        parse_fit_terms("O99999999999999999999999999999999999999{x}")
    with pytest.raises(FitTermsError, match="too large"):
        parse_fit_terms("O" + "9" * 5000 + "{x}")
    with pytest.raises(FitTermsError, match=f"more than {MAX_TERMS} columns"):
        parse_fit_terms("*".join(["{a,b}"] * 40))  # 2**40 columns, never built
    with pytest.raises(FitTermsError, match=f"more than {MAX_TERMS} columns"):
        parse_fit_terms("+".join(["{a,b}"] * 600))
    assert time.perf_counter() - started < 2


def test_largest_allowed_expansion():
    # C(3+12, 12) = 455 columns: accepted, and quickly.
    terms = parse_fit_terms("O12{a,b,c}")
    assert len(terms.term_names) == math.comb(15, 12)
    assert parse_fit_terms("O1{" + ",".join(f"v{i}" for i in range(999)) + "}").n_terms == 1000


@pytest.mark.timeout(10)
def test_long_and_deeply_nested_expressions():
    started = time.perf_counter()
    with pytest.raises(FitTermsError, match="characters long"):
        parse_fit_terms("{" + "x+" * 10_000 + "x}")
    with pytest.raises(FitTermsError, match="nested more than"):
        parse_fit_terms("{" + "-" * 4000 + "x}")
    with pytest.raises(FitTermsError, match="nested more than"):
        parse_fit_terms("{" + "x**" * 3000 + "x}")
    with pytest.raises(FitTermsError, match="nested more than"):
        parse_fit_terms("{" + "log(" * 1500 + "x" + ")" * 1500 + "}")
    # Redundant parentheses do not nest the evaluation: fine.
    terms = parse_fit_terms("{" + "(" * 4000 + "x" + ")" * 4000 + "}")
    np.testing.assert_array_equal(terms.evaluate({"x": np.arange(3.0)})[:, 0], [0.0, 1.0, 2.0])
    assert time.perf_counter() - started < 5


@pytest.mark.timeout(10)
def test_enormous_numbers_evaluate_to_inf_without_hanging():
    terms = parse_fit_terms("{9**9**9**9, 2**99999999999, 1e999999, " + "1" * 5000 + ", x**1e308}")
    out = terms.evaluate({"x": np.array([2.0, 3.0])})
    assert np.all(np.isinf(out))


# --------------------------------------------------------------------------------------------------
# The FitTerms object
# --------------------------------------------------------------------------------------------------


def test_fitterms_is_immutable_and_picklable():
    terms = parse_fit_terms("O2{x,y}")
    assert isinstance(terms, FitTerms)
    with pytest.raises(AttributeError):
        terms.expression = "O1{x}"
    names = terms.term_names
    names.append("junk")
    assert terms.term_names == ["1", "x", "y", "x^2", "x*y", "y^2"]
    clone = pickle.loads(pickle.dumps(terms))
    assert clone == terms and clone.expression == "O2{x,y}" and hash(clone) == hash(terms)
    assert len(terms) == terms.n_terms == 6
    assert "O2{x,y}" in repr(terms)


# --------------------------------------------------------------------------------------------------
# Property tests: O<k>{...} against an independent brute-force construction
# --------------------------------------------------------------------------------------------------


def brute_force_exponents(n, k):
    """All exponent tuples of total degree <= k, in the documented order.

    Independent definition: sort by total degree, then by the exponents read from the LAST variable
    to the second one (lexicographically ascending); the first variable takes what is left.
    """
    tuples = [e for e in itertools.product(range(k + 1), repeat=n) if sum(e) <= k]
    return sorted(tuples, key=lambda e: (sum(e), e[:0:-1]))


def monomial_name(names, exponents):
    parts = [name if p == 1 else f"{name}^{p}" for name, p in zip(names, exponents, strict=True) if p]
    return "*".join(parts) or "1"


def test_brute_force_order_reproduces_the_documented_examples():
    o2 = ["1", "x", "y", "x^2", "x*y", "y^2"]
    assert [monomial_name("xy", e) for e in brute_force_exponents(2, 2)] == o2
    assert [monomial_name("gxy", e) for e in brute_force_exponents(3, 3)] == [
        "1", "g", "x", "y", "g^2", "g*x", "x^2", "g*y", "x*y", "y^2",
        "g^3", "g^2*x", "g*x^2", "x^3", "g^2*y", "g*x*y", "x^2*y", "g*y^2", "x*y^2", "y^3",
    ]  # fmt: skip
    assert [monomial_name("x", e) for e in brute_force_exponents(1, 2)] == ["1", "x", "x^2"]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5), k=st.integers(0, 5), seed=st.integers(0, 2**32 - 1))
def test_polynomial_expansion_matches_brute_force(n, k, seed):
    names = [f"v{i}" for i in range(n)]
    terms = parse_fit_terms(f"O{k}{{{','.join(names)}}}")
    assert len(terms.term_names) == math.comb(n + k, k)
    rng = np.random.default_rng(seed)
    columns = {name: rng.uniform(0.5, 1.5, 5) for name in names}
    out = terms.evaluate(columns)
    assert out.shape == (5, math.comb(n + k, k))

    exponents = brute_force_exponents(n, k)
    expected = np.column_stack(
        [np.prod([columns[name] ** p for name, p in zip(names, e, strict=True)], axis=0) for e in exponents]
    )
    # As sets of columns: every brute-force monomial is found exactly once.
    matches = np.isclose(out[:, :, None], expected[:, None, :], rtol=1e-12, atol=0).all(axis=0)
    assert (matches.sum(axis=0) == 1).all() and (matches.sum(axis=1) == 1).all()
    # And in the documented order, with matching names.
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    assert terms.term_names == [monomial_name(names, e) for e in exponents]


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 4), min_size=1, max_size=3), seed=st.integers(0, 2**32 - 1))
def test_cross_product_matches_brute_force(sizes, seed):
    sets = [[f"s{i}_{j}" for j in range(size)] for i, size in enumerate(sizes)]
    terms = parse_fit_terms("*".join("{" + ",".join(s) + "}" for s in sets))
    rng = np.random.default_rng(seed)
    columns = {name: rng.uniform(0.5, 1.5, 4) for s in sets for name in s}
    # First factor fastest == itertools.product over the reversed sets, each combination reversed.
    combos = [combo[::-1] for combo in itertools.product(*sets[::-1])]
    assert terms.term_names == ["*".join(combo) for combo in combos]
    expected = np.column_stack([np.prod([columns[name] for name in combo], axis=0) for combo in combos])
    np.testing.assert_allclose(terms.evaluate(columns), expected, rtol=1e-13)
