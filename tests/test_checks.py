"""Validation helpers: normalised values, one-line messages naming field, rule and value."""

from dataclasses import dataclass

import pytest

from spaces.checks import (check_bool, check_choice, check_int, check_keys, check_number, check_number_list,
                           check_str, check_str_list, from_mapping)


def test_values_come_back_normalised():
    assert check_int("n", 3, 1) == 3
    assert check_number("x", 2, 0.0) == 2.0 and isinstance(check_number("x", 2), float)
    assert check_str_list("s", ["a", "b"]) == ("a", "b")
    assert check_number_list("l", [1, 0.5], 0.0, 1.0) == (1.0, 0.5)
    assert check_bool("b", False) is False and check_str("s", "", empty=True) == ""
    assert check_choice("mode", "a", ("a", "b")) == "a"


@pytest.mark.parametrize("call, message", [
    (lambda: check_int("batch", True, 1), "batch must be an integer >= 1, got True"),
    (lambda: check_int("batch", 0, 1), "batch must be an integer >= 1, got 0"),
    (lambda: check_int("k", 9, 0, 8), "k must be an integer <= 8, got 9"),
    (lambda: check_number("lr", float("nan")), "lr must be a finite number, got nan"),
    (lambda: check_number("lr", 0, positive=True), "lr must be a finite number > 0, got 0"),
    (lambda: check_number("r", 1.5, 0.0, 1.0), "r must be <= 1.0, got 1.5"),
    (lambda: check_bool("kd", 1), "kd must be true or false, got 1"),
    (lambda: check_str("name", ""), "name must be a non-empty string, got ''"),
    (lambda: check_str_list("methods", "l1"), "methods must be a list of strings, got 'l1'"),
    (lambda: check_choice("mode", "c", ("a", "b")), r"unknown mode 'c' \(known: a, b\)"),
    (lambda: check_keys("[t]", {"x": 1}, ("y",)), r"unknown key 'x' in \[t\] \(known: y\); remove or rename it"),
])
def test_messages_name_field_rule_and_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_from_mapping_rejects_unknown_and_missing_keys():
    @dataclass(frozen=True)
    class Conf:
        a: int
        b: int = 2

    assert from_mapping(Conf, {"a": 1}) == Conf(1, 2)
    with pytest.raises(ValueError, match="unknown key 'c' in conf"):
        from_mapping(Conf, {"a": 1, "c": 3}, "conf")
    with pytest.raises(ValueError, match="conf: .*missing"):
        from_mapping(Conf, {}, "conf")
    with pytest.raises(ValueError, match="must be a table"):
        from_mapping(Conf, [1], "conf")
