"""How this folder was made: NVIDIA ModelOpt's own packer writes a tiny FP8 checkpoint.

Run once, on CPU, with nvidia-modelopt 0.47.0 (pip install nvidia-modelopt; not a qplan
dependency), torch 2.13 and transformers 5.24, from the repository root:
``python tests/data/modelopt-fp8-tiny-llama/make.py``. It quantises the tiny random llama
of tests/tiny_models.py with ``mtq.FP8_DEFAULT_CFG`` (two calibration batches), exports it
with ``export_hf_checkpoint`` (config.json, hf_quant_config.json, model.safetensors) and
keeps the safetensors header (names, dtypes, shapes; no tensor data) as
model.safetensors.header.json. The weights themselves are not kept.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import transformers

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent.parent))  # tests/: tiny_models
sys.path.insert(0, str(HERE.parent))  # tests/data: packer_checkpoint


def main() -> None:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from packer_checkpoint import keep
    from tiny_models import make_config

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(make_config("llama"),
                                                          dtype=torch.bfloat16)

    def calibrate(m: torch.nn.Module) -> None:
        for _ in range(2):
            m(torch.randint(0, 1000, (1, 16)))

    model = mtq.quantize(model, mtq.FP8_DEFAULT_CFG, calibrate)
    with tempfile.TemporaryDirectory() as out:
        export_hf_checkpoint(model, export_dir=out)
        keep(Path(out), HERE, ("config.json", "hf_quant_config.json"))


if __name__ == "__main__":
    main()
