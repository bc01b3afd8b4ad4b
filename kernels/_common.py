"""Small helpers shared by the kernel modules (no Triton code here)."""

from __future__ import annotations

from functools import lru_cache

import torch
import triton

# Storage dtypes the kernels accept; math is always fp32.
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Head dims the kernels accept: tl.dot needs K >= 16 and power-of-two tile shapes; 256 would need
# smaller tiles than the configs below provide and no model here uses it.
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


def interpreting() -> bool:
    """Whether @triton.jit decorators applied NOW build interpreter functions (TRITON_INTERPRET=1).

    Triton 3.8 reads TRITON_INTERPRET when a function is decorated, i.e. when the kernel module is
    imported, not at launch; each kernel module records this at import time as `INTERPRETED`.
    """
    return bool(triton.knobs.runtime.interpret)


@lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def program_budget(device: torch.device, per_sm: int = 4) -> int:
    """How many persistent programs to launch: a few per SM on a GPU, a handful under the interpreter
    (it runs programs one after another, so fewer, longer programs cost less Python overhead)."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device()) * per_sm
    return 2


def check_last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels index the last dim with unit stride; copy only when that does not already hold."""
    return t if t.stride(-1) == 1 else t.contiguous()
