"""The procedural ``shapes`` task: seeded generation, options, model, caching."""

from __future__ import annotations

import pickle

import pytest
import torch

from evaluators import synthetic, task_training
from evaluators.prune import apply_policy
from evaluators.synthetic import CLASS_NAMES, MAX_CLASSES, generate_shapes, shapes_options
from evaluators.tasks import available_tasks, load_task
from spaces.space import SearchSpace

TINY = {"n_samples": 240, "epochs": 1, "widths": [4, 8, 8], "blocks": 1, "batch_size": 64}


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    cache = tmp_path_factory.mktemp("shapes-cache")
    return load_task("shapes", TINY, cache_dir=cache), cache


# -- generation -----------------------------------------------------------------------------
def test_generation_is_deterministic_under_a_seed_and_differs_across_seeds():
    x1, y1 = generate_shapes(64, seed=3)
    x2, y2 = generate_shapes(64, seed=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, y3 = generate_shapes(64, seed=4)
    assert not torch.equal(y1, y3)
    assert (x1 - x3).abs().mean() > 0.1


def test_generation_shapes_dtypes_and_range():
    x, y = generate_shapes(50, seed=0, image_size=24, num_classes=5)
    assert x.shape == (50, 3, 24, 24) and x.dtype == torch.float32
    assert y.shape == (50,) and y.dtype == torch.long
    assert int(y.min()) >= 0 and int(y.max()) < 5
    assert torch.isfinite(x).all()
    assert -3 < float(x.min()) and float(x.max()) < 3  # normalised around [-1, 1], noise on top


@pytest.mark.parametrize("n, classes", [(130, MAX_CLASSES), (101, 10), (7, 2)])
def test_classes_are_balanced(n, classes):
    _, y = generate_shapes(n, seed=1, num_classes=classes, clutter=0)
    counts = torch.bincount(y, minlength=classes)
    assert len(counts) == classes and int(counts.max() - counts.min()) <= 1


def test_every_class_draws_a_distinct_figure():
    # The same pose and colour for every class: only the figure differs, so no two classes
    # may render (nearly) the same image, and none may be empty or fill the whole canvas.
    size = 32
    axis = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    gy, gx = torch.meshgrid(axis, axis, indexing="ij")
    grid = torch.stack([gx, gy])
    one = torch.ones(1)
    drawn = []
    for c in range(MAX_CLASSES):
        canvas = torch.zeros(1, 3, size, size)
        synthetic._draw(canvas, grid, torch.tensor([c]), 0 * one, 0 * one, 0.6 * one, 0.3 * one, torch.ones(1, 3), one, size)
        assert 0.03 < float(canvas.mean()) < 0.5, f"{CLASS_NAMES[c]} draws nothing or fills the image"
        drawn.append(canvas.flatten())
    drawn = torch.stack(drawn)
    differing = (drawn[:, None] - drawn[None]).abs().mean(-1)  # share of pixels that differ
    differing += torch.eye(MAX_CLASSES)  # ignore each class against itself
    assert float(differing.min()) > 0.03, "two classes draw (nearly) the same figure"


def test_noise_and_clutter_options_change_the_images():
    clean, y = generate_shapes(40, seed=2, noise=0.0, clutter=0)
    noisy, y_noisy = generate_shapes(40, seed=2, noise=0.3, clutter=0)
    assert torch.equal(y, y_noisy)
    assert 0.4 < float((noisy - clean).std()) < 0.8  # std 0.3 on [0, 1] is 0.6 after normalising
    cluttered, _ = generate_shapes(40, seed=2, noise=0.0, clutter=3)
    assert float((cluttered - clean).abs().mean()) > 0.01


# -- options ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key, value",
    [
        ("seed", -1), ("seed", 1.5), ("n_samples", 2), ("n_samples", True), ("image_size", 4),
        ("num_classes", 1), ("num_classes", MAX_CLASSES + 1), ("noise", -0.1), ("noise", float("nan")),
        ("clutter", -1), ("widths", [8, 8]), ("widths", [8, 8, 1]), ("blocks", 0), ("epochs", 0),
        ("batch_size", 0), ("lr", 0), ("lr", "fast"), ("split", [0.5, 0.5]), ("split", [0.6, 0.3, 0.3]),
        ("split", [1.0, 0.0, 0.0]),
    ],
)
def test_bad_option_is_a_one_line_value_error_naming_it(key, value, tmp_path):
    with pytest.raises(ValueError, match=rf"\b{key}\b") as info:
        load_task("shapes", {key: value}, cache_dir=tmp_path)
    assert "\n" not in str(info.value)
    assert not any(tmp_path.iterdir()), "nothing is trained or written for bad options"


