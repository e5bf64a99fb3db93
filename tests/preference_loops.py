"""TRL's own preference trainers on CPU under qplan's live-storage tracker.

Nothing here is qplan's step code: ``trl.DPOTrainer`` / ``trl.KTOTrainer`` (and the
experimental ORPO/CPO trainers) built the way their docs show, on a dataset of text
examples and a word-level tokenizer made here (no Hub), trained for two steps. Every
row has the same length (prompt, completion and EOS), so nothing is padded and the plan's
``seq_len`` is the row length.
"""

from __future__ import annotations

import tempfile
from typing import Any

from user_loops import LoopPeak, _quiet

from qplan.planner.live_tensors import LiveTensorTracker
from qplan.planner.steps import StepTensors, track_model


def word_tokenizer(vocab: int) -> Any:
    """A word-level tokenizer over the words w0 .. w{vocab-3}, plus <pad> and </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab - 2)}
    words["<pad>"] = vocab - 2
    words["</s>"] = vocab - 1
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")


def _words(start: int, count: int, vocab: int) -> str:
    return " ".join(f"w{(start + i) % (vocab - 2)}" for i in range(count))


def preference_rows(rows: int, prompt: int, completion: int, vocab: int) -> list[dict]:
    """``rows`` pairs: a prompt of ``prompt`` words, chosen and rejected completions of
    ``completion`` words each (the trainer adds EOS to both)."""
    return [
        {"prompt": _words(7 * r, prompt, vocab),
         "chosen": " " + _words(7 * r + prompt, completion, vocab),
         "rejected": " " + _words(7 * r + prompt + 3, completion, vocab)}
        for r in range(rows)
    ]


def dpo_peak(model: Any, batch: int, prompt: int, completion: int, *, loss_type: str = "sigmoid",
             ref_model: Any = None, precompute: bool = False, gradient_checkpointing: bool,
             steps: int = 2) -> LoopPeak:
    """``DPOTrainer.train()`` for ``steps`` steps of ``batch`` pairs."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    vocab = model.config.get_text_config().vocab_size
    data = Dataset.from_list(preference_rows(batch * steps, prompt, completion, vocab))
    with tempfile.TemporaryDirectory(prefix="qplan-dpo-") as out, _quiet():
        args = DPOConfig(
            output_dir=out, per_device_train_batch_size=batch, max_steps=steps,
            bf16=False, gradient_checkpointing=gradient_checkpointing, use_cpu=True,
            save_strategy="no", report_to=[], logging_strategy="no",
            dataloader_num_workers=0, disable_tqdm=True, loss_type=[loss_type],
            precompute_ref_log_probs=precompute, max_length=None,
        )
        trainer = DPOTrainer(model=model, ref_model=ref_model, args=args,
                             train_dataset=data, processing_class=word_tokenizer(vocab))
        tracker = LiveTensorTracker()
        track_model(trainer.model, tracker, StepTensors())
        if trainer.ref_model is not None:
            track_model(trainer.ref_model, tracker, StepTensors())
        with tracker:
            trainer.train()
    return LoopPeak(tracker.peak)


