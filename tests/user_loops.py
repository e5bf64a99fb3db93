"""The loops users run, on CPU, under qplan's live-storage tracker.

Nothing here is qplan's step code: ``model.generate`` for inference; transformers'
``Trainer`` with its defaults (adamw_torch_fused, max_grad_norm 1.0, weight decay 0) for
training, after peft's own ``prepare_model_for_kbit_training`` / ``get_peft_model`` for
LoRA and QLoRA. The tracker (planner/live_tensors.py) counts every live tensor storage,
the model's included, and its peak is what ``peak_allocated_bytes`` predicts for
``target="cpu"``.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from qplan.planner.live_tensors import LiveTensorTracker
from qplan.planner.steps import StepTensors, track_model


@dataclass(frozen=True)
class LoopPeak:
    peak_bytes: int
    kv_cache_bytes: int = 0  # generate: storages the returned cache holds


def _ids(batch: int, seq_len: int, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, seq_len), generator=generator)


@contextlib.contextmanager
def _quiet():
    level = logging.getLogger("transformers").level
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.getLogger("transformers").setLevel(level)


def generate_peak(model: Any, batch: int, seq_len: int, new_tokens: int = 1) -> LoopPeak:
    """``model.generate`` on a ``batch x seq_len`` prompt, greedy, ``new_tokens`` tokens."""
    vocab = model.config.get_text_config().vocab_size
    tracker = LiveTensorTracker()
    track_model(model, tracker, StepTensors())
    ids = _ids(batch, seq_len, vocab)
    tracker.add(ids)  # the prompt is on the device before generate starts, as in a plan
    with _quiet(), tracker:
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    storages = {}
    for layer in getattr(cache, "layers", []):
        for tensor in vars(layer).values():  # keys, values and per-layer bookkeeping
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    kv = sum(storages.values())
    return LoopPeak(tracker.peak, kv)


def lora_model(model: Any, r: int, quantized: bool, exclude: list[str] | None = None) -> Any:
    """What a LoRA/QLoRA user does with peft: k-bit preparation for a quantised base,
    then LoRA on every linear layer but ``exclude`` (peft's defaults otherwise)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                        target_modules="all-linear", exclude_modules=exclude,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def trainer_peak(model: Any, batch: int, seq_len: int, *, bf16: bool,
                 gradient_checkpointing: bool, steps: int = 2) -> LoopPeak:
    """``Trainer.train()`` for ``steps`` steps of ``batch x seq_len`` tokens; the arguments
    set are only those a CPU run without saving or logging needs."""
    from transformers import Trainer, TrainingArguments

    vocab = model.config.get_text_config().vocab_size
    ids = _ids(batch, seq_len, vocab)
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    with tempfile.TemporaryDirectory(prefix="qplan-trainer-") as out, _quiet():
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=batch, max_steps=steps,
            bf16=bf16, activation_checkpointing=gradient_checkpointing, use_cpu=True,
            save_strategy="no", report_to=[], logging_strategy="no",
            dataloader_num_workers=0, disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset)
        tracker = LiveTensorTracker()
        track_model(trainer.model, tracker, StepTensors())
        with tracker:
            trainer.train()
    return LoopPeak(tracker.peak)


def record_counted_scans(monkeypatch: Any) -> list[int]:
    """The tokens each counted Mamba scan node (planner/recurrent_scan_graph.py) counted
    in a backward while the test's plans run: the plans the user's loop is compared
    against took that path."""
    from qplan.planner import recurrent_scan_graph

    counted: list[int] = []
    real_backward = recurrent_scan_graph._Run.backward

    def backward(self: Any, kept: Any, grad: Any) -> Any:
        counted.append(self.count)
        return real_backward(self, kept, grad)

    monkeypatch.setattr(recurrent_scan_graph._Run, "backward", backward)
    return counted


def record_repeats(monkeypatch: Any) -> list[bool]:
    """The answer of every ``StepRepeater.repeat`` (planner/repeated_steps.py) while the
    test's plans run, in order: whether each later optimizer step was counted, not run."""
    from qplan.planner import repeated_steps

    repeated: list[bool] = []
    real_repeat = repeated_steps.StepRepeater.repeat
    monkeypatch.setattr(repeated_steps.StepRepeater, "repeat",
                        lambda self: repeated.append(real_repeat(self)) or repeated[-1])
    return repeated
