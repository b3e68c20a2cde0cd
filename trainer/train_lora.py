"""LoRA fine-tuning of a causal LM: a MiniMind .pth, or a MiniMind / transformers model directory.

One GPU (or CPU with --device cpu), from the repo root or from inside trainer/:
    python trainer/train_lora.py --from_weight full_sft --hidden_size 512 --data_path dataset/lora_identity.jsonl
Several GPUs of one machine (add --fsdp to shard a base too big for one GPU):
    torchrun --nproc_per_node 4 trainer/train_lora.py --from_weight full_sft --hidden_size 512
Two machines with 8 GPUs each: this on the machine at --master_addr, the same with --node_rank 1 on the other:
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr 10.0.0.1 --master_port 29500 \\
        trainer/train_lora.py --from_weight full_sft --hidden_size 512
In the background, MiniMind style (from inside trainer/):
    nohup python train_lora.py --epochs 20 --hidden_size 2048 --device "cuda:0" --batch_size 16 \\
        --learning_rate 1e-4 --accumulation_steps 8 --log_interval 10 --save_interval 100 \\
        --data_path ../dataset/lora_identity.jsonl --num_hidden_layers 20 --use_wandb --from_resume 1 \\
        --from_weight full_sft > train_lora.log 2>&1 &
Ctrl-C / kill (SIGTERM) finish the current step, save, and print the command that resumes (--from_resume 1).
In the background (`... &`: bash ignores Ctrl-C there) `kill <pid>` does; the start-up line names the pid.
On a CUDA device the defaults pack rows and compile the decoder (--packing 0 / --use_compile 0 opt out), and
steps replay as CUDA graphs, compiled or not (--cuda_graphs 0 opts out); on a CPU they pad and run eager. The
start-up lines say what was chosen and what one step holds.

Writes, in --save_dir: {lora_name}_{hidden}{_moe}.pth (MiniMind's LoRA layout), {...}/ (a PEFT adapter
directory), {...}.json (this run's config), {...}_loss.png and {...}_resume.pth (to continue the run).
--from_resume 1 also continues a run of MiniMind's own trainer from its ../checkpoints/ file (beside --save_dir,
or from the working directory).
"""

from trainer.frozen_imports import frozen_imports

# The garbage collector never scans what these imports build: 1-2 s less start-up.
with frozen_imports():
    from functools import partial
    from pathlib import Path

    import torch

    from dataset.chat_render import LORA_TEMPLATE
    from dataset.lm_dataset import SFTDataset
    from dataset.token_cache import cache_from_flag
    from model.model_lora import (
        load_lora_state_dict,
        lora_parameters,
        lora_state_dict,
        save_lora,
        set_lora_fused,
    )
    from trainer.args import (
        MINIMIND_BASE,
        check_data_files,
        check_template_file,
        parse_args,
        pick_speed_defaults,
    )
    from trainer.base_model import load_base
    from trainer.checkpoint import (
        capture_rng,
        check_resume_flags,
        minimind_loader_note,
        output_stem,
        save_resume,
        seed_everything,
        sibling,
        start_or_resume,
        write_json,
        write_together,
    )
    from trainer.compile_cache import compile_cache_for_run
    from trainer.compiling import CompileWorkers, attention_line, compile_decoder, pick_packed_attention
    from trainer.data import prepare_data
    from trainer.distributed import (
        FlatGradients,
        broadcast_from_rank0_,
        gather_objects,
        same_on_all_ranks,
        setup_distributed,
    )
    from trainer.engine import (
        autocast_note,
        enable_activation_checkpointing,
        evaluate,
        forward_backward,
        make_optimizer,
        make_scaler,
        pick_dtype,
        run_config,
        step_begin,
        train_step,
        wrap_ddp,
    )
    from trainer.fsdp import parameters_held, shard_frozen_base
    from trainer.guard import DivergenceGuard
    from trainer.job import StopSignal, at_step, run_job, stopped_line
    from trainer.logger import RunLogger, plot_losses, shown_path, start_wandb
    from trainer.lora_setup import build_lora
    from trainer.loss import SupervisedLoss
    from trainer.minimind_resume import continue_minimind_run, minimind_file_to_continue
    from trainer.out_of_memory import MemoryWatch
    from trainer.save_dir import LORA_OUTPUTS, prepare_save_dir
    from trainer.schedule import lr_at, warmup_note
    from trainer.step_graphs import (
        MicroStepGraphs,
        cuda_graph_needs,
        graphs_note,
        pick_cuda_graphs,
        whole_step_needs,
    )


