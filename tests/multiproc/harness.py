"""Runs a worker function in W real processes over gloo (file:// rendezvous), with a deadline.

Each world is spawned once and the worker loops over many configurations inside it (process
start-up dominates on a 2-core CI machine). A worker returns normally or raises; a rank that
fails mid-collective makes its peers time out (gloo timeout below), never hang forever.
"""
from __future__ import annotations

import datetime
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _entry(rank, world_size, init_file, env, fn, args, backend="gloo"):
    os.environ.update(env)
    if os.environ.get("ADAPTMOE_TEST_STACKS_AFTER"):   # debugging hangs: dump every thread's stack
        import faulthandler
        faulthandler.dump_traceback_later(float(os.environ["ADAPTMOE_TEST_STACKS_AFTER"]), exit=True)
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=90))
    fn(rank, world_size, *args)
    # Only on success: after a failure, peers may sit in a collective and NCCL's destroy would
    # wait for them; exiting with the exception lets the parent report it and end the world.
    dist.destroy_process_group()
    # The worker has passed. Interpreter teardown after gloo work has been seen to abort ("terminate
    # called without an active exception", about 1 run in 15 of the planner test) after every
    # check passed; leave without it so the result is the worker's, not the teardown's.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_world(world_size: int, fn, *args, env: dict | None = None, deadline_s: float = 600,
              backend: str = "gloo") -> None:
    for path in (HERE, ROOT):
        if path not in sys.path:
            sys.path.insert(0, path)
    fd, init_file = tempfile.mkstemp(prefix="adaptmoe_dist_")
    os.close(fd)
    os.unlink(init_file)
    env = {"LOCAL_WORLD_SIZE": str(world_size), **(env or {})}
    ctx = mp.start_processes(_entry, args=(world_size, init_file, env, fn, args, backend), nprocs=world_size,
                             join=False, start_method="spawn")
    end = time.monotonic() + deadline_s
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > end:
                raise TimeoutError(f"world of {world_size} ranks did not finish in {deadline_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
        if os.path.exists(init_file):
            os.unlink(init_file)
