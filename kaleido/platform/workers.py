"""One set-up for every process that runs a data shard, whichever executor started it (a local process pool, this
process for one worker, a Ray task): the same thread counts and environment, so a shard's bytes do not depend on
where it ran.

What differed (measured on a 2-core machine): a Ray task starts with OMP_NUM_THREADS=1 (Ray sets it for a task of
one CPU) and CUDA_VISIBLE_DEVICES empty (no GPU requested), a pool worker inherited the parent's environment and set
the thread variables only after numpy / torch had read them, and the in-process executor ran with every core.
Thread counts change float results wherever a library splits a reduction by thread (torch's CPU kernels, BLAS), so
detections and scores of the curation models could differ by executor. `pinned_threads` sets the variables (for
what a shard imports or starts later) and the thread pools of libraries already loaded (torch, OpenCV, and BLAS /
OpenMP through threadpoolctl), and puts everything back when the block ends (the in-process executor shares the
caller's process). The encoder was the other cause: x264's macroblock-tree rate control gave different bitstreams
for the same frames at the embedded 96x64 size, run to run (kaleido.model.media.write_video turns it off).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS", "OPENCV_FOR_THREADS_NUM")
SHARD_THREADS = 1  # per shard process: N shards run on N cores; and one count on every machine and executor


@contextmanager
def pinned_threads(threads: int = SHARD_THREADS) -> Iterator[None]:
    """Run the block with `threads` threads in every library that would pick its own count (see the module
    docstring); the previous settings come back afterwards."""
    saved_env = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    os.environ.update({name: str(threads) for name in THREAD_VARIABLES})
    torch = sys.modules.get("torch")
    cv2 = sys.modules.get("cv2")
    saved_torch = torch.get_num_threads() if torch is not None else None
    saved_cv2 = cv2.getNumThreads() if cv2 is not None else None
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a dependency of the platform's environment
        threadpool_limits = None
    limits = threadpool_limits(limits=threads) if threadpool_limits is not None else None
    if torch is not None:
        torch.set_num_threads(threads)
    if cv2 is not None:
        cv2.setNumThreads(threads)
    try:
        yield
    finally:
        if limits is not None:
            limits.restore_original_limits()
        if torch is not None and saved_torch is not None:
            torch.set_num_threads(saved_torch)
        if cv2 is not None and saved_cv2 is not None:
            cv2.setNumThreads(saved_cv2)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
