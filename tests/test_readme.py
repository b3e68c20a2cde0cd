"""README.md's Python snippets run as written, on the demo base (the .pth files they load are made from it), and its
quoted bad-data output is what the data reader prints for the file it describes."""

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from dataset.lm_dataset import SFTDataset
from dataset.records import DataError
from dataset.token_cache import TokenCache
from model.model_lora import LoRALinear
from trainer.base_model import load_base

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_has_python_snippets():
    assert SNIPPETS, "README.md has no ```python block: this test would check nothing"


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs_on_the_demo_base(index, tmp_path, monkeypatch):
    code = SNIPPETS[index]
    # Each MiniMind .pth a snippet loads (e.g. out/full_sft_768.pth) is the demo base saved under that name,
    # in a temporary working directory, so the snippet's relative out/ paths stay out of the repo.
    demo = load_base(None, str(tmp_path), torch.float32).model
    for name in set(re.findall(r'load_minimind\("([^"]+\.pth)"\)', code)):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        torch.save(demo.state_dict(), tmp_path / name)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, f"{README.name} python snippet {index + 1}", "exec"), namespace)
    for name in re.findall(r'save_lora\(\w+, "([^"]+)"\)', code):
        assert (tmp_path / name).exists(), f"the snippet says it writes {name}"
    if "merge_lora(model, unload=True)" in code:  # merged and unloaded: plain nn.Linear layers again
        assert not any(isinstance(m, LoRALinear) for m in namespace["model"].modules())


def _output_block(starts_with: str) -> str:
    """The README's quoted output block whose first line starts with `starts_with`."""
    fenced = re.findall(r"^```\w*\n(.*?)^```$", README.read_text(encoding="utf-8"), re.S | re.M)
    blocks = [block for block in fenced if block.startswith(starts_with)]
    assert len(blocks) == 1, f"README.md has {len(blocks)} output blocks starting {starts_with!r}"
    return blocks[0].rstrip("\n")


def _write_readme_bad_data(path: Path, block: str) -> None:
    """The 60-line file the README's bad-data example describes: its good lines from the demo data, and at each line
    the README names, a line that has the README's problem (the invalid JSON's missing comma at its column)."""
    good = (REPO / "dataset" / "lora_identity.jsonl").read_text(encoding="utf-8").splitlines()
    lines = good[:int(re.search(r" bad line\(s\) of (\d+):", block).group(1))]
    column = int(re.search(r"Expecting ',' delimiter \(column (\d+)\)", block).group(1))
    head = '{"conversations": [{"role": "user", "content": "'
    pad = column - len(head) - len('"} ') - 1  # the column is 1-based: the `{` right after the missing comma
    bad = {
        "invalid JSON": head + "x" * pad + '"} {"role": "assistant", "content": "y"}]}',
        "no assistant turn": '{"conversations": [{"role": "user", "content": "hi"}]}',
        "lone surrogate": '{"conversations": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "y"}]}',
    }
    for number, problem in re.findall(r"^  \S+:(\d+): (.*)$", block, re.M):
        lines[int(number) - 1] = next(text for key, text in bad.items() if key in problem)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_bad_data_examples_are_what_the_trainer_prints(tmp_path, monkeypatch):
    """The README's `error:` block and its --skip_bad_data data line, for the file they describe, word for word."""
    error = _output_block("error: data/chats.jsonl:")
    skipped = _output_block("data/chats.jsonl: kept")
    monkeypatch.chdir(tmp_path)
    _write_readme_bad_data(Path("data/chats.jsonl"), error)
    tokenizer = AutoTokenizer.from_pretrained(REPO / "model" / "tokenizer")
    with pytest.raises(DataError) as raised:
        SFTDataset("data/chats.jsonl", tokenizer, 512, num_workers=1, log=None)
    assert f"error: {raised.value}" == error
    cache = TokenCache(tmp_path / "cache")
    dataset = SFTDataset("data/chats.jsonl", tokenizer, 512, skip_invalid=True, num_workers=1, log=None, cache=cache)
    assert dataset.summary == skipped.replace("/home/you/.cache/minilora/tokenized", str(cache.folder))
