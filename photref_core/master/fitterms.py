"""Fit-terms expressions (SPEC section 4): parse, expand and evaluate, safely.

A fit-terms expression says which predictors enter a linear fit, in AutoWISP's language::

    expression := product ('+' product)*
    product    := set ('*' set)*
    set        := '{' term (',' term)* '}'            literal list of terms
                | 'O' order '{' term (',' term)* '}'  all monomials of total degree <= order
    term       := arithmetic over catalog columns, `magnitude`, numbers, + - * / ** ( ),
                  and the functions log10 log exp sqrt abs sin cos tan arctan arcsin arccos

Expressions come from deployment parameters and a web UI, so they are untrusted. They are parsed with
a `lark` LALR grammar embedded below and evaluated by walking the parse tree: only numbers, column
names, the four arithmetic operators, ``**``, unary minus, parentheses and the whitelisted numpy
functions exist. Nothing is ever handed to ``eval``/``exec``/``compile``, no attribute is looked up from
user text, and anything else (attribute access, subscripts, strings, keyword arguments, unknown
functions, ...) is refused with a :class:`~photref_core.errors.FitTermsError` naming the offending text,
before any work is done.

Expansion order (the columns of :meth:`FitTerms.evaluate`, in order):

* ``O<k>{t1..tn}``: C(n+k, k) columns, the constant first, then by total degree ``d = 1..k``. Within
  one degree the power of the *last* term is the outermost loop (ascending), then recursively the
  power of the term before it, and so on; the first term takes the remaining degree. This is
  AutoWISP's order: ``O2{x,y}`` -> ``[1, x, y, x^2, x*y, y^2]``.
* ``A*B``: every pair, the column of the first factor varying fastest: ``{1,x}*{a,b}`` ->
  ``[a, x*a, b, x*b]``.
* ``A+B``: concatenation. A *constant* column (decided from the structure: all its factors have power
  0 or are the literal number 1, never by comparing values) is dropped when a constant column came
  before it anywhere in the list, so the expansion holds at most one constant column:
  ``O1{x}+O1{y}`` -> ``[1, x, y]``, ``{x}+O1{z}`` -> ``[x, 1, z]``. (AutoWISP compares values and
  gives ``[x, z]`` for the latter; SPEC 4 deliberately differs.) Decision where the spec is silent:
  the rule is applied to the whole expanded list, so a literal ``1`` repeated *within* one product
  (e.g. ``O2{1,x}``) also keeps only its first constant column.

Resource limits (so a hostile expression cannot hang or exhaust a worker): at most
:data:`MAX_EXPRESSION_LENGTH` characters, at most :data:`MAX_TERMS` expanded columns (checked before
anything is expanded), polynomial orders of at most :data:`MAX_ORDER`, and arithmetic nested at most
:data:`MAX_NESTING` deep. Numbers are float64, so ``9**9**9`` simply evaluates to ``inf``.
"""

from __future__ import annotations

import keyword
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from lark import Lark, Token, Tree
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from ..errors import FitTermsError

__all__ = [
    "DEFAULT_FIT_TERMS",
    "MAX_EXPRESSION_LENGTH",
    "MAX_NESTING",
    "MAX_ORDER",
    "MAX_TERMS",
    "FUNCTIONS",
    "FitTerms",
    "parse_fit_terms",
    "valid_expression",
]

#: AutoWISP's default fit-terms expression (a quadratic in the Gaia G magnitude).
DEFAULT_FIT_TERMS = "O2{phot_g_mean_mag}"

#: Longest expression accepted, in characters.
MAX_EXPRESSION_LENGTH = 10_000
#: Most columns an expression may expand to.
MAX_TERMS = 1000
#: Highest polynomial order accepted in ``O<k>{...}``.
MAX_ORDER = 100
#: Deepest nesting of arithmetic (parentheses, unary minus, operators) accepted inside a term.
MAX_NESTING = 100

#: The only functions a term may call, mapped to the numpy functions that evaluate them.
FUNCTIONS = {
    "log10": np.log10,
    "log": np.log,
    "exp": np.exp,
    "sqrt": np.sqrt,
    "abs": np.abs,
    "sin": np.sin,
    "cos": np.cos,
    "tan": np.tan,
    "arctan": np.arctan,
    "arcsin": np.arcsin,
    "arccos": np.arccos,
}

