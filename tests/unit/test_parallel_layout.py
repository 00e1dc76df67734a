"""The one layout checker (parallel/layout.py): each rule names the keys and a valid alternative,
legal layouts pass, and parallel.pp_virtual_stages is honoured."""

import pytest

from scaletrain.config.schema import ParallelConfig
from scaletrain.errors import LayoutError
from scaletrain.config.flavors import model_config_for
from scaletrain.parallel.dims import ParallelDims
from scaletrain.parallel.layout import check_layout, microbatch_count, virtual_stages


def _check(n_layers=4, batch=8, seq=64, tie=False, precision="bf16", gpus_per_node=None, tp=1, cp=1, pp=2, **kw):
    model = model_config_for("debug", n_layers=n_layers, tie_embeddings=tie)
    parallel = ParallelConfig(**{"pp": pp, "tp": tp, "cp": cp, "dp_shard": 1, **kw})
    check_layout(ParallelDims(1, 1, tp, pp, cp), parallel, model, seq, batch, precision, gpus_per_node)


@pytest.mark.parametrize("kw, needles", [
    (dict(pp=3), ["model.n_layers=4", "parallel.pp=3", "[2, 4]"]),
    (dict(pp_schedule="interleaved_1f1b", n_layers=2), ["model.n_layers=2", "parallel.pp=2", "virtual"]),
    (dict(pp_schedule="interleaved_1f1b", pp_virtual_stages=3, n_layers=8),
     ["parallel.pp_virtual_stages", "model.n_layers=8", "6 stages", "[2, 4]"]),
    (dict(pp_virtual_stages=2), ["parallel.pp_virtual_stages=2", "interleaved_1f1b"]),
    (dict(pp_schedule="interleaved_1f1b", pp_virtual_stages=1), ["pp_virtual_stages=1", "plain 1F1B"]),
    (dict(pp_microbatches=3), ["parallel.pp_microbatches=3", "data.batch_size=8"]),
    (dict(pp=4, batch=6), ["parallel.pp_microbatches=4 (0 = pp)", "data.batch_size=6"]),
    (dict(pp_microbatches=1), ["parallel.pp_microbatches >= parallel.pp", "gpipe"]),
    (dict(pp=4, pp_microbatches=9, pp_schedule="interleaved_1f1b", n_layers=8, batch=18),
     ["parallel.pp_microbatches", "multiple of", "parallel.pp=4"]),
    (dict(pp_schedule="zero_bubble"), ["parallel.pp_schedule='zero_bubble'", "interleaved_1f1b"]),
    (dict(tie=True), ["model.tie_embeddings=true", "parallel.pp=2"]),
    (dict(pp=1, tp=3), ["model.n_heads = 4 is not divisible by parallel.tp = 3", "Use tp in {1, 2}"]),
    (dict(pp=1, tp=2, tie=True), ["model.tie_embeddings = true cannot be used with parallel.tp = 2"]),
    (dict(pp=1, tp=2, seq=63), ["data.seq_len = 63", "parallel.tp = 2", "use data.seq_len 62"]),
    (dict(pp=1, cp=2, seq=66), ["data.seq_len = 66 is not divisible by 2*parallel.cp = 4", "use data.seq_len 64"]),
    (dict(pp=1, cp=2, tp=2, seq=68), ["data.seq_len = 68", "2*parallel.cp*parallel.tp = 8", "use data.seq_len 64"]),
    (dict(pp=1, tp=2, precision="fp8"), ["train.precision='fp8' with parallel.tp=2", "parallel.tp 1"]),
    (dict(pp=1, tp=2, gpus_per_node=1), ["parallel.tp = 2 spans more than one node", "tp <= 1"]),
], ids=["layers", "layers-virtual", "virtual-3", "virtual-without-interleave", "interleave-v1", "mb-divides-batch",
        "mb-default-pp", "1f1b-mb-lt-pp", "interleaved-rounds", "schedule", "pp-tied", "tp-heads", "tp-tied",
        "tp-seq", "cp-seq", "cp-tp-seq", "fp8-tp", "tp-node"])
def test_illegal_layouts_name_keys_and_a_fix(kw, needles):
    with pytest.raises(LayoutError) as info:
        _check(**kw)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


@pytest.mark.parametrize("kw", [
    dict(), dict(pp_schedule="gpipe", pp_microbatches=1), dict(pp_schedule="interleaved_1f1b", pp_microbatches=4),
    dict(pp_schedule="interleaved_1f1b", pp_virtual_stages=3, n_layers=6), dict(pp=1, pp_microbatches=3),
    dict(pp=1, tp=2, cp=2, seq=64), dict(pp=1, precision="fp8"), dict(pp=1, tp=2, gpus_per_node=8),
])
def test_legal_layouts_pass(kw):
    _check(**kw)


def test_virtual_stages_and_microbatch_count_defaults():
    assert virtual_stages(ParallelConfig(pp_schedule="interleaved_1f1b")) == 2
    assert virtual_stages(ParallelConfig(pp_schedule="interleaved_1f1b", pp_virtual_stages=4)) == 4
    assert virtual_stages(ParallelConfig(pp_schedule="1f1b")) == 1
    assert microbatch_count(ParallelConfig(pp=4)) == 4
    assert microbatch_count(ParallelConfig(pp=4, pp_microbatches=8)) == 8
    assert microbatch_count(ParallelConfig(), pp=3) == 3


def test_trainer_refuses_fp8_with_tp_before_any_process_group(capsys, tmp_path, monkeypatch):
    """At the CLI: one line, exit 2, nothing written (the world size comes from WORLD_SIZE; no
    process group is started because the check runs first)."""
    from conftest import main_exit

    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    run = tmp_path / "run"
    code, err = main_exit(capsys, "train", "--run-dir", str(run), "--parallel.tp", "2", "--parallel.dp_shard", "1",
                          "--train.precision", "fp8", "--train.device", "cpu")
    assert code == 2 and "train.precision='fp8' with parallel.tp=2" in err and len(err.strip().splitlines()) == 1
    assert not run.exists()
