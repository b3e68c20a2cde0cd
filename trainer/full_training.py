"""The loop of the full-parameter jobs (train_full_sft.py, train_pretrain.py): every weight trains.

Those two jobs differ only in their data and where the model comes from, so they share this function.
train_lora.py keeps its own copy of the loop in full view: it is the script a newcomer reads top to bottom.
"""

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from trainer.base_model import REPO_TOKENIZER, BaseModel, load_base, load_tokenizer, new_minimind
from trainer.checkpoint import (
    capture_rng,
    check_resume_flags,
    output_stem,
    save_full_model,
    save_resume,
    seed_everything,
    sibling,
    start_or_resume,
    write_json,
    write_together,
)
from trainer.compile_cache import compile_cache_for_run
from trainer.compiling import attention_line, compile_decoder, pick_packed_attention
from trainer.data import prepare_data
from trainer.distributed import DistInfo, gather_objects, same_on_all_ranks
from trainer.engine import (
    autocast_note,
    enable_activation_checkpointing,
    evaluate,
    make_optimizer,
    make_scaler,
    run_config,
    step_begin,
    train_step,
    wrap_ddp,
)
from trainer.guard import DivergenceGuard
from trainer.job import StopSignal, at_step, stopped_line
from trainer.logger import RunLogger, plot_losses, shown_path, start_wandb
from trainer.loss import SupervisedLoss
from trainer.minimind_resume import continue_minimind_run, minimind_file_to_continue
from trainer.out_of_memory import MemoryWatch
from trainer.save_dir import FULL_OUTPUTS, prepare_save_dir
from trainer.schedule import lr_at, warmup_note


def load_or_build(args: object, minimind_default: str | None) -> BaseModel:
    """--from_weight loaded in fp32 (every weight trains), or with `none` a new random MiniMind of the flags' size,
    the same on every rank. `minimind_default`: the name MiniMind's own script loads when --from_weight is absent."""
    given = args.from_weight
    if (given or "").lower() == "none" or (given is None and minimind_default is None):  # MiniMind's spelling
        seed_everything(args.seed)
        tokenizer = load_tokenizer(Path(args.tokenizer_path) if args.tokenizer_path else REPO_TOKENIZER)
        return new_minimind(tokenizer, args.hidden_size, args.num_hidden_layers, args.use_moe)
    return load_base(args.from_weight, args.save_dir, torch.float32, args.hidden_size, args.num_hidden_layers,
                     args.use_moe, args.tokenizer_path, args.max_seq_len, minimind_default=minimind_default)