_GRAMMAR = r"""
    expression: product ("+" product)*
    product: set ("*" set)*
    ?set: "{" term ("," term)* "}"            -> literal_set
        | "O" ORDER "{" term ("," term)* "}"  -> poly_set

    term: sum
    ?sum: prod
        | sum "+" prod      -> add
        | sum "-" prod      -> sub
    ?prod: unary
        | prod "*" unary    -> mul
        | prod "/" unary    -> div
    ?unary: power
        | "-" unary         -> neg
    ?power: atom
        | atom "**" unary   -> pow
    ?atom: NUMBER           -> number
        | NAME              -> name
        | NAME "(" sum ")"  -> call
        | "(" sum ")"

    ORDER: /[0-9]+/
    NUMBER: /([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?/
    NAME: /[A-Za-z_][A-Za-z0-9_]*/
    %ignore /[ \t\r\n\f\v]+/
"""

_PARSER = Lark(_GRAMMAR, start="expression", parser="lalr", propagate_positions=True)

_BINARY = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide, "pow": np.power}

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _forbidden_name(name: str) -> bool:
    """Dunder-like names and Python keywords are refused outright, whatever their context."""
    return name.startswith("__") or keyword.iskeyword(name)


# AST of one term: nested tuples ('num', value) | ('var', name) | ('neg', a) | ('call', fname, a)
# | (op, a, b) with op in _BINARY. Plain tuples of str/float: hashable, picklable, inert.


@dataclass(frozen=True)
class _Term:
    """One term written inside braces."""

    text: str  # source text without whitespace
    ast: tuple
    atomic: bool  # a number, a name or a function call: needs no parentheses inside a product
    is_one: bool  # the literal number 1


# A column is a tuple of factors (term index, power >= 1); () is the constant 1.
_Column = tuple[tuple[int, int], ...]


def _fail(expression: str, position: int | None, problem: str) -> FitTermsError:
    """Build a FitTermsError quoting the expression and pointing at the offending place."""
    if len(expression) <= 200:
        message = f"fit-terms expression {expression!r}: {problem}"
        if position is not None and 0 <= position <= len(expression):
            message += f"\n    {expression}\n    {' ' * position}^"
    else:
        message = f"fit-terms expression {expression[:100]!r}... ({len(expression)} characters): {problem}"
        if position is not None:
            message += f" (near {_snippet(expression, max(0, position - 10), 40)!r})"
    return FitTermsError(message)


def _snippet(expression: str, position: int, width: int = 20) -> str:
    text = expression[position : position + width]
    return text + ("..." if position + width < len(expression) else "")


def _syntax_error(expression: str, exc: UnexpectedInput) -> FitTermsError:
    """Turn a lark error into a FitTermsError naming the offending text and its position."""
    if isinstance(exc, UnexpectedEOF):
        return _fail(expression, len(expression), "unexpected end of expression (unclosed '{' or '(')?")
    pos = exc.pos_in_stream
    if isinstance(exc, UnexpectedToken) and isinstance(exc.token, Token):
        if exc.token.type == "$END":
            return _fail(expression, len(expression), "unexpected end of expression (unclosed '{' or '(')?")
        pos = exc.token.start_pos
    if pos is None:
        pos = max(0, (exc.column or 1) - 1) if isinstance(exc.column, int) else 0
    offending = _snippet(expression, pos)
    hint = ""
    char = expression[pos : pos + 1]
    if char == "^":
        hint = " (write powers as '**')"
    elif char and char in "'\"":
        hint = " (strings are not allowed)"
    elif char == ".":
        hint = " (attribute access is not allowed)"
    elif char == "[":
        hint = " (subscripts are not allowed)"
    elif char == "=":
        hint = " (keyword arguments and assignments are not allowed)"
    elif isinstance(exc, UnexpectedCharacters):
        hint = " (not part of the fit-terms language)"
    return _fail(expression, pos, f"cannot parse at position {pos}: unexpected {offending!r}{hint}")


