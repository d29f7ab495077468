import pickle

import pytest

from spaces.policy import Policy


def test_json_round_trip_keeps_everything():
    p = Policy(ratios={"b": 0.5, "a": 0.25}, method={"a": "l1", "b": "fpgm"}, recovery="adaptive_bn")
    q = Policy.from_json(p.to_json())
    assert q == p
    assert dict(q.ratios) == {"a": 0.25, "b": 0.5}
    assert q.method_for("b") == "fpgm" and q.recovery == "adaptive_bn"


def test_equal_policies_share_one_key_and_pickle():
    a = Policy(ratios={"x": 0.5, "y": 1.0})
    b = Policy(ratios={"y": 1, "x": 0.5})
    assert a.key() == b.key() and hash(a) == hash(b)
    assert pickle.loads(pickle.dumps(a)) == a


def test_unnamed_groups_keep_everything():
    assert Policy(ratios={"x": 0.3}).ratio("other") == 1.0


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.01, float("nan"), "0.5", True])
def test_bad_ratio_is_named(ratio):
    with pytest.raises(ValueError, match="ratio for group 'g'"):
        Policy(ratios={"g": ratio})


def test_validate_names_unknown_group_and_method():
    p = Policy(ratios={"nope": 0.5})
    with pytest.raises(ValueError, match="unknown group name 'nope'"):
        p.validate(["a", "b"])
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        Policy(ratios={"a": 0.5}, method="magic").validate(["a"], ["l1", "l2"])


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"ratios": {}, "bogus": 1}'])
def test_bad_json_is_rejected(text):
    with pytest.raises(ValueError):
        Policy.from_json(text)
