"""Triton kernels for the Kaleido DiT, their pure-PyTorch references and benchmarks.

Import name clash: Hugging Face publishes a package also imported as `kernels`, and transformers /
diffusers probe for it (`is_kernels_available`). This package ships inside the `kaleido-platform`
distribution with version 0.x, below the probes' minimum, so the probes stay False; a test checks it.
Importing this package must stay free of side effects (the probes may import it).
"""
