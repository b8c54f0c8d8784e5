"""Benchmark: RL rollouts and weight sync. raylm's Serve vLLM replicas vs HF `generate` and a bare vLLM engine.

Same model, same prompts (the held-out task prompts, chat template), k samples per prompt at temperature 1, up to
`--max-tokens` new tokens (responses stop at end-of-turn, so their lengths vary). Measured in one run:
  1. bare vLLM: `vllm.LLM` in this process (shut down before Ray starts, so the two never share the cores);
  2. raylm: `RolloutClient.sample` through deployment handles to `--replicas` Serve replicas (what the learner calls);
  3. HF `generate` (do_sample, num_return_sequences=k, left padding, batches of `--hf-batch` prompts);
  4. weight sync: `RolloutClient.push_weights` (object store -> replica -> /dev/shm -> vLLM reload) against the
     floor `model bytes / memcpy bandwidth` measured here with torch.
Prints generated tokens/s for each and the ratios; paste the table into benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/rollout.py --model runs/demo/<sft run>/train/.../model [--prompts 64 --k 8]
"""
from __future__ import annotations

import argparse
import statistics
import time


def prompts_for(model: str, n: int) -> list[list[int]]:
    from raylm.models import load_tokenizer

    tok = load_tokenizer(model)
    qs = [f"What is {a} plus {b}?" for a in range(20) for b in range(10)]
    qs += [f"Is {i} even or odd?" for i in range(200)] + [f"What number comes after {i}?" for i in range(200)]
    qs = qs[::max(1, len(qs) // n)][:n]
    return [tok(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                        tokenize=False), add_special_tokens=False)["input_ids"] for q in qs]


def bare_vllm(model, prompts, params, engine_kwargs, repeats):
    import gc

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model, **engine_kwargs)
    sp = SamplingParams(**params, logprobs=0)
    toks = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    llm.generate(toks, sp, use_tqdm=False)  # warm-up
    times, counts = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = llm.generate(toks, sp, use_tqdm=False)
        times.append(time.perf_counter() - t0)
        counts.append(sum(len(c.token_ids) for r in res for c in r.outputs))
    llm.llm_engine.engine_core.shutdown()  # free its memory and cores before the Serve replicas start
    del llm
    gc.collect()
    return times, counts


def serve_rollouts(model, prompts, params, engine_kwargs, repeats, replicas, sync_repeats):
    import ray
    from ray import serve

    from raylm.cluster import init_ray
    from raylm.models import load_model
    from serve.rollout import RolloutClient, build_rollout_app, create_weight_store

    init_ray()
    store = create_weight_store("weights-bench")
    serve.start(http_options={"location": "NoServer"})
    serve.run(build_rollout_app(model, "policy", "weights-bench", replicas=replicas, engine_kwargs=engine_kwargs),
              name="rollout-bench", route_prefix=None)
    client = RolloutClient("rollout-bench", "policy", "weights-bench", chunk_size=max(1, len(prompts) // (2 * replicas)))
    client.sample(prompts, params, 0)  # warm-up
    times, counts = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = client.sample(prompts, params, 0)
        times.append(time.perf_counter() - t0)
        counts.append(sum(len(s["ids"]) for g in out for s in g))
    state = load_model(model).state_dict()
    syncs = []
    for v in range(1, sync_repeats + 1):
        t0 = time.perf_counter()
        client.push_weights({k: t + 0.0 for k, t in state.items()}, v)
        syncs.append(time.perf_counter() - t0)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    serve.delete("rollout-bench")
    ray.kill(store)
    ray.shutdown()
    return times, counts, syncs, nbytes


def hf_generate(model, prompts, params, repeats, batch):
    import torch

    from raylm.models import load_model, load_tokenizer

    torch.set_num_threads(2)
    m, tok = load_model(model).eval(), load_tokenizer(model)
    stop = [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    times, counts = [], []
    for _ in range(repeats):
        t0, n = time.perf_counter(), 0
        for i in range(0, len(prompts), batch):
            chunk = prompts[i: i + batch]
            width = max(map(len, chunk))
            ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in chunk])
            attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            with torch.no_grad():
                gen = m.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=params["temperature"],
                                 top_k=0, max_new_tokens=params["max_tokens"], num_return_sequences=params["n"],
                                 eos_token_id=stop, pad_token_id=tok.pad_token_id)
            new = gen[:, width:]
            done = torch.isin(new, torch.tensor(stop))
            # tokens up to and including the first stop token, as vLLM counts them
            lengths = torch.where(done.any(1), done.int().argmax(1) + 1, torch.full((len(new),), new.shape[1]))
            n += int(lengths.sum())
        times.append(time.perf_counter() - t0)
        counts.append(n)
    return times, counts


def memcpy_bandwidth(nbytes: int) -> float:
    import torch

    src = torch.empty(max(nbytes // 4, 1), dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return src.numel() * 4 / best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a local HF model directory (e.g. the demo's SFT model)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--sync-repeats", type=int, default=10)
    args = ap.parse_args()
    prompts = prompts_for(args.model, args.prompts)
    params = {"n": args.k, "max_tokens": args.max_tokens, "temperature": 1.0}
    engine = {"dtype": "float32", "enforce_eager": True, "gpu_memory_utilization": 0.2, "max_model_len": 256}

    bare_t, bare_n = bare_vllm(args.model, prompts, params, engine, args.repeats)
    serve_t, serve_n, syncs, nbytes = serve_rollouts(args.model, prompts, params, {"max_model_len": 256},
                                                     args.repeats, args.replicas, args.sync_repeats)
    hf_t, hf_n = hf_generate(args.model, prompts, params, args.repeats, args.hf_batch)
    bw = memcpy_bandwidth(nbytes)

    def rate(ts, ns):  # best of the repeats: the least disturbed by the other processes on 2 cores
        i = min(range(len(ts)), key=lambda j: ts[j])
        return ns[i] / ts[i], ts[i], ns[i]

    (r_bare, t_bare, n_bare), (r_serve, t_serve, n_serve), (r_hf, t_hf, n_hf) = (
        rate(bare_t, bare_n), rate(serve_t, serve_n), rate(hf_t, hf_n))
    print(f"{args.prompts} prompts x {args.k} samples, <= {args.max_tokens} new tokens, temperature 1")
    print(f"{'engine':<34}{'tokens':>8}{'seconds':>9}{'tokens/s':>10}")
    for name, r, t, n in (("raylm: Serve vLLM replicas (handle)", r_serve, t_serve, n_serve),
                          ("bare vLLM engine (in process)", r_bare, t_bare, n_bare),
                          ("HF generate (sampling)", r_hf, t_hf, n_hf)):
        print(f"{name:<34}{n:>8}{t:>9.3f}{r:>10.0f}")
    print(f"raylm vs HF generate: {r_serve / r_hf:.2f}x throughput (goal >= 2x)")
    print(f"raylm vs bare vLLM:   {(n_bare / r_bare) and (t_serve / n_serve) / (t_bare / n_bare):.2f}x time per "
          f"token (goal <= 1.15x)")
    med = statistics.median(syncs)
    floor = nbytes / bw
    print(f"weight sync: {nbytes / 1e6:.1f} MB, median {med * 1000:.1f} ms over {len(syncs)} pushes; memcpy floor "
          f"{floor * 1000:.2f} ms ({bw / 1e9:.1f} GB/s) -> {med / floor:.0f}x the floor")


if __name__ == "__main__":
    main()
