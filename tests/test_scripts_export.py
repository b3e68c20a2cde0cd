"""merge_lora.py: the exported transformers directory and .pth compute exactly base + LoRA.

Every export is opened in a fresh Python process that imports only transformers (never this repo's model
code), and its logits are compared with base + LoRA (unmerged) in this repo and, for the fixtures, with
the logits MiniMind's own code produced.
"""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from model.generate import stop_token_ids
from model.model_lora import apply_lora, load_lora, lora_parameters, save_lora
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM, load_minimind
from scripts.merge_lora import main
from tests.test_dataset_masks import with_tokens
from tests.test_dataset_templates import LLAMA
from tests.test_scripts_chat import LLAMA31_STOPS, biased_to, llama31_dir
from tests.train_utils import fill_random
from trainer.logger import shown_path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
TOKENIZER = SHARED / "tokenizers" / "minimind"
FIXTURES = ["minimind2_dense", "minimind2_moe", "minimind3_dense", "minimind3_moe"]
IDS = torch.randint(0, 6400, (2, 16), generator=torch.Generator().manual_seed(0))

# Tiny random MiniMind variants: (config, expected transformers class). MoE variants use top-2 so the
# renormalisation of the top-k weights is exercised; minimind2 also gets 2 shared experts (concatenated
# into Qwen2-MoE's one) and a top-1 variant without shared experts (no renormalisation, empty shared MLP).
VARIANTS = {
    "mm3_dense": (dict(generation=3), "Qwen3ForCausalLM"),
    "mm3_moe": (
        dict(generation=3, use_moe=True, num_experts=4, num_experts_per_tok=2),
        "Qwen3MoeForCausalLM",
    ),
    "mm2_dense": (dict(generation=2), "LlamaForCausalLM"),
    "mm2_moe": (
        dict(generation=2, use_moe=True, num_experts=4, num_experts_per_tok=2, n_shared_experts=2),
        "Qwen2MoeForCausalLM",
    ),
    "mm2_moe_top1": (
        dict(generation=2, use_moe=True, num_experts=3, num_experts_per_tok=1, n_shared_experts=0),
        "Qwen2MoeForCausalLM",
    ),
}
FIXTURE_ARCH = {
    "minimind2_dense": "LlamaForCausalLM",
    "minimind2_moe": "Qwen2MoeForCausalLM",
    "minimind3_dense": "Qwen3ForCausalLM",
    "minimind3_moe": "Qwen3MoeForCausalLM",
}

# Runs in a fresh interpreter: plain transformers only, and it checks that nothing from this repo got in.
REFERENCE_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    jobs = json.loads(sys.argv[1])
    ids = torch.load(sys.argv[2])
    out = {}
    for name, folder in jobs.items():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        assert type(model).__module__.startswith("transformers."), type(model).__module__
        with torch.no_grad():
            out[name] = (type(model).__name__, model(ids[name]).logits)
    assert not any(m == "model" or m.startswith(("model.", "scripts.")) for m in sys.modules), "repo code imported"
    torch.save(out, sys.argv[3])
""")


def need_fixtures() -> None:
    if not (TOKENIZER / "tokenizer.json").is_file():
        pytest.skip(f"fixtures not found at {SHARED}")


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere (norm weights too, which init leaves at 1 and would hide a mix-up)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("norm.weight") else 0.0
            p.copy_(base + torch.randn(p.shape, generator=g) * (0.2 if "norm" in name else 0.05))


def minimind_logits(pth: Path, lora: Path | None, ids: torch.Tensor = IDS, **overrides) -> torch.Tensor:
    """base (+ LoRA, unmerged) in this repo's model, fp32."""
    model = load_minimind(pth, dtype=torch.float32, **overrides)
    if lora is not None:
        load_lora(model, lora)
    with torch.no_grad():
        return model(ids).logits


