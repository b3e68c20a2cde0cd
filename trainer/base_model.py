"""Find and load the model to train (`--from_weight`) and its tokenizer."""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

import model.model_minimind  # noqa: F401  (registers "minimind" with AutoModelForCausalLM)
from model.errors import UserError, first_line
from model.fast_decoder import (
    ARCHITECTURES,
    LayoutMismatch,
    ShapeMismatch,
    check_loaded,
    load_fast,
    why_not_fast,
)
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM, load_minimind
from trainer.args import REPO_ROOT, FlagError

DEMO_BASE = REPO_ROOT / "model" / "demo"
REPO_TOKENIZER = REPO_ROOT / "model" / "tokenizer"
# A folder holding one of these has a tokenizer; merge_lora.py copies all of TOKENIZER_FILES into its exports.
TOKENIZER_CORE = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
TOKENIZER_FILES = (*TOKENIZER_CORE, "special_tokens_map.json", "chat_template.jinja", "merges.txt", "added_tokens.json")


class BaseModelError(UserError):
    """A --from_weight / --tokenizer_path that cannot be found or does not fit the flags."""


@dataclass
class BaseModel:
    """The model to train, its tokenizer, and what names its outputs."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    source: str  # the file or directory it came from ("new" for a fresh random model)
    hidden_size: int
    use_moe: bool
    stored_dtype: torch.dtype | None = None  # a directory's config.json dtype, a .pth's tensors'; None: unknown


def resolve_weight(from_weight: str | None, save_dir: str, hidden_size: int | None,
                   use_moe: bool | None, minimind_default: str | None = None) -> Path:
    """--from_weight as a path: an existing file/directory, or a MiniMind name looked up in save_dir. Absent: with
    --hidden_size, the base MiniMind's own script would load (`minimind_default`, e.g. full_sft) where it exists,
    else the demo base."""
    if from_weight is None:
        if not (DEMO_BASE / "config.json").is_file():
            raise BaseModelError(f"no --from_weight given and the demo base model {DEMO_BASE} is missing; pass "
                                 "--from_weight <name in --save_dir | file.pth | model directory>")
        if hidden_size is not None and minimind_default:
            wanted = Path(save_dir) / f"{minimind_default}_{hidden_size}{'_moe' if use_moe else ''}.pth"
            if wanted.is_file():  # MiniMind's `--hidden_size 512` alone trains on out/full_sft_512.pth
                return wanted
            demo = json.loads((DEMO_BASE / "config.json").read_text()).get("hidden_size")
            if demo != hidden_size:
                raise BaseModelError(f"no --from_weight given: MiniMind's default base {wanted} does not exist, and "
                                     f"the demo base {DEMO_BASE} has hidden_size {demo}, not --hidden_size "
                                     f"{hidden_size}; pass --from_weight <name in --save_dir | file.pth | model "
                                     "directory>")
        return DEMO_BASE
    path = Path(from_weight).expanduser()
    if path.exists():
        _refuse_what_is_no_base(path, from_weight)
        return path
    if path.suffix or len(path.parts) > 1:
        raise BaseModelError(f"--from_weight {from_weight}: no such file or directory")
    name_re = re.compile(rf"{re.escape(from_weight)}_(\d+)(_moe)?\.pth")
    found = sorted(p for p in Path(save_dir).glob(f"{from_weight}_*.pth") if name_re.fullmatch(p.name))
    if hidden_size is not None:
        wanted = Path(save_dir) / f"{from_weight}_{hidden_size}{'_moe' if use_moe else ''}.pth"
        if wanted.is_file():
            return wanted
        problem = f"{wanted} does not exist"
    else:
        matches = [p for p in found if use_moe is None or bool(name_re.fullmatch(p.name).group(2)) == use_moe]
        if len(matches) == 1:
            return matches[0]
        problem = (f"{len(matches)} files match {save_dir}/{from_weight}_*.pth; pick one with --hidden_size "
                   f"(and --use_moe)" if matches else f"no {save_dir}/{from_weight}_*.pth")
    listing = ", ".join(p.name for p in found) or "none"
    raise BaseModelError(f"--from_weight {from_weight}: {problem}. Candidates in --save_dir {save_dir}: {listing}. "
                         "Pass --hidden_size/--use_moe to match one, a path to a .pth, or a model directory.")


def _refuse_what_is_no_base(path: Path, flag: str) -> None:
    """A file inside a transformers model directory, or a LoRA adapter folder, is no --from_weight: a weights file
    alone would load as MiniMind with guessed sizes (torch.load reads safetensors too), and wrong logits follow."""
    if path.is_file() and path.suffix != ".pth" and (path.parent / "config.json").is_file():
        raise BaseModelError(f"--from_weight {flag}: a file of the model directory {path.parent}; pass the directory")
    if path.is_dir() and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise BaseModelError(f"--from_weight {flag}: a LoRA adapter, not a base model; pass it as --lora_path, and "
                             "the model it was trained on as --from_weight")


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """A fast tokenizer from a directory (tokenizer.json + tokenizer_config.json)."""
    wants = "--tokenizer_path takes a folder holding tokenizer.json and tokenizer_config.json"
    if path.is_file():
        raise BaseModelError(f"{path}: a file; {wants}: pass {path.parent}")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:
        if not path.exists():  # transformers would answer with its rules for hub names
            raise BaseModelError(f"{path}: no such folder; {wants}") from None
        if path.is_dir() and not any((path / f).is_file() for f in TOKENIZER_CORE):
            raise BaseModelError(f"{path}: holds no tokenizer ({', '.join(TOKENIZER_CORE)}); {wants}") from None
        raise BaseModelError(f"{path}: cannot load a tokenizer from it ({first_line(err)})") from err


def pick_tokenizer(weight: Path | None, tokenizer_path: str | None) -> PreTrainedTokenizerBase:
    """--tokenizer_path, else the model directory's, or for a .pth the one beside it or in the model directory
    this repo writes with it (`{name}/` of the trainers, `{name}_hf/` of merge_lora.py), else the repo's (warned)."""
    if tokenizer_path:
        return load_tokenizer(Path(tokenizer_path))
    if weight is not None:
        folders = [weight] if weight.is_dir() else [weight.parent, weight.with_suffix(""),
                                                     weight.parent / f"{weight.stem}_hf"]
        for folder in folders:
            if any((folder / f).is_file() for f in TOKENIZER_CORE):
                return load_tokenizer(folder)
    if weight is not None and weight.is_dir():
        print(f"warning: {weight} holds no tokenizer ({', '.join(TOKENIZER_CORE)}); using the repo's "
              f"{REPO_TOKENIZER} (pass the model's own with --tokenizer_path <dir>)", flush=True)
    else:
        print(f"warning: using the repo's tokenizer {REPO_TOKENIZER}; MiniMind's released weights need MiniMind's "
              "own tokenizer (pass --tokenizer_path <dir>)", flush=True)
    return load_tokenizer(REPO_TOKENIZER)