def test_unknown_option_and_too_few_samples_are_refused():
    with pytest.raises(ValueError, match="colour"):
        shapes_options({"colour": "red"})
    with pytest.raises(ValueError, match="n_samples"):
        shapes_options({"n_samples": 5, "num_classes": 10})


def test_defaults_are_valid_and_keep_a_large_validation_split():
    opts = shapes_options({})
    assert opts["num_classes"] >= 10
    assert opts["n_samples"] * opts["split"][2] >= 2000  # one sample < 0.1 accuracy points


# -- task ---------------------------------------------------------------------------------------
def test_shapes_is_registered():
    assert "shapes" in available_tasks()


def test_tiny_task_is_built_and_shaped(tiny_task):
    task, _ = tiny_task
    sizes = [len(task.split(s)[1]) for s in ("train", "calibration", "validation")]
    assert sum(sizes) == TINY["n_samples"] and all(sizes)
    assert task.example_inputs.shape == (1, 3, 32, 32)
    assert task.num_classes == shapes_options({})["num_classes"]
    model = task.base_model()
    assert not model.training
    with torch.no_grad():
        assert model(task.validation[0][:3]).shape == (3, task.num_classes)
    assert task.config["task"] == "shapes" and task.config["widths"] == TINY["widths"]


def test_model_factory_pickles(tiny_task):
    task, _ = tiny_task
    rebuilt = pickle.loads(pickle.dumps(task.build_model))()
    rebuilt.load_state_dict(task.base_state)  # same architecture
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in task.base_model().parameters())


def test_model_is_prunable_with_residual_groups(tiny_task):
    task, _ = tiny_task
    base = task.base_model()
    space = SearchSpace.from_model(base, task.example_inputs, ratio_min=0.1)
    assert any(len(g.members) > 3 for g in space.groups), "residual stages should couple several layers"
    policy = space.uniform(0.5)
    pruned = apply_policy(base, policy, task.example_inputs)
    with torch.no_grad():
        assert pruned(task.validation[0][:2]).shape == (2, task.num_classes)
    assert space.flops_ratio(policy) < 0.6


def test_training_is_cached_by_config(tiny_task, monkeypatch):
    task, cache = tiny_task
    files = list(cache.glob("shapes-*.pt"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("cached weights should have been used")

    monkeypatch.setattr(task_training, "train_classifier", no_training)
    again = load_task("shapes", TINY, cache_dir=cache)
    assert files[0].stat().st_mtime_ns == mtime
    assert all(torch.equal(again.base_state[k], v) for k, v in task.base_state.items())
    assert torch.equal(again.validation[0], task.validation[0])
    with pytest.raises(AssertionError, match="cached weights"):  # another seed is another cache file
        load_task("shapes", {**TINY, "seed": 1}, cache_dir=cache)


def test_training_is_deterministic(tiny_task, tmp_path):
    task, _ = tiny_task
    other = load_task("shapes", TINY, cache_dir=tmp_path)  # trained again from scratch
    assert all(torch.equal(other.base_state[k], v) for k, v in task.base_state.items())
