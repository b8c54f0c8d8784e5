"""The quiet console: the terminal gets progress, summaries and errors; everything else lands in the run's log.

Each case runs a small script in a subprocess, whose stdout/stderr stand for the user's terminal: output that
bypasses Python (a child process, raw fd writes) must be caught as well as `print`.
"""
import subprocess
import sys
import textwrap
import time

from raylm.console import describe

SCRIPT = """
import os, subprocess, sys, warnings
from raylm import console
from raylm.runs import RunStore

store = RunStore({root!r})
with console.session(verbose={verbose}):
    print("noise before the run: ray start-up")
    with store.start_run("curate", {{}}) as run, console.run_log(run) as log:
        print("noise: an INFO line")
        warnings.warn("noise: a deprecation warning")
        os.write(2, b"noise: a C++ log line on fd 2\\n")
        # a long burst, so the tee's pipe still holds the child's last line when the run ends
        subprocess.run(["sh", "-c", "head -c 300000 /dev/zero | tr '\\\\0' x; echo; echo noise: a child process"])
        console.say("SUMMARY: stage done")
        console.status("PROGRESS: step 3/10")
    print("noise after the run")
    console.say(f"LOG {{log}}")
    {fail}
"""


def _run(tmp_path, verbose=False, fail=""):
    code = SCRIPT.format(root=str(tmp_path), verbose=verbose, fail=fail)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)


def test_terminal_gets_summaries_and_the_run_log_gets_everything_else(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    terminal = proc.stdout + proc.stderr
    assert "SUMMARY: stage done" in terminal and "PROGRESS: step 3/10" in terminal
    assert "noise" not in terminal, terminal
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    log = (run_dir / "logs" / "driver.log").read_text()
    for line in ("noise before the run", "noise: an INFO line", "noise: a deprecation warning",
                 "noise: a C++ log line", "noise: a child process"):
        assert line in log, (line, log)
    assert "SUMMARY" not in log and "after the run" not in log  # the next run's log would get that
    assert f"LOG {run_dir}/logs/driver.log" in terminal


def test_verbose_shows_everything_and_still_writes_the_log(tmp_path):
    proc = _run(tmp_path, verbose=True)
    assert proc.returncode == 0, proc.stderr
    terminal = proc.stdout + proc.stderr
    assert "noise: an INFO line" in terminal and "noise: a child process" in terminal and "SUMMARY" in terminal
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert "noise: a child process" in (run_dir / "logs" / "driver.log").read_text()


def test_an_error_reaches_the_terminal(tmp_path):
    proc = _run(tmp_path, fail='raise RuntimeError("the stage broke")')
    assert proc.returncode == 1 and "RuntimeError: the stage broke" in proc.stderr  # after the fds came back


def test_progress_line_reads_like_a_progress_bar():
    t0 = time.time()
    line = describe("pretrain", 35, {"step": 40, "total": 100, "loss": 3.21449, "tokens_per_s": 1234.4},
                    (t0 - 30, 10))
    assert line.startswith("pretrain") and "step 40/100" in line and "loss 3.214" in line
    assert "1,234 tok/s" in line and "0:35 elapsed" in line and "ETA 1:0" in line  # 1 s/step, 60 steps left
    assert describe("curate", 5, {"text": "rows seen: read 10"}, None) == "curate     rows seen: read 10  0:05 elapsed"


def test_cli_refusal_before_any_run_is_one_clean_error(tmp_path):
    """`raylm run` refused at input resolution (inside the console session): the error on the terminal, nothing
    else, and no run written."""
    proc = subprocess.run([sys.executable, "-m", "raylm.cli", "run", "sft", "--config", "pipelines/configs/sft/tiny.yaml",
                           "inputs.dataset=nope", "inputs.model=nope", f"root={tmp_path}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "no run 'nope'" in proc.stderr, proc.stderr
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())
