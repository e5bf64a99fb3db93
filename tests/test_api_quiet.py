"""A plan called from Python shows the caller nothing of the libraries' chatter at qplan's
own calls, and leaves the caller's warning filters as they were."""

from __future__ import annotations

import warnings

from qplan.api import estimate


def test_a_plan_raises_no_library_warnings_and_restores_the_filters(tiny_model_dir):
    folder = str(tiny_model_dir("llama"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filters = list(warnings.filters)
        # LoRA: peft adds adapters and enables checkpointing through transformers'
        # deprecated gradient_checkpointing_enable (a FutureWarning at every preparation).
        report = estimate(folder, gpu="24GiB", mode="lora", precisions="bf16,int8",
                          seq_len=32, gradient_checkpointing=True)
        assert warnings.filters == filters
        warnings.warn("the caller's own warning", UserWarning, stacklevel=1)
    assert report.recommendation is not None
    assert [str(w.message) for w in caught] == ["the caller's own warning"]
