"""``engine.train`` given bad flags, bad TOML, bad data, a folder it must not touch, or a
checkpoint made for another run: exit 2, one line naming what is wrong, nothing changed."""

from __future__ import annotations

import json

import pytest

from tests.faults.conftest import cli, snapshot, train_args, write_jsonl


@pytest.mark.parametrize("flags, expected", [
    (["--lr", "nan"], "--lr: expected a finite number, got nan"),
    (["--lr", "inf"], "--lr: expected a finite number, got inf"),
    (["--adam-eps=-1e-8"], "--adam-eps: expected a value > 0"),
    (["--adam-beta1", "1.0"], "--adam-beta1: expected a value >= 0 and < 1"),
    (["--adam-beta2", "1.5"], "--adam-beta2: expected a value >= 0 and < 1"),
    (["--warmup-steps", "-1"], "--warmup-steps: expected a value >= 0"),
    (["--save-every", "-2"], "--save-every: expected a value >= 0"),
    (["--eval-every", "-1"], "--eval-every: expected a value >= 0"),
    (["--max-grad-norm", "nan"], "--max-grad-norm: expected a finite number"),
    (["--lora-dropout", "1"], "--lora-dropout: expected a value >= 0 and < 1"),
    (["--seed", "-3"], "--seed: expected a value >= 0"),
    (["--batch-size", "4.5"], "argument --batch-size: invalid int value: '4.5'"),
    (["--pack", "maybe"], "argument --pack: expected true or false, got 'maybe'"),
    (["--lora-r", "4", "--init-adapter", "somewhere"], "--lora-r: has no effect with --init-adapter"),
])
def test_bad_flags_exit_2_before_anything_is_created(flags, expected, tiny_model_dir, sft_data, tmp_path, capfd):
    out = tmp_path / "out"
    result = cli("train", *train_args(tiny_model_dir, sft_data, out), *flags, capfd=capfd)
    assert result.code == 2 and expected in result.message
    assert not out.exists()


@pytest.mark.parametrize("toml, expected", [
    ('pack = "false"\n', ":2: pack: expected true or false, got the string 'false'"),
    ("batch_size = 4.0\n", ":2: batch_size: expected a whole number, got the number 4.0"),
    ("lr = nan\n", ":2: lr: expected a finite number, got nan"),
    ("adam-beta2 = 1\n", ":2: adam-beta2: expected a value >= 0 and < 1, got 1"),
    ("learning_rate = 1e-4\n", ":2: unknown option 'learning_rate'"),
    ("lr = [1, 2]\n", ":2: lr: expected a number, got a list"),
])
def test_bad_toml_values_name_the_file_and_line(toml, expected, tiny_model_dir, sft_data, tmp_path, capfd):
    config = tmp_path / "run.toml"
    config.write_text("# overrides\n" + toml)
    out = tmp_path / "out"
    result = cli("train", *train_args(tiny_model_dir, sft_data, out), "--config", config, capfd=capfd)
    assert result.code == 2 and f"{config}{expected}" in result.message, result.message
    assert not out.exists()


def test_help_shows_one_default_per_option_and_the_exit_codes(capfd):
    result = cli("train", "--help", capfd=capfd)
    assert result.code == 0
    text = result.stdout
    assert "(default: None)" not in text
    for block in text.split("\n  --")[1:]:
        assert block.count("(default:") <= 1, block
    assert "--pack / --no-pack" in text and "Required." in text
    assert "exit status:" in text and "75" in text and "74" in text


# ---------------------------------------------------------------------------- data

def test_a_mistyped_field_is_an_error_naming_file_line_and_field(tiny_model_dir, sft_data, tmp_path, capfd):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": 7}])
    out = tmp_path / "out"
    result = cli("train", *train_args(tiny_model_dir, data, out), capfd=capfd)
    assert result.code == 2
    assert f"{data}:2: field 'completion' must be a string, got int" in result.message
    assert "--skip-invalid-records" in result.message and not out.exists()