def merge(base: Path, lora: Path, out: Path, *extra: str) -> None:
    main(
        [
            "--from_weight",
            str(base),
            "--lora_path",
            str(lora),
            "--tokenizer_path",
            str(TOKENIZER),
            "--save_dir",
            str(out),
            "--dtype",
            "float32",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Build every case, export it, and run the plain-transformers reference once for all of them."""
    need_fixtures()
    tmp = tmp_path_factory.mktemp("export")
    cases = {}  # name -> dict(hf=dir, pth=file or None, overrides, expected logits, arch)

    for name, (kw, arch) in VARIANTS.items():
        torch.manual_seed(0)
        cfg = MiniMindConfig(
            vocab_size=6400,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            **kw,
        )
        model = MiniMindForCausalLM(cfg).eval()
        randomize(model, seed=1)
        # A MiniMind model directory: its config.json carries what a .pth cannot (heads, top-k).
        model.save_pretrained(tmp / f"{name}_base")
        apply_lora(model, rank=4, alpha=8)  # every linear layer, experts included; scale 2
        fill_random(lora_parameters(model), seed=2)
        lora = tmp / (f"{name}_peft" if name == "mm3_dense" else f"{name}_lora.pth")  # one PEFT adapter dir
        save_lora(model, lora)
        merge(tmp / f"{name}_base", lora, tmp / name)
        reference = MiniMindForCausalLM.from_pretrained(tmp / f"{name}_base").eval()
        load_lora(reference, lora)
        with torch.no_grad():
            expected = reference(IDS).logits
        stem = f"merged_64{'_moe' if cfg.use_moe else ''}"
        overrides = {"num_attention_heads": 4, "num_experts_per_tok": cfg.num_experts_per_tok}
        cases[name] = dict(
            hf=tmp / name / f"{stem}_hf",
            pth=tmp / name / f"{stem}.pth",
            overrides=overrides,
            expected=expected,
            arch=arch,
        )

    for gen in FIXTURES:
        d = SHARED / "minimind" / gen
        merge(d / "weights.pth", d / "lora_rank4.pth", tmp / gen)
        stem = f"merged_64{'_moe' if gen.endswith('moe') else ''}"
        vectors = torch.load(d / "vectors.pt")
        ids = vectors["input_ids"]
        cases[gen] = dict(
            hf=tmp / gen / f"{stem}_hf",
            pth=tmp / gen / f"{stem}.pth",
            overrides={},
            ids=ids,
            expected=minimind_logits(d / "weights.pth", d / "lora_rank4.pth", ids),
            upstream=vectors["lora_logits"],
            arch=FIXTURE_ARCH[gen],
        )

    # A transformers base: a tiny Qwen3 directory and a PEFT adapter, merged back into Qwen3.
    torch.manual_seed(0)
    qcfg = Qwen3Config(
        vocab_size=6400,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=False,
    )
    qwen = Qwen3ForCausalLM(qcfg).eval()
    randomize(qwen, seed=3)
    qwen.save_pretrained(tmp / "qwen_base")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / f, tmp / "qwen_base" / f)
    apply_lora(qwen, rank=4, alpha=16, targets="q_proj,v_proj,up_proj")
    fill_random(lora_parameters(qwen), seed=4)
    save_lora(qwen, tmp / "qwen_peft")
    main(
        [
            "--from_weight",
            str(tmp / "qwen_base"),
            "--lora_path",
            str(tmp / "qwen_peft"),
            "--save_dir",
            str(tmp / "qwen"),
            "--dtype",
            "float32",
        ]
    )
    with torch.no_grad():
        expected = qwen(IDS).logits
    cases["qwen3_dir"] = dict(
        hf=tmp / "qwen" / "merged_hf",
        pth=None,
        expected=expected,
        arch="Qwen3ForCausalLM",
        peft=(tmp / "qwen_base", tmp / "qwen_peft"),
    )

    torch.save({name: c.get("ids", IDS) for name, c in cases.items()}, tmp / "ids.pt")
    jobs = {name: str(c["hf"]) for name, c in cases.items()}
    subprocess.run(
        [sys.executable, "-c", REFERENCE_SCRIPT, json.dumps(jobs), str(tmp / "ids.pt"), str(tmp / "out.pt")],
        check=True,
        cwd=tmp,
    )
    got = torch.load(tmp / "out.pt")
    return cases, got


@pytest.mark.parametrize("name", [*VARIANTS, *FIXTURES, "qwen3_dir"])
def test_transformers_export_matches_base_plus_lora(exports, name):
    cases, got = exports
    arch, logits = got[name]
    assert arch == cases[name]["arch"]
    assert AutoConfig.from_pretrained(cases[name]["hf"]).architectures == [arch]
    torch.testing.assert_close(logits, cases[name]["expected"], rtol=0, atol=1e-4)
    if "upstream" in cases[name]:  # and what MiniMind's own code computes for base + this LoRA
        torch.testing.assert_close(logits, cases[name]["upstream"], rtol=0, atol=1e-4)
    assert (cases[name]["hf"] / "tokenizer.json").is_file()


def test_transformers_base_matches_peft(exports):
    """The merged transformers directory equals PEFT's own base + adapter."""
    PeftModel = pytest.importorskip("peft").PeftModel

    cases, got = exports
    base_dir, adapter = cases["qwen3_dir"]["peft"]
    reference = PeftModel.from_pretrained(Qwen3ForCausalLM.from_pretrained(base_dir), adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(got["qwen3_dir"][1], reference(IDS).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", [*VARIANTS, *FIXTURES])
def test_minimind_pth_export_matches_base_plus_lora(exports, name):
    cases, _ = exports
    c = cases[name]
    merged = load_minimind(c["pth"], **c["overrides"])
    assert all(v.dtype == torch.float32 for v in torch.load(c["pth"]).values())
    with torch.no_grad():
        torch.testing.assert_close(merged(c.get("ids", IDS)).logits, c["expected"], rtol=0, atol=1e-4)


def tiny_dir(path: Path, dtype: torch.dtype = torch.float32, **kw) -> MiniMindForCausalLM:
    """A tiny random MiniMind model directory (with MiniMind's tokenizer) at `path`, stored in `dtype`."""
    need_fixtures()
    torch.manual_seed(0)
    cfg = MiniMindConfig(
        vocab_size=6400,
        hidden_size=kw.pop("hidden_size", 64),
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        **kw,
    )
    model = MiniMindForCausalLM(cfg).eval()
    model.to(dtype).save_pretrained(path)
    return model


def test_no_exact_architecture_still_writes_the_pth(tmp_path, capsys):
    # minimind-3 MoE + shared experts: Qwen3-MoE has no shared expert, so only the .pth is written.
    model = tiny_dir(tmp_path / "base", generation=3, use_moe=True, num_experts=2, n_shared_experts=1,
                     dtype=torch.float16)
    apply_lora(model, rank=2, targets="q_proj")
    save_lora(model, tmp_path / "lora.pth")
    main(
        [
            "--from_weight",
            str(tmp_path / "base"),
            "--lora_path",
            str(tmp_path / "lora.pth"),
            "--tokenizer_path",
            str(TOKENIZER),
            "--save_dir",
            str(tmp_path / "out"),
        ]
    )  # no --dtype: the base's own, float16 here
    assert "no transformers model directory: a minimind-3 MoE with shared experts" in capsys.readouterr().out
    assert not (tmp_path / "out" / "merged_64_moe_hf").exists()
    sd = torch.load(tmp_path / "out" / "merged_64_moe.pth")
    assert all(v.dtype == torch.float16 for v in sd.values())
    assert "model.layers.0.mlp.shared_experts.0.up_proj.weight" in sd


def test_lora_of_another_model_exits_2(tmp_path, capsys):
    tiny_dir(tmp_path / "base", generation=3)
    other = MiniMindForCausalLM(
        MiniMindConfig(
            vocab_size=6400, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2
        )
    )
    apply_lora(other, rank=2, targets="q_proj")
    save_lora(other, tmp_path / "lora.pth")
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "--from_weight",
                str(tmp_path / "base"),
                "--lora_path",
                str(tmp_path / "lora.pth"),
                "--tokenizer_path",
                str(TOKENIZER),
                "--save_dir",
                str(tmp_path / "out"),
            ]
        )
    assert exit_info.value.code == 2
    assert "does not fit the base" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["minimind", "qwen3"])
def test_merge_keeps_the_base_dtype_and_writes_0644(tmp_path, capsys, kind):
    """A bf16 base stays bf16 without --dtype (fp16 could overflow), and every file is readable by all."""
    need_fixtures()
    if kind == "minimind":
        model = tiny_dir(tmp_path / "base", dtype=torch.bfloat16)
    else:
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(Qwen3Config(vocab_size=6400, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, head_dim=16))
        model.to(torch.bfloat16).save_pretrained(tmp_path / "base")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / f, tmp_path / "base" / f)
    apply_lora(model, rank=2, targets="q_proj")
    save_lora(model, tmp_path / "lora")
    main(["--from_weight", str(tmp_path / "base"), "--lora_path", str(tmp_path / "lora"),
          "--save_dir", str(tmp_path / "out")])
    assert "bfloat16" in capsys.readouterr().out
    hf = tmp_path / "out" / ("merged_64_hf" if kind == "minimind" else "merged_hf")
    assert AutoConfig.from_pretrained(hf).dtype == torch.bfloat16
    with safe_open(hf / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert hf / "model.safetensors" in written and (kind == "qwen3" or tmp_path / "out" / "merged_64.pth" in written)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: "0o644" for p in written}


