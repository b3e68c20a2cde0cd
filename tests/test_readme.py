"""README.md's Python snippets run as written, on the demo base (the .pth files they load are made from it)."""

import re
from pathlib import Path

import pytest
import torch

from model.model_lora import LoRALinear
from trainer.base_model import load_base

README = Path(__file__).resolve().parents[1] / "README.md"
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