class _Builder:
    """Walks the lark tree (never deeper than MAX_NESTING) and builds terms and columns."""

    def __init__(self, expression: str):
        self.expression = expression
        self.terms: list[_Term] = []
        self._term_index: dict[str, int] = {}
        self.variables: set[str] = set()
        self.literal_terms: set[int] = set()  # terms written in a literal set {..}

    # --- arithmetic inside one term -----------------------------------------------------------
    def _ast(self, node, depth: int) -> tuple:
        if depth > MAX_NESTING:
            pos = node.start_pos if isinstance(node, Token) else node.meta.start_pos
            raise _fail(self.expression, pos, f"term nested more than {MAX_NESTING} levels deep")
        if isinstance(node, Token):  # pragma: no cover - the grammar wraps every token in a rule
            raise _fail(self.expression, node.start_pos, f"unexpected {str(node)!r}")
        kind = node.data
        if kind == "number":
            return ("num", float(node.children[0]))
        if kind == "name":
            token = node.children[0]
            self._check_name(token)
            self.variables.add(str(token))
            return ("var", str(token))
        if kind == "call":
            token, argument = node.children
            name = str(token)
            if name not in FUNCTIONS:
                raise _fail(
                    self.expression,
                    token.start_pos,
                    f"unknown function {name!r}; allowed functions: {', '.join(FUNCTIONS)}",
                )
            return ("call", name, self._ast(argument, depth + 1))
        if kind == "neg":
            return ("neg", self._ast(node.children[0], depth + 1))
        if kind in _BINARY:
            left, right = node.children
            return (kind, self._ast(left, depth + 1), self._ast(right, depth + 1))
        # The grammar produces nothing else; refuse rather than guess if it ever does.
        raise _fail(self.expression, node.meta.start_pos, f"unexpected construct {kind!r}")

    def _check_name(self, token: Token) -> None:
        name = str(token)
        if _forbidden_name(name):
            raise _fail(self.expression, token.start_pos, f"the name {name!r} is not allowed")

    def term(self, node: Tree) -> int:
        """Index of the term under ``node`` (a 'term' rule), adding it if new."""
        meta = node.meta
        text = "".join(self.expression[meta.start_pos : meta.end_pos].split())
        if text in self._term_index:
            # Same text, same meaning; still walk it so that its names are validated.
            self._ast(node.children[0], 1)
            return self._term_index[text]
        ast = self._ast(node.children[0], 1)
        term = _Term(
            text=text,
            ast=ast,
            atomic=ast[0] in ("num", "var", "call"),
            is_one=ast == ("num", 1.0),
        )
        self._term_index[text] = len(self.terms)
        self.terms.append(term)
        return self._term_index[text]

    # --- sets, products, sums -------------------------------------------------------------------
    def set_size(self, node: Tree) -> int:
        if node.data == "literal_set":
            return len(node.children)
        order_token, *terms = node.children
        if len(order_token) > 3 or int(order_token) > MAX_ORDER:
            raise _fail(
                self.expression,
                order_token.start_pos,
                f"polynomial order {str(order_token)!r} is too large (at most {MAX_ORDER})",
            )
        return math.comb(len(terms) + int(order_token), int(order_token))

    def set_columns(self, node: Tree) -> list[_Column]:
        if node.data == "literal_set":
            indices = [self.term(child) for child in node.children]
            self.literal_terms.update(indices)
            return [((index, 1),) for index in indices]
        order_token, *term_nodes = node.children
        indices = [self.term(child) for child in term_nodes]
        return _polynomial_columns(indices, int(order_token))

    def expression_columns(self, tree: Tree) -> list[_Column]:
        # Count first (cheaply, from the tree) so that nothing huge is ever built.
        total = 0
        for product in tree.children:
            count = 1
            for set_node in product.children:
                count *= self.set_size(set_node)
                if count > MAX_TERMS:
                    break
            total += count
            if total > MAX_TERMS:
                raise _fail(
                    self.expression,
                    product.meta.start_pos,
                    f"expands to more than {MAX_TERMS} columns; use a lower order or fewer terms",
                )
        columns: list[_Column] = []
        for product in tree.children:
            product_columns: list[_Column] = [()]
            for set_node in product.children:
                new = self.set_columns(set_node)
                # First factor varies fastest: the outer loop runs over the new (later) set.
                product_columns = [old + extra for extra in new for old in product_columns]
            columns.extend(product_columns)
        return columns


