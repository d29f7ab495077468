"""Tasks: the digits built-in, image folders, plugins, caching and bad input."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from evaluators import task_training
from evaluators.tasks import Task, available_tasks, load_task
from spaces.cost import count_cost
from spaces.space import SearchSpace

CACHE = Path(__file__).resolve().parents[1] / "studies" / "cache"
TINY_DIGITS = {"widths": [4, 8, 8], "epochs": 1}


@pytest.fixture(scope="module")
def digits() -> Task:
    return load_task("digits", cache_dir=CACHE)


# -- plugin targets (imported by name through "tests.test_tasks:...") -------------------------
def make_tiny_task(n: int = 12, classes: int = 3) -> Task:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 4, generator=g), torch.arange(n) % classes
    model = tiny_mlp(classes)
    return Task(
        name="tiny", build_model=functools.partial(tiny_mlp, classes), train=(x, y), calibration=(x[:4], y[:4]), validation=(x, y),
        example_inputs=x[:1], num_classes=classes, base_state=model.state_dict(), config={"n": n},
    )


def tiny_mlp(classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, classes))


def not_a_task() -> dict:
    return {"name": "nope"}


class TinyConvNet(nn.Module):
    def __init__(self, num_classes: int = 2, channels: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(channels, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def wrong_output_model(num_classes: int = 2) -> nn.Module:
    return TinyConvNet(num_classes + 3)


# -- digits -----------------------------------------------------------------------------------
def test_registry_lists_builtins():
    assert {"digits", "image-folder"} <= set(available_tasks())


def test_digits_task_is_accurate_and_shaped(digits):
    sizes = [len(s[1]) for s in (digits.train, digits.calibration, digits.validation)]
    assert sum(sizes) == 1797 and sizes[2] >= 400 and sizes[1] >= 256
    assert digits.example_inputs.shape == (1, 1, 16, 16)
    assert digits.num_classes == 10
    model = digits.base_model()
    assert not model.training
    x, y = digits.validation
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy >= 0.97
    flops = count_cost(model, digits.example_inputs).flops
    assert 3e6 <= flops <= 10e6


def test_digits_space_has_residual_and_depthwise_groups(digits):
    space = SearchSpace.from_model(digits.base_model(), digits.example_inputs, ratio_min=0.1)
    members = [set(g.members) for g in space.groups]
    assert any(any("shortcut" in m for m in ms) and len(ms) > 3 for ms in members), "no residual group"
    modules = dict(digits.base_model().named_modules())
    depthwise = [n for n, m in modules.items() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and any(set(depthwise) & ms for ms in members), "no depthwise group"


def test_digits_splits_are_disjoint_and_seeded(digits):
    def rows(t):
        return {tuple(r.flatten().tolist()) for r in t}

    train, cal, val = (rows(s[0]) for s in (digits.train, digits.calibration, digits.validation))
    # load_digits holds a few exact duplicate images; the splits must still be (nearly) disjoint.
    assert len(train & val) < 5 and len(cal & val) < 5
    again = load_task("digits", cache_dir=CACHE)
    assert torch.equal(again.validation[0], digits.validation[0])


def test_digits_training_is_cached_and_deterministic(tmp_path, monkeypatch):
    first = load_task("digits", TINY_DIGITS, cache_dir=tmp_path / "a")
    files = list((tmp_path / "a").glob("digits-*.pt"))
    assert len(files) == 1
    loaded = torch.load(files[0], weights_only=True)
    assert all(torch.equal(loaded[k], first.base_state[k]) for k in loaded)

    other = load_task("digits", TINY_DIGITS, cache_dir=tmp_path / "b")  # retrained from scratch
    assert all(torch.equal(other.base_state[k], first.base_state[k]) for k in first.base_state)

    def no_training(*args, **kwargs):
        raise AssertionError("cached weights should have been used")

    monkeypatch.setattr(task_training, "train_classifier", no_training)
    cached = load_task("digits", TINY_DIGITS, cache_dir=tmp_path / "a")
    assert all(torch.equal(cached.base_state[k], first.base_state[k]) for k in first.base_state)
    with pytest.raises(AssertionError):  # a different config is a different cache file
        load_task("digits", {**TINY_DIGITS, "seed": 1}, cache_dir=tmp_path / "a")


def test_batches_limit_shuffle_and_order():
    task = make_tiny_task(n=10)
    batches = task.batches("train", 4)
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert [len(y) for _, y in task.batches("train", 4, limit=5)] == [4, 1]
    ordered = torch.cat([x for x, _ in task.batches("train", 3, seed=None)])
    assert torch.equal(ordered, task.train[0])
    a = torch.cat([x for x, _ in task.batches("train", 3, seed=1)])
    b = torch.cat([x for x, _ in task.batches("train", 3, seed=1)])
    c = torch.cat([x for x, _ in task.batches("train", 3, seed=2)])
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert sorted(a[:, 0].tolist()) == sorted(task.train[0][:, 0].tolist())


@pytest.mark.parametrize("kwargs, match", [
    ({"split": "test", "batch_size": 4}, "unknown split 'test'"),
    ({"split": "train", "batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
    ({"split": "train", "batch_size": 4, "limit": 0}, "limit must be None or an integer >= 1, got 0"),
])
def test_batches_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_tiny_task().batches(**kwargs)


# -- plugins and bad specs --------------------------------------------------------------------
def test_plugin_task_with_options():
    task = load_task("tests.test_tasks:make_tiny_task", {"n": 9, "classes": 2})
    assert isinstance(task, Task) and len(task.train[1]) == 9 and task.num_classes == 2
    assert isinstance(task.base_model(), nn.Module)


@pytest.mark.parametrize("spec, options, match", [
    ("cifar100", None, "unknown task 'cifar100'"),
    ("no_such_pkg.mod:fn", None, "cannot import module 'no_such_pkg.mod'"),
    ("tests.test_tasks:missing_fn", None, "has no attribute 'missing_fn'"),
    ("tests.test_tasks:not_a_task", None, "returned dict, not an evaluators.tasks.Task"),
    ("tests.test_tasks:CACHE", None, "not a callable"),
    (":fn", None, "not of the form 'package.module:callable'"),
    ("tests.test_tasks:make_tiny_task", {"rows": 3}, "does not accept options \\['rows'\\]"),
    ("", None, "task must be a registered name"),
    ("digits", {"widht": [4, 4, 4]}, "unknown option\\(s\\) for task 'digits': widht"),
    ("digits", {"epochs": 0}, "epochs must be a positive integer, got 0"),
    ("digits", {"split": [0.5, 0.5, 0.5]}, "split must be 3 positive fractions"),
])
def test_bad_task_specs_are_one_line_value_errors(spec, options, match, tmp_path):
    with pytest.raises(ValueError, match=match) as info:
        load_task(spec, options, cache_dir=tmp_path)
    assert "\n" not in str(info.value)


def test_task_validates_its_fields():
    good = make_tiny_task()
    with pytest.raises(ValueError, match="example_inputs must be a tensor holding one sample"):
        Task(**{**good.__dict__, "example_inputs": good.train[0][:2]})
    with pytest.raises(ValueError, match="validation has 12 inputs but 3 labels"):
        Task(**{**good.__dict__, "validation": (good.train[0], good.train[1][:3])})
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1, got 0"):
        Task(**{**good.__dict__, "num_classes": 0})


# -- image folder -----------------------------------------------------------------------------
def _write_images(root: Path, per_class: int = 6, size: int = 10) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            arr[..., c] += 180  # class = dominant colour channel
            Image.fromarray(arr).save(root / name / f"{i}.png")


def test_image_folder_task_trains_caches_and_loads_weights(tmp_path):
    data = tmp_path / "images"
    _write_images(data)
    opts = {"path": str(data), "model": "tests.test_tasks:TinyConvNet", "model_options": {"num_classes": 2},
            "image_size": 8, "epochs": 3}
    task = load_task("image-folder", opts, cache_dir=tmp_path / "cache")
    assert task.num_classes == 2 and task.example_inputs.shape == (1, 3, 8, 8)
    assert sum(task.sample_counts().values()) == 12
    assert task.config["classes"] == ["cat", "dog"]
    assert len(list((tmp_path / "cache").glob("image-folder-*.pt"))) == 1
    assert isinstance(task.base_model(), TinyConvNet)

    weights = tmp_path / "w.pt"
    torch.save(task.base_state, weights)
    again = load_task("image-folder", {**opts, "weights": str(weights)}, cache_dir=tmp_path / "other")
    assert all(torch.equal(again.base_state[k], task.base_state[k]) for k in task.base_state)
    assert not (tmp_path / "other").exists()  # given weights: nothing trained or cached

    gray = load_task("image-folder", {**opts, "grayscale": True, "model_options": {"num_classes": 2, "channels": 1}},
                     cache_dir=tmp_path / "cache")
    assert gray.example_inputs.shape == (1, 1, 8, 8)


@pytest.mark.parametrize("case, match", [
    ("missing", "does not exist"),
    ("empty", "has no class sub-directories"),
    ("no_images", "has no images"),
    ("no_path", "needs option path"),
    ("no_model", "needs option model"),
    ("wrong_output", "expected \\(1, 2\\) logits"),
    ("bad_model", "cannot import module 'nowhere'"),
    ("bad_weights", "cannot load weights"),
    ("bad_model_options", "model 'tests.test_tasks:TinyConvNet' does not accept options \\['depth'\\]"),
])
def test_image_folder_bad_input(tmp_path, case, match):
    data = tmp_path / "images"
    opts = {"path": str(data), "model": "tests.test_tasks:TinyConvNet", "image_size": 8}
    if case == "empty":
        data.mkdir()
    elif case == "no_images":
        (data / "cat").mkdir(parents=True)
        (data / "cat" / "notes.txt").write_text("not an image")
    elif case != "missing":
        _write_images(data, per_class=2)
    if case == "no_path":
        opts.pop("path")
    elif case == "no_model":
        opts.pop("model")
    elif case == "wrong_output":
        opts["model"] = "tests.test_tasks:wrong_output_model"
    elif case == "bad_model":
        opts["model"] = "nowhere:Net"
    elif case == "bad_model_options":
        opts["model_options"] = {"depth": 3}
    elif case == "bad_weights":
        (tmp_path / "w.pt").write_bytes(b"garbage")
        opts["weights"] = str(tmp_path / "w.pt")
    with pytest.raises(ValueError, match=match) as info:
        load_task("image-folder", opts, cache_dir=tmp_path / "cache")
    assert "\n" not in str(info.value)
