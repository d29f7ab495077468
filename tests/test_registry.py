"""Registry: register by decorator, one-line errors for unknown and clashing names, plugins."""

import pytest

from spaces.registry import Registry


def test_register_and_get():
    reg: Registry = Registry("widget")

    @reg.register("a")
    def a():
        return 1

    assert reg.get("a") is a and "a" in reg and reg.names() == ("a",)
    reg.register("a")(a)  # the same entry again: a no-op
    assert reg.names() == ("a",)


def test_unknown_name_lists_known():
    reg: Registry = Registry("widget")
    reg.add("b", object)
    with pytest.raises(ValueError, match=r"unknown widget 'zz' \(known: b\)"):
        reg.get("zz")


def test_clash_and_bad_names():
    reg: Registry = Registry("widget")
    reg.add("a", int)
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.add("a", str)
    with pytest.raises(ValueError, match="non-empty string"):
        reg.add("", int)


def test_plugins_load_on_first_lookup():
    reg: Registry = Registry("widget", plugins=("tests.no_such_module_here",))
    assert reg.names() == ()  # a missing plugin module is skipped
    reg2: Registry = Registry("widget", plugins=("json",))
    assert reg2.names() == ()


def test_remove_drops_an_entry():
    reg: Registry = Registry("widget")
    reg.add("a", int)
    reg.remove("a")
    reg.remove("never-there")
    assert reg.names() == ()
