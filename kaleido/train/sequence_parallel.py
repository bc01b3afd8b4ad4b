"""DeepSpeed-Ulysses sequence parallelism for KaleidoDiT, attached with module hooks (the DiT is not forked).

P ranks (one sequence-parallel group) share every sample. The DiT runs unchanged up to its first block,
on the full sequence on every rank (patch embedding, time and text embeddings are cheap). Then:
- blocks[0] pre-hook: pad the sequence [references, video] with zero tokens to a multiple of P and keep
  this rank's contiguous slice [B, L_pad/P, dim];
- every self-attention pre-hook: hand this rank's slice of the R-RoPE table (pads rotate by 0) and the
  Ulysses backend. Its attention is `deepspeed.sequence.layer.DistributedAttention`: an all-to-all turns
  q/k/v [B, L_pad/P, H, D] into [B, L_pad, H/P, D], the padded tail is trimmed so pad tokens are never
  keys, attention runs over the full real sequence on H/P heads, and a second all-to-all returns
  [B, L_pad/P, H, D]. Norms, FFN, modulation are per token and need no exchange;
- cross-attention (text) keeps the plain backend: every rank holds the whole text, queries are local;
- blocks[-1] forward hook: all-gather the slices, drop the pads: the head sees the full sequence.

Gradients: after the gather every rank of a group computes the same head and loss. The gather's backward
SUMS the identical downstream gradients of the P ranks (all-reduce, then this rank's slice), so each rank's
parameter gradients are P x its share; DeepSpeed, which sees all ranks as data-parallel, averages over
world = DP x P ranks, which gives exactly the data-parallel average of the full-sequence gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from kaleido.model.attention import AttentionBackend


class _GatherSequence(torch.autograd.Function):
    """All-gather [B, l, d] slices along dim 1; backward: sum the ranks' gradients, keep this rank's slice."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        size = dist.get_world_size(group)
        ctx.rank = dist.get_rank(group)
        ctx.local = x.shape[1]
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)  # gloo has no reduce_scatter; the tensor is one activation
        start = ctx.rank * ctx.local
        return grad[:, start : start + ctx.local].contiguous(), None


def shard_bounds(tokens: int, degree: int, rank: int) -> tuple[int, int, int]:
    """(padded, start, stop): the sequence of `tokens` padded with zero tokens to a multiple of `degree`, and
    rank's contiguous slice [start, stop) of it. At most degree - 1 pad tokens; every rank holds padded / degree.

    Shipped sizes: 480x832x81 + 3 references = 32,760 + 3 x 1,560 = 37,440 tokens split 2/4/8 ways without
    padding (18,720 / 9,360 / 4,680 per rank). (The official code splits the latent's H or W axis instead.)
    """
    if degree < 1 or not 0 <= rank < degree:
        raise ValueError(f"rank {rank} is not in a sequence-parallel group of {degree}")
    padded = -(-tokens // degree) * degree
    local = padded // degree
    return padded, rank * local, (rank + 1) * local


@dataclass
class _Layout:
    real: int = 0  # tokens of the full sequence
    padded: int = 0  # rounded up to a multiple of the group size


class UlyssesSequenceParallel:
    """Hooks that run one KaleidoDiT sequence-parallel over `group`; `attach(model)` installs them."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group if group is not None else dist.group.WORLD
        self.size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.layout = _Layout()
        self._rope_cache: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor, tuple]] = {}
        self._handles: list[Any] = []
        self.backend: AttentionBackend | None = None

    # -- the Ulysses attention backend ----------------------------------------------------------------

    def _local_attention(self, inner: Callable) -> Callable:
        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            # [B, L_pad, H/P, D] on every rank: pads must not be keys (trim), and come back as zeros
            real = self.layout.real
            out = inner(q[:, :real], k[:, :real], v[:, :real])
            if out.shape[1] == q.shape[1]:
                return out
            return torch.cat([out, out.new_zeros(out.shape[0], q.shape[1] - real, *out.shape[2:])], dim=1)

        return attend

    def make_backend(self, inner: AttentionBackend) -> AttentionBackend:
        from deepspeed.sequence.layer import DistributedAttention

        # scatter heads (dim 2), gather the sequence (dim 1) of [B, L, H, D]
        local = self._local_attention(inner.attention)
        distributed = DistributedAttention(local, self.group, scatter_idx=2, gather_idx=1)

        def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return distributed(q, k, v, 0)  # batch_dim_idx 0

        return AttentionBackend(f"ulysses-{inner.name}", inner.norm_rope, attention)

    # -- hooks ----------------------------------------------------------------------------------------------

    def _split(self, module: nn.Module, args: tuple) -> tuple:
        x, *rest = args
        real = x.shape[1]
        padded, start, stop = shard_bounds(real, self.size, self.rank)
        self.layout = _Layout(real, padded)
        if padded != real:
            x = torch.cat([x, x.new_zeros(x.shape[0], padded - real, x.shape[2])], dim=1)
        return (x[:, start:stop], *rest)

    def _local_rope(self, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = rope
        key = (id(cos), self.layout.real, self.layout.padded)
        cached = self._rope_cache.get(key)
        if cached is None or cached[2][0] is not cos:
            pad = self.layout.padded - self.layout.real
            if pad:  # a pad token rotates by angle 0
                cos = torch.cat([cos, cos.new_ones(pad, cos.shape[1])])
                sin = torch.cat([sin, sin.new_zeros(pad, sin.shape[1])])
            _, start, stop = shard_bounds(self.layout.real, self.size, self.rank)
            sl = slice(start, stop)
            # the original table is kept referenced so its id() cannot be reused by another table
            cached = (cos[sl].contiguous(), sin[sl].contiguous(), (rope[0],))
            if len(self._rope_cache) > 64:
                self._rope_cache.clear()
            self._rope_cache[key] = cached
        return cached[0], cached[1]

    def _self_attention(self, module: nn.Module, args: tuple) -> tuple:
        x, rope, _plain_backend = args
        return (x, self._local_rope(rope), self.backend)

    def _gather(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        full = _GatherSequence.apply(output, self.group)
        return full[:, : self.layout.real]

    def attach(self, model: nn.Module) -> nn.Module:
        """Install the hooks on a KaleidoDiT (in place); returns the model. Heads must divide by the group size."""
        heads = model.cfg.num_heads
        if heads % self.size:
            raise ValueError(f"sequence parallel degree {self.size} does not divide the {heads} attention heads")
        self.backend = self.make_backend(model.backend)
        blocks = model.blocks
        self._handles.append(blocks[0].register_forward_pre_hook(self._split))
        for block in blocks:
            self._handles.append(block.self_attn.register_forward_pre_hook(self._self_attention))
        self._handles.append(blocks[-1].register_forward_hook(self._gather))
        return model

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def sequence_parallel_groups(degree: int) -> tuple[dist.ProcessGroup, int, int]:
    """Consecutive ranks form the sequence-parallel groups: (this rank's group, dp rank, dp size).

    Every rank must create every group (torch.distributed.new_group is collective), in the same order.
    """
    world = dist.get_world_size()
    rank = dist.get_rank()
    if world % degree:
        raise ValueError(f"sequence parallel degree {degree} does not divide the world size {world}")
    mine = None
    for start in range(0, world, degree):
        group = dist.new_group(list(range(start, start + degree)))
        if start <= rank < start + degree:
            mine = group
    assert mine is not None
    return mine, rank // degree, world // degree
