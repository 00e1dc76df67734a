"""train.compile_mode reaches torch.compile for every block; "default" passes no mode."""

from __future__ import annotations

import pytest
from torch import nn

from scaletrain.config import load_config
from scaletrain.errors import ConfigError
from scaletrain.parallel.compile import apply_compile


class _Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleDict({str(i): nn.Linear(2, 2) for i in range(3)})


@pytest.mark.parametrize("mode, passed", [("default", None), ("reduce-overhead", "reduce-overhead"),
                                          ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs")])
def test_apply_compile_passes_the_mode(monkeypatch, mode, passed):
    seen = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: seen.append(kw))
    apply_compile(_Blocks(), mode)
    assert seen == [{"mode": passed}] * 3


def test_unknown_compile_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="train.compile_mode = 'fast'"):
        load_config(None, ["--train.compile_mode", "fast"])
