"""The reaper: what a SIGKILLed command started (children, their children, a child that ignores SIGTERM) ends."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil

OWNER = textwrap.dedent("""
    import subprocess, sys, time
    from raylm import reaper
    reaper.start()
    # a child, a grandchild in a new session (as vLLM's engines and Ray's workers are), one that ignores SIGTERM
    subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                      "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True);"
                      " time.sleep(600)"])
    subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                      "time.sleep(600)"])
    print("started", flush=True)
    time.sleep(600)
""")


def test_sigkill_of_the_owner_ends_everything_it_started():
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    assert owner.stdout.readline().strip() == "started"
    deadline = time.time() + 20
    tree = []
    while time.time() < deadline and len(tree) < 4:  # reaper, child, grandchild, TERM-ignorer
        tree = psutil.Process(owner.pid).children(recursive=True)
        time.sleep(0.2)
    reaper = [p for p in tree if "raylm.reaper" in " ".join(p.cmdline())]
    work = [p for p in tree if p not in reaper]
    assert len(reaper) == 1 and len(work) == 3, [p.cmdline() for p in tree]
    time.sleep(1.5)  # the reaper has looked at the tree
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait()
    gone, alive = psutil.wait_procs(work + reaper, timeout=20)
    assert not alive, [p.cmdline() for p in alive]  # SIGTERM, then SIGKILL for the one ignoring it; reaper exits


def test_the_reaper_leaves_a_clean_exit_alone():
    """An owner that exits normally: nothing to kill, and the reaper goes away too."""
    owner = subprocess.Popen([sys.executable, "-c", "from raylm import reaper; import time; "
                              "print(reaper.start().pid, flush=True); time.sleep(1.5)"], stdout=subprocess.PIPE,
                             text=True)
    pid = int(owner.stdout.readline())
    assert owner.wait(timeout=30) == 0
    gone, alive = psutil.wait_procs([psutil.Process(pid)], timeout=10) if psutil.pid_exists(pid) else ([], [])
    assert not alive
