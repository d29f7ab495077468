"""[evaluation] device: the names accepted, where CUDA is checked, and the CPU path end to end.

This machine has no GPU: what runs here is the CPU path and every refusal of CUDA; the
CUDA branches (event timing, models and batches on a GPU) run only in
``benchmarks/gpu_check.py`` on a GPU machine.
"""

from __future__ import annotations

import copy

import pytest
import torch

from evaluators import timing
from evaluators.build import build_pruned
from evaluators.devices import check_device, model_device, on_device, placed, resolve_device, to_device
from evaluators.evaluate import evaluate, evaluate_model
from evaluators.settings import EvalSettings
from search.config import ConfigError, load_config
from search.setup import check_device as check_study_device
from search.setup import local_gpus
from tests.fakes import tiny_config, tiny_space, tiny_task

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of CUDA where there is none")
CPU = torch.device("cpu")


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:7", "cuda:1234"])
def test_device_names_accepted(name):
    assert check_device("device", name) == name
    assert EvalSettings(device=name).device == name  # syntax only: stored settings read back anywhere


@pytest.mark.parametrize("name", ["gpu", "CUDA", "cuda:", "cuda:-1", "cuda:01", "cuda:0 ", "mps", "", 0, None])
def test_bad_device_names_are_one_line_errors(name):
    with pytest.raises(ValueError, match=r"^device must be one of 'auto', 'cpu', 'cuda', 'cuda:N', got ") as err:
        EvalSettings(device=name)
    assert "\n" not in str(err.value)


def test_device_round_trips_through_stored_settings():
    settings = EvalSettings(device="cpu", seed=3)
    assert settings.to_dict()["device"] == "cpu"
    assert EvalSettings.from_dict(settings.to_dict()) == settings
    assert EvalSettings().device == "auto"


def test_auto_and_cpu_resolve_here():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto") == (torch.device("cuda", torch.cuda.current_device())
                                      if torch.cuda.is_available() else CPU)


@NO_CUDA
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_is_refused_where_there_is_none(name):
    with pytest.raises(ValueError, match=rf"^device '{name}' asks for CUDA, but CUDA is not available here") as err:
        resolve_device(name)
    assert "\n" not in str(err.value)


def test_batches_move_whole_and_models_come_back_where_they_were():
    batch = ({"x": torch.ones(2)}, [torch.zeros(1), 3], "label")
    moved = to_device(batch, CPU)
    assert moved[0]["x"] is batch[0]["x"] and moved[1][1] == 3 and moved[2] == "label"  # no copy when already there
    model = torch.nn.Linear(2, 2)
    assert placed(model, CPU) is model
    with on_device(model, CPU) as m:
        assert m is model
    assert model_device(model) == CPU
    assert model_device(torch.nn.ReLU()) == CPU  # no parameters: the CPU


def test_cpu_device_evaluates_exactly_as_before(digits_setup):
    task, model, space = digits_setup
    settings = EvalSettings(calibration_samples=64, bn_batches=2, eval_samples=200, recovery="finetune",
                            finetune_steps=2, measure_latency=True)
    policy = space(0.3).uniform(0.5)
    on_cpu = evaluate(policy, task, settings.replace(device="cpu"), base_model=model)
    assert on_cpu.ok, on_cpu.error
    assert on_cpu.latency_ms > 0 and on_cpu.latency_ratio > 0
    # "auto": the same costs anywhere; the same accuracy where it is the CPU (latency is timed)
    auto = evaluate(policy, task, settings.replace(device="auto"), base_model=model)
    same = ("flops", "params", "flops_ratio", "params_ratio") + (() if torch.cuda.is_available() else ("accuracy",))
    assert auto.ok and [getattr(auto, k) for k in same] == [getattr(on_cpu, k) for k in same]


def test_export_path_keeps_its_model_on_the_cpu():
    task, space = tiny_task(), tiny_space()
    settings = EvalSettings(calibration_samples=32, bn_batches=2, batch_size=32, device="auto")
    base = task.base_model()
    before = copy.deepcopy(base.state_dict())
    model = build_pruned(space.uniform(0.5), task, settings, groups=space.groups, base=base)
    assert model_device(model) == CPU  # given a CPU base model, a CPU model comes back
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # base untouched
    metrics = evaluate_model(model, task, settings)
    assert metrics.ok and model_device(model) == CPU


