"""`dsv3` command line: one verb per workflow. Each verb parses its arguments, builds the config
dataclasses and calls library functions; the library itself prints nothing."""

from __future__ import annotations

import argparse
import sys


def _model_config(args):
    from dsv3.config import ModelConfig, preset

    if getattr(args, "config", None):
        return ModelConfig.from_json(args.config), args.config
    return preset(args.preset), args.preset


def cmd_info(args) -> int:
    from dsv3.info import format_info

    cfg, name = _model_config(args)
    print(format_info(cfg, name))
    return 0


def cmd_plan(args) -> int:
    from dsv3.plan import PlanConfig, format_suggestions, plan, suggest

    cfg, name = _model_config(args)
    kw = dict(zero=args.zero, precision=args.precision, micro_batch=args.micro_batch, seq_len=args.seq_len,
              global_batch=args.global_batch, recompute=args.recompute, schedule=args.schedule)
    if args.suggest:
        res = suggest(cfg, args.gpus, args.gpu_mem, sort=args.sort, name=name, **kw)
        print(format_suggestions(res) if res else "no valid layout")
        return 0
    print(plan(cfg, PlanConfig(gpus=args.gpus, gpu_mem_gib=args.gpu_mem, pp=args.pp, ep=args.ep, dp=args.dp, **kw),
               name).format())
    return 0


def _resolve_checkpoint(path: str) -> str:
    from dsv3.training.checkpointing import resolve_checkpoint

    return resolve_checkpoint(path)


def cmd_train(args) -> int:
    from dsv3.training.loop import TrainConfig, train

    mc, name = _model_config(args)
    tc = TrainConfig(out_dir=args.out or f"runs/{name if not args.config else 'custom'}", data=args.data,
                     extra_data=args.extra_data,
                     tokenizer=args.tokenizer, steps=args.steps, tokens=args.tokens, seq_len=args.seq_len,
                     batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, lr=args.lr,
                     warmup_steps=args.warmup_steps, device=args.device, precision=args.precision,
                     seed=args.seed, resume=args.resume, eval_every=args.eval_every, save_every=args.save_every,
                     mtp_lambda=args.mtp_lambda, bias_gamma=args.bias_gamma, balance_alpha=args.balance_alpha,
                     fim_rate=args.fim_rate, batch_ramp_steps=args.batch_ramp_steps, batch_start=args.batch_start,
                     progress=not args.no_progress, compile=args.compile, recompute=args.recompute,
                     optim_state_dtype=args.optim_state, fp8_experts=args.fp8_experts)
    if args.cache_dir:
        tc.cache_dir = args.cache_dir
    if _parallel_run(args, tc):
        return _train_parallel(args, mc, tc)
    summary = train(mc, tc)
    if args.samples > 0 and not summary["interrupted"]:
        _print_samples(summary["checkpoint"], args.samples, args.seed)
    return 0


def _parallel_run(args, tc) -> bool:
    """Several processes (torchrun sets WORLD_SIZE), a layout flag, or a resume of a sharded run."""
    import os

    if (int(os.environ.get("WORLD_SIZE", "1")) > 1 or args.dp_shard or args.ep or args.no_fsdp or args.node_groups
            or args.pp > 1):
        return True
    if not tc.resume:
        return False
    from dsv3.distributed.checkpoint import is_dcp_checkpoint
    from dsv3.training.checkpointing import latest_checkpoint

    latest = latest_checkpoint(os.path.join(tc.out_dir, "checkpoints"))
    return latest is not None and is_dcp_checkpoint(latest)