def test_a_merge_that_would_write_over_its_own_base_stops_first(tmp_path, capsys):
    # Merging a LoRA into the last merge's output, with the default names: the output is the base itself
    model = tiny_dir(tmp_path / "base")
    apply_lora(model, rank=2, targets="q_proj")
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_()
    save_lora(model, tmp_path / "lora.pth")
    out = tmp_path / "out"
    merge(tmp_path / "base", tmp_path / "lora.pth", out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    for base, written in ((out / "merged_64.pth", out / "merged_64.pth"), (out / "merged_64_hf", out / "merged_64_hf")):
        extra = ["--save_weight", "merged_64"] if base.is_dir() else []  # a transformers base writes {name}_hf/
        with pytest.raises(SystemExit) as exit_info:
            merge(base, tmp_path / "lora.pth", out, *extra)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert (f"error: {shown_path(written)} is where this run writes, and it holds the run's own --from_weight {base}: "
                "writing there would replace it. Pass another --save_weight or --save_dir") in err, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # A --save_dir that is a file
    with pytest.raises(SystemExit) as exit_info:
        merge(tmp_path / "base", tmp_path / "lora.pth", tmp_path / "lora.pth")
    assert exit_info.value.code == 2
    assert f"--save_dir {tmp_path / 'lora.pth'}: cannot make the folder" in capsys.readouterr().err


@pytest.mark.parametrize("lora_name", ["lora.pth", "lora_dir"])
def test_a_merge_that_would_replace_the_folder_holding_its_lora_stops_first(tmp_path, capsys, lora_name):
    # The transformers directory is replaced whole: a LoRA kept inside an earlier export would be deleted by the merge
    model = tiny_dir(tmp_path / "base")
    apply_lora(model, rank=2, targets="q_proj")
    out = tmp_path / "out"
    save_lora(model, out / "merged_64_hf" / lora_name)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        merge(tmp_path / "base", out / "merged_64_hf" / lora_name, out)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert (f"error: {shown_path(out / 'merged_64_hf')} is where this run writes, and it holds the run's own --lora_path "
            f"{out / 'merged_64_hf' / lora_name}: writing there would replace it") in err, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    merge(tmp_path / "base", out / "merged_64_hf" / lora_name, tmp_path / "elsewhere")  # another --save_dir merges


def test_a_merge_named_as_its_lora_leaves_the_lora_s_other_form(tmp_path, capsys):
    # The trainer writes a LoRA twice, lo_64.pth and the adapter folder lo_64/: merging the folder with
    # --save_weight lo would write the merged model over the .pth beside it
    model = tiny_dir(tmp_path / "base")
    apply_lora(model, rank=2, targets="q_proj")
    out = tmp_path / "out"
    save_lora(model, out / "lo_64.pth")
    save_lora(model, out / "lo_64")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        merge(tmp_path / "base", out / "lo_64", out, "--save_weight", "lo")
    assert exit_info.value.code == 2
    assert (f"error: {shown_path(out / 'lo_64.pth')} is where this run writes, and it holds the run's own LoRA beside "
            f"--lora_path {out / 'lo_64.pth'}: writing there would replace it") in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_merge_into_an_earlier_export_leaves_none_of_its_files(tmp_path, capsys):
    """An earlier export of another model held a chat_template.jinja this tokenizer lacks: transformers would read
    it before the template in tokenizer_config.json, so the new export must not keep it."""
    model = tiny_dir(tmp_path / "base")
    apply_lora(model, rank=2, targets="q_proj")
    save_lora(model, tmp_path / "lora.pth")
    out = tmp_path / "out"
    merge(tmp_path / "base", tmp_path / "lora.pth", out)
    first = sorted(p.name for p in (out / "merged_64_hf").iterdir())
    (out / "merged_64_hf" / "chat_template.jinja").write_text("{{ 'another model' }}")
    (out / "merged_64_hf" / "model-00001-of-00002.safetensors").write_bytes(b"an earlier sharded export")
    capsys.readouterr()
    merge(tmp_path / "base", tmp_path / "lora.pth", out)
    assert "merged_64_hf (replaces the earlier one)" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "merged_64_hf").iterdir()) == first
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temp folder left


