"""What `--dtype auto` resolves to on this machine, and why (run.json model.dtype_choice).

CUDA: bfloat16 where the GPU computes it (`torch.cuda.is_bf16_supported()`), else float32.
CPU: bfloat16 only if the CPU has native bf16 arithmetic (AVX512-BF16 or AMX) *and* a one-time measurement says it
is faster here: a one-position decode step plus a 4-position verification pass (what speculative decoding pays
per round) of a random Llama stack with the embedded model's shapes (30 layers, a 49k-row head, a 256-position
cache) through the harness's own core, in each dtype. The verdict is cached per machine (CPU model,
core count, torch version) under the harness cache, so it costs ~5 s once. bf16 must be at least 10% faster to be
chosen: a tie keeps fp32, which is exact.
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

MARGIN = 0.9  # bf16 step time must be below this fraction of fp32's


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX, as torch's CPU capability probes report them."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's capability probes (torch >= 2.3)
    return any(bool(getattr(torch.cpu, p, lambda: False)()) for p in probes)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> str:
    return f"{_cpu_name()}|threads={torch.get_num_threads()}|torch={torch.__version__}"


@torch.inference_mode()
def step_seconds(dtype: torch.dtype, layers: int = 30, context: int = 256, reps: int = 7) -> float:
    """Median seconds of a 1-position plus a 4-position pass of a random Llama stack through LayeredModel's core."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .model import LayeredModel
    from .speedup_model import median_time

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                      num_hidden_layers=layers, vocab_size=49152, max_position_embeddings=2048,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).to(dtype).eval()

    class _Tok:  # the core needs no tokenizer for this
        eos_token_id = None

    m = LayeredModel(hf, _Tok(), name="probe")
    cache = m.new_cache()
    m.run_layers(m.embed(torch.randint(0, 49152, (1, context))), 0, layers, cache, 0)
    total = 0.0
    for k in (1, 4):
        x = m.embed(torch.arange(1, k + 1).unsqueeze(0))
        rope = m.rope(x, context)

        def one_pass():
            m.exit_logits(m.run_layers(x, 0, layers, cache, context, rope=rope))
            m.crop(cache, context)

        total += median_time(one_pass, m.synchronize, reps)
    return total


def choose(device: torch.device, cache_dir: Path) -> tuple[torch.dtype, dict]:
    """(dtype, why) for --dtype auto on `device`."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return (torch.bfloat16 if ok else torch.float32), {
            "resolved": "bfloat16" if ok else "float32", "why": "CUDA device " + ("computes" if ok else "lacks") + " bf16"}
    if device.type != "cpu":
        return torch.float32, {"resolved": "float32", "why": f"{device.type}: float32 (no measurement on this device)"}
    if not cpu_has_native_bf16():
        return torch.float32, {"resolved": "float32", "why": "this CPU has no native bf16 (AVX512-BF16/AMX)"}
    path = cache_dir / "dtype_choice.json"
    key = machine_key()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    entry = cached.get(key)
    if not isinstance(entry, dict) or not {"float32", "bfloat16"} <= set(entry):
        entry = {"float32": step_seconds(torch.float32), "bfloat16": step_seconds(torch.bfloat16)}
        cached[key] = entry
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(cached, indent=1))
            tmp.replace(path)
        except OSError:  # an unwritable cache only costs the measurement again next time
            pass
    fp32, bf16 = entry["float32"], entry["bfloat16"]
    pick = bf16 < MARGIN * fp32
    why = (f"native bf16 CPU; measured 1- + 4-position passes (random 30-layer 135M-shaped probe): {1e3 * bf16:.1f} ms "
           f"bf16 vs {1e3 * fp32:.1f} ms fp32, so {'bf16' if pick else 'fp32'} (bf16 must be >= {1 / MARGIN - 1:.0%} "
           "faster); --dtype float32 for exact fp32")
    return (torch.bfloat16 if pick else torch.float32), {
        "resolved": "bfloat16" if pick else "float32", "why": why, "probe_seconds": entry, "machine": key}
