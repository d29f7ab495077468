"""Group discovery gives the same groups in every process.

``output_layers`` matched the model's outputs to layer outputs by storage address without
holding the layer outputs: a layer output freed during the forward (no_grad) hands its memory
to a later tensor, the model's output too, so an earlier layer (on ``markov-lm``: a q/k/v
projection, ``fc1``, an ``out_proj``) was taken for an output layer in some processes and
ignored. Torch-Pruning then traced that layer as a plain op, the residual stream's group
reached into the attention's projections (setting ``num_heads`` without pruning them) and
groups went missing, so a run's groups and a later process's differed ("groups differ").
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from evaluators.language import build_lm, generate_sequences
from spaces.groups import build_graph, discover_groups, forward, output_layers, prune_group

ROOT = Path(__file__).resolve().parents[1]
PROCESSES = 8

# What each fresh process reports: the output layers of 20 calls (a freed layer output's
# address is reused differently call by call as well as process by process) and every
# discovered group with its members in order and its block counts.
DISCOVER = """
import json, torch
torch.set_num_threads(1)
from evaluators.language import build_lm, generate_sequences
from spaces.groups import discover_groups, output_layers
torch.manual_seed(0)
x, _ = generate_sequences(2)
model = build_lm(16, 16, 32, 4, 64, 2).eval()
inputs = {k: v[:1] for k, v in x.items()}
outputs = sorted({tuple(output_layers(model, inputs)) for _ in range(20)})
groups = [[g.name, g.channels, g.unit, list(g.members), [[c.module, c.attr, c.size] for c in g.counts], g.heads]
          for g in discover_groups(model, inputs)]
print(json.dumps({"outputs": outputs, "groups": groups}))
"""

STREAM = {"embed", "blocks.0.norm1", "blocks.0.attn.out_proj", "blocks.0.norm2", "blocks.0.fc2",
          "blocks.1.norm1", "blocks.1.attn.out_proj", "blocks.1.norm2", "blocks.1.fc2", "norm"}
# markov-lm (dim 32, 4 heads of 8, hidden 64, depth 2): per block its heads (q/k/v, in whole
# heads of 8 channels) and its MLP's hidden width, plus the residual stream, which feeds the
# attention's q/k/v only as inputs and so prunes channel by channel without touching num_heads.
EXPECTED = [
    ("blocks.0.attn.v_proj", 4, 8, {"blocks.0.attn.q_proj", "blocks.0.attn.k_proj", "blocks.0.attn.v_proj"},
     [["blocks.0.attn", "num_heads", 8]]),
    ("blocks.0.fc1", 64, 1, {"blocks.0.fc1"}, []),
    ("blocks.1.attn.v_proj", 4, 8, {"blocks.1.attn.q_proj", "blocks.1.attn.k_proj", "blocks.1.attn.v_proj"},
     [["blocks.1.attn", "num_heads", 8]]),
    ("blocks.1.fc1", 64, 1, {"blocks.1.fc1"}, []),
    ("blocks.1.fc2", 32, 1, STREAM, []),
]


def _markov_lm():
    torch.manual_seed(0)
    x, _ = generate_sequences(2)
    return build_lm(16, 16, 32, 4, 64, 2).eval(), {k: v[:1] for k, v in x.items()}


def _discover_in_fresh_process(_: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", DISCOVER], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_markov_lm_groups_are_the_same_in_every_fresh_process():
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(_discover_in_fresh_process, range(PROCESSES)))
    assert all(r["groups"] == results[0]["groups"] for r in results), \
        "\n".join(json.dumps(r["groups"]) for r in results)
    found = [(name, channels, unit, set(members), counts) for name, channels, unit, members, counts, _ in
             results[0]["groups"]]
    assert found == EXPECTED
    assert all(r["outputs"] == [["lm_head"]] for r in results), [r["outputs"] for r in results]


def test_output_layers_never_name_a_layer_whose_freed_output_memory_the_output_reuses():
    model, inputs = _markov_lm()
    assert {tuple(output_layers(model, inputs)) for _ in range(50)} == {("lm_head",)}


def test_markov_lm_residual_stream_prunes_without_touching_attention_heads():
    model, inputs = _markov_lm()
    stream = {g.name: g for g in discover_groups(model, inputs)}["blocks.1.fc2"]
    work = copy.deepcopy(model)
    modules = dict(work.named_modules())
    prune_group(build_graph(work, inputs), modules, stream, [0, 5])
    with torch.no_grad():
        assert forward(work, inputs).shape == (1, 16, 16)
    for block in ("blocks.0", "blocks.1"):
        attn = modules[f"{block}.attn"]
        assert attn.num_heads == 4 and attn.q_proj.in_features == 30 and attn.q_proj.out_features == 32
        assert modules[f"{block}.fc2"].out_features == 30
