"""What a `raylm run` / `raylm lifecycle` prints: one live progress line per stage, each stage's summary, errors.

Everything else the command's process writes (Ray's INFO lines, worker output that Ray forwards to the driver,
library warnings, C++ logs) goes to the run's own log, `<root>/<run id>/logs/driver.log`; `--verbose` shows it on
the terminal as well. The switch is made on file descriptors 1 and 2, not on Python's `sys.stdout`, because much of
that output does not pass through Python (Ray's core worker logs, forwarded worker lines printed by Ray's threads).

Progress comes from where the work is: a training loop's rank 0 (or the RL learner, or curate's operators) calls
`publish(row)`, a fire-and-forget call to a small named actor; the driver polls it once a second and redraws
the line (on a terminal) or prints it every `RAYLM_PROGRESS_EVERY_S` seconds (in a log or a job's output).
Without a console session (tests calling `execute`, sweeps, `python -m pipelines.X`) nothing is redirected and
`publish` does nothing.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager

BOARD = "raylm-progress"
_SESSION: "Session | None" = None
_FAILED_LOG: str | None = None


class Session:
    """The command's terminal (duplicated before fds 1 and 2 are pointed elsewhere) and where they point now."""

    def __init__(self, verbose: bool):
        self.verbose = verbose
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = (os.dup(1), os.dup(2))
        self.term = os.fdopen(os.dup(1), "w", buffering=1)
        self.tty = self.term.isatty()
        self.every = float(os.environ.get("RAYLM_PROGRESS_EVERY_S", "1" if self.tty else "30"))
        self._live = False
        self._lock = threading.Lock()
        self._tee: tuple[int, threading.Thread] | None = None
        self.log_path = ""
        self.last_run_log: str | None = None  # the log of the last run, named when a command fails
        self._log_fd = -1
        self._pending = False
        self.switch(tempfile.mkstemp(prefix="raylm-", suffix=".log")[1], pending=True)

    # -------------------------------------------------------- where fds 1 and 2 go
    def switch(self, path: str, carry_from: str | None = None, pending: bool = False) -> None:
        """Point fds 1 and 2 at `path` (appending), first copying `carry_from` into it (output from before the
        run existed: Ray's start-up, input resolution)."""
        sys.stdout.flush()
        sys.stderr.flush()
        paused = self._pause_tee()  # --verbose: bytes already in the pipe belong to the old log
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if carry_from and carry_from != path:
            with open(carry_from, "rb") as src, open(path, "ab") as dst:
                shutil.copyfileobj(src, dst)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if self._tee is not None:
            self._tee_target[0] = fd
            if paused:
                self._resume.set()
        elif self.verbose:
            self._start_tee(fd)
        else:
            os.dup2(fd, 1)
            os.dup2(fd, 2)
        if self._log_fd >= 0:
            os.close(self._log_fd)
        if self._pending and self.log_path != path:
            os.unlink(self.log_path)  # carried into the run's log, or uploaded with it
        self._log_fd, self.log_path, self._pending = fd, path, pending

    # A marker written through the pipe: the pump has copied everything before it once it sees it. Waiting for
    # the pipe to look empty is not enough: the pump may hold a chunk it has read but not yet written.
    _MARK = b"\x00raylm-tee-switch\x00"

    def _pause_tee(self) -> bool:
        """--verbose: let the pump copy what is already in the pipe to the current log, then hold it until
        `switch` names the next one (else a child's last lines could land in the next run's log, or be lost)."""
        if self._tee is None:
            return False
        self._drained.clear()
        self._resume.clear()
        os.write(1, self._MARK)
        if not self._drained.wait(timeout=5):
            self._resume.set()  # the pump is stuck (a full terminal?): switch anyway rather than hang
            return False
        return True

    def _start_tee(self, log_fd: int) -> None:
        """--verbose: fds 1 and 2 into a pipe whose reader copies every byte to the terminal and the log."""
        r, w = os.pipe()
        self._tee_target = [log_fd]
        self._drained, self._resume = threading.Event(), threading.Event()
        term, mark = self._saved[1], self._MARK

        def copy(data: bytes) -> None:
            for fd in (term, self._tee_target[0]):
                try:  # a log being switched (or closed at the end) must not stop the pump: writers would block
                    os.write(fd, data)
                except OSError:
                    pass

        def pump():
            held = b""  # a tail that may be the start of a marker split across two reads
            while True:
                data = os.read(r, 65536)
                if not data:
                    return copy(held) if held else None
                data, held = held + data, b""
                while mark in data:
                    before, data = data.split(mark, 1)
                    copy(before)
                    self._drained.set()
                    self._resume.wait(timeout=10)
                held = next((data[-k:] for k in range(len(mark) - 1, 0, -1) if data.endswith(mark[:k])), b"")
                if len(data) > len(held):
                    copy(data[:len(data) - len(held)])

        t = threading.Thread(target=pump, name="raylm-tee", daemon=True)
        t.start()
        os.dup2(w, 1)
        os.dup2(w, 2)
        os.close(w)
        self._tee = (r, t)

    def close(self, failed: bool) -> str | None:
        """Restore the terminal; returns the log a failure is explained in (None on success)."""
        self.clear()
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        if self._tee is not None:
            self._tee[1].join(timeout=2)  # the pipe's writers are gone: the pump drains it and stops
        for fd in (*self._saved, self._log_fd):
            os.close(fd)
        pending = self.log_path  # output since the last run ended (or from before any run)
        if not failed or os.path.getsize(pending) == 0:
            os.unlink(pending)
            pending = None
        return (self.last_run_log or pending) if failed else None

    # -------------------------------------------------------- the terminal
    def say(self, text: str) -> None:
        with self._lock:
            self._clear_locked()
            self.term.write(text + "\n")

    def status(self, text: str) -> None:
        if self.verbose:  # the forwarded output would tear a redrawn line apart
            return self.say(text)
        with self._lock:
            if self.tty:
                width = shutil.get_terminal_size((120, 20)).columns
                self.term.write("\r" + text[:width - 1].ljust(width - 1))
                self.term.flush()
                self._live = True
            else:
                self.term.write(text + "\n")

    def clear(self) -> None:
        with self._lock:
            self._clear_locked()

    def _clear_locked(self) -> None:
        if self._live:
            self.term.write("\r" + " " * (shutil.get_terminal_size((120, 20)).columns - 1) + "\r")
            self._live = False


