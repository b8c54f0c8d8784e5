"""`raylm import`: a local HF directory, an s3:// one and a GGUF file become `model` runs that every model-taking
stage accepts; a bad source is refused with a clear message before any run exists."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from raylm.config import ConfigError, load_config
from raylm.runs import RunStore, sha256_path
from raylm.stage import execute, recipe

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
imp = recipe("import")
MODEL_TAKERS = {"sft": "model", "dpo": "model", "reward": "model", "rl": "model", "distill": "teacher",
                "prune": "model", "quantize": "model", "evaluate": "model", "serve": "model"}


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_import(root, **cfg) -> str:
    return execute(imp, load_config(imp.Config, {"root": str(root), **{k: str(v) for k, v in cfg.items()}}))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama checkpoint as a user would have it: safetensors, tokenizer with a chat template, a dotfile."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from raylm.models import IM_END, train_tokenizer

    d = tmp_path_factory.mktemp("tiny-hf") / "tiny"
    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog", "hello world, what is 2 + 3?"] * 20, 300)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.eos_token_id, eos_token_id=tok.convert_tokens_to_ids(IM_END),
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    (d / ".cache").mkdir()
    (d / ".cache" / "lock").write_text("a download tool's state: not part of the model")
    return d


def source_files(d: Path) -> dict:
    return {str(p.relative_to(d)): sha(p) for p in sorted(d.rglob("*")) if p.is_file() and ".cache" not in p.parts}


def test_tiny_hf_dir_is_a_model_run_every_stage_takes(ray_cluster, tiny_dir, tmp_path):
    from raylm.models import load_model, load_tokenizer, param_count
    from raylm.train.peft_menu import check_peft
    from raylm.config import LoraSpec
    from serve.main import resolve_model

    root = tmp_path / "runs"
    run_id = run_import(root, source=tiny_dir, name="tiny")
    store = RunStore(str(root))
    m = store.load(run_id)
    assert m.stage == "import" and m.status == "succeeded" and m.parent is None and m.name == "tiny"
    art, x = m.output(kind="model"), m.metrics
    # the run holds a copy of every file (the dotfile left out), each hash recorded and equal to the source's
    assert {k: v["sha256"] for k, v in x["files"].items()} == source_files(tiny_dir)
    assert source_files(Path(art.uri)) == source_files(tiny_dir)
    assert art.sha256 == sha256_path(store.fs, art.uri)
    model = load_model(art.uri)
    assert x["params"] == param_count(model) == art.meta["params"]
    assert x["vocab_size"] == x["tokenizer_vocab_size"] == len(load_tokenizer(art.uri))
    assert x["context_length"] == 256 and x["dtype"] == "float32" and x["chat_template"] is True
    assert x["architecture"]["model_type"] == "llama" and x["architecture"]["num_hidden_layers"] == 2
    assert x["source"] == {"uri": str(tiny_dir), "kind": "hf_dir", "weight_files": ["model.safetensors"]}
    # every stage that takes a model resolves it (by latest/import and by id); the tokenizer sits beside it
    for stage, role in MODEL_TAKERS.items():
        for ref in ("latest/import", run_id):
            assert store.resolve(role, ref, recipe(stage).INPUTS[role]).uri == art.uri, stage
    assert resolve_model("latest/import", str(root)) == art.uri  # `raylm serve latest/import`
    tok_uri = store.resolve("tokenizer", "latest/import", recipe("pretrain").INPUTS["tokenizer"]).uri
    assert load_tokenizer(tok_uri).chat_template == load_tokenizer(art.uri).chat_template
    check_peft(LoraSpec(), art.uri)  # sft's LoRA targets exist on the imported model
    # a named dtype converts the weights
    x16 = store.load(run_import(root, source=tiny_dir, dtype="bfloat16")).metrics
    assert x16["dtype"] == "bfloat16" and x16["weights_dtypes"] == {"bfloat16": x["params"]}


def test_s3_source(ray_cluster, s3_endpoint, tiny_dir, tmp_path):
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.mkdir("raylm-import")
    fs.put(str(tiny_dir), "raylm-import/ckpt", recursive=True)
    root = tmp_path / "runs"
    m = RunStore(str(root)).load(run_import(root, source="s3://raylm-import/ckpt"))
    assert m.metrics["source"]["uri"] == "s3://raylm-import/ckpt" and m.metrics["source"]["kind"] == "remote_dir"
    assert source_files(Path(m.output(kind="model").uri)) == source_files(tiny_dir)


def test_smollm2_gguf_import(smollm2_import):
    """The real model: a Q4_1 GGUF dequantized to a float32 HF checkpoint that answers through its chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, run_id = smollm2_import
    m = RunStore(root).load(run_id)
    x, art = m.metrics, m.output(kind="model")
    assert round(x["params"] / 1e6, 1) == 134.5 and x["vocab_size"] == 49152 == x["tokenizer_vocab_size"]
    assert x["chat_template"] is True and x["dtype"] == "float32" and x["context_length"] == 8192
    assert x["architecture"]["model_type"] == "llama"
    src = x["source"]
    assert src["kind"] == "gguf" and src["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert src["gguf_tensor_types"]["Q4_1"] > 0 and len(src["gguf_sha256"]) == 64
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= set(x["files"])
    assert x["files"]["tokenizer.json"]["sha256"] == sha(Path(art.uri) / "tokenizer.json")
    assert RunStore(root).resolve_id("latest/import") == run_id
    tok = AutoTokenizer.from_pretrained(art.uri)
    model = AutoModelForCausalLM.from_pretrained(art.uri, dtype=torch.float32)
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=10, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def _gguf(path: Path, arch: str = "llama", qtype=None) -> Path:
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter

    w = GGUFWriter(str(path), arch)
    w.add_name("tiny")
    if qtype is not None:  # one block row of each quant type's size
        from gguf import GGML_QUANT_SIZES

        w.add_tensor("token_embd.weight", np.zeros((4, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8), raw_dtype=qtype)
    w.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32), raw_dtype=GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_bad_sources_fail_before_any_run(tiny_dir, tmp_path):
    """No Ray needed: `check` refuses them before execute starts Ray or writes a run."""
    pytest.importorskip("gguf", reason="the gguf package is not installed (pip install -e '.[eval]')")
    from gguf import GGMLQuantizationType

    def copy(name: str) -> Path:
        return Path(shutil.copytree(tiny_dir, tmp_path / name))

    no_config = copy("no-config")
    (no_config / "config.json").unlink()
    vit, unknown = copy("vit"), copy("unknown")
    for d, model_type in ((vit, "vit"), (unknown, "made_up_lm")):
        c = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**c, "model_type": model_type}))
    truncated, garbage = copy("truncated"), copy("garbage")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    (garbage / "model.safetensors").write_bytes(b"\xff" * 64 + data[64:])
    no_tok = copy("no-tokenizer")
    for f in no_tok.glob("tokenizer*"):
        f.unlink()
    q81 = _gguf(tmp_path / "q8_1.gguf", qtype=GGMLQuantizationType.Q8_1)
    rwkv = _gguf(tmp_path / "rwkv.gguf", arch="rwkv6")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a GGUF file" * 8)
    cases = [
        (no_config, "no config.json in the directory"),
        (vit, r"unsupported architecture model_type='vit'.*known to transformers but not as a causal LM"),
        (unknown, r"unsupported architecture model_type='made_up_lm'.*not known to transformers"),
        (truncated, "corrupt safetensors file model.safetensors"),
        (garbage, "corrupt safetensors file model.safetensors"),
        (no_tok, "no tokenizer in the directory"),
        (q81, r"unsupported GGUF quant type\(s\) Q8_1 \(1 tensors, e.g. token_embd.weight\).*cannot dequantize"),
        (rwkv, "GGUF architecture 'rwkv6' is not supported by transformers' GGUF loader"),
        (junk, "not a readable GGUF file"),
        (tmp_path / "no" / "such" / "model", "no such file or directory"),
        (tmp_path / "no-config" / "tokenizer.json", "a file, but not a .gguf one"),
    ]
    root = tmp_path / "runs"
    for source, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            run_import(root, source=source)
        assert f"cannot import {source}" in str(err.value)
        assert os.listdir(root) == [], source  # no run directory, not even a failed manifest
    with pytest.raises(ConfigError, match="source is not set"):
        execute(imp, load_config(imp.Config, None, [f"root={root}"]))
    with pytest.raises(ConfigError, match="no file other.gguf in the directory; GGUF files there: junk.gguf, q8_1"):
        run_import(root, source=tmp_path, gguf_file="other.gguf")
    assert os.listdir(root) == []


def test_cli_import_prints_the_run_id(ray_cluster, tiny_dir, tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
           "PYTHONPATH": os.pathsep.join([str(REPO / "platform"), str(REPO)])}
    cli = [sys.executable, "-m", "raylm.cli"]
    root = tmp_path / "runs"
    proc = subprocess.run(cli + ["import", str(tiny_dir), "--name", "mine", "--root", str(root)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id = proc.stdout.strip().splitlines()[-1]
    assert "llama" in proc.stdout and "chat template yes" in proc.stdout
    store = RunStore(str(root))
    assert store.resolve_id("latest/import") == run_id and store.load(run_id).name == "mine"
    listed = subprocess.run(cli + ["runs", "--stage", "import", "--root", str(root)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and run_id in listed.stdout and " import " in listed.stdout
    # `raylm run import` names the same stage; a bad source fails before Ray starts, with no run written
    for args in (["run", "import", f"source={tmp_path / 'nope'}"], ["import", str(tmp_path / "nope")]):
        bad = subprocess.run(cli + args + ["--root", str(tmp_path / "empty")], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and f"cannot import {tmp_path / 'nope'}: no such file" in bad.stderr, bad.stderr
        assert not list((tmp_path / "empty").iterdir())
