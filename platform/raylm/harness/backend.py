"""raylm's model backend for lm-evaluation-harness: requests run on vLLM engines that are Ray actors.

lm-eval does the task side (loading, prompts, few-shot, filters, metrics, stderr); this is only an `LM`
(`lm_eval.api.model.TemplateLM`) registered as `raylm`. Tokenization mirrors lm-eval's `hf` backend (the same
context/continuation split, the tokenizer's own special tokens, the same prefix token for empty contexts), so
scores are comparable with `lm_eval --model hf`; log-likelihoods come from vLLM's prompt log-probs.

Why not lm-eval's own `vllm` backend with `data_parallel_size`: it starts Ray tasks per call, each building a new
engine, and then calls `ray.shutdown()`, which disconnects the caller (a raylm stage) from its cluster. Here
`engines` actors are started once, spread over the cluster, and every batch is dealt out to them interleaved.

On CPU each engine runs its core in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): killing the actor ends the
engine with it, and nothing is left if the evaluation dies.
"""
from __future__ import annotations

import os
from typing import Any

import ray
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (handle_stop_sequences, maybe_truncate, normalize_gen_kwargs,
                                  postprocess_generated_text)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from raylm.runs import local_path

# The CPU defaults: float32, eager, an explicit KV-cache size (a fraction of host memory fails on small machines).
MAX_CANDIDATES = 128  # vLLM's bound on SamplingParams.logprob_token_ids
WEIGHT_EXT = "serve.weight_ext.WeightSyncExtension"  # in-place weight reload (serve/weight_ext.py)
CPU_ENGINE = {"dtype": "float32", "enforce_eager": True, "kv_cache_memory_bytes": 512 << 20, "max_num_seqs": 64,
              "seed": 0}


@ray.remote
class Engine:
    """One vLLM engine. Scoring happens here, so only (log-prob, is-greedy) pairs travel back, not whole
    prompt log-prob tables."""

    def __init__(self, model_dir: str, engine_kwargs: dict):
        from vllm import LLM

        self.llm = LLM(model=model_dir, **engine_kwargs)

    def load_checkpoint(self, model_dir: str) -> int:
        """New weights of the same architecture, in place (needs `worker_extension_cls=WEIGHT_EXT`): a training
        run's next snapshot without a new engine."""
        n = self.llm.collective_rpc("raylm_load_checkpoint", args=(model_dir,))[0]
        self.llm.reset_prefix_cache()  # cached blocks hold the old weights' keys and values
        return n

    def max_model_len(self) -> int:
        return self.llm.llm_engine.model_config.max_model_len

    def loglikelihood(self, inputs: list[list[int]], ctxlens: list[int]) -> list[tuple[float, bool]]:
        from vllm import SamplingParams, TokensPrompt

        sp = SamplingParams(temperature=0, prompt_logprobs=1, max_tokens=1, detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=t) for t in inputs], sp, use_tqdm=False)
        return [_continuation_logprob(t, o.prompt_logprobs, c) for t, o, c in zip(inputs, outs, ctxlens)]

    def next_token(self, contexts: list[list[int]], candidates: list[list[int]]) -> list[tuple[dict, int]]:
        """For each context, the log-probs of its candidate next tokens and the greedy next token: one decode step
        per context instead of one prompt pass per (context, candidate) pair."""
        from vllm import SamplingParams, TokensPrompt

        sps = [SamplingParams(temperature=0, max_tokens=1, logprob_token_ids=c, detokenize=False) for c in candidates]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=t) for t in contexts], sps, use_tqdm=False)
        return [({k: getattr(v, "logprob", v) for k, v in o.outputs[0].logprobs[0].items()}, o.outputs[0].token_ids[0])
                for o in outs]

    def generate(self, inputs: list[list[int]], params: list[dict]) -> list[str]:
        from vllm import SamplingParams, TokensPrompt

        sps = [SamplingParams(**p) for p in params]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=t) for t in inputs], sps, use_tqdm=False)
        return [o.outputs[0].text for o in outs]


def _continuation_logprob(tokens: list[int], prompt_logprobs: list, ctxlen: int) -> tuple[float, bool]:
    """Sum of the continuation's log-probs (positions ctxlen..) and whether each was the argmax.

    prompt_logprobs[i] maps token id -> Logprob for position i (None at 0); it holds the actual token and the top-1.
    """
    total, greedy = 0.0, True
    for tok, table in zip(tokens[ctxlen:], prompt_logprobs[ctxlen:]):
        values = {k: getattr(v, "logprob", v) for k, v in table.items()}
        total += values[tok]
        greedy = greedy and max(values, key=values.get) == tok
    return total, greedy


def start_engines(model_dir: str, engines: int = 1, engine_kwargs: dict | None = None, num_gpus: float = 0,
                  tensor_parallel: int = 1, wait: bool = True, cpus: float = 1) -> list:
    """`engines` actors, spread over the cluster's nodes; on GPU each takes `tensor_parallel` GPUs. `wait=False`
    returns at once (start several models' engines together; the first call on them waits). `cpus` per engine:
    on CPU it is also the engine's thread count (Ray sets OMP_NUM_THREADS to an actor's CPUs)."""
    kwargs = {**({} if num_gpus else CPU_ENGINE), **(engine_kwargs or {})}
    if tensor_parallel > 1:
        kwargs["tensor_parallel_size"] = tensor_parallel
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if not num_gpus else {}
    opts: dict[str, Any] = {"num_cpus": cpus, "scheduling_strategy": "SPREAD", "runtime_env": {"env_vars": env}}
    if num_gpus:
        opts["num_gpus"] = num_gpus * tensor_parallel
    actors = [Engine.options(**opts).remote(local_path(model_dir), kwargs) for _ in range(engines)]
    if wait:
        ray.get([a.max_model_len.remote() for a in actors])  # fail here, with vLLM's message, if one cannot start
    return actors