def test_a_json_array_with_a_broken_record_names_its_element(tiny_model_dir, tmp_path, capfd):
    data = tmp_path / "bad.json"
    data.write_text(json.dumps([{"prompt": "a", "completion": "b"}, {"prompt": "c"}]))  # one line
    result = cli("train", *train_args(tiny_model_dir, data, tmp_path / "out"), capfd=capfd)
    assert result.code == 2 and f"{data}:1 (array element 1): field 'completion' is missing" in result.message


def test_skip_invalid_records_counts_them_and_trains(tiny_model_dir, sft_data, tmp_path, capfd):
    good = sft_data.read_text().splitlines()
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join([*good, json.dumps({"messages": [{"role": "bot", "content": "x"}]})]) + "\n")
    out = tmp_path / "out"
    result = cli("train", *train_args(tiny_model_dir, data, out), capfd=capfd)
    assert result.code == 2 and "messages[0].role is 'bot'" in result.message
    result = cli("train", *train_args(tiny_model_dir, data, out), "--skip-invalid-records", capfd=capfd)
    assert result.code == 0, result.stderr
    report = json.loads((out / "data_report.json").read_text())[0]
    assert report["skipped_missing_fields"] == 1 and report["lines"]["skipped_missing_fields"] == [len(good) + 1]


@pytest.mark.parametrize("content, expected", [
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', ":2: not UTF-8 text (byte 0xe9)"),
    (b'{"text": "ok"}\n' + b"[" * 100_000 + b"]" * 100_000 + b"\n", ":2: JSON nested too deeply"),
    (b'{"text": "ok"}\n{"text": "\\ud800 lone"}\n', ":2: a string holds a lone surrogate escape"),
])
def test_unreadable_data_is_one_line_not_a_traceback(content, expected, tiny_model_dir, tmp_path, capfd):
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    result = cli("train", *train_args(tiny_model_dir, data, tmp_path / "out"), capfd=capfd)
    assert result.code == 2 and f"{data}{expected}" in result.message


# ---------------------------------------------------------------------------- folders it must not touch

def test_overwrite_with_a_data_typo_keeps_the_finished_run(finished_copy, tiny_model_dir, tmp_path, capfd):
    before = snapshot(finished_copy)
    result = cli("train", *train_args(tiny_model_dir, tmp_path / "typo.jsonl", finished_copy), "--overwrite", capfd=capfd)
    assert result.code == 2 and "typo.jsonl: data file not found" in result.message
    assert snapshot(finished_copy) == before


def test_output_pointing_at_a_model_folder_is_refused(tiny_model_dir, sft_data, capfd):
    before = snapshot(tiny_model_dir)
    for extra in ([], ["--overwrite"]):
        result = cli("train", *train_args(tiny_model_dir, sft_data, tiny_model_dir), *extra, capfd=capfd)
        assert result.code == 2 and "holds a model" in result.message
    assert snapshot(tiny_model_dir) == before


def test_a_folder_with_foreign_files_of_our_names_is_refused(tiny_model_dir, sft_data, tmp_path, capfd):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"not": "ours"}')
    (foreign / "notes.txt").write_text("keep me")
    before = snapshot(foreign)
    result = cli("train", *train_args(tiny_model_dir, sft_data, foreign), "--overwrite", capfd=capfd)
    assert result.code == 2 and "is not a run folder of ours" in result.message
    assert snapshot(foreign) == before


def test_overwrite_replaces_only_what_a_run_wrote(finished_copy, tiny_model_dir, sft_data, capfd):
    (finished_copy / "notes.txt").write_text("the user's own file")
    result = cli("train", *train_args(tiny_model_dir, sft_data, finished_copy), "--overwrite", capfd=capfd)
    assert result.code == 0, result.stderr
    assert (finished_copy / "notes.txt").read_text() == "the user's own file"
    assert (finished_copy / "run_complete.json").is_file() and (finished_copy / "run.json").is_file()


