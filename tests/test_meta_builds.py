"""What building a meta model may skip without changing what it holds: the weight
initialisers' draws, and probe layers that only repeat a kind of layer already probed."""

from __future__ import annotations

import copy

import torch
from accelerate import init_empty_weights
from tiny_models import make_config
from torch import nn
from transformers import AutoModelForCausalLM

import qplan.planner.quantize_meta as quantize_meta
from qplan.api import estimate
from qplan.planner.components import num_layers
from qplan.planner.depths import layer_signatures, trace_plan
from qplan.planner.inventory import _values_not_drawn, build_meta_model, take_inventory


def _layout(model: nn.Module) -> list[tuple]:
    return [(name, tuple(t.shape), t.dtype, t.device.type)
            for name, t in (*model.named_parameters(), *model.named_buffers())]


def test_meta_build_without_drawing_holds_what_transformers_builds():
    """The same tensors (names, shapes, dtypes, device) as transformers' own meta build,
    with the initialisers drawing as usual; and torch's initialisers are back after."""
    originals = (nn.init.kaiming_uniform_, nn.init.normal_, nn.modules.linear.init.uniform_)
    for arch in ("llama", "gemma3", "mamba", "deepseek_v3"):
        config = make_config(arch)
        built = build_meta_model(copy.deepcopy(config))
        with init_empty_weights(include_buffers=True):
            drawn = AutoModelForCausalLM.from_config(copy.deepcopy(config),
                                                     dtype=torch.bfloat16)
        drawn.tie_weights()
        assert _layout(built) == _layout(drawn), arch
        assert take_inventory(built) == take_inventory(drawn), arch
    assert (nn.init.kaiming_uniform_, nn.init.normal_,
            nn.modules.linear.init.uniform_) == originals


def test_initialisers_hand_back_their_tensor_while_skipped():
    """A constructor that uses an initialiser's result (``nn.Parameter(init.normal_(t))``)
    still gets its tensor."""
    with _values_not_drawn():
        t = torch.empty(3, 4, device="meta")
        assert nn.init.normal_(t) is t
        assert nn.init.xavier_uniform_(t) is t
        layer = nn.Linear(4, 3, device="meta")
    assert layer.weight.shape == (3, 4)


def test_weights_used_as_matrices_probe_the_layers_that_hold_every_kind(monkeypatch, tmp_path):
    """A deep Mamba: its trace plan's low depth holds every kind of layer, the probe
    runs at that depth, and finds what a probe of the first eight layers finds."""
    config = make_config("mamba", num_hidden_layers=12)
    inventory = take_inventory(build_meta_model(copy.deepcopy(config)))
    plan = trace_plan(layer_signatures(inventory, config), num_layers(config))
    assert plan.depths is not None and not plan.pattern.suffix_layers
    low = plan.depths[0]
    assert low < quantize_meta._PROBE_LAYERS
    deep = quantize_meta._probe_weights_used_as_matrices(config, False, 8)
    assert deep == ("dt_proj",)
    assert quantize_meta._probe_weights_used_as_matrices(config, False, low) == deep

    asked = []
    probe = quantize_meta._probe_weights_used_as_matrices

    def recording(config, trust_remote_code, probe_layers=quantize_meta._PROBE_LAYERS):
        asked.append(probe_layers)
        return probe(config, trust_remote_code, probe_layers)

    monkeypatch.setattr(quantize_meta, "_probe_weights_used_as_matrices", recording)
    monkeypatch.setattr(quantize_meta, "_PROBED", {})
    config.save_pretrained(tmp_path)
    report = estimate(str(tmp_path), gpu="24GiB", mode="load", precisions="bf16,nf4")
    assert asked == [low]
    assert "dt_proj" in report.workload["skip_modules"]
