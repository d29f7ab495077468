"""Which layers of a pruned model least-squares compensation can refit, and which rows and
columns of the base layer's weights each one kept (pruning copies them exactly)."""

from __future__ import annotations

import torch
import torch.nn as nn


def in_width(module: nn.Module) -> int | None:
    """Input channels / features of a weighted layer; None for other modules."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() >= 2:
        return weight.shape[1]
    return None


def conv_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """Symmetric padding of ``conv`` per side; None for asymmetric \"same\" padding."""
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
    if any(t % 2 for t in total):
        return None  # asymmetric "same" padding: not expressible with F.unfold
    return tuple(t // 2 for t in total)


def unsupported(module: nn.Module) -> str | None:
    """Why ``module`` (whose input width shrank) cannot be compensated, or None."""
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return (f"grouped/depthwise conv (groups={module.groups}): each output reads only its own input "
                    "channels, which were removed together with it")
        if module.padding_mode != "zeros":
            return f"padding_mode {module.padding_mode!r} is not zero padding"
        if conv_padding(module) is None:
            return "asymmetric 'same' padding"
        return None
    return f"{type(module).__name__} is not a Conv2d or Linear (not compensated as linear in its inputs)"


def _match_rows(small: torch.Tensor, big: torch.Tensor, same_width: bool) -> list[int] | None:
    """Indices i_0 < i_1 < ... of ``big``'s rows that ``small``'s rows were taken from.

    ``same_width``: rows are compared whole; otherwise a row matches when every value of
    the small row occurs in the big row (its columns were sliced too). Candidates are the
    big rows holding the small row's first value, found by binary search in the sorted
    values (memory linear in the weights).
    """
    width = big.shape[1]
    values, order = torch.sort(big.reshape(-1))
    firsts = small[:, 0].contiguous()
    lo = torch.searchsorted(values, firsts, right=False).tolist()
    hi = torch.searchsorted(values, firsts, right=True).tolist()
    picked: list[int] = []
    j = 0
    for r, row in enumerate(small):
        found = None
        for c in sorted({int(i) // width for i in order[lo[r]:hi[r]]}):
            if c < j:
                continue
            cand = big[c]
            if torch.equal(row, cand) if same_width else bool(torch.isin(row, cand).all()):
                found = c
                break
        if found is None:
            return None
        picked.append(found)
        j = found + 1
    return picked


def kept_indices(pruned_weight: torch.Tensor, base_weight: torch.Tensor) -> tuple[list[int], list[int]] | None:
    """(kept output rows, kept input columns) of ``base_weight`` giving ``pruned_weight``.

    Works on ``[out, in, *kernel]`` weights; None when no exact match exists.
    """
    p, b = pruned_weight.detach(), base_weight.detach()
    if p.dim() != b.dim() or p.shape[2:] != b.shape[2:]:
        return None
    rows_p, rows_b = p.flatten(1), b.flatten(1)
    if p.shape[0] == b.shape[0]:
        rows = list(range(b.shape[0]))
    else:
        rows = _match_rows(rows_p, rows_b, same_width=p.shape[1] == b.shape[1])
        if rows is None:
            return None
    sub = b[rows]
    cols = _match_rows(p.transpose(0, 1).flatten(1), sub.transpose(0, 1).flatten(1), same_width=True)
    if cols is None or not torch.equal(b[rows][:, cols], p):
        return None
    return rows, cols