def test_a_lora_trained_with_a_chat_template_keeps_it_through_the_merge(tmp_path, capsys):
    """--chat_template at training is saved in the LoRA's folder, and the merged model directory chats with it."""
    from tests.train_utils import lora_args, run_inprocess, save_tiny_minimind, write_chat_data
    from trainer.train_lora import main as train

    need_fixtures()
    template = (SHARED / "templates" / "qwen25.jinja").read_text()
    (tmp_path / "qwen25.jinja").write_text(template)
    weight = save_tiny_minimind(tmp_path / "base.pth")
    data = write_chat_data(tmp_path / "chat.jsonl", 4)
    assert run_inprocess(train, lora_args(tmp_path, weight, data, max_steps=1, chat_template=tmp_path / "qwen25.jinja",
                                          tokenizer_path=TOKENIZER)) == 0
    adapter = tmp_path / "out" / "lora_identity_64"
    assert (adapter / "chat_template.jinja").read_text() == template
    merge(weight, tmp_path / "out" / "lora_identity_64.pth", tmp_path / "merged")
    printed = capsys.readouterr().out
    assert "chat_template.jinja" in printed.split("tokenizer: ")[-1]
    from transformers import AutoTokenizer

    exported = AutoTokenizer.from_pretrained(tmp_path / "merged" / "merged_64_hf")
    assert exported.chat_template == template
    assert "You are Qwen" in exported.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    # A --chat_template file with a byte-order mark is exported without it (transformers would render the mark)
    (tmp_path / "bom.jinja").write_bytes(b"\xef\xbb\xbf" + template.encode())
    merge(weight, tmp_path / "out" / "lora_identity_64.pth", tmp_path / "bom", "--chat_template", str(tmp_path / "bom.jinja"))
    assert (tmp_path / "bom" / "merged_64_hf" / "chat_template.jinja").read_text(encoding="utf-8") == template


