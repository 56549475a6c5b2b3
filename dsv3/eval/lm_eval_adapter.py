"""lm-evaluation-harness adapter: dsv3 checkpoints as the model `dsv3`.

    import dsv3.eval.lm_eval_adapter, lm_eval
    lm_eval.simple_evaluate(model="dsv3", model_args="pretrained=runs/tiny", tasks=["hellaswag"])

or `dsv3 eval runs/tiny --lm-eval hellaswag,arc_easy [--include-path DIR] [--limit N]`.

Log-likelihoods are batched forwards of the model (`load_pretrained`: fp32 on the CPU, bf16 on a GPU
unless dtype= says otherwise) over context + continuation, right-padded (attention is causal and
routing is per token, so padding changes no real position), truncated on the left to the model's
context; a continuation scores the sum of its tokens' log-probabilities and is greedy when each of its
tokens is the argmax. Rolling log-likelihoods follow lm-eval's convention: disjoint windows of the
context length, the first conditioned on the prefix token. `generate_until` runs through dsv3's
continuously batched engine (greedy unless the task asks to sample), sharing the model's weights.

dsv3's pre-training separates documents with EOS and adds no BOS, so EOS is the prefix token and no
BOS is prepended; `add_bos_token=True` prepends it (official DeepSeek-V3 checkpoints are trained so).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

import lm_eval.models  # noqa: F401  the built-in models' lazy table: registering dsv3 first must not hide them
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window


@register_model("dsv3")
class DSV3LM(TemplateLM):
    """model_args: pretrained (checkpoint or run directory), device (auto | cpu | cuda), batch_size
    (sequences per forward / requests decoded together), max_length (context; 0: the model's),
    max_gen_toks (default generation length), add_bos_token, dtype (auto: bfloat16 on a GPU, float32 on the
    CPU; bfloat16 | float32 | checkpoint)."""

    def __init__(self, pretrained: str, device: str | None = "auto", batch_size: int | str = 8,
                 max_length: int | str = 0, max_gen_toks: int | str = 256, add_bos_token: bool | str = False,
                 max_batch_size: int | None = None, dtype: str = "auto", **kwargs):
        super().__init__()
        from dsv3.checkpoints.hf import load_pretrained
        from dsv3.checkpoints.rundir import resolve_checkpoint
        from dsv3.eval import resolve_dtype
        from dsv3.tokenizer import DSTokenizer

        path = resolve_checkpoint(str(pretrained))
        device, torch_dtype = resolve_dtype(str(dtype), device or "auto")
        self._device = torch.device(device)
        self.tok = DSTokenizer.load(path)
        self.model = load_pretrained(path, device=self._device, dtype=torch_dtype, keep_fp8=True).eval()
        # "auto" (lm-eval's batch-size search) is not supported: a fixed batch of 8
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_length = int(max_length) or self.model.config.max_position_embeddings
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = str(add_bos_token).lower() in ("true", "1")
        self._engine = None

    # --- TemplateLM's hooks ---------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return "dsv3-" + self.tok.fingerprint[:16]

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.tok.encode(string)
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens and self.add_bos_token
        return [self.tok.bos_id, *ids] if bos else ids

    def tok_decode(self, ids) -> str:
        return self.tok.decode(ids)

    @torch.inference_mode()
    def _score(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), continuation is the greedy one) per (context ids,
        continuation ids); longest first in batches of batch_size, answers in the given order."""
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        for s in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="dsv3 log-likelihoods"):
            idx = order[s: s + self.batch_size]
            rows, conts = [], []
            for i in idx:
                ctx, cont = pairs[i]
                assert cont, "empty continuation"
                full = (ctx + cont)[-(self.max_length + 1):]  # the last max_length inputs predict cont
                rows.append(full[:-1])
                conts.append(cont)
            T = max(len(r) for r in rows)
            ids = torch.full((len(rows), T), self.tok.eos_id, dtype=torch.long)
            for b, r in enumerate(rows):
                ids[b, : len(r)] = torch.tensor(r)
            logits = self.model(ids.to(self._device), with_mtp=False).logits.float()  # (B, T, V)
            for b, (r, cont) in enumerate(zip(rows, conts)):
                n = len(cont)
                lp = F.log_softmax(logits[b, len(r) - n: len(r)], dim=-1)  # (n, V): the positions predicting cont
                target = torch.tensor(cont, device=lp.device)
                total = lp.gather(1, target[:, None]).sum().item()
                greedy = bool((lp.argmax(-1) == target).all())
                out[idx[b]] = (total, greedy)
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        res = self._score([(ctx, cont) for _, ctx, cont in requests], disable_tqdm)
        for (key, _, _), r in zip(requests, res):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, r)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for w in get_rolling_token_windows(token_list=self.tok_encode(string, add_special_tokens=False),
                                               prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                                               context_len=1):
                windows.append(make_disjoint_window(w))
                owner.append(i)
        scores = self._score(windows, disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, scores):
            totals[i] += lp
        for req, t in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), t)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from dsv3.inference.engine import Engine, SamplingParams

        if self._engine is None:
            self._engine = Engine(self.model, self.tok, max_batch_size=self.batch_size)
        prompts, params = [], []
        for context, gen_kwargs in (req.args for req in requests):
            kw = dict(gen_kwargs)
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kw.get("max_gen_toks", self.max_gen_toks))
            sample = kw.get("do_sample", False) and float(kw.get("temperature", 0.0)) > 0
            ids = self.tok_encode(context)[-max(1, self.max_length - n):] or [self.prefix_token_id]  # room for n
            prompts.append(ids)
            params.append(SamplingParams(max_new_tokens=n, stop=until, temperature=float(kw["temperature"])
                                         if sample else 0.0, seed=int(kw.get("seed", 0)) if sample else None))
        bar = tqdm(total=len(prompts), disable=disable_tqdm, desc="dsv3 generate_until")
        outs = self._engine.generate(prompts, params, on_output=lambda o: o.finished and bar.update(1))
        bar.close()
        texts = [o.text for o in outs]
        for req, t in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", req.args, t)
        return texts


def run_lm_eval(checkpoint: str, tasks: str, *, include_path: str | None = None, limit: int | None = None,
                batch_size: int = 8, device: str = "auto", **model_args) -> dict:
    """lm_eval.simple_evaluate on a checkpoint over comma-separated task names; the results dict."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 (0: every document), got {limit}")
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm = DSV3LM(checkpoint, device=device, batch_size=batch_size, **model_args)
    return lm_eval.simple_evaluate(model=lm, tasks=[t for t in tasks.split(",") if t],
                                   task_manager=TaskManager(include_path=include_path), limit=limit,
                                   log_samples=False)
