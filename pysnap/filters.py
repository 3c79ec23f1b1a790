"""containerd's filter language, in pure Python (no gRPC).

A request carries a list of filter strings.  The list is an OR of its strings
(an empty list matches everything); inside one string, ``,`` joins selectors
with AND (an empty string matches everything)::

    selectors := selector ("," selector)*
    selector  := fieldpath [operator value]
    fieldpath := field ("." field)*
    field     := [A-Za-z0-9_]+ | "double-quoted"
    operator  := "==" | "!=" | "~="
    value     := quoted | run of non-space, non-comma characters

Semantics of a selector, given ``(value, present) = adaptor(fieldpath)``:

* no operator -- ``present``;
* ``==``      -- ``present and value == wanted``;
* ``!=``      -- ``value != wanted`` (an absent field reads as ``""``);
* ``~=``      -- regular-expression search of ``wanted`` in ``value``.  A
  pattern that does not compile makes the selector false (it is logged, not
  a parse error).

Quoted strings use Go string-literal escapes.  ``"`` quotes anything; the
value of ``~=`` may also be quoted with ``/`` or ``|`` (``name~=/^c[0-9]/``).

The behaviour follows containerd 1.7 / 2.x (``filters`` / ``pkg/filters``),
including its quirks: whitespace is skipped before a token, but not where
the parser only peeks (``name==a ,b`` and a trailing blank are errors, just as
in containerd).  Known deliberate differences:

* error positions count characters, not UTF-8 bytes;
* regular expressions run on Python's :mod:`re` (with ``re.ASCII``, so that
  ``\\d``, ``\\w``, ``\\s`` and ``\\b`` are ASCII-only as in RE2) instead of Go's
  RE2: syntax only one of them accepts, ``$`` before a final newline, and
  Unicode case folding may differ;
* bytes produced by ``\\xHH`` / octal escapes that do not form valid UTF-8 are
  kept as surrogate escapes (``errors="surrogateescape"``), so they never
  equal a real (UTF-8) label value -- as in Go, where they are raw bytes.
"""

from __future__ import annotations

import enum
import logging
import re
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "ALWAYS",
    "Adaptor",
    "AllOf",
    "AnyOf",
    "Filter",
    "FilterSyntaxError",
    "Operator",
    "Selector",
    "labels_adaptor",
    "map_field",
    "parse",
    "parse_all",
    "quote",
]

log = logging.getLogger(__name__)

#: ``fieldpath -> (value, present)``; an absent field should return ``("", False)``.
Adaptor = Callable[[tuple[str, ...]], tuple[str, bool]]


class FilterSyntaxError(ValueError):
    """A filter string does not parse (containerd answers InvalidArgument).

    ``str()`` has containerd's form
    ``filters: parse error: [<before> >|<c>|< <after>]: <reason>`` (or
    ``[<input>]: <reason>`` when the error is at the end of the input).
    """

    def __init__(self, text: str, position: int, reason: str) -> None:
        self.filter = text
        self.position = position
        self.reason = reason
        if position < len(text):
            where = f"[{text[:position]} >|{text[position]}|< {text[position + 1:]}]"
        else:
            where = f"[{text}]"
        super().__init__(f"filters: parse error: {where}: {reason}")


# --------------------------------------------------------------------------- filters


class Operator(enum.Enum):
    PRESENT = "?"
    EQUAL = "=="
    NOT_EQUAL = "!="
    MATCHES = "~="


class Filter(ABC):
    """Something that decides whether an object (seen through an adaptor) matches."""

    @abstractmethod
    def match(self, adaptor: Adaptor) -> bool: ...


class _Always(Filter):
    def match(self, adaptor: Adaptor) -> bool:
        return True

    def __repr__(self) -> str:
        return "ALWAYS"


#: Matches everything (empty filter list, empty filter string).
ALWAYS: Final[Filter] = _Always()


@dataclass(frozen=True)
class AnyOf(Filter):
    """OR of its members (false when empty)."""

    members: tuple[Filter, ...]

    def match(self, adaptor: Adaptor) -> bool:
        return any(m.match(adaptor) for m in self.members)


@dataclass(frozen=True)
class AllOf(Filter):
    """AND of its members (true when empty)."""

    members: tuple[Filter, ...]

    def match(self, adaptor: Adaptor) -> bool:
        return all(m.match(adaptor) for m in self.members)


_UNCOMPILED: Final = object()
_BROKEN: Final = object()


