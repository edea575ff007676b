"""Run a function on W gloo ranks in fresh processes, with a deadline, and collect results.

Each rank is a spawned process (no fork: OpenMP and gloo are not fork-safe) that joins
a process group through a FileStore in a temporary directory, so no port is needed.
A rank that raises has its traceback re-raised in the test; a run past its deadline
kills every rank and fails the test; a rank that finishes leaves without the
interpreter's finalization (see exit_without_finalization).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(fn, rank: int, world_size: int, tmp: str, threads: int, args: tuple) -> None:
    torch.set_num_threads(threads)
    try:
        store = dist.FileStore(os.path.join(tmp, "store"), world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(tmp, f"result{rank}.pt"))
        dist.barrier()  # lets gloo's threads free the last collective's tensors (see launch/train.py)
    except BaseException:
        with open(os.path.join(tmp, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    exit_without_finalization()


def exit_without_finalization() -> None:
    """End a rank that finished cleanly (its result saved, its process group destroyed)
    without the interpreter's finalization. A gloo worker thread may still hold the last
    reference to a tensor of a finished collective (torch's own collectives in the state
    dict utilities included); freeing it needs the GIL, and during finalization that
    aborts the process ("terminate called without an active exception", seen once in a
    CI run after the barrier made it rare; pytorch/pytorch#179291 describes it). Nothing
    is left to finalize: results and errors are in files."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(fn, world_size: int, *args, threads: int = 1, timeout: float = 240.0) -> list:
    """``[fn(rank, world_size, *args) for each rank]``, run on ``world_size`` processes."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_worker, args=(fn, r, world_size, tmp, threads, args)) for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        alive = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        errors = [open(os.path.join(tmp, f)).read() for f in sorted(os.listdir(tmp)) if f.startswith("error")]
        if errors:
            raise RuntimeError("a rank failed:\n" + errors[0])
        if alive:
            raise TimeoutError(f"ranks {alive} of {world_size} still running after {timeout} s")
        failed = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"ranks exited with codes {failed}")
        return [torch.load(os.path.join(tmp, f"result{r}.pt"), weights_only=False) for r in range(world_size)]
