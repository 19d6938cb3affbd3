"""Parallel training on gloo (2 and 4 processes) against its oracle: single-process training on the same
global batch. Each process runs the oracle itself (no communication), then the parallel run, and compares
its own shard: the losses of every step and every parameter it holds after the last step."""

from __future__ import annotations

import os

import pytest
import torch

from nanoseek.config import get_preset
from nanoseek.model import DeepSeekV3
from nanoseek.parallel.expert import is_expert_param
from nanoseek.parallel.mesh import Layout, LayoutError, init_parallel
from nanoseek.train.loop import TrainConfig, Trainer
from nanoseek.train.pretrain import LanguageModelStage, PretrainConfig

from gloo import spawn

STEPS = 3


def model_config():
    # 4 layers (1 dense) so that pp=2 has 2*pp = 4 stages; MTP on; a strong bias/balance signal.
    return get_preset("tiny").replace(num_hidden_layers=4, bias_update_speed=0.01, aux_loss_alpha=0.01)


class RandomTokens:
    """A deterministic stream of (inputs, targets) with some ignored targets, different per row."""

    def __init__(self, vocab: int, seq_len: int, seed: int = 0):
        self.vocab, self.seq_len, self.seed, self.calls = vocab, seq_len, seed, 0

    def next_batch(self, batch_size: int):
        gen = torch.Generator().manual_seed(self.seed * 1000 + self.calls)
        self.calls += 1
        tokens = torch.randint(0, self.vocab, (batch_size, self.seq_len + 1), generator=gen)
        targets = tokens[:, 1:].clone()
        targets[torch.rand(targets.shape, generator=gen) < 0.1] = -100
        return tokens[:, :-1], targets

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def lm_stage(model: DeepSeekV3) -> LanguageModelStage:
    return LanguageModelStage(RandomTokens(512, 16), PretrainConfig(seq_len=16, batch_size=8, micro_batch_size=1),
                              model.config)


def train_config(out_dir: str) -> TrainConfig:
    return TrainConfig(out_dir=out_dir, max_steps=STEPS, lr=1e-2,
                       warmup_steps=1, device="cpu", tensorboard=False, save_every=0, eval_every=0)


def fresh_model() -> DeepSeekV3:
    torch.manual_seed(0)
    return DeepSeekV3(model_config())


def oracle(tmp: str):
    """Single-process training: the losses of each step and the final weights."""
    model = fresh_model()
    trainer = Trainer(model, lm_stage(model), train_config(tmp))
    records = [trainer.train_step() for _ in range(STEPS)]
    return records, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def compare(model, records, ref_records, ref_state, ctx) -> float:
    """Largest difference: each step's loss and gradient norm (relative: AdamW's update is blind to a
    gradient's scale), and this rank's weights after the last step (expert shards against their slice)."""
    worst = 0.0
    for got, ref in zip(records, ref_records, strict=True):
        worst = max(worst, abs(got["loss"] - ref["loss"]), abs(got["grad_norm"] / ref["grad_norm"] - 1))
    for name, value in model.state_dict().items():
        ref = ref_state[name]
        if is_expert_param(name) and value.shape != ref.shape:
            n = value.shape[0]
            ref = ref[ctx.ep_rank * n:(ctx.ep_rank + 1) * n]
        worst = max(worst, float((value - ref).abs().max()))
    return worst


def run_layout(layout: Layout, tmp: str, ref) -> float:
    from nanoseek.parallel.trainer import ParallelTrainer

    ctx = init_parallel(layout, model_config(), device="cpu")
    model = fresh_model()
    trainer = ParallelTrainer(model, lm_stage(model), train_config(tmp), ctx, seq_len=16, micro_batch_size=1)
    records = [trainer.train_step() for _ in range(STEPS)]
    return compare(trainer.model, records, *ref, ctx)


SAVE_LAYOUT, RESUME_LAYOUT = Layout(pp=2, ep=2), Layout(ep=2)  # 4 ranks write, 2 ranks (other EP size) read


def save_then_resume(world: int, run_dir: str, ref) -> float:
    """4 ranks: 2 steps, then a distributed checkpoint. 2 ranks: resume it, 1 more step, compare to the oracle."""
    from nanoseek.parallel.trainer import ParallelTrainer

    layout = SAVE_LAYOUT if world == 4 else RESUME_LAYOUT
    ctx = init_parallel(layout, model_config(), device="cpu")
    model = fresh_model()
    trainer = ParallelTrainer(model, lm_stage(model), train_config(run_dir), ctx, seq_len=16, micro_batch_size=1)
    if world == 4:
        for _ in range(STEPS - 1):
            trainer.train_step()
        trainer.save()
        return 0.0
    assert trainer.resume() and trainer.step == STEPS - 1
    last = trainer.train_step()
    ref_records, ref_state = ref
    return compare(trainer.model, [last], ref_records[-1:], ref_state, ctx)


def worker(rank: int, world: int, layouts: list[Layout], tmp: str, run_dir: str, report) -> None:
    ref = oracle(os.path.join(tmp, f"oracle{rank}"))
    for layout in layouts:
        report(str(layout), run_layout(layout, os.path.join(tmp, str(rank)), ref))
    report("checkpoint", save_then_resume(world, run_dir, ref))