@register_model("raylm")
class RayVLLM(TemplateLM):
    """lm-eval `LM` over raylm's engine actors. `RayVLLM(model_dir, engines=[...])` reuses running engines (a stage
    scores several task sets on one start-up); `RayVLLM(model_dir, n_engines=2)` starts its own."""

    def __init__(self, pretrained: str, engines: list | None = None, n_engines: int = 1,
                 engine_kwargs: dict | None = None, batch_size: int = 256, max_gen_toks: int = 256,
                 max_length: int | None = None, cpus_per_engine: float = 1, **_: Any):
        super().__init__()
        from transformers import AutoTokenizer

        self.model_dir = local_path(pretrained)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.engines = engines or start_engines(self.model_dir, int(n_engines), engine_kwargs,
                                                cpus=float(cpus_per_engine))
        self.batch_size = int(batch_size)
        self._max_gen_toks = int(max_gen_toks)
        self._max_length = int(max_length) if max_length else ray.get(self.engines[0].max_model_len.remote())

    # ---- what TemplateLM asks for
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """As lm-eval's hf backend: the tokenizer's own special tokens unless told, none before an explicit BOS."""
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            kw["add_special_tokens"] = False
        return self.tokenizer.encode(string, **kw)

    # ---- dealing work out to the engines
    def _deal(self, method: str, items: list, *columns: list) -> list:
        """Interleave items over the engines in batches (sorted by length first, so a batch holds similar lengths),
        run them all at once, and return the results in the items' order."""
        order = sorted(range(len(items)), key=lambda i: -len(items[i]))
        n = len(self.engines)
        refs = []
        for start in range(0, len(order), self.batch_size * n):
            block = order[start:start + self.batch_size * n]
            for e in range(n):
                part = block[e::n]
                if part:
                    args = [[items[i] for i in part], *[[col[i] for i in part] for col in columns]]
                    refs.append((part, getattr(self.engines[e], method).remote(*args)))
        out: list = [None] * len(items)
        for part, ref in refs:
            for i, r in zip(part, ray.get(ref)):
                out[i] = r
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Single-token continuations (letter choices, yes/no) are grouped by context and scored from one decode
        step each (`Engine.next_token`): the same log-softmax, without a prompt pass per choice (vLLM does not
        reuse cached prefixes for prompt log-probs). Everything else: prompt log-probs of context + continuation."""
        max_ctx = self.max_length - 1  # vLLM needs room for one generated token
        out: list = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, (_, context_enc, continuation_enc) in enumerate(requests):
            if len(continuation_enc) == 1 and len(context_enc) < max_ctx:
                groups.setdefault(tuple(context_enc), []).append(i)
        if groups:
            candidates = [sorted({requests[i][2][0] for i in members})[:MAX_CANDIDATES] for members in groups.values()]
            scored = self._deal("next_token", [list(c) for c in groups], candidates)
            for members, (logprobs, greedy) in zip(groups.values(), scored):
                for i in members:
                    tok = requests[i][2][0]
                    out[i] = (logprobs[tok], greedy == tok) if tok in logprobs else None
        rest = [i for i, r in enumerate(out) if r is None]  # longer continuations (or over 128 candidates)
        if rest:
            inputs = [(requests[i][1] + requests[i][2])[-max_ctx:] for i in rest]
            ctxlens = [len(requests[i][1]) - max(0, len(requests[i][1]) + len(requests[i][2]) - max_ctx) for i in rest]
            for i, res in zip(rest, self._deal("loglikelihood", inputs, ctxlens)):
                out[i] = res
        for (key, _, _), res in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood in disjoint windows of the context length, as lm-eval's backends do."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for w in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length - 2, context_len=1)):
                windows.append((None, *w))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, scores):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self.tokenizer.decode(self.eot_token_id) or self.tokenizer.eos_token
        inputs, params, stops = [], [], []
        for context, gen_kwargs in (req.args for req in requests):
            kw = normalize_gen_kwargs(gen_kwargs, default_max_gen_toks=self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=eos)
            max_toks = int(kw.pop("max_gen_toks", self.max_gen_toks))
            kw.pop("do_sample", None)
            toks, max_toks = maybe_truncate(self.tok_encode(context), max_gen_toks=max_toks,
                                            max_model_len=self.max_length, verbose=False)
            inputs.append(toks)
            params.append({"skip_special_tokens": False, "spaces_between_special_tokens": False, **kw,
                           "max_tokens": max_toks, "stop": until})
            stops.append(until)
        texts = self._deal("generate", inputs, params)
        out = [postprocess_generated_text(t, s, None) for t, s in zip(texts, stops)]
        for req, text in zip(requests, out):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out

    def shutdown(self) -> None:
        for a in self.engines:
            ray.kill(a)
        self.engines = []