def test_without_from_weight_the_merge_loads_the_base_the_lora_names(tmp_path, capsys):
    """The trainer records its base's absolute path in adapter_config.json (beside a .pth LoRA too): chat, eval and
    merge load it when --from_weight is not given, as PEFT's AutoPeftModel does, not the demo base."""
    from tests.train_utils import lora_args, run_inprocess, save_tiny_minimind, write_chat_data
    from trainer.train_lora import main as train

    need_fixtures()
    weight = save_tiny_minimind(tmp_path / "base.pth")
    data = write_chat_data(tmp_path / "chat.jsonl", 4)
    assert run_inprocess(train, lora_args(tmp_path, weight, data, max_steps=1, tokenizer_path=TOKENIZER)) == 0
    config = json.loads((tmp_path / "out" / "lora_identity_64" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(weight.resolve())
    capsys.readouterr()
    main(["--lora_path", str(tmp_path / "out" / "lora_identity_64.pth"), "--tokenizer_path", str(TOKENIZER),
          "--save_dir", str(tmp_path / "merged")])
    assert f"base model: {weight.resolve()} (named by {tmp_path / 'out' / 'lora_identity_64' / 'adapter_config.json'}" \
        in capsys.readouterr().out
    merge(weight, tmp_path / "out" / "lora_identity_64.pth", tmp_path / "explicit")
    by_path, explicit = torch.load(tmp_path / "merged" / "merged_64.pth"), torch.load(tmp_path / "explicit" / "merged_64.pth")
    assert by_path.keys() == explicit.keys()
    for key, value in explicit.items():
        torch.testing.assert_close(by_path[key].float(), value.float())
    # eval_llm.py's spelling, a MiniMind name with no --hidden_size and no --tokenizer_path: both come from the run
    capsys.readouterr()
    main(["--lora_weight", "lora_identity", "--save_dir", str(tmp_path / "out"), "--save_weight", "by_name"])
    printed = capsys.readouterr().out
    assert f"tokenizer: {TOKENIZER.resolve()} (the LoRA's run trained with it" in printed and "base model: " in printed
    torch.testing.assert_close(torch.load(tmp_path / "out" / "by_name_64.pth"), by_path)
    # A recorded base that is not here any more is said, not skipped in silence
    config_path = tmp_path / "out" / "lora_identity_64" / "adapter_config.json"
    config_path.write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path / "moved.pth")}))
    with pytest.raises(SystemExit):  # the demo base then does not fit this 64-wide LoRA
        main(["--lora_path", str(tmp_path / "out" / "lora_identity_64.pth"), "--save_dir", str(tmp_path / "m2")])
    assert f"note: {config_path} names the base {tmp_path / 'moved.pth'}, which is not here" in capsys.readouterr().out


