"""The evaluation harness's pure parts: the paired bootstrap, task specs, the results table."""
from __future__ import annotations

import pytest

from raylm.config import ConfigError
from raylm.harness.compare import paired_bootstrap, task_deltas
from raylm.harness.run import TaskResult, task_names


def test_paired_bootstrap_finds_a_real_gain_and_not_a_tie():
    base = [0, 1] * 50
    better = [1, 1] * 50  # right on every document the baseline got wrong: +0.5
    gain = paired_bootstrap(base, better, resamples=2000, seed=1)
    assert gain["delta"] == 0.5 and gain["n"] == 100
    assert 0.35 < gain["ci_low"] < 0.5 < gain["ci_high"] < 0.65 and gain["p_not_better"] == 0.0
    same = paired_bootstrap(base, base)
    assert same["delta"] == same["ci_low"] == same["ci_high"] == 0.0 and same["p_not_better"] == 1.0
    swapped = paired_bootstrap([0, 1] * 50, [1, 0] * 50, seed=1)  # same mean, different documents: a wide interval
    assert swapped["delta"] == 0 and swapped["ci_low"] < -0.15 and swapped["ci_high"] > 0.15
    assert paired_bootstrap([], [])["delta"] is None
    with pytest.raises(ValueError, match="length"):
        paired_bootstrap([1, 0], [1])


def test_task_deltas_pair_documents_by_id_and_filter():
    def samples(scores, filt="none", start=0):
        return [{"doc_id": start + i, "filter": filt, "scores": {"acc": v}} for i, v in enumerate(scores)]

    mine = {"quiz": samples([1, 1, 1, 0]), "gen": samples([1, 0], "strict")}
    base = {"quiz": samples([0, 1, 1, 0, 1]), "gen": samples([0, 0], "strict"), "only_theirs": samples([1])}
    rows = {(r["task"], r["metric"]): r for r in task_deltas(mine, base, resamples=500)}
    assert set(rows) == {("quiz", "acc"), ("gen", "acc,strict")}
    assert rows[("quiz", "acc")]["n"] == 4 and rows[("quiz", "acc")]["delta"] == 0.25  # doc 4: theirs only
    assert rows[("gen", "acc,strict")]["delta"] == 0.5


def test_corpus_metrics_are_compared_as_corpus_values():
    """bits per byte and perplexities are functions of summed (log-likelihood, count), not per-document means."""
    import math

    def samples(pairs):
        return [{"doc_id": i, "filter": "none", "scores": {"bits_per_byte": list(p), "word_perplexity": list(p),
                                                            "acc": 1.0}} for i, p in enumerate(pairs)]

    base = [(-100.0, 50), (-10.0, 100), (-30.0, 10)] * 10
    mine = [(ll * 0.9, n) for ll, n in base]  # 10% less surprised on every document
    rows = {r["metric"]: r for r in task_deltas({"t": samples(mine)}, {"t": samples(base)}, resamples=500)}
    bpb = lambda pairs: -sum(p[0] for p in pairs) / sum(p[1] for p in pairs) / math.log(2)
    assert rows["bits_per_byte"]["delta"] == pytest.approx(bpb(mine) - bpb(base), abs=1e-6)
    assert rows["bits_per_byte"]["ci_high"] < 0 and rows["bits_per_byte"]["p_not_better"] == 0.0
    ppl = lambda pairs: math.exp(-sum(p[0] for p in pairs) / sum(p[1] for p in pairs))
    assert rows["word_perplexity"]["delta"] == pytest.approx(ppl(mine) - ppl(base), abs=1e-5)
    assert rows["acc"]["delta"] == 0 and rows["bits_per_byte"]["n"] == 30


def test_task_specs_names_and_yaml_paths(tmp_path):
    y = tmp_path / "mine.yaml"
    y.write_text("task: my_task\nprocess_results: !function utils.process_results\n")
    assert task_names(["arc_easy", str(y)]) == (["arc_easy", "my_task"], [str(tmp_path)])
    with pytest.raises(ConfigError, match="no task file"):
        task_names([str(tmp_path / "missing.yaml")])
    (tmp_path / "nameless.yaml").write_text("output_type: multiple_choice\n")
    with pytest.raises(ConfigError, match="no `task:` name"):
        task_names([str(tmp_path / "nameless.yaml")])


def test_table_shows_value_stderr_and_the_delta_with_its_interval():
    from raylm.harness.report import task_table

    mine = {"quiz": TaskResult("quiz", {"acc": {"value": 0.75, "stderr": 0.05}}, 40, num_fewshot=0)}
    base = {"quiz": TaskResult("quiz", {"acc": {"value": 0.5, "stderr": 0.06}}, 40, num_fewshot=0)}
    rows = [{"baseline": "b1", "task": "quiz", "metric": "acc", "delta": 0.25, "ci_low": 0.1, "ci_high": 0.4, "n": 40}]
    table = task_table("m1", mine, {"b1": base}, rows)
    line = table.splitlines()[2]
    assert line.startswith("|quiz|0|40|acc|0.7500|±|0.0500|0.5000|+0.2500 [+0.1000, +0.4000]*|")