def _check_flags(model: nn.Module, source: Path, hidden_size: int | None, layers: int | None,
                 use_moe: bool | None) -> None:
    """Flags that contradict a model directory's config.json stop the run (as load_minimind does for .pth)."""
    config = model.config
    for flag, wanted, actual in (("hidden_size", hidden_size, getattr(config, "hidden_size", None)),
                                 ("num_hidden_layers", layers, getattr(config, "num_hidden_layers", None))):
        if wanted is not None and actual is not None and wanted != actual:
            raise BaseModelError(f"{source}/config.json has {flag}={actual}, but --{flag} {wanted} was given; "
                                 f"drop the flag or pick the matching model")
    # use_moe by the experts (is_moe): a transformers MoE config counts them (num_experts...), it has no use_moe key
    if use_moe is not None and use_moe != is_moe(model):
        raise BaseModelError(f"{source}/config.json has {_experts_in(config)}, but --use_moe {int(use_moe)} was "
                             "given; drop the flag or pick the matching model")


# What transformers' MoE configs call their count of routed experts: Qwen-MoE, Mixtral (and GPT-OSS), DeepSeek-V2/V3
# (and GLM-4.5), ERNIE-4.5-MoE; transformers 5 also answers the first two names for the others, 4.x does not.
EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def is_moe(model: nn.Module) -> bool:
    """Whether a MiniMind or transformers causal LM routes tokens to experts."""
    cfg = model.config
    switch = _moe_switch(cfg)
    if switch:  # such a config lists num_experts for dense models too
        return bool(getattr(cfg, switch))
    return any(getattr(cfg, name, 0) for name in EXPERT_COUNTS)


def _moe_switch(config: object) -> str | None:
    """The key with which a config turns its experts on or off, if it has one: MiniMind's use_moe, Doge's is_moe."""
    return next((key for key in ("use_moe", "is_moe") if hasattr(config, key)), None)


def _experts_in(config: object) -> str:
    """What a config.json says of experts, as it writes it: its switch (_moe_switch), else its count of experts."""
    switch = _moe_switch(config)
    if switch:
        return f"{switch}={getattr(config, switch)}"
    written = config.to_dict()  # the keys of the file, not the names transformers 5 also answers to
    counts = [f"{name}={written[name]}" for name in EXPERT_COUNTS if written.get(name)]
    return counts[0] if counts else f"no experts (none of {', '.join(EXPERT_COUNTS)})"


