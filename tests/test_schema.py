"""The dict <-> dataclass converter: every value coerced the way YAML users expect, every error message whole."""

from __future__ import annotations

import dataclasses
import re
import types
import warnings
from typing import Any, ClassVar

import pytest

from atlas_vla.schema import (
    RenamedWarning,
    dotted_keys,
    flatten,
    from_dict,
    print_renames_as_one_line,
    renamed_dotted_keys,
    suggest,
)


@dataclasses.dataclass
class Inner:
    depth: int = 1
    old_free: bool = False

    RENAMED_KEYS: ClassVar[dict[str, str]] = {"deep": "depth"}


@dataclasses.dataclass
class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)
    maybe: Inner | None = None  # a nested section that may be null
    steps: int | None = None
    count: int = 0
    rate: float = 0.0
    flag: bool = False
    name: str = ""
    ids: list[int] = dataclasses.field(default_factory=list)
    anything: list = dataclasses.field(default_factory=list)
    columns: dict[str, str] = dataclasses.field(default_factory=dict)
    table: dict = dataclasses.field(default_factory=dict)
    payload: Any = None

    RENAMED_KEYS: ClassVar[dict[str, str]] = {"number": "count"}


def error_of(values: dict[str, Any]) -> str:
    with pytest.raises(ValueError) as error:
        from_dict(Outer, values, "cfg")
    return str(error.value)


# ----------------------------------------------------------------------------------------------
# from_dict and the coercion of each annotation
# ----------------------------------------------------------------------------------------------


def test_a_value_that_is_not_a_mapping_is_named():
    with pytest.raises(ValueError) as error:
        from_dict(Outer, [1, 2], "cfg")
    assert str(error.value) == "cfg must be a mapping, got [1, 2]"
    assert error_of({"inner": 3}) == "cfg.inner must be a mapping, got 3"


def test_an_old_and_a_new_key_together_are_refused():
    with pytest.raises(ValueError) as error:
        from_dict(Outer, {"number": 1, "count": 2}, "cfg")
    assert str(error.value) == "cfg sets both number and count (its new name): keep only count"


def test_an_old_key_works_with_a_warning_naming_the_new_one():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert from_dict(Outer, {"number": "3"}, "cfg").count == 3
    assert [(w.category, str(w.message)) for w in caught] == [(RenamedWarning, "cfg.number is deprecated: use cfg.count")]


def test_unknown_key_suggests_the_closest_valid_one():
    assert error_of({"cont": 1}) == (
        "unknown key cfg.cont (did you mean 'count'?); valid keys: ['inner', 'maybe', 'steps', 'count', 'rate', "
        "'flag', 'name', 'ids', 'anything', 'columns', 'table', 'payload']")


def test_suggest_names_the_closest_candidate_or_nothing():
    assert suggest("lerning_rate", ["seed", "learning_rate", "learning_rates"]) == " (did you mean 'learning_rate'?)"
    assert suggest("zzz", ["seed", "learning_rate"]) == ""
    assert suggest("zzz", []) == ""


@pytest.mark.parametrize("text,expected", [
    ("true", True), ("false", False), ("1", True), ("0", False), ("yes", True), ("no", False),
    ("on", True), ("off", False), ("y", True), ("n", False), ("TRUE", True), ("False", False), ("Yes", True),
    ("NO", False), ("On", True), ("OFF", False), ("Y", True), ("N", False),
])
def test_boolean_strings(text, expected):
    assert from_dict(Outer, {"flag": text}, "cfg").flag is expected


@pytest.mark.parametrize("value", [1, 0, 1.0, None, "maybe", "", [True]])
def test_anything_else_is_not_a_boolean(value):
    assert error_of({"flag": value}) == f"cfg.flag must be true or false, got {value!r}"


def test_booleans_stay_booleans():
    assert from_dict(Outer, {"flag": True}, "cfg").flag is True
    assert from_dict(Outer, {"flag": False}, "cfg").flag is False


@pytest.mark.parametrize("value,expected", [(3, 3), ("3", 3), ("-2", -2), pytest.param(" 7 ", 7, id="padded")])
def test_integers(value, expected):
    count = from_dict(Outer, {"count": value}, "cfg").count
    assert count == expected and type(count) is int


@pytest.mark.parametrize("value", [True, False, 1.5, 2.0, None, [1], "1.5", "abc", ""])
def test_anything_else_is_not_an_integer(value):
    assert error_of({"count": value}) == f"cfg.count must be an integer, got {value!r}"


@pytest.mark.parametrize("value,expected", [(2, 2.0), ("1e-4", 1e-4), (0.5, 0.5), ("-3", -3.0)])
def test_numbers(value, expected):
    rate = from_dict(Outer, {"rate": value}, "cfg").rate
    assert rate == expected and type(rate) is float