def _polynomial_columns(indices: list[int], order: int) -> list[_Column]:
    """All monomials of total degree <= ``order`` of the given terms, in AutoWISP's order.

    Within one total degree ``d``, the power of the last term is the outer loop (ascending), and the
    monomials of the remaining terms of degree ``d - p_last`` follow recursively in the same order.
    Built iteratively (no recursion over the number of terms).
    """
    # by_degree[d]: monomials of degree exactly d in the terms seen so far, as (index, power) factors.
    by_degree: list[list[_Column]] = [[((indices[0], d),) if d else ()] for d in range(order + 1)]
    for index in indices[1:]:
        by_degree = [
            [rest + (((index, p),) if p else ()) for p in range(d + 1) for rest in by_degree[d - p]]
            for d in range(order + 1)
        ]
    return [column for d in range(order + 1) for column in by_degree[d]]


def _evaluate_ast(ast: tuple, values: Mapping[str, np.ndarray]):
    kind = ast[0]
    if kind == "num":
        return np.float64(ast[1])
    if kind == "var":
        return values[ast[1]]
    if kind == "neg":
        return np.negative(_evaluate_ast(ast[1], values))
    if kind == "call":
        return FUNCTIONS[ast[1]](_evaluate_ast(ast[2], values))
    return _BINARY[kind](_evaluate_ast(ast[1], values), _evaluate_ast(ast[2], values))


