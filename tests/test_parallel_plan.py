"""The cluster planner against DeepSeek-V3's published numbers and the DualPipe README's bubble formulas."""

import pytest

from nanoseek.cli import main
from nanoseek.config import get_preset
from nanoseek.parallel.mesh import LayoutError
from nanoseek.parallel.plan import Cluster, PlanLayout, Workload, bubble_fraction, plan


def test_v3_on_2048_h800_lands_near_the_papers_gpu_hours():
    p = plan(get_preset("v3-671b"), Cluster(), PlanLayout(pp=16, ep=64, schedule="dualpipe"), Workload())
    assert p.gpu_hours_per_trillion == pytest.approx(180e3, rel=0.05)  # paper: 2664K GPU-hours / 14.8T tokens
    assert p.bubbles["1f1b"] > p.bubbles["zb1p"] > p.bubbles["dualpipe"] > 0
    assert p.a2a_bytes_per_step > 0


def test_bubble_formulas():
    # 1F1B: (PP-1)(F+B) idle over M(F+B) of work; ZB1P: (PP-1)(F+B-2W); DualPipe: (PP/2-1)(F&B+B-3W)
    assert bubble_fraction("1f1b", 8, 20) == pytest.approx(7 / 20)
    assert bubble_fraction("zb1p", 8, 20) == pytest.approx(7 * 1 / 60)
    assert bubble_fraction("dualpipe", 8, 20) == pytest.approx(3 * 2 / 60)
    assert bubble_fraction("dualpipev", 4, 20) == pytest.approx(3 * 1 / 60)
    assert bubble_fraction("1f1b", 1, 20) == 0


def test_bad_plans_name_the_problem():
    with pytest.raises(LayoutError, match="do not split into pp=3"):
        plan(get_preset("v3-671b"), Cluster(), PlanLayout(pp=3, ep=64), Workload())
    with pytest.raises(LayoutError, match="experts do not split over ep=48"):
        plan(get_preset("v3-671b"), Cluster(nodes=6), PlanLayout(pp=1, ep=48), Workload(global_batch=48))


def test_cli_plan_prints_the_assumptions(capsys):
    assert main(["plan", "--preset", "v2-lite-16b", "--nodes", "1", "--pp", "1", "--ep", "8",
                 "--schedule", "1f1b", "--global-batch", "4608", "--micro-batch", "4"]) == 0
    out = capsys.readouterr().out
    for needle in ("memory / GPU", "pipeline bubble", "all-to-all", "GPU-hours / 1T tokens", "MFU 45%"):
        assert needle in out
    assert main(["plan", "--pp", "5"]) == 2  # 2048 GPUs do not split into pp=5 x ep=64