# (base, its tokenizer's extra special tokens, its eos, the LoRA's chat template, that template's turn end)
STOP_CASES = {
    "minimind_llama3": ("minimind", LLAMA, None, "llama31.jinja", "<|eot_id|>"),  # MiniMind's eos is <|im_end|>
    "qwen_base_chatml": ("qwen3", [], "<|endoftext|>", "qwen3.jinja", "<|im_end|>"),  # as Qwen2.5/Qwen3 bases ship
    "minimind_chatml": ("minimind", [], None, None, "<|im_end|>"),  # MiniMind's own template: the turn end is eos
}


@pytest.mark.parametrize("case", STOP_CASES)
def test_transformers_generate_on_the_export_stops_at_the_turn_end(tmp_path, case):
    """transformers' generate() (and vLLM) stop at generation_config.json's eos_token_id: the export lists the chat
    template's turn end there too, which a LoRA learns to write after its reply, as chat.py stops at."""
    need_fixtures()
    kind, tokens, eos, template, turn_end = STOP_CASES[case]
    tok = with_tokens(AutoTokenizer.from_pretrained(TOKENIZER), tokens, **({"eos_token": eos} if eos else {}))
    torch.manual_seed(0)
    if kind == "minimind":
        model = MiniMindForCausalLM(MiniMindConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=1,
                                                   num_attention_heads=4, num_key_value_heads=2))
    else:
        eos_id = tok.eos_token_id
        model = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                             head_dim=16, bos_token_id=eos_id, eos_token_id=eos_id))
        model.generation_config = GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, do_sample=False,
                                                   max_new_tokens=2048)  # a Qwen base's generation_config.json
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    apply_lora(model, rank=2, targets="q_proj")
    save_lora(model, tmp_path / "lora")
    chat_template = ["--chat_template", str(SHARED / "templates" / template)] if template else []
    main(["--from_weight", str(tmp_path / "base"), "--lora_path", str(tmp_path / "lora"), "--tokenizer_path",
          str(tmp_path / "base"), "--save_dir", str(tmp_path / "out"), *chat_template])

    hf = tmp_path / "out" / ("merged_64_hf" if kind == "minimind" else "merged_hf")
    tokenizer = AutoTokenizer.from_pretrained(hf)
    end = tokenizer.convert_tokens_to_ids(turn_end)
    merged = biased_to(AutoModelForCausalLM.from_pretrained(hf).eval(), end)
    assert type(merged).__module__.startswith("transformers.")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "who are you?"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    # with the generation_config.json from_pretrained loaded; transformers 4 also returns token_type_ids for a
    # PreTrainedTokenizerFast (MiniMind's), which generate() refuses, so the ids and mask go by name
    out = merged.generate(input_ids=prompt["input_ids"], attention_mask=prompt["attention_mask"], max_new_tokens=8)
    assert out[0, prompt["input_ids"].shape[1]:].tolist() == [end]  # past the turn end, it would write it 8 times
    generation = GenerationConfig.from_pretrained(hf)
    assert generation.eos_token_id == (end if end == tok.eos_token_id else [tok.eos_token_id, end])
    if kind == "qwen3":
        assert (generation.do_sample, generation.max_new_tokens) == (False, 2048)  # the base's settings stay
    assert set(stop_token_ids(merged, tokenizer)) == {tok.eos_token_id, end}  # chat.py stops at the same tokens


