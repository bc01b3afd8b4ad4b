"""Triton kernels for the Kaleido DiT, their pure-PyTorch references and benchmarks.

Modules (import them explicitly): `norm_rope` (fused RMSNorm + 3D RoPE for Q/K), `flash_attention`,
`reference` (float64 PyTorch references), `backend` (registers the DiT's `triton` attention backend on
import, with a CPU fallback) and `bench` (`python -m kernels.bench`).

Import name clash: Hugging Face publishes a package also imported as `kernels`, and transformers /
diffusers probe for it (`is_kernels_available`). This package ships inside the `kaleido-platform`
distribution with version 0.x, below the probes' minimum, so the probes stay False; a test checks it.
Importing this package must stay free of side effects (the probes may import it).
"""