def load_directory(path: Path, dtype: torch.dtype, max_seq_len: int | None = None, training: bool = True) -> nn.Module:
    """A model directory: MiniMind's, a Qwen2/Qwen3/Llama/Mistral one on the fast decoder (same names, same
    logits, model/fast_decoder.py), or any other causal LM through transformers' own class, said in one line (which
    names the training paths it goes without where `training`)."""
    if not (path / "config.json").is_file():
        # merge_lora.py's --save_dir holds a .pth and a model directory: name what could be meant
        try:
            inside = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir()
                            if p.suffix == ".pth" or (p / "config.json").is_file())
        except OSError:  # a folder we may not list: the error without the hint, not a traceback
            inside = []
        hint = f"; it holds {', '.join(inside)}: pass one of those" if inside else ""
        raise BaseModelError(f"--from_weight {path}: a model directory needs config.json (and weights){hint}")
    _refuse_unknown_architecture(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers' load report: what it would say is refused below in one line
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        kind = config.model_type
        reason = None if kind == "minimind" else why_not_fast(config, max_seq_len)
        if kind in ARCHITECTURES and reason is None:
            try:
                model = load_fast(path, dtype)
                print(f"model: {path} ({ARCHITECTURES[kind]}) runs on the fast decoder", flush=True)
                return model
            except ShapeMismatch:
                raise
            except LayoutMismatch as err:
                reason = str(err)
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, dtype=dtype or "auto", trust_remote_code=False,
            output_loading_info=True, ignore_mismatched_sizes=True)
        check_loaded(info, strict_names=False)  # extra tensors (a tied head saved anyway) are harmless here
    except LayoutMismatch as err:
        raise BaseModelError(f"--from_weight {path}: {err}") from err
    except Exception as err:
        raise BaseModelError(f"--from_weight {path}: cannot load it as a causal LM ({first_line(err)})") from err
    finally:
        hf_logging.set_verbosity(verbosity)
    if reason:
        print(f"model: {path} runs on transformers' {type(model).__name__}{_paths_off(training)}: {reason}", flush=True)
    return model


def _paths_off(training: bool) -> str:
    """What a model on transformers' own class goes without: the training paths for a trainer; for chat, eval and
    merge, which neither pack rows nor compile, only the decoder itself."""
    if training:
        return " with the fast paths off (FlexAttention for packed rows, the RoPE table op)"
    return ", not the fast decoder"


