"""Planner <-> trainer round trip: for every layout the search emits, the config
`--write-config` writes is accepted by the trainer's pre-launch checks (resolve_dims +
parallel/layout.py) and its memory pre-flight (plan/memcheck.py) predicts exactly the plan's
memory."""

import pytest

from scaletrain.config.load import config_from_dict, config_to_dict, load_config
from scaletrain.config.flavors import model_config_for
from scaletrain.parallel.layout import resolve_dims
from scaletrain.parallel.layout import check_layout
from scaletrain.plan.cost import Workload, estimate
from scaletrain.plan.hardware import get_hardware
from scaletrain.plan.memcheck import memory_for_config, scaletrain_stack, workload_for_config
from scaletrain.plan.report import winner_config, write_winner
from scaletrain.plan.search import enumerate_layouts

GRID = [  # (flavor, GPUs, seq_len, sequences per step, precision, fp8 recipe, compile)
    ("debug", 8, 256, 64, "bf16", "tensorwise", False),
    ("debug", 8, 256, 32, "fp8", "rowwise", True),
    ("llama3_8b", 8, 4096, 32, "bf16", "tensorwise", True),
    ("llama3_8b", 8, 8192, 16, "fp8", "tensorwise", False),
    ("llama3_70b", 16, 8192, 32, "bf16", "tensorwise", False),
    ("moe_debug", 8, 256, 64, "bf16", "tensorwise", False),  # expert parallelism: ep 1, 2, 4, 8
]


@pytest.mark.parametrize("flavor, gpus, seq, batch, precision, recipe, compile", GRID,
                         ids=[f"{g[0]}-{g[1]}gpu-{g[4]}" for g in GRID])
def test_every_emitted_layout_round_trips(flavor, gpus, seq, batch, precision, recipe, compile):
    model = model_config_for(flavor)
    w = Workload(model, seq, batch, precision, recipe)
    hw = get_hardware("h100_sxm")
    stack = scaletrain_stack(compile, precision, recipe)
    layouts = enumerate_layouts(w, gpus, hw)
    assert layouts
    for lay in layouts:
        e = estimate(w, lay, hw, stack)
        cfg = config_from_dict(config_to_dict(winner_config(model, w, e, compile)))  # what the TOML holds
        dims = resolve_dims(cfg.parallel, gpus)
        check_layout(dims, cfg.parallel, cfg.model, cfg.data.seq_len, cfg.data.batch_size, cfg.train.precision)
        w2, lay2 = workload_for_config(cfg, gpus, "cuda")
        assert (lay2, w2.global_batch, w2.precision) == (lay, w.global_batch, w.precision), lay.short()
        assert memory_for_config(cfg, gpus, "cuda").total == pytest.approx(e.memory.total, rel=1e-12), lay.short()
    if model.moe_experts:
        assert {lay.ep for lay in layouts} == {1, 2, 4, 8}


def test_written_file_loads_and_matches(tmp_path):
    model = model_config_for("llama3_8b")
    w = Workload(model, 8192, 32, "bf16")
    hw = get_hardware("h100_sxm")
    stack = scaletrain_stack(False, "bf16", "tensorwise")
    lay = next(x for x in enumerate_layouts(w, 16, hw) if x.pp_schedule == "interleaved_1f1b" and x.virtual_stages > 2)
    e = estimate(w, lay, hw, stack)
    path = tmp_path / "plan.toml"
    write_winner(model, w, e, path, hw, 16)
    cfg = load_config(path)
    assert cfg.parallel.pp_virtual_stages == lay.virtual_stages > 2
    assert memory_for_config(cfg, 16, "cuda").total == pytest.approx(e.memory.total, rel=1e-12)


def test_written_moe_plan_keeps_its_expert_parallelism(tmp_path):
    model = model_config_for("moe_debug")
    w = Workload(model, 256, 64, "bf16")
    hw = get_hardware("h100_sxm")
    lay = next(x for x in enumerate_layouts(w, 8, hw) if x.ep == 4 and x.dp_shard == 8)
    e = estimate(w, lay, hw, scaletrain_stack(False, "bf16", "tensorwise"))
    path = tmp_path / "moe.toml"
    write_winner(model, w, e, path, hw, 8)
    assert "ep = 4" in path.read_text() and "ep4" in path.read_text()  # the [parallel] key and the header's layout
    cfg = load_config(path)
    assert cfg.parallel.ep == 4 and resolve_dims(cfg.parallel, 8).ep == 4
    assert memory_for_config(cfg, 8, "cuda").total == pytest.approx(e.memory.total, rel=1e-12)
