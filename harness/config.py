"""One flag vocabulary: dataclass configs that are also the CLIs' flags.

Every field's ``metadata["help"]`` becomes its ``--help`` line, so flags, defaults and docs cannot drift
apart. Names follow LayerSkip's where LayerSkip has one.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, get_type_hints


class UsageError(Exception):
    """Bad user input: the CLIs print it as one line and exit with code 2."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class GenerationConfig:
    """How to decode: the strategy and all of its knobs."""

    generation_strategy: str = _f("autoregressive", "decoding method (see the list below)")
    max_steps: Optional[int] = _f(None, "maximum new tokens; default: the task's own limit (128 for generate.py)")
    exit_layer: Optional[int] = _f(
        None,
        "number of layers used before the exit head, 1..L. With autoregressive: static exit "
        "(only the first E layers). With self_speculative: the draft depth (LayerSkip, arXiv 2404.16710)",
    )
    num_speculations: Optional[int] = _f(
        None, "self_speculative: tokens drafted per step (LayerSkip's num_speculations)"
    )
    sample: bool = _f(False, "sample instead of greedy decoding")
    temperature: float = _f(1.0, "sampling temperature (with --sample)")
    top_p: float = _f(1.0, "nucleus sampling mass, 1.0 = off (with --sample)")
    top_k: int = _f(0, "top-k sampling, 0 = off (with --sample)")
    seed: int = _f(42, "random seed for sampling and few-shot selection")


@dataclass
class RunConfig:
    """What to run it on: model, data, hardware, output."""

    model: Optional[str] = _f(
        None,
        "model: omitted = embedded SmolLM2-135M-Instruct; or a local transformers directory, a .gguf file, "
        "or a hub id (needs network)",
    )
    dataset: str = _f("cnn_dm_summarization", "task (see the list below)")
    data_path: Optional[str] = _f(None, "evaluate on this JSONL(.gz) file (same field names as the task) instead of the bundled one")
    data_source: str = _f("bundled", "bundled = files shipped in harness/data; hf = load through `datasets` (needs network)",
                          choices=("bundled", "hf"))
    num_samples: Optional[int] = _f(10, "number of examples to evaluate (first N of the file); 0 = all")
    n_shot: int = _f(0, "few-shot exemplars prepended to each prompt, drawn from another split where one exists")
    output_dir: str = _f("results", "a new run directory is created under this folder for every invocation")
    device: str = _f("auto", "torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps")
    dtype: str = _f("auto", "float32 | bfloat16 | float16 | auto (float32 on cpu, bfloat16 on cuda)")
    warmup: int = _f(1, "untimed warm-up generations before measuring (on the first prompt)")
    chat_template: bool = _f(False, "wrap each prompt in the tokenizer's chat template (off: raw prompts, as LayerSkip)")
    max_prompt_tokens: Optional[int] = _f(
        None, "truncate prompts from the left to this many tokens (default: the model's context minus max_steps)"
    )


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """Add one flag per dataclass field, typed and documented from the field itself."""
    group = parser.add_argument_group(title)
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kw: dict[str, Any] = {"default": f.default, "help": f.metadata["help"] + " (default: %(default)s)"}
        typ = hints[f.name]
        if typ is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            base = typ.__args__[0] if getattr(typ, "__args__", None) else typ  # Optional[X] -> X
            kw["type"] = base
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        group.add_argument(f"--{f.name}", **kw)


def from_args(cls: type, args: argparse.Namespace) -> Any:
    """Build a dataclass from the parsed flags of the same names."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