LAYOUTS = {
    2: [Layout(dp=2), Layout(ep=2), Layout(pp=2)],
    4: [Layout(dp=4), Layout(ep=4), Layout(dp=2, ep=2), Layout(pp=2, ep=2), Layout(pp=2, dp=2)],
}


@pytest.fixture(scope="module", params=[4, 2])  # 4 first: its checkpoint is what the 2 ranks resume
def world_results(request, tmp_path_factory):
    world = request.param
    run_dir = tmp_path_factory.getbasetemp() / "dcp_run"
    tmp = tmp_path_factory.mktemp(f"world{world}")
    return world, spawn(worker, world, (LAYOUTS[world], str(tmp), str(run_dir)), len(LAYOUTS[world]) + 1)


def test_parallel_training_equals_single_process(world_results):
    world, results = world_results
    assert set(results) == {str(layout) for layout in LAYOUTS[world]} | {"checkpoint"}
    results = dict(results)
    resumed = results.pop("checkpoint")
    if world == 2:
        print(f"written on 4 ranks ({SAVE_LAYOUT}), resumed on 2 ({RESUME_LAYOUT}): max |difference| = {resumed:.2e}")
        assert resumed < 1e-3
    for name, diff in results.items():
        print(f"{world} ranks, {name}: max |difference| from single-process = {diff:.2e}")
        assert diff < 1e-3, name  # float32 noise through 3 AdamW steps at lr 1e-2; a wrong gradient moves weights ~lr


def test_bad_layouts_are_named():
    config = model_config()
    with pytest.raises(LayoutError, match="needs pp\\*dp\\*ep = 4 ranks"):
        Layout(dp=2, ep=2).check(config, world_size=2)
    with pytest.raises(LayoutError, match="experts do not split"):
        Layout(ep=3).check(config)
    with pytest.raises(LayoutError, match="do not split into 2 \\* pp = 6"):
        Layout(pp=3).check(config)


def test_node_limited_routing_reaches_at_most_topk_group_nodes():
    """With experts placed contiguously (as shard_experts does), a group is a node of ep/n_group ranks and a
    token's experts sit on at most topk_group nodes."""
    from nanoseek.model.moe import Router

    config = get_preset("tiny").replace(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    router = Router(config)
    torch.nn.init.normal_(router.weight)
    route = router(torch.randn(256, config.hidden_size))
    ep, nodes = 8, 4  # 2 experts per rank, 2 ranks per node
    node_of_expert = torch.arange(16) // (16 // ep) // (ep // nodes)
    reached = [len(set(node_of_expert[row].tolist())) for row in route.indices]
    assert max(reached) <= config.topk_group and max(reached) == 2


@pytest.mark.parametrize("document_mask", [False, True])
def test_pipeline_chunks_chained_equal_compute_loss(document_mask):
    """The 2 * pp chunks run in one process, one after another, give compute_loss's gradients and stats: the chunks
    are the model's own pieces (rope, run_layers, head_loss), the balance loss's weighting and the document mask
    included. In float64, but the router scores in float32: where the share multiplies moves the gradients through
    it by ~1e-7."""
    from nanoseek.parallel.pipeline import Chunk, StepWeights, chunk_layers
    from nanoseek.train.pretrain import TokenBatch

    model = fresh_model().double()
    inputs, targets = RandomTokens(512, 16).next_batch(4)
    inputs[:, [0, 5, 11]] = model.config.bos_token_id  # three packed documents per row
    n_tokens = int((targets != -100).sum())
    micro = [TokenBatch(inputs[i:i + 1], targets[i:i + 1], int((targets[i:i + 1] != -100).sum()) / n_tokens,
                        document_mask) for i in range(4)]
    weights = StepWeights(mtp=0.3, balance=0.01)
    chunks = [Chunk(model, layers, first=c == 0, last=c == 3, weights=weights)
              for c, layers in enumerate(chunk_layers(4, pp=2))]
    for chunk in chunks:
        chunk.begin_step(micro)
    for mb in micro:
        x = mb.input_ids
        for chunk in chunks:
            x = chunk(x)
        x.backward()
    piped = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    totals, counts = torch.zeros(3, dtype=torch.float64), 0
    for mb in micro:
        out = model.compute_loss(mb.input_ids, mb.targets, mtp_weight=0.3, balance_alpha=0.01,
                                 document_mask=document_mask)
        (out.loss * mb.share).backward()
        totals += torch.stack([t.detach().double() for t in (out.lm_loss, out.mtp_loss, out.balance_loss)]) * mb.share
        counts = counts + out.expert_counts
    for name, p in model.named_parameters():
        assert (piped[name] - p.grad).abs().max() <= 1e-6 * p.grad.abs().max(), name
    torch.testing.assert_close(sum(chunk.totals for chunk in chunks), totals, rtol=1e-6, atol=0)  # balance: float32
    by_layer = {i: c for chunk in chunks for i, c in chunk.counts.items()}
    assert sorted(by_layer) == [1, 2, 3, 4]  # 3 MoE layers (layer 0 is dense), then the MTP block as layer 4
    assert torch.equal(torch.stack([by_layer[i] for i in sorted(by_layer)]), counts)