def kto_peak(model: Any, batch: int, prompt: int, completion: int, *, ref_model: Any = None,
             precompute: bool = False, gradient_checkpointing: bool, steps: int = 2) -> LoopPeak:
    """``KTOTrainer.train()`` for ``steps`` steps of ``batch`` unpaired examples
    (alternately desirable and not), with its KL rows (``loss_type="kto"``)."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    vocab = model.config.get_text_config().vocab_size
    rows = [
        {"prompt": pair["prompt"], "completion": pair["chosen"], "label": r % 2 == 0}
        for r, pair in enumerate(preference_rows(batch * steps, prompt, completion, vocab))
    ]
    with tempfile.TemporaryDirectory(prefix="qplan-kto-") as out, _quiet():
        args = KTOConfig(
            output_dir=out, per_device_train_batch_size=batch, max_steps=steps,
            bf16=False, gradient_checkpointing=gradient_checkpointing, use_cpu=True,
            save_strategy="no", report_to=[], logging_strategy="no",
            dataloader_num_workers=0, disable_tqdm=True,
            precompute_ref_log_probs=precompute, max_length=None,
        )
        trainer = KTOTrainer(model=model, ref_model=ref_model, args=args,
                             train_dataset=Dataset.from_list(rows),
                             processing_class=word_tokenizer(vocab))
        tracker = LiveTensorTracker()
        track_model(trainer.model, tracker, StepTensors())
        if trainer.ref_model is not None:
            track_model(trainer.ref_model, tracker, StepTensors())
        with tracker:
            trainer.train()
    return LoopPeak(tracker.peak)


def concatenated_peak(kind: str, model: Any, batch: int, prompt: int, completion: int, *,
                      gradient_checkpointing: bool, steps: int = 2) -> LoopPeak:
    """TRL's experimental ``ORPOTrainer`` (``kind="orpo"``) or ``CPOTrainer`` with
    ``loss_type="simpo"`` (``kind="simpo"``, as Axolotl runs SimPO) for ``steps`` steps of
    ``batch`` pairs."""
    from datasets import Dataset

    with _quiet():
        if kind == "orpo":
            from trl.experimental.orpo import ORPOConfig as Config
            from trl.experimental.orpo import ORPOTrainer as Trainer

            extra: dict[str, Any] = {}
        else:
            from trl.experimental.cpo import CPOConfig as Config
            from trl.experimental.cpo import CPOTrainer as Trainer

            extra = {"loss_type": "simpo"}
    vocab = model.config.get_text_config().vocab_size
    data = Dataset.from_list(preference_rows(batch * steps, prompt, completion, vocab))
    with tempfile.TemporaryDirectory(prefix=f"qplan-{kind}-") as out, _quiet():
        args = Config(
            output_dir=out, per_device_train_batch_size=batch, max_steps=steps,
            bf16=False, gradient_checkpointing=gradient_checkpointing, use_cpu=True,
            save_strategy="no", report_to=[], logging_strategy="no",
            dataloader_num_workers=0, disable_tqdm=True, **extra,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data,
                          processing_class=word_tokenizer(vocab))
        tracker = LiveTensorTracker()
        track_model(trainer.model, tracker, StepTensors())
        with tracker:
            trainer.train()
    return LoopPeak(tracker.peak)


def completion_length(completions: list[str], **_: Any) -> list[float]:
    """A model-free reward (a Python function, as GRPO users write them): the length of
    each completion in characters."""
    return [float(len(text)) for text in completions]


def grpo_peak(model: Any, batch: int, prompt: int, completion: int, *, num_generations: int,
              beta: float = 0.0, gradient_checkpointing: bool, accumulation: int = 1,
              steps: int = 2) -> tuple[LoopPeak, int]:
    """``GRPOTrainer.train()`` for ``steps`` steps of ``batch`` completions (``batch //
    num_generations`` prompts of ``prompt`` words, each sampled ``num_generations`` times
    for ``completion`` tokens by ``model.generate``), a Python reward function, TRL's
    defaults otherwise; ``accumulation`` micro-steps per optimizer step (TRL then
    generates for all of them at once). Returns the whole run's peak and the peak while
    ``generate`` ran. Full fine-tuning with beta > 0 loads the checkpoint again (the
    model's config path) as the reference."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    vocab = model.config.get_text_config().vocab_size
    prompts = batch * accumulation * steps // num_generations
    data = Dataset.from_list([{"prompt": _words(11 * r, prompt, vocab)} for r in range(prompts)])
    with tempfile.TemporaryDirectory(prefix="qplan-grpo-") as out, _quiet():
        args = GRPOConfig(
            output_dir=out, per_device_train_batch_size=batch, max_steps=steps,
            num_generations=num_generations, max_completion_length=completion, beta=beta,
            gradient_accumulation_steps=accumulation, bf16=False,
            gradient_checkpointing=gradient_checkpointing, use_cpu=True,
            save_strategy="no", report_to=[], logging_strategy="no",
            dataloader_num_workers=0, disable_tqdm=True, shuffle_dataset=False,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=completion_length, args=args,
                              train_dataset=data, processing_class=word_tokenizer(vocab))
        tracker = LiveTensorTracker()
        track_model(trainer.model, tracker, StepTensors())
        if trainer.ref_model is not None:
            track_model(trainer.ref_model, tracker, StepTensors())
        generate = trainer.model.generate

        def tracked_generate(*a: Any, **kw: Any) -> Any:
            phase, tracker.phase = tracker.phase, "generate"
            try:
                return generate(*a, **kw)
            finally:
                tracker.phase = phase

        trainer.model.generate = tracked_generate
        with tracker:
            trainer.train()
    return LoopPeak(tracker.peak), tracker.phase_peaks.get("generate", 0)
