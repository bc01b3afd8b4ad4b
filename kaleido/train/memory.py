"""Training memory per rank, estimated before launch: model states by ZeRO stage and offload, activations from
the DiT's shapes, the largest temporary buffers. `kaleido train --plan` prints it; every launch checks it.

Model states (bytes per rank; P parameters, N data-parallel ranks, LL the largest layer's parameters):
- On GPUs (bf16 with fp32 master weights) full fine-tuning uses DeepSpeed's own estimators,
  `estimate_zero2_model_states_mem_needs` (2 P + 18 P / N; with optimizer offload 2 P) and
  `estimate_zero3_model_states_mem_needs` (4 LL + 18 P / N; offload of the optimizer 4 LL + 2 P / N; of the
  parameters too 4 LL). Their split, as DeepSpeed states it: 16-bit parameters 2, 16-bit gradients 2,
  fp32 gradients 4, fp32 master parameters 4, Adam moments 8. ZeRO-1 (no DeepSpeed estimator) partitions
  only the fp32 master, fp32 gradients and moments: 2 P + 2 P + 16 P / N.
- On CPU (fp32, bf16 off) DeepSpeed's ZeRO-1/2 still keeps an fp32 copy of each rank's partition: parameters
  4 P, then fp32 master 4, gradient partition 4 and Adam 8 bytes per parameter over N; ZeRO-3 partitions the
  parameters too (4 P / N) and gathers the largest layer (4 LL).
- LoRA: the frozen base counts as parameters only (16-bit on GPUs; partitioned under ZeRO-3); the adapter's
  parameters go through the formulas above.

Activations of one micro-batch sample (L tokens of video and references on this rank = all / SP degree, T text
tokens, d model width, f FFN width, h heads, b bytes of the training dtype), counted from the tensors
`WanAttentionBlock.forward` keeps for backward (kaleido/model/dit.py; flash / memory-efficient attention keeps no
L x L matrix, only q, k, v, the output and the log-sum-exp):
- per block: 10 fp32 copies of L x d (the modulation and norms run in fp32), 12 L x d in the training dtype
  (linear inputs, normed and transposed q/k/v, attention outputs), 2 L x f (FFN hidden before and after GELU),
  L x (9 + 2 h) fp32 row statistics, and for cross-attention (3 b + 4) T x d (text keys and values; Ulysses
  splits only self-attention, so this part is not divided by the SP degree);
- with activation checkpointing every block keeps only its input (L x d x b) and the block being recomputed
  holds its full set during its backward;
- outside the blocks: the text context T x d x b and the RoPE tables 2 x L x head_dim / 2 complex64.
Buffers: DeepSpeed allocates its gradient reduce bucket whole (`reduce_bucket_size` values of the gradient dtype,
default 5e8: 1 GB in bf16, 2 GB in fp32, even for a tiny model; counted with the gradients); the gradients
flowing through one block's backward (2 L x f x b for the FFN hidden and 4 fp32 L x d); the optimizer step's
temporary (one fp32 value per trainable parameter of the rank's partition). The peak is the model states plus
the larger of (activations + backward buffers) and the step's buffers.
With LoRA (the base frozen) a block keeps 6 fp32 and 8 training-dtype L x d and one L x f, plus one L x d for a
targeted ffn.0 and one L x f for a targeted ffn.2: the modulation products keep nothing for scale/shift/gate
gradients and a frozen linear keeps no copy of its input.

`benchmarks/train_memory.py` prints these next to the peak memory a real DeepSpeed step measures on CPU.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kaleido.config.schema import LORA_ATTENTION_TARGETS
from kaleido.model.dit import DiTConfig, dit_config
from kaleido.model.memory import GB, dit_parameters, tokens

if TYPE_CHECKING:
    from kaleido.config import Params

REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements)
ROWS = ("parameters", "gradients", "optimizer states", "activations", "backward buffers", "optimizer step buffers")
STATE_ROWS = ROWS[:3]


@dataclass(frozen=True)
class TrainingShape:
    """What one rank trains: the model, the tokens of a micro-batch sample and how the work is split."""

    config: DiTConfig
    frames: int
    height: int
    width: int
    references: int
    text_len: int
    micro_batch: int = 1
    world_size: int = 1
    sequence_parallel: int = 1
    zero_stage: int = 2
    precision: str = "bf16"  # bf16 on GPUs (fp32 master weights), fp32 on CPU
    checkpointing: bool = True
    lora_rank: int = 0  # 0: full fine-tuning
    lora_targets: tuple[str, ...] = ()
    offload_optimizer: bool = False
    offload_parameters: bool = False
    reduce_bucket: int = REDUCE_BUCKET  # DeepSpeed reduce_bucket_size (elements), train.reduce_bucket_size
    nodes: int = 1  # machines the ranks run on (offloaded states share each machine's memory)

    @property
    def tokens(self) -> int:
        """Video + reference tokens of one sample (the whole sequence, before sequence parallelism)."""
        return tokens(self.frames, self.height, self.width, self.references, self.config.patch_size)


@dataclass
class MemoryEstimate:
    """Bytes per rank by component (ROWS), and the notes that explain them."""

    shape: TrainingShape
    rows: dict[str, float]
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        """The peak: model states, plus the larger of forward/backward (activations and backward buffers) and
        the optimizer step's buffers (the activations are freed by then)."""
        states = sum(self.rows[name] for name in STATE_ROWS)
        forward_backward = self.rows["activations"] + self.rows["backward buffers"]
        return states + max(forward_backward, self.rows["optimizer step buffers"])

    @property
    def total_gb(self) -> float:
        return self.total / GB


