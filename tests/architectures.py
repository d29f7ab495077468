"""Hand-written architectures covering the channel-coupling patterns pruning must handle."""

from __future__ import annotations

import torch
import torch.nn as nn


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class PlainCNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 16), conv_bn(16, 32, stride=2), conv_bn(32, 32), nn.MaxPool2d(2))
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.features(x).flatten(1)
        return self.head(torch.relu(self.fc1(x)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetStyle(nn.Module):
    def __init__(self, widths=(16, 32, 64), blocks: int = 2, num_classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, widths[0])
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, w, stride=2 if (b == 0 and i > 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            conv_bn(cin, hidden, 1),
            conv_bn(hidden, hidden, 3, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        return x + self.block(x) if self.use_res else self.block(x)


class MobileNetV2Style(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 16, stride=1)
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, 1, 2),
            InvertedResidual(16, 24, 2, 4),
            InvertedResidual(24, 24, 1, 4),
            InvertedResidual(24, 32, 2, 4),
        )
        self.last = conv_bn(32, 64, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.last(self.blocks(self.stem(x)))).flatten(1))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(torch.relu(self.bn(x)))], 1)


class DenseNetStyle(nn.Module):
    def __init__(self, num_classes: int = 10, growth: int = 12):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, padding=1, bias=False)
        layers, c = [], 24
        for _ in range(3):
            layers.append(DenseLayer(c, growth))
            c += growth
        self.dense1 = nn.Sequential(*layers)
        self.trans = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 32, 1, bias=False), nn.AvgPool2d(2))
        layers, c = [], 32
        for _ in range(2):
            layers.append(DenseLayer(c, growth))
            c += growth
        self.dense2 = nn.Sequential(*layers)
        self.norm = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.dense2(self.trans(self.dense1(self.stem(x))))
        x = torch.relu(self.norm(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class TokenMLP(nn.Module):
    """Transformer-style stack of pre-norm MLP blocks over a (B, tokens, dim) sequence."""

    def __init__(self, in_dim: int = 12, dim: int = 32, hidden: int = 64, depth: int = 3, num_classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.blocks = nn.Sequential(*[MLPBlock(dim, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.norm(self.blocks(self.embed(x)))
        return self.head(x.mean(1))


class GroupedConvNet(nn.Module):
    """A grouped (non-depthwise) conv, which torch_pruning cannot prune channel-wise."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = conv_bn(3, 16)
        self.grouped = conv_bn(16, 16, groups=4)
        self.conv3 = conv_bn(16, 32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.conv3(self.grouped(self.conv1(x)))
        return self.fc(x.mean((2, 3)))


ARCHITECTURES = {
    "plain_cnn": (PlainCNN, lambda: torch.randn(1, 3, 16, 16)),
    "resnet": (ResNetStyle, lambda: torch.randn(1, 3, 16, 16)),
    "mobilenetv2": (MobileNetV2Style, lambda: torch.randn(1, 3, 16, 16)),
    "densenet": (DenseNetStyle, lambda: torch.randn(1, 3, 16, 16)),
    "token_mlp": (TokenMLP, lambda: torch.randn(1, 8, 12)),
}