def _train_parallel(args, mc, tc) -> int:
    """`dsv3 train` on every rank of a torchrun world (dsv3/distributed/trainer.py)."""
    import torch.distributed as dist

    from dsv3.distributed.trainer import default_layout, start, train_parallel

    if args.pp > 1:  # refused before any process group is started
        if args.dp_shard > 1:
            raise ValueError("--pp with --dp-shard > 1 (FSDP data parallelism) is not supported: the pipeline "
                             "ranks replicate nothing but the ep ranks of a stage")
        if args.node_groups:
            raise ValueError("--pp with --node-groups is not supported")
        if tc.precision == "fp8":
            raise ValueError("--pp with --precision fp8 is not supported")
    elif args.pp_schedule != "1f1b" or args.n_microbatches:
        raise ValueError("--pp-schedule / --n-microbatches need --pp N (N >= 2)")
    env = start(tc.device)
    try:
        if args.pp > 1:
            from dsv3.distributed.pipeline import PipelineConfig
            from dsv3.distributed.trainer import train_pipeline

            ep = args.ep or max(env.world_size // args.pp, 1)
            n_stages = args.pp if args.pp_schedule == "1f1b" else 2 * args.pp
            ppcfg = PipelineConfig(pp=args.pp, schedule=args.pp_schedule, ep=ep,
                                   n_microbatches=args.n_microbatches or n_stages)
            summary = train_pipeline(mc, tc, ppcfg, env)
        else:
            pcfg = default_layout(env.world_size, args.dp_shard, args.ep, fsdp=not args.no_fsdp,
                                  node_groups=args.node_groups)
            summary = train_parallel(mc, tc, pcfg, env)
        if env.rank == 0 and args.samples > 0 and not summary["interrupted"]:
            _print_samples(summary["checkpoint"], args.samples, args.seed)
    finally:
        dist.destroy_process_group()
    return 0


def cmd_convert(args) -> int:
    import torch

    from dsv3.distributed.checkpoint import to_hf

    print(to_hf(args.checkpoint, args.out, getattr(torch, args.dtype) if args.dtype else None))
    return 0


def _print_samples(path: str, n: int, seed: int, max_new_tokens: int = 120) -> None:
    from dsv3.inference.engine import SamplingParams, load_engine

    engine, tok = load_engine(path, device="cpu", max_batch_size=n)
    prompts = ["def ", "import os\n\n", "class ", "# ", "    return "][:n]
    params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=0.8, top_k=50, seed=seed + i)
              for i in range(len(prompts))]
    print(f"\nsamples from {path} (temperature 0.8, top-k 50):")
    for prompt, out in zip(prompts, engine.generate(prompts, params)):
        print(f"--- prompt {prompt!r}\n{prompt}{out.text}")


def cmd_eval(args) -> int:
    import torch

    from dsv3.checkpoint import load_pretrained
    from dsv3.training.data import build_token_cache
    from dsv3.training.loop import TrainConfig, evaluate, resolve_device
    from dsv3.training.tokenizer import DSTokenizer

    path = _resolve_checkpoint(args.checkpoint)
    device = resolve_device(args.device)
    tok = DSTokenizer.load(path)
    model = load_pretrained(path, device=device, dtype=torch.float32).eval()
    tc = TrainConfig()
    # as in `train`: --cache-dir is the root; token caches live in its tokens/ subdirectory
    cache = build_token_cache(args.data, tok, __import__("os").path.join(args.cache_dir or tc.cache_dir, "tokens"),
                              val_permille=args.val_permille, fim_rate=0.0, progress=True)
    split = args.split
    if cache.meta["splits"][split]["n_tokens"] <= args.seq_len:
        raise ValueError(f"the {split} split of {cache.meta['source']} has too few tokens for seq_len {args.seq_len}")
    from dsv3.training.data import ValBatches
    batches = ValBatches(cache.tokens(split), args.seq_len, args.batch_size, name=f"{split} split")
    ev = evaluate(model, batches, tok.token_byte_lengths(), device, __import__("contextlib").nullcontext,
                  args.max_batches or None)
    print(f"{path}: {split} loss {ev['val_loss']:.4f} nats/token, {ev['val_bpb']:.4f} bits/byte "
          f"over {ev['val_tokens']:,} tokens of {cache.meta['source']}")
    return 0


def _engine(args):
    from dsv3.inference.engine import load_engine

    return load_engine(_resolve_checkpoint(args.checkpoint), device=args.device, max_batch_size=1,
                       speculative_k=args.speculative_k)


def _sampling(args):
    from dsv3.inference.engine import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          stop=list(args.stop or []), seed=args.seed)


