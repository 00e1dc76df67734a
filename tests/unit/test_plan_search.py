"""Layout enumeration and ranking (plan/search.py): every layout the search emits is one the
trainer's checker accepts, and the order is deterministic."""

import pytest

from scaletrain.errors import ConfigError
from scaletrain.config.flavors import model_config_for
from scaletrain.parallel.layout import check_layout
from scaletrain.plan.cost import Workload
from scaletrain.plan.hardware import get_hardware
from scaletrain.plan.search import enumerate_layouts, layout_config, rank_key, search


def _w(flavor="llama3_8b", seq=8192, tokens=2**21, precision="bf16"):
    return Workload(model_config_for(flavor), seq, tokens // seq, precision)


def test_every_enumerated_layout_is_accepted_by_the_trainers_checker():
    w, hw, gpus = _w(), get_hardware("h100_sxm"), 64
    layouts = enumerate_layouts(w, gpus, hw)
    assert len(layouts) > 100
    for lay in layouts:
        assert lay.world_size == gpus
        n_micro = w.global_batch // (lay.dp * lay.micro_batch)
        dims, parallel, batch, grad_accum = layout_config(lay, n_micro)
        check_layout(dims, parallel, w.model, w.seq_len, batch, w.precision, gpus_per_node=hw.gpus_per_node)
        assert batch * grad_accum * lay.dp == w.global_batch
    assert {lay.ac for lay in layouts} == {"none", "selective", "full"}
    assert {lay.pp_schedule for lay in layouts if lay.pp > 1} == {"gpipe", "1f1b", "interleaved_1f1b"}
    # interleaved schedules with more than 2 virtual stages are emitted, and the config says so
    deep = [lay for lay in layouts if lay.virtual_stages > 2]
    assert deep and all(layout_config(lay, 4)[1].pp_virtual_stages == lay.virtual_stages for lay in deep)


def test_fp8_layouts_never_use_tensor_parallelism():
    layouts = enumerate_layouts(_w(precision="fp8"), 16, get_hardware("h100_sxm"))
    assert layouts and {lay.tp for lay in layouts} == {1}


def test_tp_limited_by_node_and_heads():
    w = _w()
    hw = get_hardware("h100_sxm", gpus_per_node=4)
    assert max(lay.tp for lay in enumerate_layouts(w, 64, hw)) == 4
    odd = Workload(model_config_for("debug", n_heads=6, n_kv_heads=3, dim=96), 256, 64)
    assert {lay.tp for lay in enumerate_layouts(odd, 8, get_hardware("h100_sxm"))} == {1}


def test_search_never_recommends_a_layout_that_does_not_fit():
    # 70B on 32 H100s: plain FSDP without checkpointing is fastest on paper but cannot fit
    w, hw = _w("llama3_70b", tokens=2**20), get_hardware("h100_sxm")
    res = search(w, 32, hw, top=50)
    assert res.ranked and res.not_fitting
    assert all(e.fits and e.memory.total <= hw.hbm_bytes for e in res.ranked)
    assert res.not_fitting[0].tokens_per_s_per_gpu > res.ranked[0].tokens_per_s_per_gpu
    speeds = [float(f"{e.tokens_per_s_per_gpu:.4g}") for e in res.ranked]
    assert speeds == sorted(speeds, reverse=True)


def test_ranking_is_deterministic_and_ties_go_to_the_simpler_layout():
    w, hw = _w(tokens=2**20), get_hardware("h100_sxm")
    first, again = search(w, 16, hw, top=20), search(w, 16, hw, top=20)
    assert [e.layout for e in first.ranked] == [e.layout for e in again.ranked]
    keys = [rank_key(e) for e in first.ranked]
    assert keys == sorted(keys)
    for a, b in zip(first.ranked, first.ranked[1:]):  # equal speed: the simpler layout first
        if rank_key(a)[0] == rank_key(b)[0]:
            assert rank_key(a)[1:6] <= rank_key(b)[1:6]


def test_nothing_fits_gives_empty_ranking():
    res = search(_w("llama3_70b", tokens=2**16), 8, get_hardware("h100_sxm"))
    assert res.ranked == [] and res.not_fitting


def test_no_valid_layout_is_a_config_error():
    with pytest.raises(ConfigError, match="no valid layout"):
        search(Workload(model_config_for("debug"), 254, 3), 64, get_hardware("h100_sxm"))


def test_unknown_gpu_suggests_a_name():
    with pytest.raises(ConfigError, match="h100_sxm"):
        get_hardware("h100_sxn")
