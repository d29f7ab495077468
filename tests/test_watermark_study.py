"""The watermark through the whole service: projected trials, export manifest, `prunesearch verify`."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from search.cli import main
from search.config import load_config
from search.export import export_study
from search.runner import run_study
from search.records import read_trials
from spaces.watermark import Watermark, channel_counts_from_policy
from tests.fakes import local_pool, tiny_config

KEY = "s3cr3t-watermark-key-7f1c9e"


def watermark_config(tmp: Path, key: str | None = KEY, name: str = "marked") -> Path:
    key_file = tmp / f"{name}.key"
    if key is not None:
        key_file.write_text(key)
    path = tiny_config(tmp, name=name, n_trials=6)
    with open(path, "a", encoding="utf-8") as f:
        f.write(f'\n[watermark]\nkey_file = "{key_file}"\nmessage = "(c) prunesearch tests"\nmax_shift = 0.25\n')
    return path


@pytest.fixture(scope="module")
def marked_study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wm")
    path = watermark_config(tmp)
    config = load_config(path)
    run_study(config, pool_factory=lambda p, a: local_pool(p.task, p.space, p.config.evaluation), progress=False)
    summary = export_study(config, out=tmp / "exports" / "marked")
    return tmp, path, config, summary


def test_every_trial_carries_the_mark_and_keeps_its_proposal(marked_study):
    tmp, path, config, _ = marked_study
    from search.setup import load_task_and_space

    _, space = load_task_and_space(config)
    mark = Watermark.from_space(space, config.watermark)
    study = optuna.load_study(study_name="marked", storage=config.study.storage_url)
    records = [r for r in read_trials(study) if r.policy is not None]
    assert len(records) == 6
    for r in records:
        result = mark.verify(channel_counts_from_policy(r.policy, space.groups, space.round_to))
        assert result.passed and result.ber == 0.0
    assert any("proposal" in r.meta for r in records)  # the un-projected proposal is kept


def test_export_writes_manifest_and_verify_passes(marked_study, capsys):
    tmp, path, _, summary = marked_study
    assert summary.directories
    for directory in summary.directories:
        manifest = json.loads((directory / "watermark.json").read_text())
        assert manifest["n_bits"] >= 1 if "n_bits" in manifest else True
        assert main(["verify", str(path), str(directory)]) == 0
    assert main(["verify", str(path), "--capacity"]) == 0
    assert "bits" in capsys.readouterr().out


def test_wrong_key_does_not_verify(marked_study, tmp_path):
    _, _, _, summary = marked_study
    other = watermark_config(tmp_path, key="a-completely-different-key", name="other")
    assert main(["verify", str(other), str(summary.directories[0])]) == 1


def test_key_never_reaches_storage_logs_or_exports(marked_study):
    tmp, _, _, _ = marked_study
    for file in tmp.rglob("*"):
        if file.is_file() and not file.name.endswith(".key"):
            assert KEY.encode() not in file.read_bytes(), file


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_bad_key_file_exits_2_with_one_line(tmp_path, capsys, case):
    path = watermark_config(tmp_path, key=None if case == "missing" else "")
    rc = main(["run", str(path), "--no-progress"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("prunesearch: error: ")
    assert not (tmp_path / "marked.db").exists()


def test_message_longer_than_capacity_is_refused(tmp_path, capsys):
    path = watermark_config(tmp_path)
    text = path.read_text().replace('message = "(c) prunesearch tests"', 'message = "too long"\nencoding = "raw"')
    path.write_text(text)
    rc = main(["run", str(path), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "capacity" in err
