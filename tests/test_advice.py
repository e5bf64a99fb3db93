"""What the planner advises when nothing fits one GPU."""

from __future__ import annotations

from qplan.planner.advice import _more_gpus_advice

MIB = 1024**2


def test_more_gpus_split_only_what_sharding_or_a_layer_split_divides():
    # 300 MiB of model states, 20 MiB of per-GPU step memory, 100 MiB per GPU available.
    components = {"weights": 100 * MIB, "gradients": 100 * MIB, "optimizer_states": 100 * MIB,
                  "activations": 15 * MIB, "logits": 5 * MIB}
    advice = _more_gpus_advice("bf16", components, 330 * MIB, 100 * MIB, 10 * MIB, "GPU")
    # Each GPU keeps 10 MiB context + 20 MiB step memory: 70 MiB left for 300 MiB of states.
    assert "at least 5 x GPU" in advice and "--num-gpus 5" in advice


def test_more_gpus_do_not_help_when_the_step_alone_does_not_fit():
    components = {"weights": 10 * MIB, "activations": 95 * MIB, "logits": 5 * MIB}
    advice = _more_gpus_advice("nf4", components, 120 * MIB, 100 * MIB, 10 * MIB, "GPU")
    assert advice.startswith("more GPUs would not help nf4")
    assert "--seq-len" in advice