def test_a_llama31_export_stops_at_every_eos_id_of_its_base(tmp_path):
    """Llama-3.1's generation_config.json lists <|end_of_text|>, <|eom_id|> (after a built-in tool call) and
    <|eot_id|>; the export keeps all three, and transformers' generate() stops at each. config.json keeps the base's
    own single eos: generate() reads generation_config.json, as vLLM and MLX do."""
    need_fixtures()
    base = llama31_dir(tmp_path / "base", AutoTokenizer.from_pretrained(TOKENIZER))
    model = AutoModelForCausalLM.from_pretrained(base)
    apply_lora(model, rank=2, targets="q_proj")
    save_lora(model, tmp_path / "lora")
    main(["--from_weight", str(base), "--lora_path", str(tmp_path / "lora"), "--save_dir", str(tmp_path / "out")])
    hf = tmp_path / "out" / "merged_hf"
    tokenizer = AutoTokenizer.from_pretrained(hf)
    stops = [tokenizer.convert_tokens_to_ids(t) for t in LLAMA31_STOPS]
    assert GenerationConfig.from_pretrained(hf).eos_token_id == GenerationConfig.from_pretrained(base).eos_token_id
    assert GenerationConfig.from_pretrained(hf).eos_token_id == stops
    assert AutoConfig.from_pretrained(hf).eos_token_id == AutoConfig.from_pretrained(base).eos_token_id == stops[0]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    for stop in stops:
        merged = biased_to(AutoModelForCausalLM.from_pretrained(hf).eval(), stop)
        out = merged.generate(input_ids=prompt["input_ids"], attention_mask=prompt["attention_mask"], max_new_tokens=4,
                              do_sample=False)
        assert out[0, prompt["input_ids"].shape[1]:].tolist() == [stop]  # past it, it would write it 4 times
