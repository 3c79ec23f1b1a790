"""Unit tests for pysnap.filters (containerd's filter language)."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pysnap.filters import (
    ALWAYS,
    Filter,
    FilterSyntaxError,
    Operator,
    Selector,
    labels_adaptor,
    map_field,
    parse,
    parse_all,
    quote,
)

# --------------------------------------------------------------------------- helpers

GC_ROOT = {"containerd.io/gc.root": "check-walk"}

# The snapshots created by containerd's snapshot testsuite Walk test:
# name -> (kind, parent, labels)
WALK_CORPUS: dict[str, tuple[str, str, dict[str, str]]] = {
    "a-np": ("active", "", GC_ROOT),
    "p": ("committed", "", GC_ROOT),
    "a": ("active", "p", GC_ROOT),
    "v": ("view", "p", GC_ROOT),
    "p-wl": ("committed", "", {"l": "1", **GC_ROOT}),
    "a-wl": ("active", "p-wl", {"l": "2", **GC_ROOT}),
    "v-wl": ("view", "p-wl", {"l": "3", **GC_ROOT}),
    "a-np-wl": ("active", "", {"l": "2", **GC_ROOT}),
}


def snapshot_adaptor(name: str, kind: str, parent: str, labels: dict[str, str]):
    return labels_adaptor({"kind": kind, "name": name, "parent": parent}, labels)


def walk(*filters: str) -> set[str]:
    flt = parse_all(list(filters))
    return {
        name
        for name, (kind, parent, labels) in WALK_CORPUS.items()
        if flt.match(snapshot_adaptor(name, kind, parent, labels))
    }


def obj(fields: dict[str, str] | None = None, labels: dict[str, str] | None = None):
    return labels_adaptor(fields or {}, labels)


def matches(text: str, adaptor) -> bool:
    return parse_all([text]).match(adaptor)


def error_of(text: str) -> FilterSyntaxError:
    with pytest.raises(FilterSyntaxError) as info:
        parse_all([text])
    return info.value


def selector_value(text: str) -> str:
    flt = parse(text)
    (sel,) = flt.members  # type: ignore[attr-defined]
    return sel.value


# --------------------------------------------------------------------------- Walk test cases


def test_walk_gc_root_label_selects_all_snapshots():
    assert walk('labels."containerd.io/gc.root"==check-walk') == set(WALK_CORPUS)


def test_walk_kind_active_and_label():
    assert walk('kind==active,labels."containerd.io/gc.root"==check-walk') == {
        "a-np",
        "a",
        "a-wl",
        "a-np-wl",
    }


def test_walk_kind_view_and_label():
    assert walk('kind==view,labels."containerd.io/gc.root"==check-walk') == {"v", "v-wl"}


def test_walk_kind_committed_and_label():
    assert walk('kind==committed,labels."containerd.io/gc.root"==check-walk') == {"p", "p-wl"}


def test_walk_two_filter_strings_are_ored():
    assert walk("name==p", "name==a-np-wl") == {"p", "a-np-wl"}


def test_walk_name_and_label_presence():
    assert walk("name==a-wl,labels.l") == {"a-wl"}


def test_walk_parent_equal():
    assert walk("parent==p") == {"a", "v"}


def test_walk_parent_not_empty_and_label():
    assert walk('parent!="",labels."containerd.io/gc.root"==check-walk') == {
        "a",
        "v",
        "a-wl",
        "v-wl",
    }


def test_walk_label_presence():
    assert walk("labels.l") == {"p-wl", "a-wl", "v-wl", "a-np-wl"}


def test_walk_label_value():
    assert walk("labels.l==2") == {"a-wl", "a-np-wl"}


def test_walk_parent_empty_string_selects_roots():
    assert walk('parent==""') == {"a-np", "p", "p-wl", "a-np-wl"}


# --------------------------------------------------------------------------- matching semantics


def test_empty_filter_list_matches_everything():
    assert parse_all([]) is ALWAYS
    assert parse_all([]).match(obj())


def test_empty_filter_string_matches_everything():
    assert parse_all([""]).match(obj())


def test_empty_string_among_others_still_matches_everything():
    assert parse_all(["name==nope", ""]).match(obj({"name": "x"}))


def test_presence_selector_true_when_field_present():
    assert matches("labels.foo", obj(labels={"foo": ""}))


def test_presence_selector_false_when_field_absent():
    assert not matches("labels.foo", obj(labels={"bar": "1"}))


def test_equal_requires_presence():
    assert not matches('labels.foo==""', obj(labels={"bar": "1"}))


def test_equal_compares_value():
    assert matches("name==bar", obj({"name": "bar"}))
    assert not matches("name==bar", obj({"name": "baz"}))


def test_not_equal_matches_absent_field():
    assert matches("labels.foo!=x", obj())


def test_not_equal_empty_string_does_not_match_absent_field():
    assert not matches('labels.foo!=""', obj())


def test_comma_joins_selectors_with_and():
    adaptor = obj({"name": "bar"}, {"bar": "true"})
    assert matches("name==bar,labels.bar==true", adaptor)
    assert not matches("name==bar,labels.bar==wrong", adaptor)


def test_filter_list_is_or_over_strings():
    flt = parse_all(["name==a", "name==b"])
    assert flt.match(obj({"name": "b"}))
    assert not flt.match(obj({"name": "c"}))


def test_whitespace_after_comma_is_skipped():
    assert matches("name==x, kind==y", obj({"name": "x", "kind": "y"}))


def test_whitespace_around_operator_is_skipped():
    assert matches("name ==  x", obj({"name": "x"}))


def test_bare_value_keeps_dots_dashes_equals_and_colons():
    assert selector_value("labels.foo==omg_asdf.asdf-qwer") == "omg_asdf.asdf-qwer"
    assert selector_value("a==x=y:z/w") == "x=y:z/w"


def test_bare_value_may_be_unicode():
    assert selector_value("a==héllo→") == "héllo→"


def test_bare_field_may_start_with_digit_or_underscore():
    assert parse("_1.2x").members[0].fieldpath == ("_1", "2x")  # type: ignore[attr-defined]


def test_quoted_field_keeps_dots_and_slashes():
    sel = parse('labels."containerd.io/gc.root"').members[0]  # type: ignore[attr-defined]
    assert sel == Selector(("labels", "containerd.io/gc.root"), Operator.PRESENT)


def test_quoted_field_with_escaped_quote_and_backslash():
    key = 'more complex label with \\ and "'
    assert matches(r'labels."more complex label with \\ and \""==present', obj(labels={key: "present"}))


def test_quoted_field_followed_by_more_path():
    key = 'with \\ and ".post'
    assert matches(r'labels."with \\ and \"".post==present', obj(labels={key: "present"}))


def test_quoted_value_may_contain_comma_and_spaces():
    assert matches('other=="too complex, yo"', obj({"other": "too complex, yo"}))


# --------------------------------------------------------------------------- regular expressions


def test_regex_bare_value():
    assert matches("other~=[abc]+", obj({"other": "xxabc"}))


def test_regex_is_unanchored_search():
    assert matches("name~=oo", obj({"name": "foobar"}))
    assert not matches("name~=^oo", obj({"name": "foobar"}))


def test_regex_slash_quoted():
    assert selector_value("name~=/^c[0-9]/") == "^c[0-9]"
    assert matches("name~=/^c[0-9]/", obj({"name": "c7"}))


def test_regex_slash_quoted_with_comma_in_repetition():
    assert matches("other~=/[abc]{1,2}/,name!=foo", obj({"other": "abc", "name": "x"}))


def test_regex_pipe_quoted_with_escaped_pipe_is_alternation():
    assert selector_value(r"name~=|^(a\|b)$|") == "^(a|b)$"
    assert matches(r"name~=|^(a\|b)$|", obj({"name": "b"}))


def test_regex_slash_quoted_with_escaped_slash():
    assert selector_value(r"path~=/^a\/b/") == "^a/b"


def test_regex_slash_quoted_may_contain_raw_double_quote():
    assert selector_value(r'other~=/[abc]{0,1}"\//') == '[abc]{0,1}"/'


def test_regex_double_quoted_needs_doubled_backslash():
    assert selector_value(r'name~="^\\d+$"') == r"^\d+$"


def test_regex_backslash_class_in_bare_value_is_literal_pattern():
    assert matches(r"name~=^\d+$", obj({"name": "123"}))


def test_regex_digit_class_is_ascii_only_like_re2():
    assert not matches(r"name~=^\d$", obj({"name": "\u0663"}))  # ARABIC-INDIC DIGIT THREE


def test_regex_on_absent_field_searches_empty_string():
    assert matches("labels.x~=^$", obj())


def test_invalid_regex_makes_selector_false_not_parse_error(caplog):
    flt = parse_all(["name~=/[unclosed/"])
    with caplog.at_level(logging.ERROR, logger="pysnap.filters"):
        assert not flt.match(obj({"name": "[unclosed"}))
    assert "error compiling regexp" in caplog.text


def test_invalid_regex_selector_can_still_be_ored():
    flt = parse_all(["name~=(", "name==x"])
    assert flt.match(obj({"name": "x"}))


# --------------------------------------------------------------------------- escapes


def test_simple_escapes_in_quoted_value():
    assert selector_value(r'a=="\a\b\f\n\r\t\v\\\""') == '\a\b\f\n\r\t\v\\"'


def test_octal_escape():
    assert selector_value(r'a=="\101\060\377x"') == "A0\udcffx"


def test_hex_escape():
    assert selector_value(r'a=="\x41\x7e"') == "A~"


def test_hex_escapes_forming_utf8_decode_to_text():
    assert selector_value(r'a=="\xc3\xa9"') == "é"


def test_short_unicode_escape():
    assert selector_value(r'a=="\u00e9\u2192"') == "é→"


def test_long_unicode_escape():
    assert selector_value(r'a=="\U0001F600"') == "\U0001f600"


def test_escaped_pipe_delimiter_inside_pipe_quotes():
    assert selector_value(r"a~=|x\|y|") == "x|y"


def test_escaping_a_non_active_delimiter_is_illegal():
    assert error_of(r'a=="x\/y"').reason == "illegal escape sequence"


def test_single_quote_escape_is_illegal():
    assert error_of(r'a=="\'"').reason == "illegal escape sequence"


def test_unknown_escape_is_illegal():
    assert error_of(r'a=="\q"').reason == "illegal escape sequence"


def test_truncated_hex_escape_is_illegal_numeric_escape():
    err = error_of(r'a=="\x4"')
    assert str(err) == r'filters: parse error: [a== >|"|< \x4"]: illegal numeric escape sequence'


def test_octal_escape_above_255_fails_unquoting():
    err = error_of(r'a=="\777"')
    assert err.reason == "unquoting failed: quote syntax error"


def test_unicode_escape_above_max_rune_fails_unquoting():
    assert error_of(r'a=="\U00110000"').reason == "unquoting failed: quote syntax error"


# --------------------------------------------------------------------------- parse errors


def test_parse_error_is_value_error_with_containerd_message():
    err = error_of("labels.|foo|==omg_asdf.asdf-qwer")
    assert isinstance(err, ValueError)
    assert str(err) == (
        "filters: parse error: [labels. >|||< foo|==omg_asdf.asdf-qwer]: invalid quote encountered"
    )


def test_parse_error_exposes_input_position_and_reason():
    err = error_of("name===x")
    assert (err.filter, err.position, err.reason) == ("name===x", 4, 'unsupported operator "==="')


def test_parse_error_at_end_of_input_has_no_marker():
    assert str(error_of("name==foo,")) == "filters: parse error: [name==foo,]: expected field or quoted"


def test_field_path_with_trailing_dot_is_error():
    assert str(error_of("labels.")) == "filters: parse error: [labels.]: expected field or quoted"


def test_unexpected_character_in_field_path_is_error():
    err = error_of('labels.?"x".post==present')
    assert str(err) == 'filters: parse error: [labels. >|?|< "x".post==present]: expected field or quoted'


def test_comma_where_value_expected_is_error():
    err = error_of("image~=,id?=?fbaq")
    assert str(err) == "filters: parse error: [image~= >|,|< id?=?fbaq]: expected value or quoted"


def test_dot_where_value_expected_is_error():
    assert error_of("a==.b").reason == "expected value or quoted"


def test_missing_value_at_end_is_error():
    assert str(error_of("name==")) == "filters: parse error: [name==]: expected value or quoted"


def test_slash_in_field_starts_unterminated_quote():
    err = error_of("labels.ns/key==value")
    assert str(err) == "filters: parse error: [labels.ns >|/|< key==value]: quoted literal not terminated"


def test_slash_value_for_equal_is_unterminated_quote():
    err = error_of("labels.key==/value")
    assert str(err) == "filters: parse error: [labels.key== >|/|< value]: quoted literal not terminated"


def test_slash_quoted_value_for_equal_is_invalid_quote():
    assert error_of("name==/x/").reason == "invalid quote encountered"


def test_pipe_quoted_value_for_not_equal_is_invalid_quote():
    assert error_of("name!=|x|").reason == "invalid quote encountered"


def test_single_equals_is_unsupported_operator():
    assert error_of("name=x").reason == 'unsupported operator "="'


def test_bang_tilde_is_unsupported_operator():
    assert error_of("name!~x").reason == 'unsupported operator "!~"'


def test_missing_operator_is_error():
    err = error_of("name foo")
    assert err.reason == 'expected an operator ("=="|"!="|"~=")'
    assert err.position == 5


def test_unterminated_double_quote_is_error():
    assert error_of('name=="abc').reason == "quoted literal not terminated"


def test_newline_inside_quotes_is_error():
    assert error_of('name=="a\nb"').reason == "quoted literal not terminated"


def test_nul_character_is_error():
    assert error_of("name==\0").reason == "unexpected null"


def test_space_before_comma_is_unexpected_input():
    err = error_of("name==a ,b")
    assert (err.position, err.reason) == (7, "unexpected input:  ")


def test_trailing_space_after_value_is_unexpected_input():
    assert error_of("name==a ").reason == "unexpected input:  "


def test_garbage_after_quoted_value_is_unexpected_input():
    assert error_of('name=="a"b').reason == "unexpected input: b"


def test_parse_all_reports_first_bad_string():
    with pytest.raises(FilterSyntaxError) as info:
        parse_all(["name==ok", "name=bad"])
    assert info.value.filter == "name=bad"


def test_parse_all_rejects_a_bare_string():
    with pytest.raises(TypeError):
        parse_all("name==x")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- adaptors


def test_labels_adaptor_joins_label_path_with_dots():
    adapt = obj(labels={"containerd.io/gc.root": "x"})
    assert adapt(("labels", "containerd", "io/gc", "root")) == ("x", True)


def test_labels_adaptor_without_labels_reports_absent():
    assert obj(labels=None)(("labels", "l")) == ("", False)
    assert obj(labels={})(("labels", "l")) == ("", False)


def test_labels_adaptor_reads_top_level_fields():
    assert obj({"parent": ""})(("parent",)) == ("", True)


def test_labels_adaptor_unknown_field_is_absent():
    assert obj({"name": "n"})(("size",)) == ("", False)


def test_labels_adaptor_empty_path_is_absent():
    assert obj({"name": "n"})(()) == ("", False)


def test_map_field_looks_up_joined_key():
    assert map_field(("a", "b"), {"a.b": "v"}) == ("v", True)
    assert map_field(("a",), {"a.b": "v"}) == ("", False)


def test_filter_match_accepts_any_callable_adaptor():
    seen = []

    def adaptor(path):
        seen.append(path)
        return ("v", True)

    assert isinstance(parse("x.y==v"), Filter)
    assert parse("x.y==v").match(adaptor)
    assert seen == [("x", "y")]


# --------------------------------------------------------------------------- quote helper


def test_quote_escapes_control_characters_and_delimiter():
    assert quote('a"\n\x01\\') == r'"a\"\n\x01\\"'


def test_quote_with_slash_leaves_double_quote_raw():
    assert quote('a"/b', "/") == r'/a"\/b/'


def test_quote_escapes_non_printable_unicode():
    assert quote("\u2028\U000e0001") == r'"\u2028\U000e0001"'


def test_quote_rejects_unknown_delimiter():
    with pytest.raises(ValueError):
        quote("x", "'")


# --------------------------------------------------------------------------- properties

texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)))


@given(value=texts, delimiter=st.sampled_from(['"', "/", "|"]))
def test_property_quoted_regex_value_round_trips(value, delimiter):
    assert selector_value(f"name~={quote(value, delimiter)}") == value


@given(value=texts)
def test_property_quoted_equal_value_round_trips_and_matches(value):
    text = f"name=={quote(value)}"
    assert selector_value(text) == value
    assert matches(text, obj({"name": value}))


@given(key=texts, value=texts)
def test_property_quoted_label_key_round_trips(key, value):
    text = f"labels.{quote(key)}=={quote(value)}"
    assert matches(text, obj(labels={key: value}))


@given(text=st.text())
def test_property_parsing_arbitrary_text_only_raises_filter_syntax_error(text):
    try:
        flt = parse_all([text])
    except FilterSyntaxError as err:
        assert 0 <= err.position <= len(text)
        assert str(err).startswith("filters: parse error: [")
    else:
        flt.match(obj({"name": "n"}, {"l": "v"}))
