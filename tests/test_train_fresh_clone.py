"""A fresh clone: the generated demo data is missing until make_demo_data.py runs; --from_weight none pretrains anew."""

import json

import pytest

from tests.train_utils import REPO, run_inprocess, tokenizer_dir
from trainer import train_full_sft, train_pretrain
from trainer.logger import shown_path


@pytest.mark.parametrize("job", [train_pretrain, train_full_sft])
def test_missing_demo_data_names_the_generator(job, capsys, monkeypatch):
    # The default --data_path of both jobs is generated, not committed: the message says how to make it.
    missing = REPO / "dataset" / "missing_demo.jsonl"
    flags = ["--data_path", str(missing), "--device", "cpu"]
    if job is train_pretrain:  # a 62M-parameter model would take seconds to build: the check comes first
        flags += ["--hidden_size", "4096", "--num_hidden_layers", "64"]
    assert run_inprocess(job.main, flags) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --data_path {missing}: no such file")
    assert "`python dataset/make_demo_data.py`" in err and "Traceback" not in err


def test_missing_own_data_names_the_flag(tmp_path, capsys):
    assert run_inprocess(train_full_sft.main, ["--data_path", str(tmp_path / "mine.jsonl"),
                                               "--val_data_path", str(tmp_path / "val.jsonl")]) == 2
    assert capsys.readouterr().err == f"error: --data_path {tmp_path / 'mine.jsonl'}: no such file\n"


def test_from_weight_none_pretrains_a_new_model(tmp_path):
    with open(tmp_path / "text.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"text": f"one two three {i}"}) + "\n")
    flags = ["--from_weight", "none", "--save_dir", str(tmp_path), "--data_path", str(tmp_path / "text.jsonl"),
             "--hidden_size", "32", "--num_hidden_layers", "1", "--tokenizer_path", str(tokenizer_dir()),
             "--max_steps", "1", "--device", "cpu", "--num_workers", "0", "--batch_size", "4"]
    assert run_inprocess(train_pretrain.main, flags) == 0
    assert json.loads((tmp_path / "pretrain_32.json").read_text())["base_model"] == "new"


def test_done_line_paths_are_typable_from_here(tmp_path, monkeypatch):
    (tmp_path / "repo" / "trainer").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "repo")
    assert shown_path(tmp_path / "repo" / "out" / "lora_identity_256.pth") == "out/lora_identity_256.pth"
    monkeypatch.chdir(tmp_path / "repo" / "trainer")  # where MiniMind users start their jobs
    # Outside the working directory, even one level up: absolute, so it can be copied into any shell
    assert shown_path(tmp_path / "repo" / "out" / "x.pth") == str((tmp_path / "repo" / "out" / "x.pth").resolve())
    assert shown_path(tmp_path / "repo" / "trainer" / "a" / ".." / "x.pth") == "x.pth"
    assert shown_path("/") == "/"


def test_lora_names_a_missing_data_file_before_it_loads_the_base(tmp_path, capsys):
    # The base is missing too: the data's error comes first, so a large base never loads for a wrong path.
    from trainer import train_lora

    flags = ["--data_path", str(tmp_path / "mine.jsonl"), "--from_weight", str(tmp_path / "base.pth")]
    assert run_inprocess(train_lora.main, flags) == 2
    assert capsys.readouterr().err == f"error: --data_path {tmp_path / 'mine.jsonl'}: no such file\n"


def test_a_folder_as_data_path_is_named_as_a_folder(tmp_path, capsys):
    assert run_inprocess(train_full_sft.main, ["--data_path", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: --data_path {tmp_path} is a folder; pass the .jsonl file in it\n"
