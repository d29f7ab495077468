"""What prunesearch reads must not run code; what it writes must not leak the watermark key.

* every ``torch.load`` in the packages is ``weights_only=True``; nothing unpickles,
  ``eval``s or ``exec``s otherwise;
* a poisoned base-model cache or export ``weights.pt`` is refused or rebuilt, its payload
  never runs;
* naming a module in a config runs it only where the README says so: a task plugin;
* the watermark key appears in no storage, log, console output or exported file.
"""

from __future__ import annotations

import ast
import base64
import io
import os
import pickle
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import search.runner
from search.cli import main
from search.config import ConfigError, load_config
from search.setup import prepare
from tests.fakes import FakePool, tiny_config, tiny_task

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("spaces", "evaluators", "search")
KEY = b"KEYMATERIAL-7f3c1a9e5b2d4086-do-not-leak"


class Payload:
    """Unpickling this creates a directory: proof that a load ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _poison(path: Path, marker: Path) -> None:
    torch.save({"weight": Payload(marker)}, path)  # torch's own zip format, as a real file would be


# -- static: how files are read ------------------------------------------------------------
def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_every_torch_load_is_weights_only_and_nothing_else_unpickles():
    problems, loads = [], 0
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node, func in _calls(tree):
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                if func == "torch.load":
                    loads += 1
                    kw = {k.arg: k.value for k in node.keywords}
                    if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                        problems.append(f"{where}: torch.load without weights_only=True")
                elif func in {"pickle.load", "pickle.loads", "dill.load", "dill.loads", "cloudpickle.load",
                              "cloudpickle.loads", "marshal.loads", "yaml.load", "eval", "exec", "torch.jit.load"}:
                    problems.append(f"{where}: {func}")
                elif func in {"np.load", "numpy.load"}:
                    kw = {k.arg: k.value for k in node.keywords}
                    if isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value:
                        problems.append(f"{where}: np.load(allow_pickle=True)")
    assert loads >= 3  # the task cache, image-folder weights, exports: the scan sees them
    assert not problems, problems


# -- poisoned files ------------------------------------------------------------------------
def test_a_poisoned_weight_cache_is_rebuilt_not_executed(tmp_path):
    from evaluators.task_training import cached_weights

    cache, marker = tmp_path / "digits-0123.pt", tmp_path / "pwned"
    _poison(cache, marker)
    trained = {"w": torch.ones(2)}
    state = cached_weights(cache, lambda: trained)
    assert not marker.exists()
    assert torch.equal(state["w"], trained["w"])                     # retrained...
    assert torch.equal(torch.load(cache, weights_only=True)["w"], trained["w"])  # ...and the cache replaced


@pytest.fixture(scope="module")
def watermarked(tmp_path_factory):
    """A watermarked tiny study run and exported through the CLI, with everything it printed."""
    tmp = tmp_path_factory.mktemp("security")
    key_file = tmp / "owner.key"
    key_file.write_bytes(KEY + b"\n")
    path = tiny_config(tmp, n_trials=6)
    path.write_text(path.read_text() + f'\n[watermark]\nkey_file = "{key_file}"\nmessage = "(c) tests"\n'
                    # the tiny model carries 4 bits: p = 1/16 when all match
                    'alpha = 0.1\n')
    config = load_config(path)
    printed = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(search.runner, "default_pool", lambda prepared, address: FakePool(prepared.space))
        for argv in (["run", str(path), "--no-progress"], ["status", str(path)], ["export", str(path)]):
            out, err = io.StringIO(), io.StringIO()
            mp.setattr(sys, "stdout", out)
            mp.setattr(sys, "stderr", err)
            assert main(argv) == 0, err.getvalue()
            printed.append(out.getvalue() + err.getvalue())
    exports = sorted((Path(config.export.dir) / config.name).glob("trial-*"))
    assert exports
    return tmp, path, config, exports, printed


def test_exports_load_as_plain_tensors(watermarked):
    from search.export import load_exported

    _, _, _, exports, _ = watermarked
    task = tiny_task()
    for directory in exports:
        state = torch.load(directory / "weights.pt", weights_only=True)
        assert state and all(isinstance(v, torch.Tensor) for v in state.values())
        model = load_exported(directory, task)
        assert isinstance(model, torch.nn.Module)


def test_poisoned_export_weights_are_refused_not_executed(watermarked, tmp_path, capsys):
    from search.export import load_exported

    _, path, _, exports, _ = watermarked
    suspect, marker = tmp_path / "suspect", tmp_path / "pwned"
    shutil.copytree(exports[0], suspect)
    _poison(suspect / "weights.pt", marker)
    with pytest.raises(pickle.UnpicklingError):
        load_exported(suspect, tiny_task())
    assert main(["verify", str(path), str(suspect)]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert not marker.exists()


def _poisoned_program(source: Path, target: Path, marker: Path) -> None:
    """A copy of a real model.pt2 whose sample inputs are a pickle that runs code."""
    bad = io.BytesIO()
    torch.save((Payload(marker),), bad)
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            zout.writestr(item, bad.getvalue() if item.filename.endswith("sample_inputs/model.pt") else data)


def test_verify_never_unpickles_a_suspect_model_pt2(watermarked, tmp_path):
    """``prunesearch verify`` is run on models of unknown origin: reading one must not run it."""
    from spaces.watermark import channel_counts_from_export_dir
    from tests.fakes import tiny_space

    _, _, _, exports, _ = watermarked
    suspect, marker = tmp_path / "suspect", tmp_path / "pwned"
    suspect.mkdir()
    _poisoned_program(exports[0] / "model.pt2", suspect / "model.pt2", marker)  # no weights.pt: pt2 is read
    try:
        channel_counts_from_export_dir(suspect, tiny_space().groups)
    except ValueError:
        pass  # refusing the file is fine; running it is not
    assert not marker.exists()


# -- code named in a config ----------------------------------------------------------------
PLUGIN = "marker_plugin_for_tests"
SPEC = f"{PLUGIN}:make"
ELSEWHERE = [  # (old, new): the plugin spec in every other string a config holds
    ('storage = "sqlite:///{tmp}/tiny.db"', f'storage = "{SPEC}"'),
    ('storage = "sqlite:///{tmp}/tiny.db"', f'storage = "{PLUGIN}://host/db"'),
    ('log_file = "{tmp}/tiny.log"', f'log_file = "{SPEC}"'),
    ('kind = "random"', f'kind = "{SPEC}"'),
    ('kind = "random"', f'kind = "tpe"\n[searchers.options]\nn_startup_trials = "{SPEC}"'),
    ("ratio_step = 0.1", f'ratio_step = 0.1\nmethods = ["{SPEC}"]'),
    ("ratio_step = 0.1", f'ratio_step = 0.1\nrecoveries = ["{SPEC}"]'),
    ("[evaluation]\n", f'[evaluation]\nrecovery = "{SPEC}"\n'),
    ('dir = "{tmp}/exports"', 'dir = "{tmp}/exports"\nformats = ["' + SPEC + '"]'),
    ('cache_dir = "{tmp}/cache"', f'cache_dir = "{SPEC}"'),
    ("[constraints]", f'[watermark]\nkey_file = "{{tmp}}/owner.key"\nmessage = "{SPEC}"\n\n[constraints]'),
]


def test_only_a_task_plugin_imports_code_named_in_a_config(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / f"{PLUGIN}.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
        "from tests.fakes import tiny_task as make\n"
    )
    monkeypatch.syspath_prepend(str(plugins))
    monkeypatch.delitem(sys.modules, PLUGIN, raising=False)
    (tmp_path / "owner.key").write_bytes(KEY)
    base = tiny_config(tmp_path, n_trials=4).read_text()
    for i, (old, new) in enumerate(ELSEWHERE):
        old = old.replace("{tmp}", str(tmp_path))
        assert old in base, old
        path = tmp_path / f"case{i}.toml"
        path.write_text(base.replace(old, new.replace("{tmp}", str(tmp_path))))
        try:
            prepare(load_config(path))  # everything a run checks before it writes
        except ConfigError:
            pass
        assert not marker.exists(), f"{new!r} imported the module"
    assert not (tmp_path / "tiny.db").exists()
    # the one documented way: a task plugin (the README says it is the only code a config runs)
    path = tmp_path / "plugin.toml"
    path.write_text(base.replace("tests.fakes:tiny_task", SPEC))
    prepare(load_config(path))
    assert marker.read_text() == "imported"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "plugin import is the only code" in " ".join(readme.split())


# -- the watermark key ---------------------------------------------------------------------
def _leaks(data: bytes) -> list[str]:
    forms = {"raw": KEY, "hex": KEY.hex().encode(), "base64": base64.b64encode(KEY),
             "utf-16": KEY.decode().encode("utf-16-le")}
    return [name for name, form in forms.items() if form in data]


def _file_contents(path: Path) -> list[tuple[str, bytes]]:
    """A file's bytes, and for zip archives (weights.pt, model.pt2) each member's."""
    data = path.read_bytes()
    out = [(str(path), data)]
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            out += [(f"{path}!{name}", archive.read(name)) for name in archive.namelist()]
    return out


def test_the_watermark_key_never_leaves_its_file(watermarked, capsys):
    tmp, path, config, exports, printed = watermarked
    assert main(["verify", str(path), str(exports[0])]) == 0  # the mark is there: the key was used
    printed.append("".join(capsys.readouterr()))
    assert all((d / "watermark.json").is_file() for d in exports)
    scanned = 0
    for file in sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != "owner.key"):
        for name, data in _file_contents(file):
            scanned += 1
            assert not _leaks(data), f"the key is in {name}"
    assert scanned > 10 and (tmp / "tiny.db").is_file() and config.study.log_path.is_file()
    for text in printed:
        assert not _leaks(text.encode()), text
