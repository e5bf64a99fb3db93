"""How tests/data/gptq-tiny-llama and awq-tiny-llama were made: GPTQModel's own packer
writes a tiny GPTQ / AWQ (GEMM) checkpoint.

Run once, on CPU, with gptqmodel 7.7.0 built without its CUDA extensions
(``BUILD_CUDA_EXT=0 pip install gptqmodel``; not a qplan dependency; it needs
``GPTQMODEL_CPU_WORKERS=2`` on a small machine), torch 2.13 and transformers 5.24, from the
repository root: ``python tests/data/make_gptqmodel_checkpoint.py gptq`` (or ``awq``). It
quantises a tiny random float16 llama (4-bit, group size 32, no act order; eight random
calibration rows; a word-level tokenizer because GPTQModel loads one), saves it with
``model.save`` and keeps config.json, quantize_config.json and the safetensors header
(names, dtypes, shapes; no tensor data) as model.safetensors.header.json.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import transformers

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))  # tests/: tiny_models
SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4,
             num_key_value_heads=2)


def _word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(1000)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="t0", pad_token="t1", eos_token="t2",
        bos_token="t3")


def main(method: str) -> None:
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization.config import AWQConfig
    from packer_checkpoint import keep
    from tiny_models import make_config

    target = HERE / f"{method}-tiny-llama"
    settings = (AWQConfig(bits=4, group_size=32) if method == "awq"
                else QuantizeConfig(bits=4, group_size=32, desc_act=False))

    torch.manual_seed(0)
    config = make_config("llama", dtype="float16", **SHAPE)
    with tempfile.TemporaryDirectory() as source, tempfile.TemporaryDirectory() as out:
        transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float16) \
            .save_pretrained(source)
        _word_tokenizer().save_pretrained(source)
        model = GPTQModel.load(source, settings, device="cpu")
        rows = [{"input_ids": torch.randint(0, 1000, (1, 64)),
                 "attention_mask": torch.ones(1, 64, dtype=torch.long)} for _ in range(8)]
        model.quantize(rows, batch_size=1)
        model.save(out)
        keep(Path(out), target, ("config.json", "quantize_config.json"))


if __name__ == "__main__":
    main(sys.argv[1])