def main(argv: list[str] | None = None) -> int:
    """Train LoRA adapters (flags from `argv`, default sys.argv); returns the exit status."""
    # ------------------------------------------------------------------ config
    args = parse_args("lora", __doc__.splitlines()[0], argv)
    check_data_files(args)  # before the base: a missing file should not wait for a large base to load
    info = setup_distributed(args.device, args.ddp, args.dist_timeout)
    speed = pick_speed_defaults(args, info.device.type)  # packed + compiled on CUDA unless opted out
    # Compiled kernels are kept in a folder a reboot keeps, for the next run's first step.
    compile_cache = compile_cache_for_run(args.compile_cache, args.use_compile, info.device.type)
    amp_dtype = pick_dtype(args.dtype, info.device)
    seed_everything(args.seed + info.rank)  # dropout differs per rank; the data order depends on args.seed only

    # ------------------------------------------------------------------ model
    # On a GPU with bf16 the frozen base is held in bf16 (half the memory); LoRA weights and AdamW state stay fp32.
    base_dtype = torch.bfloat16 if amp_dtype == torch.bfloat16 and info.device.type == "cuda" else torch.float32
    base = load_base(args.from_weight, args.save_dir, base_dtype, args.hidden_size, args.num_hidden_layers,
                     args.use_moe, args.tokenizer_path, args.max_seq_len, minimind_default=MINIMIND_BASE["lora"])
    model = base.model
    n_base = sum(p.numel() for p in model.parameters())
    targets, nf4 = build_lora(model, args, info.device)
    model.train()
    if info.device.type == "cuda" and not args.fsdp:
        # One GEMM per layer with the merged weight: 1.12x faster, 3 GiB less at 0.6B (FSDP frees that weight).
        set_lora_fused(model)
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model)
    # One layer's graph reused by every layer: a first step in seconds, not minutes (--fsdp keeps one graph).
    per_layer = args.compile_scope == "layer" or (args.compile_scope == "auto" and not args.fsdp)
    # CUDA graphs replay each step's kernels without the host: one graph per micro-batch shape, compiled or not,
    # where it can hold a whole micro-step; else (compiled: float16, transformers' own classes) each layer's.
    minimind = hasattr(model.model, "packed_attention")
    cuda_graphs = pick_cuda_graphs(args.cuda_graphs, cuda_graph_needs(
        info.device, args.use_compile, args.packing, args.fsdp, base.use_moe, args.gradient_checkpointing,
        minimind, amp_dtype))
    whole_steps = cuda_graphs and all(whole_step_needs(minimind, amp_dtype).values())
    attention = pick_packed_attention(model, args.attention, args.packing, args.use_compile, info.device, per_layer,
                                      amp_dtype, whole_steps, args.max_seq_len)
    compiled = "; " + compile_decoder(model, cuda_graphs and not whole_steps, per_layer) if args.use_compile else ""
    loss_module = SupervisedLoss(model)
    # Every rank starts from rank 0's weights; an MoE base keeps DDP (an expert no rank used keeps a None grad).
    if args.fsdp:
        step_module = shard_frozen_base(loss_module, info)
    elif base.use_moe:
        step_module = wrap_ddp(loss_module.to(info.device), info, find_unused=True)
    else:
        step_module = loss_module.to(info.device)
        broadcast_from_rank0_([*loss_module.parameters(), *loss_module.buffers()], info)
    params = lora_parameters(model)
    # One gradient buffer for the run (CUDA graphs need it, ranks all-reduce it in one call); AdamW then updates
    # the parameters as one tensor beside it.
    flat_grads = FlatGradients(params) if not base.use_moe or args.fsdp else None
    optimizer = make_optimizer(params, args.learning_rate, args.weight_decay, flat_grads)
    scaler = make_scaler(info.device, amp_dtype)
    graphs = None
    if whole_steps:
        graphs = MicroStepGraphs(partial(forward_backward, step_module, device=info.device, amp_dtype=amp_dtype),
                                 info.device)
    stem = output_stem(args.save_dir, args.lora_name, base.hidden_size, base.use_moe)
    # An unwritable --save_dir, or another run writing these files, stops the run now, not at its first save.
    _lock = prepare_save_dir(stem, LORA_OUTPUTS, info, {"--from_weight": base.source,  # held until main() returns
                                                        "--init_lora": args.init_lora})
    if info.is_main:
        n_lora = sum(p.numel() for p in params)
        sharded = f"; --fsdp: each holds {(parameters_held(model) - n_lora) / n_base:.0%} of the base" if args.fsdp else ""
        print(f"base {base.source}: {n_base / 1e6:.1f}M parameters, LoRA on {len(targets)} layers: "
              f"{n_lora / 1e6:.3f}M trainable; {info.world_size} process(es) on {info.device}, "
              f"{autocast_note(amp_dtype, base_dtype)}{nf4}{compiled}{graphs_note(graphs, bool(compiled))}{sharded}", flush=True)
        if speed:
            print(f"speed defaults for {info.device.type}: {speed}", flush=True)
        if args.packing:
            print(attention_line(attention, args.attention), flush=True)

    # ------------------------------------------------------------------ data
    # Read as the flag check reads it: UTF-8, without a byte-order mark that would open every rendered chat
    template = check_template_file(Path(args.chat_template)) if args.chat_template else None
    make = partial(SFTDataset, tokenizer=base.tokenizer, max_length=args.max_seq_len, skip_invalid=args.skip_bad_data,
                   chat_template=template, template_name=args.chat_template, log=print if info.is_main else None,
                   cache=cache_from_flag(args.data_cache, write=info.local_rank == 0))
    data = prepare_data(make, args, info, pad_id=base.tokenizer.pad_token_id or 0, segments=attention == "varlen")
    if info.is_main:
        print(data.note, flush=True)

    # ------------------------------------------------------------------ resume
    resume_path = sibling(stem, "_resume.pth")
    # A run MiniMind's own trainer checkpointed (into its ../checkpoints/) continues here too
    minimind_file = minimind_file_to_continue(args.save_dir, stem, resume_path, args.from_resume, info.is_main)
    if minimind_file is not None:
        state = continue_minimind_run(minimind_file, model, params, optimizer, scaler, args, info, data, lora=True)
    else:
        state = start_or_resume(resume_path, args.from_resume,
                                partial(load_lora_state_dict, model, source=str(resume_path)),
                                optimizer, scaler, info.rank, info.world_size, args.seed,
                                partial(check_resume_flags, args=args, world_size=info.world_size,
                                        n_train=len(data.train), model=model, source=base.source, targets=targets),
                                epochs=args.epochs)
    # Every rank reads the resume file: on several machines they must all see the same one.
    same_on_all_ranks(state.step, "the step to continue from", f"each reads {resume_path}: on several machines, "
                      "--save_dir must be a folder that all of them see (shared storage)", info)
    total_steps = data.total_steps(args.epochs, state.epoch, state.position, state.step, args.max_steps)
    wandb_run = None
    if args.use_wandb and info.is_main:
        wandb_run = start_wandb(args.wandb_project, stem.name, vars(args), state.wandb_id)
        state.wandb_id = getattr(wandb_run, "id", None)

    def save_adapter(folder: Path) -> None:
        """The PEFT adapter directory, with the --chat_template it learned: chat, eval and merge render with it."""
        save_lora(model, folder, base_model_name_or_path=str(Path(base.source).resolve()))  # for chat, eval, merge
        if template is not None:
            (folder / LORA_TEMPLATE).write_text(template, encoding="utf-8")

    def save(final: bool, rng: dict | None = None) -> bool:
        """LoRA files + config JSON + resume file (rank 0 writes; every rank hands over its RNG state, or
        `rng`, the state at the start of a step that failed), unless the guard finds the run diverged: then
        the last good checkpoint stays as it is. Returns whether it saved."""
        ok = guard.allow_save(state.step, params, log, final, check_grads=scaler is None)
        rng = gather_objects(rng or capture_rng(), info)
        if not ok or not info.is_main:
            return ok
        config = run_config(args, info, base.source, model, state.step, total_steps, lora_targets=targets,
                            history=state.history, train_samples=len(data.train))
        def write_files(out: Path) -> None:  # `out`: stem's name in a staging folder (write_together)
            if not args.use_dora:  # MiniMind's .pth layout has no DoRA magnitude; the PEFT directory holds it
                save_lora(model, sibling(out, ".pth"))
            save_adapter(out)
            write_json(sibling(out, ".json"), config)
            save_resume(sibling(out, "_resume.pth"), lora_state_dict(model), optimizer, scaler, state, rng, config)

        write_together(stem, write_files)  # all of them or, on a full disk, none: the last save stays whole
        if final:
            plot_losses(state.history, sibling(stem, "_loss.png"), f"LoRA {stem.name}")
            if loader_note:
                log.write(loader_note)
        return True

    # ------------------------------------------------------------------ loop
    log = RunLogger(info, total_steps, state.step, args.log_interval, state.history, wandb_run)
    # Compiled steps replayed as CUDA graphs keep one shape (and validation runs eagerly): after the warm-up
    # nothing compiles, so Inductor's compile workers can go.
    workers = CompileWorkers(state.step + RunLogger.WARMUP if compiled and cuda_graphs else None)
    stop = StopSignal()
    guard = DivergenceGuard(model.config.vocab_size, params, state.history["train"], resume_path, state.step)
    memory = MemoryWatch(info, args, keep_rng=args.lora_dropout > 0, step_graphs=graphs is not None and not args.packing)
    # With DoRA no MiniMind .pth is written, so there is nothing for MiniMind's loader to read
    loader_note = None if args.use_dora else minimind_loader_note(model, targets, sibling(stem, ".pth"))
    log.write(f"training steps {state.step + 1}..{total_steps} ({data.sampler.steps_in_epoch()} per epoch); {stop.how} "
              "stops after the current step and saves" if state.step < total_steps else
              f"nothing to train: the run already reached step {total_steps}")
    if compiled and state.step < total_steps:
        log.write("compiling... (the first two steps compile and record; seconds with a warm cache in "
                  f"{shown_path(compile_cache)}, longer with an empty one)")
    if info.is_main and state.step < total_steps and (note := warmup_note(args.warmup_iters, total_steps)):
        log.write(note)
    stopped, first_step = False, state.step
    for epoch, micro_batches, n_samples in data.steps(state.epoch, state.position, args.epochs):
        if state.step >= total_steps:  # --max_steps reached, or a finished run resumed
            break
        workers.before_step(state.step, epoch)
        n_supervised, n_tokens, stopped = step_begin(micro_batches, stop.requested, info)
        if stopped:
            break
        lr = lr_at(state.step, total_steps, args.learning_rate, args.warmup_iters)
        # A failure names its rank and step (see run_job); running out of memory ends the loop (below).
        with at_step(state.step + 1), memory.watch(state.step + 1, micro_batches):
            loss, grad_norm = train_step(step_module, micro_batches, n_supervised, info, optimizer, scaler, params,
                                         lr, args.grad_clip, amp_dtype, flat_grads, graphs)
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
    workers.join()
    trained = state.step > first_step  # a finished run resumed evaluates and writes nothing again
    if data.val_batches is not None and trained and not stopped and not memory.failed:
        with memory.watch(state.step):
            log.val(state.step, evaluate(loss_module, data.val_batches, info, amp_dtype))
    if memory.failed:
        # A step that ran out of memory never reached its update: the weights are the last finished step's.
        saved = state.step > 0 and save(final=False, rng=memory.rng)
        log.close()
        raise memory.error(state.step, resume_path if saved else None)
    if trained:
        save(final=True)
    if graphs is not None:
        log.write(graphs.note)
    log.close()
    if info.is_main:
        if stopped:
            print(stopped_line(state.step, total_steps, info), flush=True)
        else:
            pth = "" if args.use_dora else f"{shown_path(sibling(stem, '.pth'))} and "
            print(f"done: {pth}{shown_path(stem)}/ (step {state.step}/{total_steps})", flush=True)
    return 0


if __name__ == "__main__":
    run_job(main, teardown=False)