def test_setup_failure_in_a_new_folder_leaves_no_folder(tiny_model_dir, tmp_path, capfd):
    data = write_jsonl(tmp_path / "prefs.jsonl", [{"text": "not preference data"}])
    out = tmp_path / "new" / "run"
    result = cli("train", *train_args(tiny_model_dir, data, out), "--method", "dpo", capfd=capfd)
    assert result.code == 2 and "not preference data" in result.message
    assert not out.exists()


def test_a_rank_beyond_the_model_is_refused_before_allocation(tiny_model_dir, sft_data, tmp_path, capfd):
    args = train_args(tiny_model_dir, sft_data, tmp_path / "out")
    args[args.index("--lora-r") + 1] = "100000"
    result = cli("train", *args, capfd=capfd)
    assert result.code == 2 and "--lora-r 100000: more than the smallest dimension (32)" in result.message
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- resume checks

@pytest.mark.parametrize("change, field", [
    (["--seed", "7"], "seed: checkpoint 42, now 7"),
    (["--batch-size", "1"], "batch_size: checkpoint 2, now 1"),
    (["--quant", "nf4"], "quant: checkpoint 'none', now 'nf4'"),
    (["--lora-dropout", "0.2"], "lora_dropout"),
    (["--method", "dpo"], "method: checkpoint 'sft', now 'dpo'"),
])
def test_resume_refuses_a_checkpoint_made_for_something_else(change, field, unfinished_copy, tiny_model_dir, sft_data,
                                                             capfd):
    before = snapshot(unfinished_copy)
    args = train_args(tiny_model_dir, sft_data, unfinished_copy, "--save-every", "1")
    result = cli("train", *args, "--resume", *change, capfd=capfd)
    if "--method" in change:  # DPO reads preference data: the data check comes first
        assert result.code == 2
        return
    assert result.code == 2 and "was made for another run" in result.message and field in result.message
    assert snapshot(unfinished_copy) == before


def test_resume_refuses_changed_data(unfinished_copy, tiny_model_dir, sft_data, tmp_path, capfd):
    changed = tmp_path / "qa.jsonl"
    changed.write_text(sft_data.read_text().replace("Apache", "Apachee", 1))
    before = snapshot(unfinished_copy)
    result = cli("train", *train_args(tiny_model_dir, changed, unfinished_copy, "--save-every", "1"), "--resume",
                 capfd=capfd)
    assert result.code == 2 and "data: checkpoint" in result.message
    assert snapshot(unfinished_copy) == before


def test_resume_accepts_a_new_schedule_with_a_note(unfinished_copy, tiny_model_dir, sft_data, capfd):
    args = train_args(tiny_model_dir, sft_data, unfinished_copy, "--save-every", "1")
    args[args.index("--max-steps") + 1] = "3"
    result = cli("train", *args, "--resume", "--lr", "1e-3", capfd=capfd)
    assert result.code == 0, result.stderr
    lines = [json.loads(x) for x in (unfinished_copy / "metrics.jsonl").read_text().splitlines()]
    notes = next(r["changed"] for r in lines if r["kind"] == "resume")
    assert any(n.startswith("lr: checkpoint 0.0002, now 0.001") for n in notes)
    assert any(n.startswith("max_steps: checkpoint 2, now 3") for n in notes)
    assert max(r["step"] for r in lines if r["kind"] == "train") == 3


@pytest.mark.parametrize("flag", ["--retain-data", "--replay-data"])
def test_a_broken_retention_or_replay_file_is_an_error_before_anything_is_created(flag, tiny_model_dir, sft_data,
                                                                                  tmp_path, capfd):
    data = write_jsonl(tmp_path / "general.jsonl", [{"text": "fine"}, {"text": 5}])
    out = tmp_path / "out"
    result = cli("train", *train_args(tiny_model_dir, sft_data, out), flag, data, capfd=capfd)
    assert result.code == 2 and f"{data}:2: field 'text' must be a string, got int" in result.message, result.message
    assert not out.exists()
    missing = cli("train", *train_args(tiny_model_dir, sft_data, out), flag, tmp_path / "nowhere.jsonl", capfd=capfd)
    assert missing.code == 2 and "nowhere.jsonl" in missing.message and not out.exists()