@contextmanager
def session(verbose: bool = False):
    """The whole command: fds 1 and 2 away from the terminal until it ends (then restored, before any error is
    printed)."""
    global _SESSION, _FAILED_LOG
    _SESSION, _FAILED_LOG, failed = Session(verbose), None, True
    try:
        yield _SESSION
        failed = False
    finally:
        s, _SESSION = _SESSION, None
        _FAILED_LOG = s.close(failed)


def failed_log() -> str | None:
    """After a failed session: the log that explains it."""
    return _FAILED_LOG


def say(text: str) -> None:
    """A line for the user: on the terminal during a session, else plain stdout."""
    if _SESSION is not None:
        _SESSION.say(text)
    else:
        print(text, flush=True)


def status(text: str) -> None:
    """The live progress line during a session; a printed line otherwise."""
    if _SESSION is not None:
        _SESSION.status(text)
    else:
        print(text, flush=True)


def log_path() -> str | None:
    return _SESSION.log_path if _SESSION is not None else None


# ------------------------------------------------------------ progress rows
def _board_cls():
    import ray

    @ray.remote(num_cpus=0)
    class Board:
        def __init__(self):
            self.row: dict = {}

        def set(self, row: dict) -> None:
            self.row = row

        def get(self) -> dict:
            return self.row

    return Board


_board = None
_looked_up_at = 0.0


