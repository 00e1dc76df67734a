"""Layout enumeration rules and ranking (plan/search.py)."""

import pytest

from scaletrain.errors import ConfigError
from scaletrain.model.flavors import model_config_for
from scaletrain.plan.cost import Workload
from scaletrain.plan.hardware import get_hardware
from scaletrain.plan.search import enumerate_layouts, search


def _w(flavor="llama3_8b", seq=8192, tokens=2**21):
    return Workload(model_config_for(flavor), seq, tokens // seq)


def test_every_enumerated_layout_is_valid():
    w, hw, gpus = _w(), get_hardware("h100_sxm"), 64
    layouts = enumerate_layouts(w, gpus, hw)
    assert len(layouts) > 100
    m = w.model
    for lay in layouts:
        assert lay.world_size == gpus
        assert m.n_heads % lay.tp == 0 and m.n_kv_heads % lay.tp == 0 and lay.tp <= hw.gpus_per_node
        assert m.n_layers % (lay.pp * lay.virtual_stages) == 0
        assert lay.cp == 1 or w.seq_len % (2 * lay.cp) == 0
        assert w.global_batch % (lay.dp * lay.micro_batch) == 0
        n_micro = w.global_batch // (lay.dp * lay.micro_batch)
        assert lay.pp == 1 or n_micro >= lay.pp
        assert lay.virtual_stages == 1 or (lay.pp_schedule == "interleaved_1f1b" and n_micro % lay.pp == 0)
    assert {lay.ac for lay in layouts} == {"none", "selective", "full"}
    assert {lay.pp_schedule for lay in layouts if lay.pp > 1} == {"gpipe", "1f1b", "interleaved_1f1b"}


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
    speeds = [e.tokens_per_s_per_gpu for e in res.ranked]
    assert speeds == sorted(speeds, reverse=True)


def test_nothing_fits_gives_empty_ranking():
    res = search(_w("llama3_70b", tokens=2**16), 8, get_hardware("h100_sxm"))
    assert res.ranked == [] and res.not_fitting


def test_no_valid_layout_is_a_config_error():
    with pytest.raises(ConfigError, match="no valid layout"):
        search(Workload(model_config_for("debug"), 254, 3), 64, get_hardware("h100_sxm"))


def test_unknown_gpu_suggests_a_name():
    with pytest.raises(ConfigError, match="h100_sxm"):
        get_hardware("h100_sxn")