@pytest.mark.parametrize("value", [True, False, "abc", None, [1.0]])
def test_anything_else_is_not_a_number(value):
    assert error_of({"rate": value}) == f"cfg.rate must be a number, got {value!r}"


@pytest.mark.parametrize("value,expected", [("x", "x"), (5, "5"), (1.5, "1.5")])
def test_strings_and_numbers_read_as_strings(value, expected):
    assert from_dict(Outer, {"name": value}, "cfg").name == expected


@pytest.mark.parametrize("value", [True, None, [1], {"a": 1}])
def test_anything_else_is_not_a_string(value):
    assert error_of({"name": value}) == f"cfg.name must be a string, got {value!r}"


def test_a_union_tries_each_type_and_reports_with_the_key():
    assert from_dict(Outer, {"steps": None}, "cfg").steps is None
    assert from_dict(Outer, {"steps": "4"}, "cfg").steps == 4
    assert error_of({"steps": "abc"}) == "cfg.steps must be an integer, got 'abc'"
    assert from_dict(Outer, {"maybe": {"depth": "2"}}, "cfg").maybe == Inner(depth=2)
    assert error_of({"maybe": {"depth": "x"}}) == "cfg.maybe.depth must be an integer, got 'x'"


def test_list_items_are_coerced_one_by_one():
    config = from_dict(Outer, {"ids": ("1", 2), "anything": (1, "a")}, "cfg")
    assert config.ids == [1, 2] and config.anything == [1, "a"]
    assert type(config.ids) is list and type(config.anything) is list
    assert error_of({"ids": [1, "a"]}) == "cfg.ids[1] must be an integer, got 'a'"
    assert error_of({"ids": "1, 2"}) == "cfg.ids must be a list, got '1, 2'"
    assert error_of({"anything": 3}) == "cfg.anything must be a list, got 3"


def test_mappings_become_plain_dicts():
    config = from_dict(Outer, {"columns": types.MappingProxyType({"a": "b"}),
                               "table": types.MappingProxyType({"k": 1})}, "cfg")
    assert config.columns == {"a": "b"} and type(config.columns) is dict
    assert config.table == {"k": 1} and type(config.table) is dict
    assert error_of({"columns": ["a"]}) == "cfg.columns must be a mapping, got ['a']"
    assert error_of({"table": "k: 1"}) == "cfg.table must be a mapping, got 'k: 1'"


def test_any_and_dataclass_instances_pass_as_they_are():
    inner = Inner(depth=5)
    config = from_dict(Outer, {"payload": {"x": [1]}, "inner": inner}, "cfg")
    assert config.payload == {"x": [1]} and config.inner is inner


# ----------------------------------------------------------------------------------------------
# dotted names and flattening
# ----------------------------------------------------------------------------------------------


def test_dotted_keys_reach_into_optional_sections():
    assert dotted_keys(Outer, "c.") == [
        "c.inner", "c.inner.depth", "c.inner.old_free", "c.maybe", "c.maybe.depth", "c.maybe.old_free", "c.steps",
        "c.count", "c.rate", "c.flag", "c.name", "c.ids", "c.anything", "c.columns", "c.table", "c.payload"]


def test_renamed_dotted_keys_reach_into_optional_sections():
    assert renamed_dotted_keys(Outer) == {"number": "count", "inner.deep": "inner.depth", "maybe.deep": "maybe.depth"}


def test_flatten_keeps_scalars_and_writes_everything_else_as_text():
    values = {"a": {"b": 1, "c": [1, 2], "d": None, "e": "s", "f": True, "g": 1.5, "h": {"i": (3,)}}, "j": 0}
    assert flatten(values) == {"a.b": 1, "a.c": "[1, 2]", "a.d": None, "a.e": "s", "a.f": True, "a.g": 1.5,
                               "a.h.i": "(3,)", "j": 0}
    assert flatten({"k": {"l": 2}}, "run/") == {"run/k.l": 2}
    assert flatten({}) == {}


# ----------------------------------------------------------------------------------------------
# one-line renamed warnings
# ----------------------------------------------------------------------------------------------


def test_renamed_warnings_print_as_one_line_and_others_as_usual(monkeypatch):
    standard = warnings.formatwarning
    monkeypatch.setattr(warnings, "formatwarning", standard)  # restored after the test
    expected_other = standard(UserWarning("careful"), UserWarning, "f.py", 3, line="x = 1")
    print_renames_as_one_line()
    assert warnings.formatwarning(RenamedWarning("a is deprecated: use b"), RenamedWarning, "f.py", 3) \
        == "RenamedWarning: a is deprecated: use b\n"
    assert warnings.formatwarning(UserWarning("careful"), UserWarning, "f.py", 3, line="x = 1") == expected_other
    assert expected_other == "f.py:3: UserWarning: careful\n  x = 1\n"
    assert re.fullmatch(r"f\.py:3: FutureWarning: old\n", warnings.formatwarning("old", FutureWarning, "f.py", 3, ""))