def test_cpu_timing_is_wall_time():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.inference_mode():
        assert timing.forward_ms(model, x, CPU) > 0
    assert timing.measure_latency_ms(model, x, runs=3, warmup=1) > 0


def _study(tmp_path, study: str = "", evaluation: str = ""):
    path = tiny_config(tmp_path)
    text = path.read_text().replace("n_trials = 12", "n_trials = 12\n" + study)
    path.write_text(text.replace("[evaluation]\n", "[evaluation]\n" + evaluation + "\n"))
    return load_config(path)


@NO_CUDA
def test_study_check_refuses_cuda_on_this_machine(tmp_path):
    config = _study(tmp_path, evaluation='device = "cuda"')
    with pytest.raises(ConfigError, match=r"^\[evaluation\] device 'cuda' asks for CUDA"):
        check_study_device(config)
    check_study_device(_study(tmp_path, evaluation='device = "auto"'))  # auto falls back to the CPU
    # workers given GPUs by Ray: the driver's own CUDA does not matter on a cluster ...
    gpus = _study(tmp_path, study="gpus_per_worker = 0.5", evaluation='device = "cuda"')
    check_study_device(gpus, on_cluster=True)
    check_study_device(gpus)  # not yet known whether the run joins a cluster: start_ray checks
    # ... but a local Ray's workers are processes of this machine
    with pytest.raises(ConfigError, match="asks for CUDA"):
        check_study_device(gpus, on_cluster=False)


@NO_CUDA
def test_local_ray_declares_the_gpus_the_workers_ask_for(tmp_path):
    assert local_gpus(_study(tmp_path)) is None  # none asked: Ray counts the machine's own
    assert local_gpus(_study(tmp_path, study="workers = 3\ngpus_per_worker = 0.5")) == 2
    assert local_gpus(_study(tmp_path, study="workers = 2\ngpus_per_worker = 1")) == 2


@NO_CUDA
def test_latency_table_is_measured_on_the_device_and_refuses_cuda_here(tmp_path):
    from evaluators.latency_table import LatencyConfig, build_latency_table
    from search.setup import latency_table_of

    task, space = tiny_task(), tiny_space()
    config = LatencyConfig(runs=2, warmup=1, levels=(0.5,), calibration=2)
    table = build_latency_table(task.base_model(), task.example_inputs, space, config, cache_dir=tmp_path)
    # "cpu" and "auto" (the CPU here) share the key a table built before devices existed had
    again = build_latency_table(task.base_model(), task.example_inputs, space, config, cache_dir=tmp_path,
                                device="auto")
    assert again.key == table.key and len(list(tmp_path.glob("latency-*.json"))) == 1
    with pytest.raises(ValueError, match="asks for CUDA"):
        build_latency_table(task.base_model(), task.example_inputs, space, config, device="cuda")
    # workers on a cluster's GPUs skip the driver's check, but the table is measured on the driver
    study = _study(tmp_path, study="gpus_per_worker = 0.5", evaluation='device = "cuda"')
    with pytest.raises(ConfigError, match=r"^\[latency\] table: device 'cuda' asks for CUDA"):
        latency_table_of(study, task, space)


def test_resuming_with_another_device_is_refused(tmp_path):
    from search.runner import run_study
    from search.setup import prepare
    from tests.fakes import FakePool

    first = _study(tmp_path, evaluation='device = "cpu"').with_overrides(n_trials=2)
    run_study(first, pool_factory=lambda p, a: FakePool(p.space), progress=False)
    with pytest.raises(ConfigError, match=r"other \[evaluation\] settings \(device differ\)"):
        prepare(_study(tmp_path, evaluation='device = "auto"'))


def test_a_gpu_index_beyond_what_ray_gives_a_worker_is_refused(tmp_path):
    config = _study(tmp_path, study="gpus_per_worker = 0.5", evaluation='device = "cuda:1"')
    for on_cluster in (None, True, False):
        with pytest.raises(ConfigError, match=r"gpus_per_worker = 0.5 each worker sees only the 1 GPU\(s\)"):
            check_study_device(config, on_cluster)
    two = _study(tmp_path, study="gpus_per_worker = 2", evaluation='device = "cuda:1"')
    check_study_device(two, on_cluster=True)  # a worker given 2 GPUs sees cuda:0 and cuda:1
