"""Processes die with their owner: a watchdog that ends what a hard-killed `raylm` command leaves running.

A clean exit shuts the local Ray cluster down. A SIGKILL (a supervisor's last word after its grace period) does
not: Ray's own processes follow the driver, but each vLLM replica's `EngineCore` and its workers are children of
a replica worker, get orphaned when it dies, and keep ~5.7 GB each until killed by hand. Neither vLLM nor Ray
ties them to the driver, and a process cannot be killed by a process that is already dead, so a small separate
process (its own session, so a signal to the command's group does not reach it) remembers the owner's process
tree and ends whatever of it outlives the owner: SIGTERM, then SIGKILL after a grace period.

(Within a live cluster, an engine dies with its replica through Ray's raylet subreaper; see `raylm.cluster`.)
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

POLL_S = 1.0
GRACE_S = 5.0


def descendants(pid: int) -> dict[int, tuple[str, float]]:
    """pid -> (name, create time) of every live descendant of `pid`, from one scan of the process table. Tolerant
    of processes ending during the scan (`Process.children(recursive=True)` raises NoSuchProcess then, which read as
    the owner's death would have killed a live cluster). The create time tells a reused pid from the same process."""
    import psutil

    kids: dict[int, list] = {}
    for p in psutil.process_iter(["pid", "ppid", "name", "create_time"]):
        kids.setdefault(p.info["ppid"], []).append(p.info)
    out, todo = {}, [pid]
    while todo:
        for info in kids.get(todo.pop(), []):
            if info["pid"] not in out and info["create_time"] is not None:
                out[info["pid"]] = (info["name"], info["create_time"])
                todo.append(info["pid"])
    out.pop(os.getpid(), None)  # the reaper is one of the owner's children too
    return out


def _still(tree: dict[int, float]) -> list:
    import psutil

    alive = []
    for pid, created in tree.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created:
                alive.append(p)
        except psutil.Error:
            pass
    return alive


def watch(owner_pid: int) -> None:
    import psutil

    try:
        owner = psutil.Process(owner_pid)
    except psutil.NoSuchProcess:
        return
    tree: dict[int, float] = {}
    while True:
        try:
            if owner.status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        tree = {p: created for p, (_, created) in descendants(owner_pid).items()} or tree
        time.sleep(POLL_S)
    # their own children too (a replica's engine started after the last look), found by the same tolerant scan:
    # `children(recursive=True)` gave up on a whole subtree when one process in it ended mid-walk
    for p in _still(tree):  # only from the same processes, never from a pid reused since the last look
        tree.update({c: created for c, (_, created) in descendants(p.pid).items() if c not in tree})
    left = _still(tree)
    for p in left:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(left, timeout=GRACE_S)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def start() -> subprocess.Popen:
    """Watch this process from a separate one; call it before starting any child worth reaping."""
    return subprocess.Popen([sys.executable, "-m", "raylm.reaper", str(os.getpid())], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            close_fds=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