@functools.cache
def _shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """The checkpoint layout's tensor shapes (kaleido.model.checkpoint.expected_shapes: a meta-device model),
    once per config: the planner asks for them for every option it tries."""
    from kaleido.model.checkpoint import expected_shapes

    return {key: tuple(shape) for key, shape in expected_shapes(cfg).items()}


def lora_parameters(cfg: DiTConfig, rank: int, targets: tuple[str, ...]) -> int:
    """Adapter parameters: rank x (in + out features) of every targeted linear in every block (LoRA: A is
    r x in, B is out x r), from the checkpoint layout's shapes."""
    wanted = {f".{t}.weight" for t in targets}
    return sum(rank * (shape[0] + shape[1]) for key, shape in _shapes(cfg).items()
               if key.startswith("blocks.") and key[key.index(".", len("blocks.")):] in wanted)


def largest_layer(cfg: DiTConfig) -> int:
    """Parameters of the largest single tensor (ZeRO-3 gathers one at a time), from the checkpoint layout
    (1.3B: the time projection, 6 d x d, not the FFN)."""
    return max(math.prod(shape) for shape in _shapes(cfg).values())


def model_state_bytes(shape: TrainingShape) -> dict[str, float]:
    """Parameters, gradients and optimizer states per rank (see the module docstring for every formula)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cfg = shape.config
    trainable = trainable_parameters(shape)
    frozen = dit_parameters(cfg)[0] - trainable
    # DeepSpeed partitions over every rank it sees (it is not told about the sequence-parallel groups)
    n, zero, layer = shape.world_size, shape.zero_stage, largest_layer(cfg)
    if shape.precision == "fp32":
        params = 4 * trainable if zero < 3 else 4 * trainable / n + 4 * layer
        params += 4 * frozen / (n if zero == 3 else 1)
        grads = 4 * trainable / n
        optimizer = 0.0 if shape.offload_optimizer else 12 * trainable / n  # fp32 master + Adam moments
        return {"parameters": params, "gradients": grads, "optimizer states": optimizer}
    frozen_bytes = 0.0 if shape.offload_parameters else 2 * frozen / (n if zero == 3 else 1)
    if zero == 3:
        _, gpu, largest = estimate_zero3_model_states_mem_needs(
            trainable, layer, num_gpus_per_node=n, num_nodes=1, cpu_offload=shape.offload_optimizer,
            cpu_offload_params=shape.offload_parameters)
        if shape.offload_parameters and not shape.offload_optimizer:
            # DeepSpeed's estimator only models parameter offload together with optimizer offload: the 16-bit
            # parameter partition (2 of the 18 bytes) leaves the GPU, the rest stays
            gpu = largest + int(16 * trainable / n)
        partitioned = gpu - largest  # 18 P / N, 2 P / N or 0: DeepSpeed's split 2 + 4 + 4 + 8
        params = largest + partitioned * 6 / 18 + frozen_bytes
        grads = partitioned * 4 / 18
        optimizer = partitioned * 8 / 18
        return {"parameters": params, "gradients": grads, "optimizer states": optimizer}
    if zero == 2:
        _, gpu = estimate_zero2_model_states_mem_needs(trainable, num_gpus_per_node=n, num_nodes=1,
                                                       cpu_offload=shape.offload_optimizer)
        replicated = 2 * trainable
        partitioned = gpu - replicated  # 18 P / N: 2 grads16 + 4 grads32 + 4 master + 8 Adam
        return {"parameters": replicated + partitioned * 4 / 18 + frozen_bytes,
                "gradients": partitioned * 6 / 18, "optimizer states": partitioned * 8 / 18}
    # ZeRO-1: 16-bit parameters and gradients replicated; fp32 master, fp32 gradients and Adam partitioned
    state = 0.0 if shape.offload_optimizer else 16 * trainable / n
    return {"parameters": 2 * trainable + state * 4 / 16 + frozen_bytes,
            "gradients": 2 * trainable + state * 4 / 16, "optimizer states": state * 8 / 16}


def trainable_parameters(shape: TrainingShape) -> int:
    if shape.lora_rank:
        return lora_parameters(shape.config, shape.lora_rank, shape.lora_targets)
    return dit_parameters(shape.config)[0]


def block_activation_bytes(shape: TrainingShape) -> float:
    """Bytes one WanAttentionBlock keeps for backward for one sample (all of it: what a recomputed block holds
    under activation checkpointing), counted from the tensors its forward saves (the module docstring lists
    them); L = this rank's tokens."""
    cfg = shape.config
    b = 2 if shape.precision == "bf16" else 4
    d, f, h, t = cfg.dim, cfg.ffn_dim, cfg.num_heads, shape.text_len
    local = shape.tokens / shape.sequence_parallel  # Ulysses: every [L, .] tensor is split over the SP group
    if shape.lora_rank:
        # the base frozen: the fp32 modulation products keep nothing for scale/shift/gate gradients, and an
        # untargeted linear keeps no copy of its input (the FFN then keeps only GELU's input). Counted for a block
        # whose input needs a gradient (every block after the first: an earlier adapter changed it)
        fp32_copies, dense, hidden = 6, 8 + ("ffn.0" in shape.lora_targets), 1 + ("ffn.2" in shape.lora_targets)
    else:
        fp32_copies, dense, hidden = 10, 12, 2
    return (local * d * (fp32_copies * 4 + dense * b) + hidden * local * f * b + local * (9 + 2 * h) * 4
            + t * d * (3 * b + 4))