def _as_float_column(name: str, column) -> np.ndarray:
    try:
        if isinstance(column, np.ma.MaskedArray):
            array = np.ma.asarray(column, dtype=np.float64).filled(np.nan)
        else:
            array = np.asarray(column, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise FitTermsError(f"column {name!r} is not numeric: {exc}") from exc
    if array.ndim != 1:
        raise ValueError(f"column {name!r} must be one-dimensional, got shape {array.shape}")
    return array


class FitTerms:
    """A parsed, validated fit-terms expression (immutable; build it with :func:`parse_fit_terms`).

    Attributes
    ----------
    expression : str
        The expression as given.
    term_names : list of str
        Human-readable text of every expanded column, in order, e.g. ``['1', 'x', 'y', 'x^2', 'x*y',
        'y^2']``. A copy is returned on each access.
    variables : frozenset of str
        The column names the expression uses (``'magnitude'`` included when used).
    """

    __slots__ = ("_expression", "_terms", "_columns", "_variables", "_names", "_rescalable")

    def __init__(
        self,
        expression: str,
        terms: list[_Term],
        columns: list[_Column],
        variables: frozenset,
        literal_terms: Iterable[int] = (),
    ):
        object.__setattr__(self, "_expression", expression)
        object.__setattr__(self, "_terms", tuple(terms))
        object.__setattr__(self, "_columns", tuple(columns))
        object.__setattr__(self, "_variables", frozenset(variables))
        object.__setattr__(self, "_names", tuple(self._column_name(column) for column in columns))
        literal = set(literal_terms)
        object.__setattr__(
            self, "_rescalable", tuple(i not in literal and not t.is_one for i, t in enumerate(terms))
        )

    def __setattr__(self, name, value):
        raise AttributeError("FitTerms is immutable")

    def __delattr__(self, name):
        raise AttributeError("FitTerms is immutable")

    def __reduce__(self):
        return (parse_fit_terms, (self._expression,))

    def __repr__(self) -> str:
        return f"FitTerms({self._expression!r}, {len(self._columns)} terms)"

    def __eq__(self, other) -> bool:
        if not isinstance(other, FitTerms):
            return NotImplemented
        return self._names == other._names and self._columns == other._columns

    def __hash__(self) -> int:
        return hash((self._names, self._columns))

    def __len__(self) -> int:
        return len(self._columns)

    @property
    def expression(self) -> str:
        """The expression as given."""
        return self._expression

    @property
    def term_names(self) -> list[str]:
        """Human-readable text of each expanded column, in order."""
        return list(self._names)

    @property
    def variables(self) -> frozenset[str]:
        """The column names used by the expression."""
        return self._variables

    @property
    def n_terms(self) -> int:
        """Number of expanded columns."""
        return len(self._columns)

    @property
    def inner_terms(self) -> list[str]:
        """The distinct terms written inside the braces (their text), in the order of
        :meth:`term_values`."""
        return [term.text for term in self._terms]

    @property
    def rescalable(self) -> np.ndarray:
        """Per inner term: whether replacing its values ``t`` by ``(t - c) / s`` leaves the span of the
        expanded columns (so a least-squares model built on them) unchanged.

        True for a term that appears only in polynomial sets ``O<k>{..}`` (the monomials of degree <= k of
        affinely mapped terms span the same space, and products and sums of such sets keep that); False
        for a term written in a literal set ``{..}`` and for the literal ``1``. A fit uses this to centre
        and scale its variables, which a design of raw magnitudes and pixel coordinates needs (condition
        number ~1e12 for ``O3{phot_g_mean_mag, x, y}`` otherwise).
        """
        return np.array(self._rescalable, dtype=bool)

    def _column_name(self, column: _Column) -> str:
        factors = [(self._terms[index], power) for index, power in column if not self._terms[index].is_one]
        if not factors:
            return "1"
        if len(factors) == 1 and factors[0][1] == 1:
            return factors[0][0].text
        parts = []
        for term, power in factors:
            text = term.text if term.atomic else f"({term.text})"
            parts.append(text if power == 1 else f"{text}^{power}")
        return "*".join(parts)

    def check_columns(self, available: Iterable[str]) -> None:
        """Check that every column the expression uses is available.

        Parameters
        ----------
        available : iterable of str
            The column names that can be used (catalog columns, plus ``'magnitude'`` where the caller
            provides it).

        Raises
        ------
        FitTermsError
            Naming the unknown column(s) and the expression.
        """
        available = set(available)
        missing = sorted(self._variables - available)
        if missing:
            shown = sorted(available)
            listing = ", ".join(shown[:50]) + (", ..." if len(shown) > 50 else "")
            raise FitTermsError(
                f"fit-terms expression {self._expression!r} uses unknown column(s) "
                f"{', '.join(repr(name) for name in missing)}; available columns: {listing or '(none)'}"
            )

    def evaluate(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """Evaluate every expanded column.

        Parameters
        ----------
        columns : mapping of str to 1-D array
            Values of the variables (e.g. catalog columns and ``'magnitude'``), one entry per star.
            Masked values (numpy masked arrays, astropy ``MaskedColumn``) count as NaN. Extra entries
            are ignored.

        Returns
        -------
        numpy.ndarray
            Float64 array of shape ``(nstars, n_terms)``. Invalid arithmetic (log of a negative,
            division by zero, overflow) gives NaN or inf without warnings; such stars simply have
            non-finite predictors.

        Raises
        ------
        FitTermsError
            When a used column is missing or not numeric, or (for an expression without variables)
            when ``columns`` is empty so the number of stars is unknown.
        ValueError
            When the used columns are not one-dimensional or differ in length.
        """
        return self.expand(self.term_values(columns))

    def term_values(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """The value of every inner term (:attr:`inner_terms`) for every star.

        Parameters
        ----------
        columns : mapping of str to 1-D array
            As :meth:`evaluate`.

        Returns
        -------
        numpy.ndarray
            Float64 array of shape ``(nstars, len(inner_terms))``; :meth:`expand` turns it into the
            expanded columns.

        Raises
        ------
        FitTermsError, ValueError
            As :meth:`evaluate`.
        """
        self.check_columns(columns.keys())
        values = {name: _as_float_column(name, columns[name]) for name in sorted(self._variables)}
        lengths = {name: array.shape[0] for name, array in values.items()}
        if lengths:
            nstars = next(iter(lengths.values()))
            if any(length != nstars for length in lengths.values()):
                raise ValueError(f"columns used by {self._expression!r} differ in length: {lengths}")
        else:
            if not len(columns):
                raise FitTermsError(
                    f"fit-terms expression {self._expression!r} uses no column: give at least one "
                    "column so that the number of stars is known"
                )
            nstars = len(np.asarray(next(iter(columns.values()))))
        result = np.empty((nstars, len(self._terms)), dtype=np.float64)
        with np.errstate(all="ignore"):
            for i, term in enumerate(self._terms):
                result[:, i] = np.asarray(_evaluate_ast(term.ast, values), dtype=np.float64)
        return result

    def expand(self, term_values: np.ndarray) -> np.ndarray:
        """The expanded columns from the inner terms' values.

        Parameters
        ----------
        term_values : numpy.ndarray
            Shape ``(..., len(inner_terms))``, e.g. from :meth:`term_values` (any leading shape: a batch
            of frames is ``(frames, stars, len(inner_terms))``).

        Returns
        -------
        numpy.ndarray
            Float64, shape ``(..., n_terms)``.
        """
        term_values = np.asarray(term_values, dtype=np.float64)
        if term_values.shape[-1] != len(self._terms):
            raise ValueError(
                f"{self._expression!r} has {len(self._terms)} inner terms, got {term_values.shape[-1]} values"
            )
        result = np.empty(term_values.shape[:-1] + (len(self._columns),), dtype=np.float64)
        # Each column is formed contiguously, then written once into its (strided) place; every power of a
        # term is computed once.
        terms = [np.ascontiguousarray(term_values[..., i]) for i in range(term_values.shape[-1])]
        powers: dict[tuple[int, int], np.ndarray] = {}
        with np.errstate(all="ignore"):
            for j, column in enumerate(self._columns):
                factors = []
                for index, power in column:
                    if (index, power) not in powers:
                        powers[index, power] = terms[index] if power == 1 else np.power(terms[index], power)
                    factors.append(powers[index, power])
                if not factors:
                    result[..., j] = 1.0
                    continue
                if len(factors) == 1:
                    result[..., j] = factors[0]
                    continue
                value = np.multiply(factors[0], factors[1])  # a new array: the rest multiply into it
                for factor in factors[2:]:
                    np.multiply(value, factor, out=value)
                result[..., j] = value
        return result


def valid_expression(expression: str) -> str:
    """``expression`` when it parses (a parameter object's validator); otherwise a ``ValueError`` with the
    :class:`FitTermsError`'s message (pydantic reports it under the field's name)."""
    try:
        parse_fit_terms(expression)
    except FitTermsError as exc:
        raise ValueError(str(exc)) from None
    return expression


def parse_fit_terms(expression: str) -> FitTerms:
    """Parse and validate a fit-terms expression (SPEC 4).

    Parameters
    ----------
    expression : str
        E.g. ``'O2{phot_g_mean_mag}'`` or ``'O1{x,y}*{1,bp_rp}+{log10(magnitude)}'``. Untrusted input
        is fine: it is never executed.

    Returns
    -------
    FitTerms
        The expansion: ``term_names``, ``variables``, and :meth:`FitTerms.evaluate`.

    Raises
    ------
    FitTermsError
        When the expression does not parse (the message names the offending text and its position),
        calls an unknown function, uses a forbidden name (Python keywords, names starting with
        ``__``), or exceeds a resource limit (:data:`MAX_EXPRESSION_LENGTH`, :data:`MAX_TERMS`,
        :data:`MAX_ORDER`, :data:`MAX_NESTING`).
    """
    if not isinstance(expression, str):
        raise FitTermsError(f"a fit-terms expression must be a string, got {type(expression).__name__}")
    if len(expression) > MAX_EXPRESSION_LENGTH:
        raise FitTermsError(
            f"fit-terms expression is {len(expression)} characters long (at most {MAX_EXPRESSION_LENGTH}): "
            f"{_snippet(expression, 0, 60)!r}"
        )
    if not expression.strip():
        raise FitTermsError("empty fit-terms expression")
    # Name forbidden identifiers (dunders, Python keywords) even where the parse would fail first.
    for match in _IDENTIFIER.finditer(expression):
        if _forbidden_name(match.group()):
            raise _fail(expression, match.start(), f"the name {match.group()!r} is not allowed")
    try:
        tree = _PARSER.parse(expression)
    except UnexpectedInput as exc:
        raise _syntax_error(expression, exc) from None
    except LarkError as exc:  # pragma: no cover - any other parser failure
        raise FitTermsError(f"fit-terms expression {expression!r}: cannot parse: {exc}") from None
    builder = _Builder(expression)
    columns = builder.expression_columns(tree)
    kept: list[_Column] = []
    seen_constant = False
    for column in columns:
        constant = all(builder.terms[index].is_one for index, _ in column)
        if constant:
            if seen_constant:
                continue
            seen_constant = True
        kept.append(column)
    return FitTerms(expression, builder.terms, kept, frozenset(builder.variables), builder.literal_terms)