@dataclass(frozen=True)
class Selector(Filter):
    """One ``fieldpath [op value]`` term."""

    fieldpath: tuple[str, ...]
    operator: Operator
    value: str = ""
    _regex: list = field(
        default_factory=lambda: [_UNCOMPILED], init=False, repr=False, compare=False
    )

    def _pattern(self) -> re.Pattern[str] | None:
        cached = self._regex[0]
        if cached is _UNCOMPILED:
            try:
                cached = re.compile(self.value, re.ASCII)
            except (re.error, ValueError, OverflowError, RecursionError) as exc:
                log.error("error compiling regexp %r: %s", self.value, exc)
                cached = _BROKEN
            self._regex[0] = cached
        return None if cached is _BROKEN else cached

    def match(self, adaptor: Adaptor) -> bool:
        value, present = adaptor(self.fieldpath)
        op = self.operator
        if op is Operator.PRESENT:
            return bool(present)
        if op is Operator.EQUAL:
            return bool(present) and value == self.value
        if op is Operator.NOT_EQUAL:
            return value != self.value
        if op is Operator.MATCHES:
            pattern = self._pattern()
            return pattern is not None and pattern.search(value) is not None
        return False


# --------------------------------------------------------------------------- scanner

# Pseudo-characters returned by the scanner instead of a one-character str.
_EOF: Final = -1
_ILLEGAL: Final = -2


class _Tok(enum.Enum):
    EOF = "EOF"
    ILLEGAL = "Illegal"
    QUOTED = "Quoted"
    VALUE = "Value"
    FIELD = "Field"
    SEPARATOR = "Separator"
    OPERATOR = "Operator"
    CHAR = "Char"  # any other single character (text holds it)