def cmd_generate(args) -> int:
    """Complete a prompt (or answer one chat message with --chat), streaming to stdout."""
    engine, tok = _engine(args)
    params = _sampling(args)
    if args.chat:
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": args.prompt}]))
    else:
        ids = tok.encode(args.prompt)
        print(args.prompt, end="", flush=True)
    final = None
    for out in engine.stream(ids, params):
        print(out.new_text, end="", flush=True)
        final = out
    print()
    if args.verbose and final is not None:
        s = engine.stats
        spec = (f"; MTP drafts accepted {s.acceptance_rate:.2f}, {s.mean_accepted_length:.2f} tokens per step"
                if args.speculative_k else "")
        print(f"[{len(final.token_ids)} tokens, finish reason {final.finish_reason}{spec}]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    """Interactive multi-turn chat with the DeepSeek-V3 chat template, streaming each reply."""
    engine, tok = _engine(args)
    params = _sampling(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        print("dsv3 chat: type a message; /reset starts over, /exit or Ctrl-D quits, Ctrl-C stops a reply.")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            return 0
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            messages = list(system)
            continue
        if not cmd:
            continue
        messages.append({"role": "user", "content": line})
        ids = tok.encode(tok.apply_chat_template(messages))
        print("assistant> " if interactive else "", end="", flush=True)
        reply, rid = "", None
        try:
            for out in engine.stream(ids, params):
                rid = out.request_id
                print(out.new_text, end="", flush=True)
                reply = out.text
        except KeyboardInterrupt:  # stop this reply, keep the conversation
            if rid is not None:
                engine.abort(rid)
                while engine.has_unfinished():
                    engine.step()
        print()
        messages.append({"role": "assistant", "content": reply})


# Files of a checkpoint directory besides the weights and config.json that `quantize` carries over.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "generation_config.json")


def cmd_quantize(args) -> int:
    """Checkpoint (any dtype, or FP8 already) -> official-layout FP8 checkpoint: every matrix the
    official checkpoint stores in FP8 becomes e4m3 + 128x128 `weight_scale_inv` blocks (tensors that
    are FP8 already are copied bit for bit), the rest is stored in --dtype, the router bias in fp32."""
    import os
    import shutil

    import torch

    from dsv3.checkpoint import load_pretrained, save_pretrained, tempdir_beside
    from dsv3.inference.fp8 import FP8Experts, FP8Linear, quantize_model_fp8

    out = args.out
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"output {out} already exists and is not an empty directory; choose a new one")
    src = _resolve_checkpoint(args.checkpoint)
    model = quantize_model_fp8(load_pretrained(src, keep_fp8=True))
    n_fp8 = sum(isinstance(m, (FP8Linear, FP8Experts)) for m in model.modules())
    tmp = tempdir_beside(out)  # written in full, then renamed: OUT never holds a partial checkpoint
    try:
        save_pretrained(model, tmp, dtype=getattr(torch, args.dtype))
        copied = [f for f in _TOKENIZER_FILES if os.path.isfile(os.path.join(src, f))]
        for f in copied:
            shutil.copy2(os.path.join(src, f), os.path.join(tmp, f))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    def weight_bytes(d):  # model shards only (a training checkpoint also holds optimizer.safetensors)
        return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)
                   if f.startswith("model") and f.endswith(".safetensors"))

    print(f"{src} -> {out}: {n_fp8} FP8 modules (e4m3, 128x128 block scales), other tensors {args.dtype}; "
          f"weights {weight_bytes(src) / 2**20:.1f} MiB -> {weight_bytes(out) / 2**20:.1f} MiB"
          + (f"; copied {', '.join(copied)}" if copied else ""))
    return 0


def cmd_serve(args) -> int:
    """OpenAI-compatible HTTP server (dsv3/inference/server.py) over a checkpoint or run directory."""
    import os

    from dsv3.inference.server import load_for_serving, serve

    path = _resolve_checkpoint(args.checkpoint)
    engine, tok = load_for_serving(path, device=args.device, max_batch_size=args.max_batch_size,
                                   cache_tokens=args.cache_tokens or None, speculative_k=args.speculative_k,
                                   max_model_len=args.max_model_len or None, compile_decode=args.compile_decode)
    name = args.model_name or os.path.basename(os.path.normpath(path))
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"dsv3 serve: warning: listening on {args.host} without --api-key", file=sys.stderr)
    print(f"serving {path} as {name!r} on http://{args.host}:{args.port}/v1 (batch {args.max_batch_size}, "
          f"{engine.cache.num_blocks * engine.cache.block_size} cache tokens, context {engine.max_model_len}, "
          f"speculative k={args.speculative_k})")
    serve(engine, tok, name, host=args.host, port=args.port, api_key=args.api_key,
          max_prompt_tokens=args.max_prompt_tokens or None, max_tokens_limit=args.max_tokens_limit or None,
          max_queue=args.max_queue, log_level=args.log_level)
    return 0


def cmd_sft(args) -> int:
    """Supervised fine-tuning on chats (dsv3/posttrain/sft.py)."""
    from dsv3.posttrain.sft import SFTConfig, train_sft

    cfg = SFTConfig(seq_len=args.seq_len, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                    epochs=args.epochs, steps=args.steps, lr=args.lr, min_lr=args.min_lr, seed=args.seed,
                    device=args.device, precision=args.precision, save_every=args.save_every, resume=args.resume)
    summary = train_sft(_resolve_checkpoint(args.checkpoint), args.data, args.out, cfg)
    print(f"sft: {summary}")
    return 0


def cmd_grpo(args) -> int:
    """GRPO on a task with a checkable answer (dsv3/posttrain/grpo.py)."""
    from dsv3.posttrain.grpo import GRPOConfig, train_grpo
    from dsv3.posttrain.tasks import load_callable, load_task

    task = load_task(args.task, seed=args.seed, reward=load_callable(args.reward) if args.reward else None)
    cfg = GRPOConfig(iterations=args.iterations, prompts_per_iter=args.prompts, group_size=args.group_size,
                     max_new_tokens=args.max_new_tokens, temperature=args.temperature, ppo_epochs=args.ppo_epochs,
                     clip_eps=args.clip_eps, beta=args.beta, lr=args.lr, eval_every=args.eval_every,
                     seed=args.seed, device=args.device, precision=args.precision, resume=args.resume)
    summary = train_grpo(_resolve_checkpoint(args.checkpoint), task, args.out, cfg)
    print(f"grpo: {summary}")
    return 0


def _add_sampling_args(p, max_new_tokens: int = 256) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=50, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--speculative-k", type=int, default=0, help="tokens drafted per step by the MTP module (0: off)")
    p.add_argument("--device", default="auto")


def _add_model_source(p) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="tiny", help="tiny | small | 16b | 671b (default: tiny)")
    src.add_argument("--config", help="path to a config.json (or a checkpoint directory)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3: model, training, inference.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    info = sub.add_parser("info", help="parameter counts and KV-cache size of a preset or config.json")
    _add_model_source(info)
    info.set_defaults(func=cmd_info)

    pl = sub.add_parser("plan", help="memory per GPU and communication per step of a parallel training layout")
    _add_model_source(pl)
    pl.add_argument("--gpus", type=int, default=1)
    pl.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU")
    pl.add_argument("--pp", type=int, default=1, help="pipeline stages")
    pl.add_argument("--ep", type=int, default=1, help="expert-parallel degree (carved from the dp ranks)")
    pl.add_argument("--dp", type=int, default=None, help="data-parallel degree (default gpus / pp)")
    pl.add_argument("--zero", type=int, default=1, choices=[0, 1, 2, 3])
    pl.add_argument("--precision", default="bf16", choices=["bf16", "fp8"])
    pl.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch")
    pl.add_argument("--seq-len", type=int, default=4096)
    pl.add_argument("--global-batch", type=int, default=None, help="sequences per step (default dp x micro-batch)")
    pl.add_argument("--recompute", default="none", choices=["none", "paper", "full"])
    pl.add_argument("--schedule", default="1f1b", choices=["1f1b", "dualpipe"])
    pl.add_argument("--suggest", action="store_true", help="list the power-of-two (pp, ep) layouts and which fit")
    pl.add_argument("--sort", default="memory", choices=["memory", "comm"], help="order of --suggest")
    pl.set_defaults(func=cmd_plan)

    t = sub.add_parser("train", help="pre-train a model (default: tiny preset on the Python stdlib, CPU)")
    _add_model_source(t)
    t.add_argument("--data", help="directory, text file or .jsonl (default: the Python standard library)")
    t.add_argument("--extra-data", action="append", default=[], metavar="PATH",
                   help="more training-only data (repeatable); validation stays on --data's held-out split")
    t.add_argument("--tokenizer", help="tokenizer.json or a directory holding one (default: train a BPE)")
    t.add_argument("--out", help="run directory (default: runs/PRESET)")
    t.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    t.add_argument("--tokens", type=int, default=0, help="train for this many tokens instead of --steps")
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--batch-size", type=int, default=16, help="sequences per optimizer step")
    t.add_argument("--micro-batch-size", type=int, default=0, help="sequences per forward (gradient accumulation)")
    t.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    t.add_argument("--warmup-steps", type=int, default=-1, help="default: 5%% of the steps, at most 2000")
    t.add_argument("--mtp-lambda", type=float, default=0.3, help="MTP loss weight (0.1 in the last third)")
    t.add_argument("--bias-gamma", type=float, default=0.001, help="aux-loss-free bias update speed")
    t.add_argument("--balance-alpha", type=float, default=1e-4, help="sequence-wise balance loss weight")
    t.add_argument("--fim-rate", type=float, default=0.1, help="fill-in-the-middle rate")
    t.add_argument("--batch-ramp-steps", type=int, default=0, help="ramp the batch size over these steps")
    t.add_argument("--batch-start", type=int, default=0, help="sequences per step at the start of the ramp")
    t.add_argument("--device", default="auto", help="auto | cpu | cuda")
    t.add_argument("--precision", default="auto",
                   help="auto | fp32 | bf16 | fp8 (paper's FP8 GEMMs; emulated, slowly, on the CPU)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--eval-every", type=int, default=100)
    t.add_argument("--save-every", type=int, default=100)
    t.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    t.add_argument("--samples", type=int, default=3, help="completions to print at the end (0: none)")
    t.add_argument("--cache-dir", help="where tokenizers and token caches go (default ~/.cache/dsv3)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument("--compile", action="store_true", help="torch.compile each block (faster on GPUs)")
    t.add_argument("--recompute", default="none", choices=["none", "selective", "full"],
                   help="activation recomputation: selective = RMSNorms + MLA up-projections (paper), full = per block")
    t.add_argument("--optim-state", default="fp32", choices=["fp32", "bf16"],
                   help="storage dtype of the AdamW moments (the paper keeps them in bf16)")
    t.add_argument("--fp8-experts", action="store_true",
                   help="with --precision fp8: the routed experts' grouped GEMMs in FP8 too (Triton; slower than "
                        "bf16 on an H100 today, bench/RESULTS.md)")
    t.add_argument("--dp-shard", type=int, default=0,
                   help="under torchrun: ranks holding the same experts (default: world size / --ep)")
    t.add_argument("--ep", type=int, default=0,
                   help="under torchrun: expert-parallel degree (default: world size / --dp-shard, else 1)")
    t.add_argument("--no-fsdp", action="store_true",
                   help="under torchrun: replicate the non-expert parameters instead of FSDP2-sharding them")
    t.add_argument("--node-groups", type=int, default=0,
                   help="node-limited routing check: the model's n_group expert groups must fall on this many "
                        "blocks of whole EP ranks (the paper: 8 nodes, topk_group = M = 4)")
    t.add_argument("--pp", type=int, default=0,
                   help="under torchrun: pipeline-parallel ranks (world = pp, or pp x --ep); not with --dp-shard")
    t.add_argument("--pp-schedule", default="1f1b", choices=["1f1b", "dualpipev"],
                   help="pipeline schedule: 1f1b (pp stages) or dualpipev (2 x pp stages in a V)")
    t.add_argument("--n-microbatches", type=int, default=0,
                   help="pipeline micro-batches per step (default: the number of stages); divides --batch-size")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="validation loss and bits per byte of a checkpoint")
    e.add_argument("checkpoint", help="checkpoint directory or run directory")
    e.add_argument("--data", help="corpus (default: the Python standard library)")
    e.add_argument("--split", default="val", choices=["val", "train"])
    e.add_argument("--val-permille", type=int, default=10)
    e.add_argument("--seq-len", type=int, default=256)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-batches", type=int, default=0, help="0: the whole split")
    e.add_argument("--device", default="auto")
    e.add_argument("--cache-dir", help="where token caches go (default ~/.cache/dsv3)")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="complete a prompt (streams; --chat wraps it in the chat template)")
    g.add_argument("checkpoint", help="checkpoint directory or run directory")
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="treat the prompt as one user message")
    g.add_argument("--verbose", "-v", action="store_true", help="print token count and MTP acceptance to stderr")
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("sample", help="same as generate (kept for the training issue's interface)")
    s.add_argument("checkpoint", help="checkpoint directory or run directory")
    s.add_argument("--prompt", required=True)
    s.add_argument("--chat", action="store_true")
    s.add_argument("--verbose", "-v", action="store_true")
    _add_sampling_args(s, max_new_tokens=200)
    s.set_defaults(func=cmd_generate, seed=0)  # sample was seeded by default

    c = sub.add_parser("chat", help="interactive multi-turn chat (streams replies)")
    c.add_argument("checkpoint", help="checkpoint directory or run directory")
    c.add_argument("--system", default=None, help="system prompt")
    _add_sampling_args(c)
    c.set_defaults(func=cmd_chat)

    ft = sub.add_parser("sft", help="supervised fine-tuning on chats (messages JSONL; loss on assistant tokens)")
    ft.add_argument("checkpoint", help="checkpoint directory or run directory")
    ft.add_argument("--data", required=True, help='JSONL, one {"messages": [...]} conversation per line')
    ft.add_argument("--out", required=True, help="run directory")
    ft.add_argument("--seq-len", type=int, default=2048)
    ft.add_argument("--batch-size", type=int, default=16, help="packed rows per optimizer step")
    ft.add_argument("--micro-batch-size", type=int, default=0)
    ft.add_argument("--epochs", type=float, default=2.0)
    ft.add_argument("--steps", type=int, default=0, help="if > 0, overrides --epochs")
    ft.add_argument("--lr", type=float, default=5e-6)
    ft.add_argument("--min-lr", type=float, default=1e-6)
    ft.add_argument("--save-every", type=int, default=200)
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--device", default="auto")
    ft.add_argument("--precision", default="auto")
    ft.add_argument("--resume", action="store_true")
    ft.set_defaults(func=cmd_sft)

    gr = sub.add_parser("grpo", help="GRPO reinforcement learning on a task with a checkable answer")
    gr.add_argument("checkpoint", help="checkpoint directory or run directory")
    gr.add_argument("--task", default="arithmetic", help='"arithmetic" or a JSONL of {"messages", "answer"} rows')
    gr.add_argument("--reward", default=None, help='"module:function" scoring (completion, example) -> float')
    gr.add_argument("--out", required=True, help="run directory")
    gr.add_argument("--iterations", type=int, default=200)
    gr.add_argument("--prompts", type=int, default=16, help="prompts per iteration")
    gr.add_argument("--group-size", type=int, default=8, help="completions per prompt (G)")
    gr.add_argument("--max-new-tokens", type=int, default=256)
    gr.add_argument("--temperature", type=float, default=1.0)
    gr.add_argument("--ppo-epochs", type=int, default=2, help="optimizer steps per sampled batch")
    gr.add_argument("--clip-eps", type=float, default=0.2)
    gr.add_argument("--beta", type=float, default=0.04, help="KL weight")
    gr.add_argument("--lr", type=float, default=1e-6)
    gr.add_argument("--eval-every", type=int, default=10)
    gr.add_argument("--seed", type=int, default=0)
    gr.add_argument("--device", default="auto")
    gr.add_argument("--precision", default="auto")
    gr.add_argument("--resume", action="store_true")
    gr.set_defaults(func=cmd_grpo)

    cv = sub.add_parser("convert", help="sharded (torchrun) checkpoint -> Hugging Face-format directory")
    cv.add_argument("checkpoint", help="DCP checkpoint directory or run directory (its latest checkpoint)")
    cv.add_argument("out", help="new output directory")
    cv.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="storage dtype (default: float32, as training checkpoints)")
    cv.set_defaults(func=cmd_convert)

    qz = sub.add_parser("quantize", help="write an official-layout FP8 copy of a checkpoint")
    qz.add_argument("checkpoint", help="checkpoint directory or run directory")
    qz.add_argument("out", help="new output directory (must not exist, or be empty)")
    qz.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="storage dtype of the tensors that stay high precision (default: bfloat16, as official)")
    qz.set_defaults(func=cmd_quantize)
    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    sv.add_argument("checkpoint", help="checkpoint directory or run directory")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    sv.add_argument("--model-name", help="model id clients send (default: the checkpoint directory name)")
    sv.add_argument("--max-batch-size", type=int, default=32, help="requests decoded together")
    sv.add_argument("--cache-tokens", type=int, default=0,
                    help="KV-cache budget in tokens (default: batch size x min(context, 4096))")
    sv.add_argument("--speculative-k", type=int, default=0, help="MTP draft tokens per step (0: off)")
    sv.add_argument("--max-model-len", type=int, default=0, help="context limit (default: the model's)")
    sv.add_argument("--compile-decode", action="store_true",
                    help="GPU: torch.compile the graphed decode step (1.65x at batch 1 on the 16b, H100); "
                         "one compile per batch/context bucket on first use")
    sv.add_argument("--max-prompt-tokens", type=int, default=0, help="longest prompt accepted (default: context - 1)")
    sv.add_argument("--max-tokens-limit", type=int, default=0, help="largest max_tokens accepted (default: context)")
    sv.add_argument("--max-queue", type=int, default=256, help="requests waiting beyond the batch before 503s")
    sv.add_argument("--device", default="auto", help="auto | cpu | cuda")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    sv.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    from dsv3.checkpoint import CheckpointError
    from dsv3.config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"dsv3 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