def publish(row: dict) -> None:
    """From a worker: the stage's newest progress row (`step`, `total`, and any of loss, val_loss, reward,
    tokens_per_s). Fire and forget; nothing happens without a console session."""
    global _board, _looked_up_at
    import ray

    if _board is None and time.time() - _looked_up_at > 30:
        _looked_up_at = time.time()
        try:
            _board = ray.get_actor(BOARD)
        except ValueError:
            _board = None
    if _board is not None:
        _board.set.remote(row)


def describe(stage: str, elapsed: float, row: dict, first: tuple[float, int] | None) -> str:
    """`pretrain  step 40/100  loss 3.214  1,234 tok/s  0:35 elapsed  ETA 0:52`."""
    parts = [f"{stage:<9}"]
    if "text" in row:
        parts.append(row["text"])
    if "step" in row:
        parts.append(f"step {row['step']}/{row['total']}" if row.get("total") else f"step {row['step']}")
    for key, label in (("loss", "loss"), ("val_loss", "val_loss"), ("reward", "reward")):
        if isinstance(row.get(key), (int, float)):
            parts.append(f"{label} {row[key]:.4g}")
    if row.get("tokens_per_s"):
        parts.append(f"{row['tokens_per_s']:,.0f} tok/s")
    parts.append(f"{_clock(elapsed)} elapsed")
    if first and row.get("total") and row.get("step", 0) > first[1]:
        t0, s0 = first
        per_step = (time.time() - t0) / (row["step"] - s0)
        parts.append(f"ETA {_clock(per_step * (row['total'] - row['step']))}")
    return "  ".join(parts)


def _clock(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class StageProgress:
    """Driver side of one stage: the board actor and a thread redrawing the line from it."""

    def __init__(self, stage: str):
        self.stage, self.t0 = stage, time.time()
        self._stop = threading.Event()
        self._board = None
        self._thread = threading.Thread(target=self._run, name="raylm-progress", daemon=True)

    def start(self) -> None:
        import ray

        try:
            self._board = _board_cls().options(name=BOARD, get_if_exists=True).remote()
            ray.get(self._board.set.remote({}))
        except Exception:  # noqa: BLE001 - progress is best effort: a stage never fails for it
            self._board = None
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if _SESSION is not None:
            _SESSION.clear()

    def _run(self) -> None:
        import ray

        first, last_print = None, 0.0
        every = _SESSION.every if _SESSION is not None else 30.0
        while not self._stop.wait(1.0):
            row = {}
            if self._board is not None:
                try:
                    row = ray.get(self._board.get.remote(), timeout=5) or {}
                except Exception:  # noqa: BLE001
                    row = {}
            if "step" in row and (first is None or row["step"] < first[1]):
                first = (time.time(), row["step"])
            if time.time() - last_print >= every:
                last_print = time.time()
                if _SESSION is not None:
                    _SESSION.status(describe(self.stage, time.time() - self.t0, row, first))


@contextmanager
def stage(name: str):
    """Around one stage's work, after Ray is up: the live line while it runs (no-op without a session)."""
    if _SESSION is None:
        yield None
        return
    p = StageProgress(name)
    p.start()
    try:
        yield p
    finally:
        p.stop()


@contextmanager
def run_log(run):
    """Fds 1 and 2 into `<run>/logs/driver.log` while the run's stage works (a remote store gets the file when the
    stage ends); what came before the run existed (Ray's start-up) is carried into it."""
    if _SESSION is None:
        yield None
        return
    local = run.local_dir("logs")
    if local:
        _SESSION.switch(os.path.join(local, "driver.log"), carry_from=_SESSION.log_path)
    shown = run.uri("logs", "driver.log")
    try:
        yield shown
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        if not local:
            run.upload(_SESSION.log_path, "logs/driver.log")
        _SESSION.last_run_log = shown
        _SESSION.switch(tempfile.mkstemp(prefix="raylm-", suffix=".log")[1], pending=True)