_QUOTES: Final = frozenset('"/|')
_SEPARATORS: Final = frozenset(",.")
_OPERATOR_CHARS: Final = frozenset("=!~")
_FIELD_CHARS: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_"
)
# Go's unicode.IsSpace: Latin-1 blanks plus the White_Space property.
_SPACES: Final = frozenset(
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_SIMPLE_ESCAPES: Final = {
    "a": 0x07,
    "b": 0x08,
    "f": 0x0C,
    "n": 0x0A,
    "r": 0x0D,
    "t": 0x09,
    "v": 0x0B,
    "\\": 0x5C,
}
_OCTAL: Final = frozenset("01234567")
_HEX: Final = frozenset("0123456789abcdefABCDEF")
_HEX_WIDTH: Final = {"x": 2, "u": 4, "U": 8}


def _is_value_char(ch: object) -> bool:
    # Letters, marks, numbers, punctuation and symbols, minus ',' and blanks.
    if not isinstance(ch, str) or ch == "," or ch in _SPACES:
        return False
    return unicodedata.category(ch)[0] in "LMNPS"


def _digit(ch: object) -> int:
    if isinstance(ch, str) and ch in _HEX:
        return int(ch, 16)
    return 16


class _Scanner:
    """Tokeniser with one character of lookahead; positions are str indexes."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0  # start of the character last read
        self.ppos = 0  # just past it
        self.in_value = False  # an operator was read: the next bare run is a value
        self.err = ""

    def _error(self, msg: str) -> None:
        if not self.err:
            self.err = msg

    def next(self) -> str | int:
        self.pos = self.ppos
        if self.ppos >= len(self.text):
            return _EOF
        ch = self.text[self.ppos]
        self.ppos += 1
        if "\ud800" <= ch <= "\udfff":
            self._error("rune error")
            return _ILLEGAL
        if ch == "\0":
            self._error("unexpected null")
            return _ILLEGAL
        return ch

    def peek(self) -> str | int:
        saved = self.pos, self.ppos
        ch = self.next()
        self.pos, self.ppos = saved
        return ch

    def scan(self) -> tuple[int, _Tok, str]:
        ch = self.next()
        start = self.pos
        while isinstance(ch, str) and ch in _SPACES:
            ch = self.next()
            start = self.pos
        if ch == _EOF:
            return self.pos, _Tok.EOF, ""
        if ch == _ILLEGAL:
            return self.pos, _Tok.ILLEGAL, ""
        assert isinstance(ch, str)
        if ch in _QUOTES:
            ok = self._scan_quoted(ch)
            return start, (_Tok.QUOTED if ok else _Tok.ILLEGAL), self.text[start : self.ppos]
        if ch in _SEPARATORS:
            self.in_value = False
            return start, _Tok.SEPARATOR, ch
        if ch in _OPERATOR_CHARS:
            while self.peek() in _OPERATOR_CHARS:
                self.next()
            self.in_value = True
            return start, _Tok.OPERATOR, self.text[start : self.ppos]
        if self.in_value:
            while _is_value_char(self.peek()):
                self.next()
            self.in_value = False
            return start, _Tok.VALUE, self.text[start : self.ppos]
        if ch in _FIELD_CHARS:
            while self.peek() in _FIELD_CHARS:
                self.next()
            return start, _Tok.FIELD, self.text[start : self.ppos]
        return self.pos, _Tok.CHAR, ch

    def _scan_quoted(self, quote: str) -> bool:
        """Find the closing quote, checking escapes; false (with err) if bad."""
        good = True
        ch = self.next()
        while ch != quote:
            if ch == "\n" or not isinstance(ch, str):
                self._error("quoted literal not terminated")
                return False
            if ch == "\\":
                ch, legal = self._scan_escape(quote)
                good = good and legal
            else:
                ch = self.next()
        return good

    def _scan_escape(self, quote: str) -> tuple[str | int, bool]:
        ch = self.next()
        if isinstance(ch, str):
            if ch in _SIMPLE_ESCAPES or ch == quote:
                return self.next(), True
            if ch in _OCTAL:
                return self._scan_digits(ch, 8, 3)
            if ch in _HEX_WIDTH:
                return self._scan_digits(self.next(), 16, _HEX_WIDTH[ch])
        self._error("illegal escape sequence")
        return ch, False

    def _scan_digits(self, ch: str | int, base: int, count: int) -> tuple[str | int, bool]:
        while count > 0 and _digit(ch) < base:
            ch = self.next()
            count -= 1
        if count > 0:
            self._error("illegal numeric escape sequence")
            return ch, False
        return ch, True


class _QuoteSyntax(Exception):
    pass


def _unquote(raw: str) -> str:
    """Decode a scanned quoted token (delimiters included), Go-literal style."""
    if len(raw) < 2 or raw[0] != raw[-1] or raw[0] not in _QUOTES:
        raise _QuoteSyntax
    delim = raw[0]
    body = raw[1:-1]
    if "\n" in body:
        raise _QuoteSyntax
    out = bytearray()
    i, n = 0, len(body)
    while i < n:
        c = body[i]
        if c == delim:
            raise _QuoteSyntax
        if c != "\\":
            out += c.encode("utf-8", "surrogatepass")
            i += 1
            continue
        if i + 1 >= n:
            raise _QuoteSyntax
        esc = body[i + 1]
        i += 2
        if esc in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[esc])
        elif esc in _HEX_WIDTH:
            width = _HEX_WIDTH[esc]
            digits = body[i : i + width]
            if len(digits) < width or not all(d in _HEX for d in digits):
                raise _QuoteSyntax
            i += width
            code = int(digits, 16)
            if esc == "x":
                out.append(code)
            elif code > 0x10FFFF:
                raise _QuoteSyntax
            else:
                if 0xD800 <= code <= 0xDFFF:
                    code = 0xFFFD  # what Go's utf8.EncodeRune writes for a surrogate
                out += chr(code).encode("utf-8")
        elif esc in _OCTAL:
            digits = body[i - 1 : i + 2]
            if len(digits) < 3 or not all(d in _OCTAL for d in digits):
                raise _QuoteSyntax
            i += 2
            code = int(digits, 8)
            if code > 0xFF:
                raise _QuoteSyntax
            out.append(code)
        elif esc in "'\"/|" and esc == delim:
            out += esc.encode()
        else:
            raise _QuoteSyntax
    return out.decode("utf-8", "surrogateescape")


# --------------------------------------------------------------------------- parser

_OPERATORS: Final = {
    "==": Operator.EQUAL,
    "!=": Operator.NOT_EQUAL,
    "~=": Operator.MATCHES,
}


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.sc = _Scanner(text)

    def fail(self, pos: int, reason: str) -> FilterSyntaxError:
        return FilterSyntaxError(self.text, pos, reason)

    def selectors(self) -> Filter:
        terms = [self.selector()]
        while True:
            nxt = self.sc.peek()
            if nxt == ",":
                self.sc.scan()
                terms.append(self.selector())
            elif nxt == _EOF:
                return AllOf(tuple(terms))
            else:
                shown = nxt if isinstance(nxt, str) else "\ufffd"
                raise self.fail(self.sc.ppos, f"unexpected input: {shown}")

    def selector(self) -> Selector:
        path = self.fieldpath()
        if self.sc.peek() in (",", _EOF):
            return Selector(path, Operator.PRESENT)
        op = self.operator()
        value = self.value(alt_quotes=op is Operator.MATCHES)
        return Selector(path, op, value)

    def fieldpath(self) -> tuple[str, ...]:
        parts = [self.field()]
        while self.sc.peek() == ".":
            self.sc.scan()
            parts.append(self.field())
        return tuple(parts)

    def field(self) -> str:
        pos, tok, text = self.sc.scan()
        if tok is _Tok.FIELD:
            return text
        if tok is _Tok.QUOTED:
            return self.unquote(pos, text, alt_quotes=False)
        if tok is _Tok.ILLEGAL:
            raise self.fail(pos, self.sc.err)
        raise self.fail(pos, "expected field or quoted")

    def operator(self) -> Operator:
        pos, tok, text = self.sc.scan()
        if tok is _Tok.OPERATOR:
            try:
                return _OPERATORS[text]
            except KeyError:
                raise self.fail(pos, f'unsupported operator "{text}"') from None
        if tok is _Tok.ILLEGAL:
            raise self.fail(pos, self.sc.err)
        raise self.fail(pos, 'expected an operator ("=="|"!="|"~=")')

    def value(self, alt_quotes: bool) -> str:
        pos, tok, text = self.sc.scan()
        if tok in (_Tok.VALUE, _Tok.FIELD):
            return text
        if tok is _Tok.QUOTED:
            return self.unquote(pos, text, alt_quotes=alt_quotes)
        if tok is _Tok.ILLEGAL:
            raise self.fail(pos, self.sc.err)
        raise self.fail(pos, "expected value or quoted")

    def unquote(self, pos: int, raw: str, alt_quotes: bool) -> str:
        if not alt_quotes and raw[0] != '"':
            raise self.fail(pos, "invalid quote encountered")
        try:
            return _unquote(raw)
        except _QuoteSyntax:
            raise self.fail(pos, "unquoting failed: quote syntax error") from None


def parse(text: str) -> Filter:
    """Parse one filter string (an AND of selectors); ``""`` matches everything."""
    if not isinstance(text, str):
        raise TypeError(f"filter must be str, not {type(text).__name__}")
    if text == "":
        return ALWAYS
    return _Parser(text).selectors()


def parse_all(filters: Sequence[str]) -> Filter:
    """Parse a request's filter list: OR over the strings; ``[]`` matches everything.

    Raises :class:`FilterSyntaxError` for the first string that does not parse.
    """
    if isinstance(filters, str):
        raise TypeError("parse_all takes a sequence of filter strings, not a str")
    if len(filters) == 0:
        return ALWAYS
    return AnyOf(tuple(parse(f) for f in filters))


# --------------------------------------------------------------------------- helpers


def quote(value: str, delimiter: str = '"') -> str:
    """Quote ``value`` so that the parser reads it back unchanged.

    Go ``strconv.Quote`` style: printable characters stay, the delimiter and
    backslash are escaped, everything else becomes ``\\a``-style, ``\\xHH``,
    ``\\uHHHH`` or ``\\UHHHHHHHH``.  ``delimiter`` is ``"`` (fields and
    values) or ``/`` / ``|`` (``~=`` values only).  Surrogate escapes
    U+DC80..U+DCFF (raw bytes, see module doc) come out as ``\\xHH``.
    """
    if delimiter not in _QUOTES:
        raise ValueError(f"delimiter must be one of {sorted(_QUOTES)}, not {delimiter!r}")
    named = {v: k for k, v in _SIMPLE_ESCAPES.items()}
    out = [delimiter]
    for ch in value:
        code = ord(ch)
        if ch == delimiter or ch == "\\":
            out.append("\\" + ch)
        elif code in named:
            out.append("\\" + named[code])
        elif 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            raise ValueError(f"cannot quote lone surrogate U+{code:04X}")
        elif ch.isprintable():
            out.append(ch)
        elif code < 0x80:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append(delimiter)
    return "".join(out)


def map_field(rest: Sequence[str], mapping: Mapping[str, str] | None) -> tuple[str, bool]:
    """Look up ``".".join(rest)`` in a label map (containerd's ``checkMap``).

    An empty or missing map makes every key absent.
    """
    if not mapping:
        return "", False
    key = ".".join(rest)
    if key in mapping:
        return mapping[key], True
    return "", False


def labels_adaptor(
    fields: Mapping[str, str], labels: Mapping[str, str] | None = None
) -> Adaptor:
    """Adaptor for an object with top-level string ``fields`` and a label map.

    ``("labels", *rest)`` reads the label ``".".join(rest)``; any other path
    reads ``fields[path[0]]`` (later path elements are ignored, as in
    containerd's adaptors); unknown names are absent.  Pass fields that
    containerd always reports even when empty, e.g. a snapshot's
    ``{"kind": "active", "name": n, "parent": ""}`` (so ``parent==""``
    selects roots), a blob's ``{"digest": d}`` or an ingest's ``{"ref": r}``.
    """

    def adapt(fieldpath: Sequence[str]) -> tuple[str, bool]:
        if not fieldpath:
            return "", False
        head = fieldpath[0]
        if head == "labels":
            return map_field(fieldpath[1:], labels)
        if head in fields:
            return fields[head], True
        return "", False

    return adapt
