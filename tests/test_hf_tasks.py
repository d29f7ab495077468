"""#19 item 4: the Hugging Face image-classification plugin task (``examples.hf_tasks``) over
ResNet (ResNet-50 bottleneck layout), MobileNetV2, ConvNeXt and ViT built from small configs:
a short real study (in-process evaluation, no Ray) measures what the space predicted, and
its exported trials reload with the pruned structure and weights."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from search.cli import main  # noqa: E402
from search.config import load_config  # noqa: E402
from search.export import load_exported  # noqa: E402
from search.runner import run_study  # noqa: E402
from search.setup import load_task_and_space  # noqa: E402
from search.storage import load_records  # noqa: E402
from tests.fakes import local_pool, tiny_config  # noqa: E402

ARCHS = ("resnet", "mobilenet_v2", "convnext", "vit")


def _study(tmp, arch: str):
    path = tiny_config(tmp, name=arch, n_trials=3, constraints="max_flops_ratio = 0.95")
    text = path.read_text().replace('"tests.fakes:tiny_task"', '"examples.hf_tasks:hf_image_task"')
    path.write_text(text.replace("[space]", f'[task.options]\narch = "{arch}"\nsamples = 32\n\n[space]', 1))
    config = load_config(path)
    run_study(config, pool_factory=lambda p, a: local_pool(p.task, p.space, config.evaluation), progress=False)
    return config


@pytest.mark.parametrize("arch", ARCHS)
def test_a_hugging_face_model_is_searched_exported_and_reloaded(arch, tmp_path):
    config = _study(tmp_path, arch)
    task, space = load_task_and_space(config)
    records = [r for r in load_records(config) if r.metrics is not None]
    assert len(records) == 3 and len(space.groups) >= 5
    for r in records:
        assert r.metrics.error is None
        assert r.metrics.flops == space.predict_cost(r.policy).flops
    assert main(["export", config.source]) == 0
    dirs = sorted((tmp_path / "exports" / arch).glob("trial-*"))
    assert dirs
    x = task.validation[0][:2]
    for d in dirs:
        model = load_exported(d, task)  # groups rediscovered, as a fresh process does
        record = next(r for r in records if d.name == f"trial-{r.number}")
        kept = space.kept(record.policy)
        modules = dict(model.named_modules())
        for g in space.groups:
            root = modules[g.name]
            width = root.out_features if isinstance(root, torch.nn.Linear) else root.out_channels
            assert width == kept[g.name] * g.unit
        with torch.no_grad():
            out = model(x)
        assert out.shape == (2, task.num_classes)
        program = torch.export.load(str(d / "model.pt2"))
        with torch.no_grad():
            assert torch.allclose(program.module()(x), out, atol=1e-5)


def test_the_digits_variant_and_bad_options():
    from examples.hf_tasks import hf_image_task

    task = hf_image_task("vit", samples=8, data="digits")
    assert task.num_classes == 10 and task.train[0].shape == (8, 3, 32, 32)
    with torch.no_grad():
        assert task.base_model()(task.example_inputs).shape == (1, 10)
    with pytest.raises(ValueError, match="^unknown image arch 'bert'"):
        hf_image_task("bert")
    with pytest.raises(ValueError, match="^data 'digits' has 1797 images: 3 \\* samples = 1800 is too many$"):
        hf_image_task("vit", samples=600, data="digits")
