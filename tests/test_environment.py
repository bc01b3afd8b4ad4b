"""The environment a user gets from `make setup`: no spurious warnings from dependencies probing our packages."""

import importlib.util
import subprocess
import sys


def test_no_bitsandbytes_and_no_kernels_warning():
    """diffusers imports bitsandbytes whenever it is installed, and bitsandbytes then tries `from kernels import
    get_kernel` (on AVX512-BF16 CPUs), which finds our top-level `kernels/` and warns on every run. pyiqa pulls
    bitsandbytes in without using it, so the lock leaves it out (Makefile `lock`, `uv pip sync`)."""
    assert importlib.util.find_spec("bitsandbytes") is None
    probe = (
        "from diffusers import AutoencoderKLWan\n"
        "from transformers import UMT5EncoderModel\n"
        "from transformers.utils import is_kernels_available\n"
        "import kaleido.cli, kernels\n"
        "print(is_kernels_available(), kernels.__file__)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert "gemm_4bit" not in done.stderr and "kernels-community" not in done.stderr, done.stderr
    available, path = done.stdout.split()
    assert available == "False" and path.endswith("kernels/__init__.py")  # our package, not HF's `kernels`
