"""Past one process and one device: records merged over the process group, models spread by a device map."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.config import GenerationConfig
from harness.generators import StopCondition, build_generator

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
VOLATILE = {"prefill_seconds", "decode_seconds", "total_seconds", "decode_time_per_token", "e2e_tokens_per_second",
            "repeats"}


def torchrun(*args, timeout=600):
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(ROOT / "benchmark.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def records(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in VOLATILE}
            for x in (run_dir / "examples.jsonl").read_text().splitlines()]


def test_records_travel_over_the_process_group_without_shared_storage(tmp_path):
    common = ["--dataset", "gsm8k", "--num_samples", "5", "--max_steps", "4", "--warmup", "0"]
    proc = torchrun(*common, "--output_dir", str(tmp_path / "out"), "--shard_dir", str(tmp_path / "node{rank}"))
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (tmp_path / "out").iterdir()
    # each rank kept its own shard on its own "node"; rank 0's run directory holds no other rank's file
    for rank in (0, 1):
        (shard,) = (tmp_path / f"node{rank}" / run_dir.name).glob("examples.rank*.jsonl")
        assert shard.name == f"examples.rank{rank}.jsonl"
        assert [json.loads(x)["index"] for x in shard.read_text().splitlines()] == list(range(rank, 5, 2))
    assert not list(run_dir.rglob("examples.rank*"))
    single = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), *common, "--output_dir", str(tmp_path / "one")],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert single.returncode == 0, single.stderr
    (one,) = (tmp_path / "one").iterdir()
    assert records(run_dir) == records(one)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["environment"]["world_size"] == 2 and info["environment"]["nodes"] == 1
    assert json.loads((run_dir / "summary.json").read_text())["num_examples"] == 5
    # a crash: rank 1 lost its last record and rank 0 never merged; --resume reads each rank's own shard
    shard1 = tmp_path / "node1" / run_dir.name / "examples.rank1.jsonl"
    shard1.write_text(shard1.read_text().splitlines()[0] + "\n")
    (run_dir / "examples.jsonl").unlink()
    proc = torchrun("--resume", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    assert records(run_dir) == records(one)


FAULT = """
import os, sys
if os.environ.get("LOCAL_RANK") == "1":  # rank 1 only: scoring example id 4 (index 3, its second) raises
    sys.path.insert(0, os.environ["HARNESS_ROOT"])
    import harness.metrics as metrics
    real = metrics.METRICS["gsm8k_exact_match"]
    def failing(prediction, example):
        if example.id == "4":
            raise RuntimeError("injected scoring failure")
        return real(prediction, example)
    metrics.METRICS["gsm8k_exact_match"] = failing
"""


def test_a_failing_rank_is_reported_and_its_finished_records_kept(tmp_path, monkeypatch):
    # A fault injected into one rank's process (bad data is now refused at load time, before any rank starts).
    (tmp_path / "sitecustomize.py").write_text(FAULT)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("HARNESS_ROOT", str(ROOT))
    proc = torchrun("--dataset", "gsm8k", "--num_samples", "5", "--max_steps", "4",
                    "--warmup", "0", "--output_dir", str(tmp_path / "out"))
    assert proc.returncode != 0
    (run_dir,) = (tmp_path / "out").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("rank 1: ")
    assert [r["index"] for r in records(run_dir)] == [0, 1, 2, 4]  # rank 1 finished example 1 before failing
    assert "rank 1: " in proc.stdout


@pytest.fixture(scope="module")
def offloaded(model):
    """The embedded model with layers 15-29 offloaded to disk by accelerate (the CPU stand-in for a
    model larger than one device: those layers' weights are loaded onto the execution device per call)."""
    from harness.model import load_model

    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    dm.update({f"model.layers.{i}": "cpu" if i < 15 else "disk" for i in range(30)})
    return load_model(None, "cpu", "float32", json.dumps(dm))


@torch.inference_mode()
@pytest.mark.parametrize("cfg", [
    dict(),
    dict(generation_strategy="self_speculative", exit_layer=8, num_speculations=3),
    dict(generation_strategy="calm", threshold=0.5),
    dict(generation_strategy="free", threshold=0.5),
], ids=["autoregressive", "self_speculative", "calm", "free"])
def test_device_map_gives_the_single_device_output(model, offloaded, real_prompts, cfg):
    assert offloaded.describe()["device_map"]["layers_offloaded_to_disk"] == 15
    assert any(p.device.type == "meta" for p in offloaded.layers[20].parameters())  # really not resident
    ids = model.encode(real_prompts[4])
    ref = build_generator(model, GenerationConfig(**cfg)).generate(ids, StopCondition(model, 6, eos_ids=set()))
    out = build_generator(offloaded, GenerationConfig(**cfg)).generate(ids, StopCondition(offloaded, 6, eos_ids=set()))
    assert out.tokens == ref.tokens and out.exit_layers == ref.exit_layers


def test_bad_device_map_gets_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), "--device_map", "{not json",
                           "--num_samples", "1", "--output_dir", str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "--device_map" in proc.stderr