def _refuse_unknown_architecture(path: Path) -> None:
    """A config.json whose model_type only its own code (auto_map) defines: transformers would ask on the terminal
    whether to run that code; this repo never does. One that no code here defines: said in one line, not in
    transformers' paragraph."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # AutoConfig says what is wrong with it
    if not isinstance(config, dict):
        return  # AutoConfig says what is wrong with it
    _check_model_type(config, path / "config.json")
    kind = config.get("model_type")
    if config.get("auto_map") and kind not in CONFIG_MAPPING and kind != "minimind":
        raise BaseModelError(f"--from_weight {path}: its config.json names custom code (auto_map, model_type "
                             f"{kind!r}), which this repo does not run; it trains MiniMind models and the "
                             "architectures transformers ships")
    if isinstance(kind, str) and kind not in CONFIG_MAPPING:  # "minimind" is there: model_minimind registers it
        raise BaseModelError(f"--from_weight {path}: its config.json's model_type {kind!r} is no architecture "
                             f"transformers {transformers.__version__} ships; if the model is newer than that, "
                             "`pip install -U transformers`")


def _check_model_type(config: dict, file: Path) -> None:
    """model_type names the architecture; absent, empty or not a string, no version of transformers would know it
    (transformers would guess from the folder's name, or advise upgrading)."""
    fix = ('set it to the architecture its weights are, as the model\'s publisher wrote it (e.g. "qwen3", "llama", '
           '"mistral", "minimind")')
    if "model_type" not in config:
        raise BaseModelError(f"{file}: no model_type key; {fix}")
    kind = config["model_type"]
    if not isinstance(kind, str):
        raise BaseModelError(f"{file}: model_type is {json.dumps(kind)}, not a string; {fix}")
    if not kind.strip():
        raise BaseModelError(f"{file}: model_type is empty ({json.dumps(kind)}); {fix}")


def load_base(from_weight: str | None, save_dir: str, dtype: torch.dtype, hidden_size: int | None = None,
              num_hidden_layers: int | None = None, use_moe: bool | None = None,
              tokenizer_path: str | None = None, max_seq_len: int | None = None,
              minimind_default: str | None = None, training: bool = True) -> BaseModel:
    """Load --from_weight (MiniMind .pth, MiniMind or transformers model directory) in `dtype`, plus tokenizer.

    `max_seq_len` (the longest row the run feeds) decides whether a sliding-window model is exact on the
    fast decoder; None assumes its max_position_embeddings. `minimind_default`: resolve_weight's. `training`: the
    script trains (its start-up line names the training paths a model on transformers' own class goes without).
    """
    path = resolve_weight(from_weight, save_dir, hidden_size, use_moe, minimind_default)
    hf_logging.disable_progress_bar()  # its "Loading weights" bar would litter nohup logs
    if path.is_dir():
        model = load_directory(path, dtype, max_seq_len, training)
        _check_flags(model, path, hidden_size, num_hidden_layers, use_moe)
        stored = stored_dtype(path)
    else:
        overrides = {k: v for k, v in (("hidden_size", hidden_size), ("num_hidden_layers", num_hidden_layers),
                                       ("use_moe", use_moe)) if v is not None}
        model = load_minimind(path, **overrides)  # in the file's dtype, which the saved directory keeps by default
        stored = weights_dtype(model)
        if dtype is not None:
            model.to(dtype)
    model.name_or_path = str(path)  # as transformers' from_pretrained sets it (a .pth too): load_lora's errors name it
    tokenizer = pick_tokenizer(path, tokenizer_path)
    check_vocab(model, tokenizer, chosen=bool(tokenizer_path), weight=path)
    cfg = model.config
    return BaseModel(model, tokenizer, str(path), cfg.hidden_size, is_moe(model), stored)


def stored_dtype(path: Path) -> torch.dtype | None:
    """The dtype a model directory's config.json gives its weights (`dtype`, or 4.x's `torch_dtype`), if it names
    a floating one; the loaded model's own dtype is the one asked for, so it cannot tell."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = (config.get("dtype") or config.get("torch_dtype")) if isinstance(config, dict) else None
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def weights_dtype(model: nn.Module) -> torch.dtype | None:
    """The one dtype of a model's floating weights as loaded from a file (a MiniMind .pth: fp16 as MiniMind saves,
    or fp32); None where they mix dtypes."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def new_minimind(tokenizer: PreTrainedTokenizerBase, hidden_size: int | None, num_hidden_layers: int | None,
                 use_moe: bool | None) -> BaseModel:
    """A freshly initialised MiniMind (minimind-3 layout) sized by the flags, vocabulary by the tokenizer."""
    heads = MiniMindConfig().num_attention_heads  # no flag sets the head count
    if hidden_size is not None and hidden_size % (2 * heads):  # RoPE rotates pairs: each head needs an even size
        raise FlagError(f"--hidden_size {hidden_size}: a new MiniMind splits it over {heads} attention heads of an "
                        f"even size each; pass a multiple of {2 * heads}, such as 512 or 768")
    config = MiniMindConfig(vocab_size=len(tokenizer), hidden_size=hidden_size,
                            num_hidden_layers=8 if num_hidden_layers is None else num_hidden_layers,
                            use_moe=bool(use_moe),
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    model = MiniMindForCausalLM(config)
    return BaseModel(model, tokenizer, "new", config.hidden_size, config.use_moe)


def check_vocab(model: nn.Module, tokenizer: PreTrainedTokenizerBase, chosen: bool = False,
                weight: Path | None = None) -> None:
    """A tokenizer with ids beyond the embedding table would index out of range mid-run: refuse it now.
    The repo's fallback tokenizer must also fill the table exactly, unless --tokenizer_path chose it (`chosen`).
    `weight`: the model's file or directory, where its own tokenizer belongs."""
    rows = model.get_input_embeddings().weight.shape[0]
    source = Path(getattr(tokenizer, "name_or_path", "") or ".").resolve()
    if not chosen and source == REPO_TOKENIZER.resolve() and len(tokenizer) != rows:
        # The fallback tokenizer on a model sized for another one trains silently on the wrong token ids.
        where = f"into {weight}" if weight is not None and weight.is_dir() else "beside the .pth"
        raise BaseModelError(f"the model's vocabulary has {rows} tokens, the repo's tokenizer {REPO_TOKENIZER} "
                             f"{len(tokenizer)}: it is not this model's tokenizer. Pass the model's own with "
                             "--tokenizer_path (for MiniMind's weights: the model/ folder of MiniMind's repo), "
                             f"or put its tokenizer.json and tokenizer_config.json {where}")
    if len(tokenizer) > rows:
        raise BaseModelError(f"the tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) has {len(tokenizer)} "
                             f"tokens but the model's vocabulary has {rows}; pass the model's own tokenizer "
                             "with --tokenizer_path")
