"""Analytic GPU memory of generation: what each memory option of `generate` keeps resident, from the shapes.

Components (bytes; bf16 = 2 bytes per value unless said):
- DiT weights: the parameter count x 2 (1.3B: 2.84 GB, 14B: 28.6 GB); with block offload only the largest
  block and the non-block tensors stay resident (the others wait on the CPU).
- text encoder: umt5-xxl's encoder, 5.68e9 parameters x 2 (11.4 GB), 0 with the text encoder on the CPU (Wan's
  --t5_cpu) or released after encoding.
- VAE: 127e6 parameters (fp32 or bf16), 0 while sampling when released after encoding.
- activations while sampling (no gradients): per block the largest live set is the input x, q/k/v and the FFN's
  hidden layer of every token: B (2 with batched CFG) x N x (4 dim + ffn_dim) values (flash attention keeps no
  N x N matrix); N = video tokens + reference tokens.
- VAE decode: measured, not derived (its causal 3D convolutions cache per chunk); `vae_decode_gb` stays None
  until a GPU run records it.
These are estimates for planning; `benchmarks/generate_throughput.py --sweep` prints them next to measured peaks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kaleido.model.dit import DiTConfig

UMT5_XXL_ENCODER_PARAMETERS = 5_680_000_000  # google/umt5-xxl encoder (Wan's models_t5_umt5-xxl-enc-bf16.pth)
WAN_VAE_PARAMETERS = 126_900_000
GB = 1e9


def dit_parameters(cfg: DiTConfig) -> tuple[int, int]:
    """(all parameters, one block's) of a Wan DiT, from its config (the module list of wan/modules/model.py):
    a block holds 8 d^2 + 2 d f + f + 21 d; outside the blocks the patch, text, time and head layers."""
    d, f = cfg.dim, cfg.ffn_dim
    block = 8 * d * d + 2 * d * f + f + 21 * d
    patch = cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
    outer = (
        cfg.in_dim * patch * d + d  # patch_embedding
        + cfg.text_dim * d + d + d * d + d  # text_embedding
        + cfg.freq_dim * d + d + d * d + d  # time_embedding
        + 6 * d * d + 6 * d  # time_projection
        + d * cfg.out_dim * patch + cfg.out_dim * patch + 2 * d  # head + head.modulation
    )
    return outer + cfg.num_layers * block, block


def tokens(frames: int, height: int, width: int, references: int, patch: tuple[int, int, int] = (1, 2, 2)) -> int:
    """Transformer tokens: (latent frames x h x w) / patch for the video, plus one latent frame per reference."""
    latent_frames = (frames - 1) // 4 + 1
    per_frame = (height // 8 // patch[1]) * (width // 8 // patch[2])
    return latent_frames // patch[0] * per_frame + references * per_frame


@dataclass(frozen=True)
class GenerationMemory:
    dit_weights_gb: float
    text_encoder_gb: float
    vae_gb: float
    activations_gb: float
    tokens: int
    vae_decode_gb: float | None = None

    @property
    def sampling_peak_gb(self) -> float:
        """Resident while the DiT samples (the VAE decode comes after, when the DiT may be released)."""
        return self.dit_weights_gb + self.text_encoder_gb + self.vae_gb + self.activations_gb

    def to_dict(self) -> dict[str, float | int | None]:
        return {**asdict(self), "sampling_peak_gb": self.sampling_peak_gb}


def generation_memory(
    cfg: DiTConfig,
    frames: int,
    height: int,
    width: int,
    references: int = 3,
    *,
    dtype_bytes: int = 2,
    batch_cfg: bool = True,
    text_encoder_on_cpu: bool = False,
    release_encoders: bool = False,
    block_offload: bool = False,
    sequence_parallel: int = 1,
) -> GenerationMemory:
    """The estimate for one configuration of `generate`'s memory options (see the module docstring)."""
    total, block = dit_parameters(cfg)
    resident = (total - cfg.num_layers * block + block) if block_offload else total
    n = tokens(frames, height, width, references, cfg.patch_size)
    batch = 2 if batch_cfg else 1
    per_rank = -(-n // sequence_parallel)
    # the FFN's hidden layer of local tokens; attention holds q/k/v of all tokens on H/P heads after the all-to-all
    activations = batch * (per_rank * (cfg.dim + cfg.ffn_dim) + 3 * n * cfg.dim // sequence_parallel) * dtype_bytes
    return GenerationMemory(
        dit_weights_gb=resident * dtype_bytes / GB,
        text_encoder_gb=0.0 if (text_encoder_on_cpu or release_encoders) else UMT5_XXL_ENCODER_PARAMETERS * 2 / GB,
        vae_gb=0.0 if release_encoders else WAN_VAE_PARAMETERS * 4 / GB,
        activations_gb=activations / GB,
        tokens=n,
    )
