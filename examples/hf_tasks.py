"""Hugging Face ``transformers`` models as prunesearch task plugins (``pip install -e '.[hf]'``).

Each task builds a model from a small config (no download: never ``from_pretrained``), wraps
it so its forward returns ``.logits`` (prunesearch measures, prunes and exports plain
tensors), and gives it the generated shapes images (``evaluators.synthetic.generate_shapes``)::

    [task]
    name = "examples.hf_tasks:hf_image_task"

    [task.options]
    arch = "resnet"        # resnet | mobilenet_v2 | convnext | vit
    train_steps = 0        # > 0 trains the base model briefly (Adam) before the search

Architectures and what is searchable (``prunesearch describe`` lists the groups):
``resnet`` (ResNet-50 bottleneck layout), ``mobilenet_v2``, ``convnext`` and ``vit``.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn

ARCHS = ("resnet", "mobilenet_v2", "convnext", "vit", "bert", "llama")


class Logits(nn.Module):
    """A Hugging Face model whose forward returns ``.logits`` of its ``ModelOutput``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


def _config(arch: str, num_labels: int, image_size: int):
    import transformers as hf

    small = {"num_labels": num_labels}
    if arch == "resnet":  # ResNet-50 layout: bottleneck blocks, 4 stages, widths / 16
        return hf.ResNetConfig(embedding_size=16, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                               layer_type="bottleneck", **small)
    if arch == "mobilenet_v2":
        return hf.MobileNetV2Config(image_size=image_size, depth_multiplier=0.35, finegrained_output=False, **small)
    if arch == "convnext":
        return hf.ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], **small)
    if arch == "vit":
        return hf.ViTConfig(image_size=image_size, patch_size=8, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=64, **small)
    if arch == "bert":
        return hf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=32, **small)
    if arch == "llama":  # grouped-query attention: 8 query heads of 8 share 4 key/value heads
        return hf.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=8,
                              num_key_value_heads=4, head_dim=8, intermediate_size=64, max_position_embeddings=32,
                              pad_token_id=0, use_cache=False, **small)
    raise ValueError(f"unknown arch {arch!r}: known {', '.join(ARCHS)}")


def hf_model(arch: str, num_labels: int = 4, image_size: int = 32) -> Logits:
    """A freshly initialised ``arch`` model (random weights from the torch seed), wrapped."""
    import transformers as hf

    config = _config(arch, num_labels, image_size)
    classes = {"resnet": hf.ResNetForImageClassification, "mobilenet_v2": hf.MobileNetV2ForImageClassification,
               "convnext": hf.ConvNextForImageClassification, "vit": hf.ViTForImageClassification,
               "bert": hf.BertForSequenceClassification, "llama": hf.LlamaForSequenceClassification}
    return Logits(classes[arch](config)).eval()


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    model.eval()


def _digits(n: int, image_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` of scikit-learn's bundled 8x8 digits (no download), shuffled, as RGB ``image_size`` images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    if n > len(digits.target):
        raise ValueError(f"data 'digits' has {len(digits.target)} images: 3 * samples = {n} is too many")
    order = torch.randperm(len(digits.target), generator=torch.Generator().manual_seed(seed))[:n]
    x = torch.tensor(digits.images, dtype=torch.float32)[order].unsqueeze(1) / 16.0
    x = nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return ((x - 0.5) / 0.5).repeat(1, 3, 1, 1).contiguous(), torch.tensor(digits.target, dtype=torch.long)[order]


def hf_image_task(arch: str = "resnet", seed: int = 0, samples: int = 64, image_size: int = 32, num_classes: int = 4,
                  train_steps: int = 0, data: str = "shapes", cache_dir: Path | None = None):
    """A task over a small Hugging Face image classifier: ``samples`` images each for
    training, calibration and validation, of generated shapes (``num_classes`` kinds) or of
    scikit-learn's digits (``data = "digits"``: 10 classes, at most 599 samples). With
    ``train_steps`` the base model is trained that many Adam steps first, and its weights
    cached under ``cache_dir`` (``[task] cache_dir``) by the hash of the options."""
    from evaluators.synthetic import generate_shapes
    from evaluators.tasks import Task

    if arch not in ARCHS[:4]:
        raise ValueError(f"unknown image arch {arch!r}: known {', '.join(ARCHS[:4])}")
    if data not in ("shapes", "digits"):
        raise ValueError(f"unknown data {data!r}: known shapes, digits")
    num_classes = 10 if data == "digits" else num_classes
    config = {"arch": arch, "seed": seed, "samples": samples, "image_size": image_size,
              "num_classes": num_classes, "train_steps": train_steps, "data": data}
    if data == "digits":
        x, y = _digits(3 * samples, image_size, seed)
    else:
        x, y = generate_shapes(3 * samples, seed=seed, image_size=image_size, num_classes=num_classes)
    torch.manual_seed(seed)
    build = functools.partial(hf_model, arch, num_classes, image_size)
    model = build()
    if train_steps > 0:
        key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
        cached = Path(cache_dir) / f"hf-{arch}-{key}.pt" if cache_dir is not None else None
        if cached is not None and cached.exists():
            model.load_state_dict(torch.load(cached, weights_only=True))
        else:
            _train(model, x[:samples], y[:samples], train_steps, seed)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                torch.save(model.state_dict(), cached)
    splits = [(x[i * samples:(i + 1) * samples], y[i * samples:(i + 1) * samples]) for i in range(3)]
    return Task(name=f"hf-{arch}", build_model=build, train=splits[0], calibration=splits[1], validation=splits[2],
                example_inputs=x[:1].clone(), num_classes=num_classes,
                base_state={k: v.clone() for k, v in model.state_dict().items()}, config=config)
