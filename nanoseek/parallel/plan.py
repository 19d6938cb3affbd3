"""The cluster planner: per-GPU memory, pipeline bubbles, all-to-all traffic and GPU-hours, on paper.

All sizes come from the model's own module tree (nanoseek.model.params, on the meta device); the rest
are stated assumptions, printed with the plan. Defaults are DeepSeek-V3's published setup: H800 nodes of
8 GPUs (NVLink 160 GB/s, InfiniBand 50 GB/s per GPU), BF16 weights, FP32 gradients and master weights,
BF16 AdamW moments, sequence length 4096, 15360 sequences per step, PP16 (DualPipe) x EP64; the backward
recomputes the least that makes the plan fit in memory (`recompute="auto"`) unless told what.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from nanoseek.config import ModelConfig
from nanoseek.model.moe import RoutedExperts
from nanoseek.model.params import count_parameters, flops_per_token
from nanoseek.model.transformer import DeepSeekV3
from nanoseek.parallel.mesh import LayoutError

SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")
RECOMPUTE = ("none", "selective", "full")  # from the most memory to the least
GB = 1e9


@dataclass
class Cluster:
    gpus_per_node: int = 8  # GPUs joined by NVLink in one node
    nodes: int = 256  # nodes joined by InfiniBand
    memory_gb: float = 80.0  # memory per GPU, GB
    intra_node_gbs: float = 160.0  # NVLink bandwidth, GB/s per GPU (the V3 paper's figure for H800)
    inter_node_gbs: float = 50.0  # InfiniBand bandwidth, GB/s per GPU (400 Gb/s NIC)
    peak_tflops: float = 989.0  # dense BF16 per GPU (H800/H100 SXM); MFU is measured against it

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass
class PlanLayout:
    pp: int = 16  # pipeline ranks (DeepSeek-V3: 16)
    ep: int = 64  # expert-parallel ranks (DeepSeek-V3: 64, over 8 nodes); data parallelism takes the rest
    schedule: Literal["1f1b", "zb1p", "dualpipe", "dualpipev"] = "dualpipe"  # how the pp ranks run
                                                                              # (dualpipe keeps 2 weight copies)


@dataclass
class Workload:
    seq_len: int = 4096  # tokens per sequence
    global_batch: int = 15360  # sequences per optimizer step
    micro_batch: int = 1  # sequences per pipeline micro-batch
    mfu: float = 0.45  # model FLOPs utilisation against peak_tflops (stated, not derived)
    weight_bytes: float = 2.0  # bytes per weight: BF16 (FP8 GEMMs quantise on the fly)
    grad_bytes: float = 4.0  # bytes per gradient: FP32 accumulation, not sharded under ZeRO-1
    optimizer_bytes: float = 8.0  # bytes per parameter of optimizer state: FP32 master weights + BF16 first and
                                  # second moments, sharded under ZeRO-1
    recompute: Literal["auto", "none", "selective", "full"] = "auto"  # what the backward recomputes: selective is
                                                                      # V3's (RMSNorm, MLA up-projections), full
                                                                      # each block; auto: the least that fits


@dataclass
class Plan:
    rows: list[tuple[str, str]]
    recompute: str  # what the backward recomputes ("auto" resolved)
    memory_gb: dict[str, float]
    bubbles: dict[str, float]
    gpu_hours_per_trillion: float
    a2a_bytes_per_step: float


def _sizes(config: ModelConfig) -> tuple[list[tuple[int, int]], int, int, int]:
    """-> per layer (dense params, routed-expert params); embedding; norm + head; MTP (dense, routed)."""
    with torch.device("meta"):
        model = DeepSeekV3(config)

    def split(module) -> tuple[int, int]:
        routed = sum(p.numel() for m in module.modules() if isinstance(m, RoutedExperts) for p in m.parameters())
        return sum(p.numel() for p in module.parameters()) - routed, routed

    layers = [split(layer) for layer in model.layers]
    head = model.lm_head.weight.numel() + model.norm.weight.numel()
    mtp = split(model.mtp)
    return layers, model.embed_tokens.weight.numel(), head, mtp


def activation_bytes_per_token_layer(config: ModelConfig, moe: bool, recompute: str) -> float:
    """What the backward keeps per token and layer, in bytes (BF16 2, FP8 1), with FlashAttention.

    selective (DeepSeek-V3): the layer input (RMSNorm recomputed from it), the query latent, the KV latent
    and RoPE key (the up-projections are recomputed), the attention output; for MoE the top-k dispatched
    copies and each chosen expert's SwiGLU inputs in FP8 (its output is recomputed), the expert outputs in
    BF16 (the router's weights need them), the shared experts' input and SwiGLU inputs in FP8.
    none: also q, k, v and the norm outputs. full: only the block input (the block is recomputed).
    """
    c = config
    h = c.hidden_size
    if recompute == "full":
        return float(2 * h)
    attn = 2 * (h + (c.q_lora_rank or 0) + c.kv_lora_rank + c.qk_rope_head_dim + c.num_attention_heads * c.v_head_dim)
    if recompute == "none":
        attn += 2 * (c.num_attention_heads * (2 * c.qk_head_dim + c.v_head_dim) + 2 * h)
    if moe:
        k, f, shared = c.num_experts_per_tok, c.moe_intermediate_size, c.n_shared_experts * c.moe_intermediate_size
        ffn = 2 * h + k * h + k * 2 * f + 2 * k * h + h + 2 * shared
    else:
        ffn = 2 * h + h + 2 * c.intermediate_size
    return float(attn + ffn)


def _chunks(n_layers: int, n: int) -> list[list[int]]:
    """Layers split into n contiguous chunks as evenly as possible (the middle chunks take the extra ones:
    the first holds the embedding, the last the head and MTP)."""
    base, extra = divmod(n_layers, n)
    sizes = [base] * n
    middle = list(range(1, n - 1)) or list(range(n))
    for i in range(extra):
        sizes[middle[i % len(middle)]] += 1
    out, start = [], 0
    for s in sizes:
        out.append(list(range(start, start + s)))
        start += s
    return out


def bubble_fraction(schedule: str, pp: int, micro_batches: int) -> float:
    """Idle time / compute time per rank, from the DualPipe README's formulas with B = 2F, W = F and
    F&B = F + B (overlap hides communication, not compute). F is the forward of L/pp layers for 1F1B, ZB1P
    and DualPipe; DualPipeV on pp ranks is DualPipe on 2*pp chunks of L/(2pp) layers, cut in half."""
    if pp == 1:
        return 0.0
    f = 1.0
    b, w, fb = 2 * f, f, 3 * f
    work = micro_batches * (f + b)  # every rank runs every micro-batch through L/pp layers
    if schedule == "1f1b":
        bubble = (pp - 1) * (f + b)
    elif schedule == "zb1p":
        bubble = (pp - 1) * (f + b - 2 * w)
    elif schedule == "dualpipe":
        bubble = (pp / 2 - 1) * (fb + b - 3 * w)
    elif schedule == "dualpipev":
        half = 0.5  # chunk of L/(2pp) layers: its F, B, W are half
        bubble = (2 * pp / 2 - 1) * half * (fb + b - 3 * w)
    else:
        raise LayoutError(f"schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    return bubble / work


def plan(config: ModelConfig, cluster: Cluster, layout: PlanLayout, work: Workload) -> Plan:
    world = cluster.gpus
    if world % (layout.pp * layout.ep):
        raise LayoutError(f"{world} GPUs do not split into pp={layout.pp} x ep={layout.ep}")
    if layout.ep > 1 and config.n_routed_experts % layout.ep:
        raise LayoutError(f"{config.n_routed_experts} routed experts do not split over ep={layout.ep}")
    if layout.schedule not in SCHEDULES:
        raise LayoutError(f"schedule {layout.schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if work.recompute not in ("auto", *RECOMPUTE):
        raise LayoutError(f"recompute {work.recompute!r}: choose one of auto, {', '.join(RECOMPUTE)}")
    dp = world // (layout.pp * layout.ep)
    data_ranks = dp * layout.ep
    if work.global_batch % (data_ranks * work.micro_batch):
        raise LayoutError(f"{work.global_batch} sequences do not split into {data_ranks} data-parallel ranks x "
                          f"micro-batches of {work.micro_batch}")
    micro_batches = work.global_batch // (data_ranks * work.micro_batch)
    layers, embed, head, (mtp_dense, mtp_routed) = _sizes(config)

    # ---- which chunks each pipeline rank holds; the busiest rank sets the memory
    v_layout = layout.schedule == "dualpipev"
    n_chunks = 2 * layout.pp if v_layout else layout.pp
    chunks = _chunks(len(layers), n_chunks)
    per_rank = []
    for r in range(layout.pp):
        held = [r, n_chunks - 1 - r] if v_layout else [r]
        if layout.schedule == "dualpipe" and layout.pp > 1:
            held = [r, layout.pp - 1 - r]  # both directions: two copies of the weights across the pipeline
        dense = routed = 0
        ids = []
        for c in held:
            ids += chunks[c]
            dense += sum(layers[i][0] for i in chunks[c]) + (embed if c == 0 else 0)
            if c == n_chunks - 1:
                dense, routed = dense + head + mtp_dense, routed + mtp_routed
            routed += sum(layers[i][1] for i in chunks[c])
        per_rank.append((dense, routed / layout.ep, ids, n_chunks - 1 in held))
    dense, routed, ids, holds_last = max(per_rank, key=lambda x: x[0] + x[1])
    params = dense + routed
    weights = params * work.weight_bytes
    grads = params * work.grad_bytes
    optimizer = (dense / data_ranks + routed / dp) * work.optimizer_bytes  # ZeRO-1 over each replica group

    # ---- activations: in-flight micro-batches x layers of a chunk x tokens x bytes/token/layer
    chunk_layers = max(len(c) for c in chunks)
    inflight = {"1f1b": layout.pp, "zb1p": layout.pp, "dualpipe": layout.pp + 1,
                "dualpipev": 2 * layout.pp + 1}[layout.schedule]
    if layout.pp == 1:
        chunk_layers, inflight = len(layers), 1
    micro_tokens = work.micro_batch * work.seq_len

    def activation_bytes(recompute: str) -> float:
        stored = inflight * chunk_layers * micro_tokens * activation_bytes_per_token_layer(
            config, config.n_routed_experts > 0, recompute)
        if recompute == "full":  # plus the one block being recomputed
            stored += micro_tokens * activation_bytes_per_token_layer(config, True, "selective")
        return stored

    recompute = work.recompute
    if recompute == "auto":  # the least recomputation that fits (full when none does)
        recompute = next((r for r in RECOMPUTE if (weights + grads + optimizer + activation_bytes(r)) / GB
                          <= cluster.memory_gb), RECOMPUTE[-1])
    per_token_layer = activation_bytes_per_token_layer(config, config.n_routed_experts > 0, recompute)
    activations = activation_bytes(recompute)
    memory = {"weights": weights / GB, "gradients": grads / GB, "optimizer": optimizer / GB,
              "activations": activations / GB}
    memory["total"] = sum(memory.values())

    # ---- compute
    counts = count_parameters(config)
    fpt = flops_per_token(config, work.seq_len)
    if config.num_nextn_predict_layers:
        # The MTP module: its activated weights and the shared head, plus one layer of attention.
        mtp_active = mtp_dense + mtp_routed * config.num_experts_per_tok / max(1, config.n_routed_experts)
        fpt += config.num_nextn_predict_layers * (6 * (mtp_active + head) + 6 * work.seq_len * config.num_attention_heads
                                                   * (config.qk_head_dim + config.v_head_dim))
    flops_per_s = cluster.peak_tflops * 1e12 * work.mfu
    gpu_hours = 1e12 * fpt / flops_per_s / 3600
    tokens_per_step = work.global_batch * work.seq_len
    step_s = tokens_per_step * fpt / (world * flops_per_s)

    # ---- expert all-to-all, per GPU per step: forward dispatch (FP8) + combine (BF16), backward both in BF16.
    # Each token visits the MoE layers of the chunks this rank runs (DualPipe: half the micro-batches per copy).
    moe_layers = sum(1 for i in ids if layers[i][1]) + (mtp_routed > 0 and holds_last)
    if layout.schedule == "dualpipe" and layout.pp > 1:
        moe_layers /= 2
    tokens_per_gpu = tokens_per_step / data_ranks
    per_copy = config.hidden_size * (1 + 2 + 2 + 2)
    nodes = math.ceil(layout.ep / cluster.gpus_per_node)
    if layout.ep > 1 and config.n_routed_experts:
        # Node-limited routing: a token reaches <= topk_group groups = nodes; it crosses IB once per remote node,
        # then NVLink fans it out to its experts' GPUs there (DeepSeek-V3's dispatch).
        reach = min(config.topk_group if config.n_group > 1 else config.num_experts_per_tok, nodes)
        remote = reach * (1 - 1 / nodes)
        ib_bytes = tokens_per_gpu * moe_layers * remote * per_copy
        nvlink_bytes = tokens_per_gpu * moe_layers * config.num_experts_per_tok * per_copy
    else:
        ib_bytes = nvlink_bytes = 0.0
    ib_s = ib_bytes / (cluster.inter_node_gbs * GB)
    nvlink_s = nvlink_bytes / (cluster.intra_node_gbs * GB)
    grad_bytes = 2 * params * work.grad_bytes  # reduce-scatter + all-gather (the all-reduce of ZeRO-1)

    bubbles = {s: bubble_fraction(s, layout.pp, micro_batches) for s in SCHEDULES}
    days = gpu_hours / world / 24
    rows = [
        ("model", f"{counts.total / 1e9:.1f}B total, {counts.activated / 1e9:.1f}B activated, "
                  f"MTP {counts.mtp / 1e9:.1f}B, {len(layers)} layers"),
        ("cluster", f"{cluster.nodes} nodes x {cluster.gpus_per_node} GPUs = {world}, {cluster.memory_gb:g} GB each, "
                    f"NVLink {cluster.intra_node_gbs:g} GB/s, IB {cluster.inter_node_gbs:g} GB/s, "
                    f"{cluster.peak_tflops:g} TFLOP/s peak"),
        ("layout", f"PP{layout.pp} ({layout.schedule}) x EP{layout.ep} x DP{dp} (ZeRO-1 over {data_ranks} ranks "
                   f"for dense weights, {dp} for experts), no TP"),
        ("step", f"{work.global_batch} x {work.seq_len} tokens = {tokens_per_step / 1e6:.1f}M; "
                 f"{micro_batches} micro-batches of {work.micro_batch} per pipeline"),
        ("busiest GPU holds", f"{len(ids)} layers, {dense / 1e9:.2f}B dense + {routed / 1e9:.2f}B expert params"),
        ("memory / GPU", f"weights {memory['weights']:.1f} GB ({work.weight_bytes:g} B/param), gradients "
                         f"{memory['gradients']:.1f} GB ({work.grad_bytes:g} B/param), optimizer "
                         f"{memory['optimizer']:.1f} GB ({work.optimizer_bytes:g} B/param / shard), activations "
                         f"{memory['activations']:.1f} GB"),
        ("", f"= {memory['total']:.1f} GB of {cluster.memory_gb:g} GB "
             f"({'fits' if memory['total'] <= cluster.memory_gb else 'DOES NOT FIT'})"),
        ("activations", f"{per_token_layer / 1e3:.0f} KB/token/layer ({recompute} recompute"
                        f"{', chosen by auto: the least that fits' if work.recompute == 'auto' else ''}) x "
                        f"{micro_tokens} tokens x {chunk_layers} layers/chunk x {inflight} in flight"),
        ("pipeline bubble", ", ".join(f"{s} {100 * f:.1f}%" for s, f in bubbles.items())
         + f"  (B=2F, W=F, F&B=F+B; {micro_batches} micro-batches)"),
        ("all-to-all / GPU / step", f"{(ib_bytes + nvlink_bytes) / GB:.1f} GB ({ib_bytes / GB:.1f} GB over IB in "
                                    f"{ib_s:.2f} s, {nvlink_bytes / GB:.1f} GB over NVLink in {nvlink_s:.2f} s); "
                                    f"compute {step_s:.1f} s per step"),
        ("gradient all-reduce", f"{grad_bytes / GB:.1f} GB / GPU / step (overlapped with the last backward)"),
        ("FLOPs / token", f"{fpt / 1e9:.1f} GFLOP (6 N_activated + attention 6 L S H (d_qk + d_v), MTP included)"),
        ("GPU-hours / 1T tokens", f"{gpu_hours / 1e3:.0f}K at MFU {100 * work.mfu:.0f}% "
                                  f"({days:.1f} days per trillion tokens on {world} GPUs)"),
    ]
    return Plan(rows, recompute, memory, bubbles, gpu_hours, ib_bytes + nvlink_bytes)


def format_plan(p: Plan) -> str:
    width = max(len(k) for k, _ in p.rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in p.rows)
