"""RunFolder: what is recognised as a run folder, what --overwrite may remove, and when."""

import json

import pytest

from engine.errors import InputError
from engine.run.folder import MARKER, RunFolder, is_run_folder


def make_run(folder, finished=True, legacy=False):
    folder.mkdir(parents=True)
    if legacy:  # a run written before run.json existed
        (folder / "config.json").write_text(json.dumps({"model": "m", "data": "d", "method": "sft", "lora_r": 4,
                                                        "output": str(folder)}))
        (folder / "metrics.jsonl").write_text("")
    else:
        (folder / MARKER).write_text("{}")
        (folder / "config.json").write_text("{}")
    (folder / "adapter").mkdir()
    if finished:
        (folder / "run_complete.json").write_text("{}")
    return folder


@pytest.mark.parametrize("legacy", [False, True])
def test_run_folders_are_recognised_by_their_marker_or_legacy_config(tmp_path, legacy):
    assert is_run_folder(make_run(tmp_path / "run", legacy=legacy))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    (model / "metrics.jsonl").write_text("")
    assert not is_run_folder(model)


def test_overwrite_is_refused_when_it_would_delete_what_the_run_reads(tmp_path):
    run = make_run(tmp_path / "run")
    inner_adapter = run / "adapter"
    with pytest.raises(InputError, match="--overwrite would delete"):
        RunFolder(run, resume=False, overwrite=True).check(protect=[inner_adapter])


def test_begin_clears_only_owned_entries_and_abandon_removes_only_what_claim_made(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    folder = RunFolder(run, resume=False, overwrite=True)
    folder.check(protect=[])
    folder.claim(protect=[])
    folder.begin("sft")
    assert sorted(p.name for p in run.iterdir()) == [".lock", "notes.txt", MARKER]
    folder.release()
    fresh = RunFolder(tmp_path / "a" / "b", resume=False, overwrite=False)
    fresh.check(protect=[])
    fresh.claim(protect=[])
    fresh.abandon()
    assert not (tmp_path / "a" / "b").exists()


def test_resume_and_overwrite_contradict(tmp_path):
    with pytest.raises(InputError, match="contradict"):
        RunFolder(tmp_path, resume=True, overwrite=True).check(protect=[])