def activation_bytes(shape: TrainingShape) -> tuple[float, float]:
    """(activations kept for backward, backward buffers) per rank for a micro-batch, in bytes."""
    cfg = shape.config
    b = 2 if shape.precision == "bf16" else 4
    d, f = cfg.dim, cfg.ffn_dim
    local = shape.tokens / shape.sequence_parallel
    block = block_activation_bytes(shape)
    shared = shape.text_len * d * b + 2 * local * (cfg.head_dim // 2) * 8
    # checkpointing: the input of every block, plus the block being recomputed
    saved = (cfg.num_layers * local * d * b + block if shape.checkpointing else cfg.num_layers * block) + shared
    backward = 2 * local * f * b + 4 * local * d * 4
    return saved * shape.micro_batch, backward * shape.micro_batch


def step_bytes(shape: TrainingShape) -> float:
    """Optimizer-step buffers: torch's foreach AdamW (`_multi_tensor_adamw`) makes one fp32 temporary of the
    parameters it steps (the square root of the second moment; the other updates are in place): 4 bytes per
    trainable parameter of this rank's partition; 0 on the GPU with the optimizer offloaded."""
    if shape.offload_optimizer and shape.precision == "bf16":
        return 0.0
    return 4 * trainable_parameters(shape) / shape.world_size


def host_bytes(shape: TrainingShape) -> float:
    """CPU memory per machine for what offload moves there (0 without offload): DeepSpeed's own estimators'
    `cpu_mem` (with their 1.5 buffer factor) for the trainable parameters, plus a frozen base's 16-bit
    parameters when they are offloaded."""
    if not (shape.offload_optimizer or shape.offload_parameters):
        return 0.0
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cfg = shape.config
    trainable = trainable_parameters(shape)
    per_node = max(shape.world_size // shape.nodes, 1)
    if shape.zero_stage == 3:
        cpu, _, _ = estimate_zero3_model_states_mem_needs(
            trainable, largest_layer(cfg), per_node, shape.nodes, cpu_offload=True,
            cpu_offload_params=shape.offload_parameters)
    else:
        cpu, _ = estimate_zero2_model_states_mem_needs(trainable, per_node, shape.nodes, cpu_offload=True)
    frozen = dit_parameters(cfg)[0] - trainable
    return cpu + (2 * frozen / shape.nodes if shape.offload_parameters else 0.0)


def estimate(shape: TrainingShape) -> MemoryEstimate:
    """Every component per rank, with the notes a reader needs (what was assumed)."""
    rows = dict(model_state_bytes(shape))
    # DeepSpeed allocates its gradient reduce bucket whole at every backward (contiguous_gradients), whatever the
    # model's size: fp32 under ZeRO-1, the gradient dtype under ZeRO-2/3 (stage_1_and_2.py, backward_prologue)
    bucket_bytes = 2 if shape.precision == "bf16" and shape.zero_stage > 1 else 4
    rows["gradients"] += bucket_bytes * shape.reduce_bucket
    rows["activations"], rows["backward buffers"] = activation_bytes(shape)
    rows["optimizer step buffers"] = step_bytes(shape)
    notes = [f"{shape.tokens} tokens per sample ({shape.references} references), "
             f"{shape.tokens / shape.sequence_parallel:.0f} per rank with sequence parallel {shape.sequence_parallel}",
             "peak = model states + the larger of (activations + backward buffers) and the optimizer step buffers"]
    if shape.offload_optimizer or shape.offload_parameters:
        moved = " and ".join(x for x, on in (("optimizer states (fp32 master + Adam)", shape.offload_optimizer),
                                             ("parameters", shape.offload_parameters)) if on)
        notes.append(f"{moved} live in CPU memory: about {host_bytes(shape) / GB:.0f} GB per machine "
                     "(DeepSpeed's estimate)")
    return MemoryEstimate(shape, rows, notes)


def shape_from_params(params: Params, stage: str, world_size: int, config: DiTConfig | None = None,
                      precision: str | None = None) -> TrainingShape:
    """The training shape of a params.yaml stage: its model, the largest bucket, train.frames, model.max_references,
    the parallel layout and LoRA; `precision` (default: the launcher's, `training_precision`) bf16 or fp32."""
    from kaleido.train.plan import stage_preset

    train = params.train
    lora = stage_preset(params, stage).lora
    height, width = max(train.buckets, key=lambda hw: hw[0] * hw[1])
    return TrainingShape(
        config=config or dit_config(params.model.arch), frames=train.frames, height=height, width=width,
        references=params.model.max_references, text_len=params.model.text_len, micro_batch=train.micro_batch,
        world_size=world_size, sequence_parallel=train.sequence_parallel, zero_stage=train.zero_stage,
        precision=precision or training_precision(params), checkpointing=train.activation_checkpointing,
        lora_rank=lora.rank if lora.enabled else 0, lora_targets=tuple(lora.target_modules) if lora.enabled else (),
        offload_optimizer=train.offload_optimizer, offload_parameters=train.offload_parameters,
        reduce_bucket=train.reduce_bucket_size,
        nodes=train.kubernetes.nodes if train.launcher == "kubernetes" else 1,
    )


def training_precision(params: Params) -> str:
    """bf16 where training runs on GPUs (Kubernetes, or a local machine with CUDA), else fp32 (the CPU path)."""
    if params.train.launcher == "kubernetes":
        return "bf16"
    import torch

    return "bf16" if torch.cuda.is_available() else "fp32"


def table(estimate_: MemoryEstimate, budget_gb: float | None = None) -> str:
    """The per-rank table `kaleido train --plan` prints (GB = 1e9 bytes)."""
    s = estimate_.shape
    kind = f"LoRA rank {s.lora_rank}" if s.lora_rank else "full fine-tuning"
    lines = [f"memory per rank ({s.precision}, {kind}, ZeRO-{s.zero_stage}, "
             f"{'optimizer offload, ' if s.offload_optimizer else ''}"
             f"{'parameter offload, ' if s.offload_parameters else ''}"
             f"{'activation checkpointing' if s.checkpointing else 'no activation checkpointing'}, "
             f"micro batch {s.micro_batch}, {s.frames} frames at {s.height}x{s.width}):"]
    for name in ROWS:
        lines.append(f"  {name:<22} {estimate_.rows[name] / GB:10.3f} GB")
    lines.append(f"  {'total (peak)':<22} {estimate_.total_gb:10.3f} GB"
                 + (f"  (budget train.gpu_memory_gb = {budget_gb:g} GB)" if budget_gb else ""))
    lines += [f"  note: {note}" for note in estimate_.notes]
    return "\n".join(lines)


def fixes(shape: TrainingShape, budget_gb: float) -> list[str]:
    """The single changes (params.yaml keys) that bring the estimate under `budget_gb`, cheapest first."""
    from dataclasses import replace

    candidates = []
    if not shape.checkpointing:
        candidates.append(("train.activation_checkpointing: true", replace(shape, checkpointing=True)))
    if shape.zero_stage < 3:
        candidates.append(("train.zero_stage: 3", replace(shape, zero_stage=3)))
    for sp in (2, 4, 8):
        if sp > shape.sequence_parallel and shape.config.num_heads % sp == 0 and shape.world_size % sp == 0:
            candidates.append((f"train.sequence_parallel: {sp}", replace(shape, sequence_parallel=sp)))
    if not shape.offload_optimizer:
        candidates.append(("train.offload_optimizer: true", replace(shape, offload_optimizer=True)))
    if not shape.lora_rank:
        candidates.append(("train.<stage>.lora.enabled: true (rank 16)",
                           replace(shape, lora_rank=16, lora_targets=LORA_ATTENTION_TARGETS)))
    if shape.reduce_bucket > 50_000_000:
        candidates.append(("train.reduce_bucket_size: 50000000", replace(shape, reduce_bucket=50_000_000)))
    if shape.micro_batch > 1:
        candidates.append(("train.micro_batch: 1", replace(shape, micro_batch=1)))
    found = [(key, estimate(option).total_gb) for key, option in candidates]
    return [f"{key} -> {gb:.1f} GB" for key, gb in found if gb <= budget_gb]


def memory_problem(params: Params, stage: str, world_size: int, config: DiTConfig | None = None,
                   precision: str | None = None) -> tuple[str | None, MemoryEstimate | None]:
    """(why the plan does not fit train.gpu_memory_gb, with the options that would, or with offload the machines'
    memory; None when it fits) and the estimate behind it (None on the CPU path, which has no GPU budget).
    `precision`: the target's (default: the launcher's)."""
    budget = params.train.gpu_memory_gb
    shape = shape_from_params(params, stage, world_size, config, precision)
    if shape.precision != "bf16":
        return None, None  # the CPU path: no GPU budget, nothing offloaded anywhere else
    host = host_problem(params, shape)
    found = estimate(shape)
    if budget is None or found.total_gb <= budget:
        return host, found
    options = fixes(shape, budget)
    combine = "activation checkpointing, " if not shape.checkpointing else ""
    return (f"the plan needs about {found.total_gb:.1f} GB per GPU, train.gpu_memory_gb is {budget:g}; "
            + (f"options that fit: {'; '.join(options)}" if options else
               f"no single option fits: combine {combine}ZeRO-3, sequence parallelism, LoRA and optimizer offload, "
               "or use more GPUs")
            + " (`kaleido train --plan` prints the table)" + (f"; also {host}" if host else "")), found


def host_problem(params: Params, shape: TrainingShape) -> str | None:
    """Offloaded states that do not fit the machine: train.kubernetes.memory per pod on the cluster, the RAM of
    this machine for the local launcher."""
    need = host_bytes(shape)
    if not need:
        return None
    if params.train.launcher == "kubernetes":
        from kubernetes.utils.quantity import parse_quantity

        have, key = float(parse_quantity(params.train.kubernetes.memory)), "train.kubernetes.memory"
    else:
        import os

        have, key = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "this machine's RAM"
    if need <= have:
        return None
    return (f"offloading needs about {need / GB:.0f} GB of CPU memory per machine (DeepSpeed's estimate), "
            f"{key} gives {have / GB:.0f} GB: raise it, offload less (train.offload_parameters / "
            "train.offload_optimizer), or spread the job over more nodes")
