"""Structural watermark: capacity, projection, extraction after export / fine-tune / torch.export,
wrong keys and unmarked models, bad input."""

from __future__ import annotations

import copy
import hashlib
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn

from evaluators.prune import apply_policy
from spaces.groups import discover_groups
from spaces.policy import Policy
from spaces.space import SearchSpace, SpaceConfig, kept_channels
from spaces.watermark import (
    Watermark,
    WatermarkConfig,
    binomial_p_value,
    bits_to_bytes,
    channel_counts_from_export_dir,
    channel_counts_from_exported,
    channel_counts_from_model,
    channel_counts_from_policy,
    load_key,
    plan_capacity,
    read_manifest,
    space_capacity,
    write_manifest,
)
from tests.architectures import BasicBlock



class ResNet18(nn.Module):
    """ResNet-18 shape for 32x32 inputs: BasicBlock [2, 2, 2, 2], widths 64-128-256-512."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin, stages = 64, []
        for i, width in enumerate((64, 128, 256, 512)):
            blocks = []
            for b in range(2):
                blocks.append(BasicBlock(cin, width, stride=2 if (b == 0 and i > 0) else 1))
                cin = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.fixture(scope="module")
def r18():
    """Base ResNet-18, its space, a key file, a watermark and one marked pruned model."""
    torch.manual_seed(0)
    model = ResNet18().eval()
    x = torch.randn(1, 3, 32, 32)
    space = SearchSpace(groups=tuple(discover_groups(model, x)), config=SpaceConfig(ratio_min=0.1))
    key = bytes(range(32))
    config = WatermarkConfig(key=key, message="(c) ACME Corp 2025")
    wm = Watermark.from_space(space, config)
    proposal = space.sample(np.random.default_rng(7))
    marked = wm.project(proposal)
    pruned = apply_policy(model, marked, x, groups=space.groups)
    return {"model": model, "x": x, "space": space, "key": key, "config": config, "wm": wm,
            "proposal": proposal, "policy": marked, "pruned": pruned}


def _assert_full_recovery(wm: Watermark, counts) -> None:
    assert wm.extract(counts) == wm.bits
    result = wm.verify(counts)
    assert result.ber == 0.0 and result.matches == wm.n_bits
    assert result.passed and result.p_value < 1e-9


# -- capacity ------------------------------------------------------------------------------------


def test_capacity_resnet18_at_least_32_bits(r18):
    space, wm = r18["space"], r18["wm"]
    cap = space_capacity(space, r18["config"])
    assert cap.total >= 32
    assert wm.capacity == cap.total and wm.n_bits == cap.total  # n_bits=None -> whole capacity
    assert r18["config"].delta >= 2
    for c in wm.carriers:
        assert c.delta * c.round_to >= 2
        assert c.period <= c.unit_hi - c.unit_lo + 1  # every symbol reachable inside the ratio range
    # Capacity depends on channel counts only, never on the key.
    other = Watermark.from_space(space, r18["config"], key=b"another key entirely")
    assert other.capacity == wm.capacity
    assert "bits over" in cap.describe()


def test_bigger_groups_carry_more_bits(r18):
    cap = space_capacity(r18["space"], r18["config"])
    channels = {g.name: g.channels for g in r18["space"].groups}
    by_width: dict[int, set[int]] = {}
    for name, bits in cap.bits_per_group.items():
        by_width.setdefault(channels[name], set()).add(bits)
    widths = sorted(by_width)
    assert all(max(by_width[a]) <= min(by_width[b]) for a, b in zip(widths, widths[1:]))
    assert max(by_width[widths[-1]]) > max(by_width[widths[0]])


# -- projection ----------------------------------------------------------------------------------


def test_projection_is_nearest_consistent_and_idempotent(r18):
    space = r18["space"]
    wm = Watermark.from_space(space, replace(r18["config"], projection="nearest"))
    rng = np.random.default_rng(1)
    carriers = {c.name: c for c in wm.carriers}
    for _ in range(20):
        proposal = space.sample(rng)
        projected = wm.project(proposal)
        assert wm.is_consistent(projected)
        assert wm.project(projected) == projected
        space.validate(projected)
        kept0, kept1 = space.kept(proposal), space.kept(projected)
        for name in space.group_names:
            ratio = projected.ratio(name)
            assert space.ratio_min - 1e-9 <= ratio <= space.ratio_max
            if name not in carriers:
                assert ratio == proposal.ratio(name)
                continue
            c = carriers[name]
            assert kept_channels(c.channels, ratio, space.round_to) == kept1[name]
            # On a lattice point (full error margin), and the nearest one of its symbol in range.
            symbol = c.decode(kept1[name])
            assert (kept1[name] // c.round_to - c.dither) % c.delta == 0
            lo, hi = c.unit_lo * c.round_to, c.unit_hi * c.round_to
            same = [k for k in range(lo, hi + 1, c.round_to)
                    if c.decode(k) == symbol and (k // c.round_to - c.dither) % c.delta == 0]
            assert abs(kept1[name] - kept0[name]) == min(abs(k - kept0[name]) for k in same)
            # Away from the range ends the move is bounded by max_shift.
            if lo + c.period <= kept0[name] <= hi - c.period:
                assert abs(kept1[name] - kept0[name]) <= r18["config"].max_shift * c.channels
    assert proposal.method == projected.method


def test_projection_respects_round_to(r18):
    space = r18["space"].with_config(round_to=4)
    wm = Watermark.from_space(space, replace(r18["config"], n_bits=16))
    assert wm.capacity < r18["wm"].capacity  # a step is delta * round_to channels
    projected = wm.project(space.uniform(0.5))
    kept = space.kept(projected)
    assert all(kept[c.name] % 4 == 0 for c in wm.carriers)
    assert wm.extract(kept) == wm.bits


def _flops(space, policy):
    return space.predict_cost(policy).flops


@pytest.fixture(scope="module")
def costed(r18):
    """r18's space with its analytic cost model (what the runner's spaces have)."""
    return SearchSpace.from_model(r18["model"], r18["x"], ratio_min=0.1)


def test_capped_projection_never_raises_flops_where_nearest_would(r18, costed):
    space = costed
    capped = Watermark.from_space(space, r18["config"])  # the default rule
    assert capped.config.projection == "capped" and capped.cost is not None
    nearest = Watermark.from_space(space, replace(r18["config"], projection="nearest"))
    rng = np.random.default_rng(3)
    raised_by_nearest = 0
    for _ in range(40):
        proposal = space.sample(rng)
        p_near, p_cap = nearest.project(proposal), capped.project(proposal)
        raised_by_nearest += _flops(space, p_near) > _flops(space, proposal)
        assert capped.is_consistent(p_cap) and capped.project(p_cap) == p_cap
        kept0, kept1, kept_near = space.kept(proposal), space.kept(p_cap), space.kept(p_near)
        forced_up = False
        for c in capped.carriers:
            # Each carrier sits at its nearest point or at the one just below the proposal.
            assert kept1[c.name] in (kept_near[c.name], c.at_most(kept0[c.name], c.decode(kept1[c.name])))
            forced_up |= kept1[c.name] > kept0[c.name] and c.at_most(kept0[c.name], c.decode(kept1[c.name])) > kept0[c.name]
        if not forced_up:  # only the range's lower end may force a carrier up
            assert _flops(space, p_cap) <= _flops(space, proposal)
        # Never more moved than the plain rule "fewer" would move.
        p_few = Watermark.from_space(space, replace(r18["config"], projection="fewer")).project(proposal)
        assert sum(abs(kept1[n] - kept0[n]) for n in kept0) <= sum(abs(space.kept(p_few)[n] - kept0[n]) for n in kept0)
    assert raised_by_nearest >= 5  # the samples did exercise the cap


def test_fewer_projection_never_adds_channels(r18):
    space = r18["space"]
    wm = Watermark.from_space(space, replace(r18["config"], projection="fewer"))
    rng = np.random.default_rng(4)
    for _ in range(20):
        proposal = space.sample(rng)
        projected = wm.project(proposal)
        assert wm.is_consistent(projected) and wm.project(projected) == projected
        kept0, kept1 = space.kept(proposal), space.kept(projected)
        for c in wm.carriers:
            if kept0[c.name] >= c.unit_lo * c.round_to + c.period:  # a lattice point below exists
                assert kept0[c.name] - c.period < kept1[c.name] <= kept0[c.name]


def test_projection_without_cost_model_is_nearest(r18):
    space = r18["space"]  # built without a cost model
    no_cost = Watermark.from_space(space, r18["config"])
    nearest = Watermark.from_space(space, replace(r18["config"], projection="nearest"))
    assert no_cost.cost is None
    assert no_cost.project(r18["proposal"]) == nearest.project(r18["proposal"])


def test_widest_allocation_puts_bits_where_a_period_is_the_smallest_share_of_a_layer(r18):
    space, config = r18["space"], replace(r18["config"], n_bits=12)
    cap = space_capacity(space, config)
    channels = {g.name: g.channels for g in space.groups}
    step = config.delta * space.round_to
    for key in (r18["key"], b"another key entirely"):
        wm = Watermark.from_space(space, config, key=key)
        assert wm.n_bits == 12 == sum(c.bits for c in wm.carriers)
        bits = {n: 0 for n in channels} | {c.name: c.bits for c in wm.carriers}
        worst_used = max(step * 2 ** b / channels[n] for n, b in bits.items() if b > 0)
        # Greedy water-filling: any further bit would cost at least the worst one placed.
        for n, b in bits.items():
            if b < cap.bits_per_group[n]:
                assert step * 2 ** (b + 1) / channels[n] >= worst_used
        assert wm.extract(space.kept(wm.project(r18["proposal"]))) == wm.bits
    widest = max(channels.values())
    carried = {c.name for c in Watermark.from_space(space, config).carriers}
    assert all(n in carried for n, ch in channels.items() if ch == widest)
    # The keyed v1 rule may leave the widest groups free and fill narrow ones instead.
    assert Watermark.from_space(space, replace(config, allocation="keyed")).n_bits == 12


def test_manifest_ignores_projection_but_not_allocation(r18, tmp_path):
    wm = r18["wm"]
    write_manifest(tmp_path, wm)
    manifest = read_manifest(tmp_path)
    assert manifest["scheme"]["allocation"] == "widest" and manifest["scheme"]["projection"] == "capped"
    other_rule = Watermark.from_space(r18["space"], replace(r18["config"], projection="nearest"), key=r18["key"])
    assert other_rule.manifest_mismatches(manifest) == []  # projection never changes how bits are read
    keyed = Watermark.from_space(r18["space"], replace(r18["config"], allocation="keyed"), key=r18["key"])
    assert any("allocation" in p for p in keyed.manifest_mismatches(manifest))


# -- extraction after export, fine-tune, torch.export ---------------------------------------------


def test_recovery_from_reloaded_export_directory(r18, tmp_path):
    wm, pruned, base = r18["wm"], r18["pruned"], r18["model"]
    (tmp_path / "policy.json").write_text(r18["policy"].to_json())
    torch.save(pruned.state_dict(), tmp_path / "weights.pt")
    write_manifest(tmp_path, wm)

    policy = Policy.from_json((tmp_path / "policy.json").read_text())
    rebuilt = apply_policy(base, policy, r18["x"], groups=r18["space"].groups)
    rebuilt.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    _assert_full_recovery(wm, channel_counts_from_model(rebuilt, r18["space"].groups))
    # Straight from the weights' shapes, without rebuilding.
    _assert_full_recovery(wm, channel_counts_from_export_dir(tmp_path, r18["space"].groups))


def test_manifest_never_holds_the_key(r18, tmp_path):
    wm, key = r18["wm"], r18["key"]
    path = write_manifest(tmp_path, wm)
    raw = path.read_bytes()
    data = read_manifest(tmp_path)
    assert data["bits"] == wm.n_bits and data["carriers"] == len(wm.carriers)
    assert data["message_sha256"] == hashlib.sha256(b"(c) ACME Corp 2025").hexdigest()
    assert key not in raw and key.hex().encode() not in raw
    assert not any(c.name.encode() in raw for c in wm.carriers)  # carrier positions are key-derived
    assert wm.manifest_mismatches(data) == []
    other = Watermark.from_space(r18["space"], replace(r18["config"], message="someone else"))
    assert any(p.startswith("message_sha256") for p in other.manifest_mismatches(data))


def test_recovery_after_fine_tuning(r18):
    wm, groups = r18["wm"], r18["space"].groups
    model = copy.deepcopy(r18["pruned"]).train()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        xb, yb = torch.randn(4, 3, 16, 16, generator=gen), torch.randint(0, 10, (4,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    _assert_full_recovery(wm, channel_counts_from_model(model, groups))


def test_recovery_after_torch_export_round_trip(r18, tmp_path):
    wm, groups = r18["wm"], r18["space"].groups
    program = torch.export.export(r18["pruned"].eval(), (r18["x"],))
    torch.export.save(program, str(tmp_path / "model.pt2"))
    loaded = torch.export.load(str(tmp_path / "model.pt2"))
    _assert_full_recovery(wm, channel_counts_from_exported(loaded, groups))
    _assert_full_recovery(wm, channel_counts_from_export_dir(tmp_path, groups, trust_program=True))  # model.pt2 only, trusted


# -- wrong key, unmarked model, chance level ----------------------------------------------------


def test_wrong_key_gives_chance_ber_and_fails(r18):
    space = r18["space"]
    config = replace(r18["config"], max_shift=0.25)  # larger periods -> >= 64 bits on ResNet-18
    wm = Watermark.from_space(space, config)
    assert wm.n_bits >= 64
    policy = wm.project(space.sample(np.random.default_rng(3)))
    pruned = apply_policy(r18["model"], policy, r18["x"], groups=space.groups)
    counts = channel_counts_from_model(pruned, space.groups)
    _assert_full_recovery(wm, counts)

    thief = Watermark.from_space(space, config, key=b"not the owner's key, 32 bytes!!")
    assert thief.n_bits == wm.n_bits
    result = thief.verify(counts, wm.bits)
    assert 0.35 <= result.ber <= 0.65
    assert not result.passed and result.p_value > config.alpha


def test_unmarked_model_is_not_claimed(r18):
    space, wm = r18["space"], r18["wm"]
    unmarked = space.sample(np.random.default_rng(11))  # a grid policy, never projected
    pruned = apply_policy(r18["model"], unmarked, r18["x"], groups=space.groups)
    result = wm.verify(channel_counts_from_model(pruned, space.groups))
    assert result.p_value > 0.01 and not result.passed


def test_unmarked_bits_match_at_chance_over_many_keys(r18):
    """Dither makes each extracted bit a fair coin under H0, so p-values are calibrated."""
    space, config = r18["space"], r18["config"]
    counts_list = [space.kept(space.uniform(0.5)), space.kept(space.sample(np.random.default_rng(5)))]
    n_keys, matches, ones, total, small_p = 150, 0, 0, 0, 0
    for counts in counts_list:
        for i in range(n_keys):
            wm = Watermark.from_space(space, config, key=f"random key {i}".encode())
            result = wm.verify(counts)
            matches += result.matches
            ones += sum(wm.extract(counts))
            total += result.n_bits
            small_p += result.p_value < 0.05
    assert abs(matches / total - 0.5) < 0.03
    assert abs(ones / total - 0.5) < 0.03  # the bits read from a fixed architecture are fair coins
    assert small_p / (len(counts_list) * n_keys) < 0.1


def test_structured_message_on_round_architecture_is_not_claimed(r18):
    """Without the keyed dither, all-zero bits would 'match' round kept counts like 50%."""
    space = r18["space"]
    wm = Watermark.from_space(space, replace(r18["config"], encoding="raw", message=b"\0\0\0\0"))
    for ratio in (0.25, 0.5, 0.75, 1.0):
        result = wm.verify(space.kept(space.uniform(ratio)))
        assert result.p_value > 0.01 and not result.passed


# -- robustness of the lattice ------------------------------------------------------------------


def test_one_channel_error_does_not_flip_bits(r18):
    space = r18["space"]
    wm = r18["wm"]
    counts = space.kept(r18["policy"])
    names = wm.carrier_names
    # delta = 2: one channel *less* (pruned further) is tolerated.
    assert wm.extract({**counts, **{n: counts[n] - 1 for n in names}}) == wm.bits
    # delta = 3: one channel more or less is tolerated.
    wm3 = Watermark.from_space(space, replace(r18["config"], delta=3, n_bits=24))
    counts3 = space.kept(wm3.project(r18["proposal"]))
    for step in (-1, 1):
        assert wm3.extract({**counts3, **{n: counts3[n] + step for n in wm3.carrier_names}}) == wm3.bits
    # Two channels off (one full step at delta = 2): Gray code flips exactly one bit per carrier.
    shifted = wm.extract({**counts, **{n: counts[n] + 2 for n in names}})
    errors = sum(a != b for a, b in zip(shifted, wm.bits))
    assert wm.n_bits == sum(c.bits for c in wm.carriers)  # no padding: every carrier fully counted
    assert errors == len(names)


def test_raw_message_round_trips(r18):
    wm = Watermark.from_space(r18["space"], replace(r18["config"], encoding="raw", message="ACME"))
    assert wm.n_bits == 32
    counts = r18["space"].kept(wm.project(r18["proposal"]))
    assert bits_to_bytes(wm.extract(counts)) == b"ACME"
    # Fewer bits than capacity -> carriers hold fewer bits than they could; no padding.
    assert sum(c.bits for c in wm.carriers) == 32 < wm.capacity
    keyed = Watermark.from_space(r18["space"], replace(r18["config"], encoding="raw", message="ACME",
                                                       allocation="keyed"))
    # Scheme v1 fills groups to capacity in keyed order: only some groups are carriers.
    assert len(keyed.carriers) < len(r18["space"].groups)
    assert bits_to_bytes(keyed.extract(r18["space"].kept(keyed.project(r18["proposal"])))) == b"ACME"


def test_binomial_p_value():
    assert binomial_p_value(32, 32) == pytest.approx(2.0**-32)
    assert binomial_p_value(0, 10) == 1.0
    assert binomial_p_value(6, 10) == pytest.approx(386 / 1024)


# -- bad input ----------------------------------------------------------------------------------


def test_message_longer_than_capacity_names_the_capacity(r18):
    cap = space_capacity(r18["space"], r18["config"]).total
    with pytest.raises(ValueError, match=f"capacity is {cap} bits") as info:
        Watermark.from_space(r18["space"], replace(r18["config"], encoding="raw", message="x" * (cap // 8 + 1)))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=f"needs {cap + 1} bits but the capacity is {cap} bits"):
        Watermark.from_space(r18["space"], replace(r18["config"], n_bits=cap + 1))


def test_missing_or_empty_key_file(tmp_path, r18):
    with pytest.raises(ValueError, match="does not exist") as info:
        load_key(tmp_path / "nope.key")
    assert "\n" not in str(info.value)
    for content in (b"", b"\n", b"  \r\n"):
        (tmp_path / "empty.key").write_bytes(content)
        with pytest.raises(ValueError, match="empty") as info:
            load_key(tmp_path / "empty.key")
        assert "\n" not in str(info.value)
    config = replace(r18["config"], key=None, key_file=str(tmp_path / "nope.key"))
    with pytest.raises(ValueError, match="does not exist"):
        Watermark.from_space(r18["space"], config)
    with pytest.raises(ValueError, match="no watermark key"):
        WatermarkConfig(message="m").load_key()


def test_key_file_trailing_newline_is_ignored(tmp_path):
    (tmp_path / "a.key").write_bytes(b"owner secret 123\n")
    (tmp_path / "b.key").write_bytes(b"owner secret 123")
    assert load_key(tmp_path / "a.key") == load_key(tmp_path / "b.key") == b"owner secret 123"


def test_config_validation(tmp_path):
    for bad in ({"delta": 1}, {"encoding": "rot13"}, {"max_shift": 0.0}, {"alpha": 1.0},
                {"bits_per_carrier": 9}, {"n_bits": 0}, {"encoding": "raw", "n_bits": 8},
                {"key": b"k", "key_file": "f"}, {"allocation": "random"}, {"projection": "up"}):
        with pytest.raises(ValueError):
            WatermarkConfig(message="m", **bad)
    with pytest.raises(ValueError, match="unknown \\[watermark\\] key"):
        WatermarkConfig.from_dict({"message": "m", "key": "inline secrets are not allowed"})
    config = WatermarkConfig.from_dict({"key_file": "owner.key", "message": "m", "delta": 3}, base_dir=tmp_path)
    assert config.key_file == str(tmp_path / "owner.key") and config.delta == 3
    assert "secret" not in repr(WatermarkConfig(key=b"secret", message="m"))
    with pytest.raises(ValueError, match="message is empty"):
        Watermark(b"k" * 16, {"a": 64}, WatermarkConfig(message=""))


def test_counts_from_another_architecture_are_refused(r18, tmp_path):
    wm, counts = r18["wm"], r18["space"].kept(r18["policy"])
    name = r18["space"].group_names[0]
    with pytest.raises(ValueError, match="not derived"):
        wm.extract({k: v for k, v in counts.items() if k != name})
    with pytest.raises(ValueError, match="outside"):
        wm.extract({**counts, name: 10_000})
    with pytest.raises(ValueError, match="neither weights.pt nor model.pt2"):
        channel_counts_from_export_dir(tmp_path, r18["space"].groups)
    with pytest.raises(ValueError, match="not derived"):
        channel_counts_from_model(r18["model"], {"no.such.layer": 4})


def test_tiny_groups_without_capacity():
    config = WatermarkConfig(message="m")
    cap = plan_capacity({"a": 4, "b": 8}, config)
    assert cap.total == 0
    with pytest.raises(ValueError, match="capacity is 0 bits"):
        Watermark(b"k" * 16, {"a": 4, "b": 8}, config)
    assert channel_counts_from_policy(Policy(ratios={"a": 0.5}), {"a": 4, "b": 8}) == {"a": 2, "b": 8}
    assert cap.describe().startswith("watermark capacity: 0 bits over 0 of 2 groups")


def test_attention_heads_carry_bits_read_back_in_whole_heads():
    """Head groups count units (whole heads): a pruned model's widths are read back in heads,
    so a watermark whose carriers include head groups is extracted exactly."""
    from evaluators.tokens import TokenTransformer, generate_tokens

    torch.manual_seed(0)
    model = TokenTransformer(dim=128, heads=16, head_dim=8, hidden=512, depth=3).eval()
    x = generate_tokens(2, seed=0)[0][:1]
    space = SearchSpace.from_model(model, x, ratio_min=0.1)
    config = WatermarkConfig(key=bytes(range(32)), message="(c) heads", allocation="keyed", bits_per_carrier=1)
    wm = Watermark.from_space(space, config)
    heads = {g.name for g in space.groups if g.unit > 1}
    assert heads & {c.name for c in wm.carriers}
    pruned = apply_policy(model, wm.project(space.sample(np.random.default_rng(7))), x, groups=space.groups)
    counts = channel_counts_from_model(pruned, space.groups)
    assert all(1 <= counts[h] <= 16 for h in heads)
    assert wm.extract(counts) == wm.bits
    from spaces.watermark_readout import channel_counts_from_state_dict

    assert channel_counts_from_state_dict(pruned.state_dict(), space.groups) == counts
