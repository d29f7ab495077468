"""image-folder decodes lazily: loading reads headers and one image, a batch decodes its
own images, and the samples are what decoding the whole folder at once gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluators.image_folder as image_folder
from evaluators.task_training import seeded_split
from evaluators.tasks import SPLITS, load_task

MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.3, 0.2]


def _write(root: Path, per_class: int = 10) -> None:
    rng = np.random.default_rng(1)
    for c, name in enumerate(["a", "b", "c"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 60, (12, 12, 3), dtype=np.uint8)
            arr[..., c] += 180
            Image.fromarray(arr).save(root / name / f"{i}.png")


@pytest.fixture
def folder(tmp_path):
    _write(tmp_path / "img")
    opts = {"path": str(tmp_path / "img"), "model": "tests.test_tasks:TinyConvNet",
            "model_options": {"num_classes": 3}, "image_size": 8, "epochs": 1, "mean": MEAN, "std": STD}
    return tmp_path, opts


def _eager(root: Path, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole folder decoded at once, as image-folder did before it streamed."""
    files = [(f, c) for c, cls in enumerate(sorted(p.name for p in root.iterdir())) for f in sorted((root / cls).iterdir())]
    images = [np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
              for f, _ in files]
    x = torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy())
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return x, torch.tensor([c for _, c in files])


def test_splits_hold_the_samples_decoding_the_folder_at_once_gives(folder):
    tmp, opts = folder
    task = load_task("image-folder", opts, cache_dir=tmp / "cache")
    x, y = _eager(tmp / "img", 8)
    for split, idx in zip(SPLITS, seeded_split(len(y), tuple(opts.get("split", [0.6, 0.15, 0.25])), 0)):
        assert isinstance(task.split(split), image_folder.ImageFiles)
        (got_x, got_y), = task.batches(split, len(idx), seed=None)
        assert torch.equal(got_y, y[idx])
        assert torch.allclose(got_x, x[idx], atol=1e-6)
    assert torch.allclose(task.example_inputs, x[:1], atol=1e-6)


def test_loading_decodes_one_image_and_a_subset_decodes_only_its_samples(folder, monkeypatch):
    tmp, opts = folder
    trained = load_task("image-folder", opts, cache_dir=tmp / "cache")  # trains (decodes the train split)
    decoded = []
    real = image_folder.decode_image
    monkeypatch.setattr(image_folder, "decode_image", lambda f, *a: (decoded.append(f), real(f, *a))[1])
    task = load_task("image-folder", opts, cache_dir=tmp / "cache")  # cached weights: nothing to train
    assert all(torch.equal(v, task.base_state[k]) for k, v in trained.base_state.items())
    assert len(decoded) == 1 + len(SPLITS)  # the example, and each split's first item (its form is checked)
    decoded.clear()
    first = task.batches("validation", 2, limit=3, seed=4)
    assert len(decoded) == 3 and [len(b[1]) for b in first] == [2, 1]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, task.batches("validation", 2, limit=3, seed=4)))


def test_num_workers_option_reads_the_same_batches(folder):
    tmp, opts = folder
    one = load_task("image-folder", opts, cache_dir=tmp / "cache")
    two = load_task("image-folder", {**opts, "num_workers": 2}, cache_dir=tmp / "cache")
    assert (one.num_workers, two.num_workers) == (0, 2)
    assert len(list((tmp / "cache").glob("*.pt"))) == 1  # how images are read does not name other weights
    for (xa, ya), (xb, yb) in zip(one.batches("train", 4, seed=2), two.batches("train", 4, seed=2)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("value", [-1, 1.5, "two"])
def test_bad_num_workers_is_one_line(folder, value):
    tmp, opts = folder
    with pytest.raises(ValueError, match=f"image-folder option num_workers must be an integer >= 0, got {value!r}"):
        load_task("image-folder", {**opts, "num_workers": value}, cache_dir=tmp / "cache")


def test_a_file_that_is_not_an_image_is_refused_at_load(folder):
    tmp, opts = folder
    (tmp / "img" / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        load_task("image-folder", opts, cache_dir=tmp / "cache")


def test_ray_workers_stream_the_folder_from_the_spec(ray_session, folder):
    """The pool's workers build the lazy task from its spec: what goes through the object
    store is the spec and the weights, and their Metrics are the in-process ones."""
    from evaluators.evaluate import evaluate
    from evaluators.pool import EvaluatorPool
    from spaces.space import SearchSpace
    from tests.fakes import FAST_EVAL

    tmp, opts = folder
    task = load_task("image-folder", opts, cache_dir=tmp / "cache")
    space = SearchSpace.from_model(task.base_model(), task.example_inputs, ratio_min=0.4)
    policy = space.sample(np.random.default_rng(0))
    expected = evaluate(policy, task, FAST_EVAL, groups=space.groups)
    with EvaluatorPool(task, groups=space.groups, settings=FAST_EVAL, workers=1) as pool:
        assert type(ray_session.get(pool._task_args[0])).__name__ == "TaskSpec"
        pool.submit(policy, tag=0)
        got = []
        while not got:
            got = pool.results(timeout=60)
    metrics = got[0][2]
    assert metrics.ok, metrics.error
    assert (metrics.accuracy, metrics.flops, metrics.params) == (expected.accuracy, expected.flops, expected.params)
