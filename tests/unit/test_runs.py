"""Run store: atomic manifests, artifacts with content hashes, input resolution errors, lineage."""
import json
import os

import pytest

from raylm.runs import RunError, RunStore


def _write(path, text="x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def make_run(store, stage, kind, inputs=(), text="data"):
    with store.start_run(stage, {"k": 1}, list(inputs)) as run:
        d = run.local_dir("out")
        _write(os.path.join(d, "f.txt"), text)
        run.add_artifact("out", kind, run.uri("out"))
        run.log_metrics({"m": 1.5})
    return run.id


def test_manifest_roundtrip_and_environment(tmp_path):
    store = RunStore(tmp_path)
    rid = make_run(store, "curate", "dataset")
    m = store.load(rid)
    assert m.status == "succeeded" and m.stage == "curate" and m.metrics == {"m": 1.5}
    assert m.outputs["out"].kind == "dataset" and len(m.outputs["out"].sha256) == 64
    assert m.environment["packages"]["torch"] and "git_commit" in m.environment
    assert m.timings["wall_s"] >= 0 and m.finished
    assert not [p for p in os.listdir(tmp_path / rid) if p.startswith(".tmp-")]  # atomic writes leave no temp
    assert json.loads((tmp_path / rid / "manifest.json").read_text())["run_id"] == rid


def test_content_hash_tracks_content(tmp_path):
    store = RunStore(tmp_path)
    a, b, c = (store.load(make_run(store, "curate", "dataset", text=t)).outputs["out"].sha256
               for t in ("one", "two", "one"))
    assert a != b and a == c


def test_failed_stage_leaves_failed_manifest(tmp_path):
    store = RunStore(tmp_path)
    with pytest.raises(ZeroDivisionError):
        with store.start_run("pretrain", {}) as run:
            1 / 0
    m = store.load(run.id)
    assert m.status == "failed" and "ZeroDivisionError" in m.error
    with pytest.raises(RunError, match="failed, not succeeded"):
        store.resolve("model", run.id, ("model",))


def test_resolve_errors_are_clear(tmp_path):
    store = RunStore(tmp_path)
    data = make_run(store, "curate", "dataset")
    with pytest.raises(RunError, match="no run 'nope'"):
        store.resolve("model", "nope", ("model",))
    # a stage pointed at the wrong parent: a dataset where a model is needed
    with pytest.raises(RunError, match=r"needs a model artifact.*offers: out\(dataset\)"):
        store.resolve("model", data, ("model",))
    # the artifact's files are gone
    import shutil

    shutil.rmtree(tmp_path / data / "out")
    with pytest.raises(RunError, match="missing at"):
        store.resolve("dataset", data, ("dataset",))


def test_latest_and_named_refs(tmp_path):
    store = RunStore(tmp_path)
    make_run(store, "curate", "dataset")
    second = make_run(store, "curate", "dataset")
    assert store.resolve("dataset", "latest/curate", ("dataset",)).run_id == second
    assert store.resolve("dataset", f"{second}:out", ("dataset",)).artifact == "out"
    with pytest.raises(RunError, match="offers"):
        store.resolve("dataset", f"{second}:other", ("dataset",))


def test_lineage_walks_back_to_the_data(tmp_path):
    store = RunStore(tmp_path)
    data = make_run(store, "curate", "dataset")
    tok = make_run(store, "tokenizer", "tokenizer", [store.resolve("dataset", data, ("dataset",))])
    base = make_run(store, "pretrain", "model", [store.resolve("dataset", data, ("dataset",)),
                                                 store.resolve("tokenizer", tok, ("tokenizer",))])
    chat = make_run(store, "sft", "model", [store.resolve("model", base, ("model",))])
    chain = [m.run_id for m in store.lineage(chat)]
    assert chain == [data, tok, base, chat]
    assert store.load(chat).parent == base and store.load(base).inputs[1].sha256


def test_remote_fsspec_store():
    """Any fsspec URI works as the root (memory:// stands in for s3:// here: same code path, no network)."""
    store = RunStore("memory://raylm-test-root")
    with store.start_run("curate", {}) as run:
        local = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"raylm-{run.id}")
        _write(os.path.join(local, "a.txt"), "hello")
        uri = run.upload(local, "out")
        run.add_artifact("out", "dataset", uri)
    assert uri.startswith("memory://")
    assert store.resolve("dataset", run.id, ("dataset",)).uri == uri
    assert [m.run_id for m in store.list()] == [run.id]


def test_require_paths_names_the_key_and_what_exists(tmp_path):
    from raylm.stage import require_paths

    (tmp_path / "text_train").mkdir()
    (tmp_path / "text_val").mkdir()
    require_paths("sft", str(tmp_path), {"val": "text_val"})
    with pytest.raises(RunError, match=r"sft: train_split='tasks_train' not found in .*it has: text_train, text_val"):
        require_paths("sft", str(tmp_path), {"train_split": "tasks_train"})
    with pytest.raises(RunError, match="it has: nothing"):
        require_paths("evaluate", str(tmp_path / "gone"), {"tasks": "tasks_test"})


def test_local_path_fetches_a_remote_artifact_once(tmp_path, monkeypatch):
    import fsspec

    from raylm.runs import local_path

    monkeypatch.setenv("RAYLM_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    fs.pipe({"/store/run1/model/config.json": b'{"a": 1}', "/store/run1/model/sub/w.bin": b"xyz"})
    local = local_path("memory://store/run1/model")
    assert open(os.path.join(local, "config.json")).read() == '{"a": 1}'
    assert open(os.path.join(local, "sub", "w.bin"), "rb").read() == b"xyz"
    fs.pipe("/store/run1/model/config.json", b"changed")  # artifacts are immutable: the cached copy is reused
    assert local_path("memory://store/run1/model") == local
    assert local_path(str(tmp_path)) == str(tmp_path)  # local paths untouched
    with pytest.raises(RunError, match="artifact not found"):
        local_path("memory://store/run2/model")