def train_all_weights(args: object, info: DistInfo, amp_dtype: torch.dtype, base: BaseModel,
                      make_dataset: Callable, title: str) -> int:
    """Train every weight of `base` on the datasets `make_dataset(path)` builds; saves `{--save_weight}_{hidden}`
    files."""
    # Every weight trains, so every weight stays fp32 (AdamW's updates would round away in bf16); autocast
    # still runs the matmuls in --dtype.
    model = base.model.to(info.device).train()
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model)
    attention = pick_packed_attention(model, args.attention, args.packing, args.use_compile, info.device,
                                      dtype=amp_dtype)
    compiled = ""
    compile_cache_for_run(args.compile_cache, args.use_compile, info.device.type)  # kept for the next run
    if args.use_compile:  # CUDA graphs are measured for LoRA only (train_lora.py)
        compiled = "; " + compile_decoder(model, cuda_graphs=False)
    params = [p for p in model.parameters() if p.requires_grad]
    loss_module = SupervisedLoss(model)
    step_module = wrap_ddp(loss_module, info, find_unused=base.use_moe)
    optimizer = make_optimizer(params, args.learning_rate, args.weight_decay)
    scaler = make_scaler(info.device, amp_dtype)
    stem = output_stem(args.save_dir, args.save_weight, base.hidden_size, base.use_moe)
    # The model directory is written as the base was stored (a bf16 base stays bf16), unless --save_dtype says
    save_dtype = getattr(torch, args.save_dtype) if args.save_dtype else base.stored_dtype or torch.float32
    # An unwritable --save_dir, or another run writing these files, stops the run now, not at its first save.
    _lock = prepare_save_dir(stem, FULL_OUTPUTS, info, {"--from_weight": base.source},  # held until this returns
                             name_flag="--save_weight")
    if info.is_main:
        print(f"model {base.source}: {sum(p.numel() for p in params) / 1e6:.1f}M parameters, all trained; "
              f"{info.world_size} process(es) on {info.device}, {autocast_note(amp_dtype, torch.float32)}{compiled}", flush=True)
        if args.packing:
            print(attention_line(attention, args.attention), flush=True)

    data = prepare_data(make_dataset, args, info, pad_id=base.tokenizer.pad_token_id or 0,
                        segments=attention == "varlen")

    # ------------------------------------------------------------------ resume
    resume_path = sibling(stem, "_resume.pth")
    # A run MiniMind's own trainer checkpointed (into its ../checkpoints/) continues here too
    minimind_file = minimind_file_to_continue(args.save_dir, stem, resume_path, args.from_resume, info.is_main)
    if minimind_file is not None:
        state = continue_minimind_run(minimind_file, model, params, optimizer, scaler, args, info, data, lora=False)
    else:
        state = start_or_resume(resume_path, args.from_resume, model.load_state_dict, optimizer, scaler, info.rank,
                                info.world_size, args.seed,
                                partial(check_resume_flags, args=args, world_size=info.world_size,
                                        n_train=len(data.train), model=model, source=base.source),
                                epochs=args.epochs)
    # Every rank reads the resume file: on several machines they must all see the same one.
    same_on_all_ranks(state.step, "the step to continue from", f"each reads {resume_path}: on several machines, "
                      "--save_dir must be a folder that all of them see (shared storage)", info)
    total_steps = data.total_steps(args.epochs, state.epoch, state.position, state.step, args.max_steps)
    wandb_run = None
    if args.use_wandb and info.is_main:
        wandb_run = start_wandb(args.wandb_project, stem.name, vars(args), state.wandb_id)
        state.wandb_id = getattr(wandb_run, "id", None)

    def save(final: bool, rng: dict | None = None) -> bool:
        """Model files + config JSON + resume file (rank 0 writes; every rank hands over its RNG state, or
        `rng`), unless the guard finds the run diverged (train_lora.py's save says how). Whether it saved."""
        ok = guard.allow_save(state.step, params, log, final, check_grads=scaler is None)
        rng = gather_objects(rng or capture_rng(), info)
        if not ok or not info.is_main:
            return ok
        config = run_config(args, info, base.source, model, state.step, total_steps, history=state.history,
                            train_samples=len(data.train))
        def write_files(out: Path) -> None:  # `out`: stem's name in a staging folder (write_together)
            save_full_model(model, base.tokenizer, out, minimind=getattr(model.config, "model_type", "") == "minimind",
                            dtype=save_dtype)
            write_json(sibling(out, ".json"), config)
            save_resume(sibling(out, "_resume.pth"), model.state_dict(), optimizer, scaler, state, rng, config)

        write_together(stem, write_files)  # all of them or, on a full disk, none: the last save stays whole
        if final:
            plot_losses(state.history, sibling(stem, "_loss.png"), f"{title} {stem.name}")
        return True

    # ------------------------------------------------------------------ loop
    log = RunLogger(info, total_steps, state.step, args.log_interval, state.history, wandb_run)
    stop = StopSignal()
    guard = DivergenceGuard(model.config.vocab_size, params, state.history["train"], resume_path, state.step)
    memory = MemoryWatch(info, args, keep_rng=True)  # a transformers model may have dropout
    log.write(f"training steps {state.step + 1}..{total_steps} ({data.sampler.steps_in_epoch()} per epoch); {stop.how} "
              "stops after the current step and saves" if state.step < total_steps else
              f"nothing to train: the run already reached step {total_steps}")
    if info.is_main and state.step < total_steps and (note := warmup_note(args.warmup_iters, total_steps)):
        log.write(note)
    stopped, first_step = False, state.step
    for epoch, micro_batches, n_samples in data.steps(state.epoch, state.position, args.epochs):
        if state.step >= total_steps:
            break
        n_supervised, n_tokens, stopped = step_begin(micro_batches, stop.requested, info)
        if stopped:
            break
        lr = lr_at(state.step, total_steps, args.learning_rate, args.warmup_iters)
        # As in train_lora.py: a failure names its rank and step, running out of memory ends the loop.
        with at_step(state.step + 1), memory.watch(state.step + 1, micro_batches):
            loss, grad_norm = train_step(step_module, micro_batches, n_supervised, info, optimizer, scaler, params,
                                         lr, args.grad_clip, amp_dtype)
        if memory.failed:
            break
        state.advance(epoch, n_samples, len(data.train))
        guard.check(log.step(state.step, epoch + 1, loss, grad_norm, lr, n_tokens), log.write,
                    check_grads=scaler is None)
        if state.step < total_steps and data.val_batches is not None and state.step % args.eval_interval == 0:
            with memory.watch(state.step):
                log.val(state.step, evaluate(loss_module, data.val_batches, info, amp_dtype))
            if memory.failed:
                break
        if state.step < total_steps and state.step % args.save_interval == 0:
            save(final=False)

    # ------------------------------------------------------------------ finish
    trained = state.step > first_step  # a finished run resumed evaluates and writes nothing again
    if data.val_batches is not None and trained and not stopped and not memory.failed:
        with memory.watch(state.step):
            log.val(state.step, evaluate(loss_module, data.val_batches, info, amp_dtype))
    if memory.failed:  # the weights are the last finished step's (see train_lora.py)
        saved = state.step > 0 and save(final=False, rng=memory.rng)
        log.close()
        raise memory.error(state.step, resume_path if saved else None)
    if trained:
        save(final=True)
    log.close()
    if info.is_main:
        if stopped:
            print(stopped_line(state.step, total_steps, info), flush=True)
        else:
            pth = f"{shown_path(sibling(stem, '.pth'))} and " if sibling(stem, ".pth").is_file() else ""
            print(f"done: {pth}{shown_path(stem)}/ (step {state.step}/{total_steps})", flush=True)
    return 0
