"""Run under torchrun (2 ranks, gloo) by tests/test_train_sp.py: Ulysses degree 2 against a one-process reference.

Every rank also computes the reference (the unwrapped model on the full sequence) itself, so one launch
checks both. Writes {case: {"out": max |diff|, "grad": max |diff|}} as JSON to argv[1] (rank 0).
"""

from __future__ import annotations

import copy
import json
import sys

import torch


def main() -> None:
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    from kaleido.model.dit import KaleidoDiT, dit_config
    from kaleido.train.sequence_parallel import UlyssesSequenceParallel

    torch.manual_seed(0)
    reference = KaleidoDiT(dit_config("tiny"), attention_backend="sdpa")
    parallel = copy.deepcopy(reference)
    sp = UlyssesSequenceParallel(dist.group.WORLD)
    sp.attach(parallel)
    world = dist.get_world_size()
    seen: list[int] = []  # tokens each self-attention of the parallel model receives: the rank's slice
    parallel.blocks[0].self_attn.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    results = {}
    cases = {
        # 2 references of 2x3 patches + 2x2x3 video patches = 24 tokens: divisible by 2
        "refs_even": ((1, 16, 2, 4, 6), (1, 2, 16, 4, 6), False),
        # 3x1x3 = 9 video tokens, no reference: padded to 10, the pad trimmed from the keys
        "odd_padded": ((2, 16, 3, 2, 6), None, False),
        # activation checkpointing recomputes the blocks, collectives included
        "refs_checkpointed": ((2, 16, 1, 4, 6), (2, 3, 16, 4, 6), True),
    }
    for name, (shape, ref_shape, checkpointing) in cases.items():
        gen = torch.Generator().manual_seed(len(name))
        latents = torch.randn(shape, generator=gen)
        refs = None if ref_shape is None else torch.randn(ref_shape, generator=gen)
        context = torch.randn(shape[0], 7, 32, generator=gen)
        t = torch.rand(shape[0], generator=gen) * 1000
        weight = torch.randn(shape, generator=gen)
        outs, grads = [], []
        for model in (reference, parallel):
            model.zero_grad(set_to_none=True)
            model.gradient_checkpointing = checkpointing
            out = model(latents, t, context, refs)
            (out * weight).sum().backward()
            outs.append(out.detach())
            grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        grad_diff = 0.0
        for key, ref_grad in grads[0].items():
            averaged = grads[1][key].clone()
            dist.all_reduce(averaged)  # what DeepSpeed's data-parallel averaging does over the group
            averaged /= world
            grad_diff = max(grad_diff, (averaged - ref_grad).abs().max().item() / (ref_grad.abs().max().item() + 1e-12))
        results[name] = {
            "out": (outs[0] - outs[1]).abs().max().item(),
            "grad_rel": grad_diff,
            "tokens": sp.layout.real,
            "local_tokens": seen[-1],
        }
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as handle:
            json.dump(results, handle)
    dist.barrier()


if __name__ == "__main__":
    main()
