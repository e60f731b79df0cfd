"""The GPU check: braid's learner class driven directly, at a real model's shape.

    python benchmarks/gpu_check.py                      # CUDA: Qwen2.5-1.5B shape, bf16
    python benchmarks/gpu_check.py --size toy           # CPU: a toy Qwen2 in seconds (make test)
    make gpu-check                                      # the first, or the second without CUDA

Needs torch, transformers, DeepSpeed and pydantic only — no Ray, no vLLM, no model hub: the
model is built from a config with random weights. It checks, printing one JSON line each:

1. ``logprobs``: the learner's chunked log-probs (vocabulary projection and fp32 log-softmax
   ``--chunk`` tokens at a time) against one pass over all positions, on a packed batch, and
   the peak memory of each;
2. ``learner``: ``DeepSpeedLearner`` (ZeRO-3, one rank, gradient checkpointing, rows packed
   without padding under a token budget) taking RL steps on ``--rows`` rows of ``--seq``
   tokens: peak memory, tokens/s and model-FLOPs utilisation of the steady steps.

Exits non-zero when a check fails. docs/gpu.md records what it printed on a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {
    # Qwen2.5-1.5B(-Instruct/-Math)'s config.json, as published
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                         tie_word_embeddings=True),
    # small, with SmolLM2's vocabulary: what makes long completions expensive on CPU
    # (benchmarks/learner_memory.py)
    "small-49k": dict(vocab_size=49152, hidden_size=128, intermediate_size=512,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=8192, rope_theta=1e5, rms_norm_eps=1e-5,
                      tie_word_embeddings=True),
    "toy": dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True),
}
# dense bf16 peak of one GPU, for MFU
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def build_model(size: str, out: Path, dtype: str) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from workers.models import build_char_tokenizer

    cfg = Qwen2Config(**SIZES[size], dtype=dtype, use_cache=False)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(out)
    build_char_tokenizer(out)  # any tokenizer: the learner reads only its pad/eos id
    return out


def recipe(model: Path, run_dir: Path, dtype: str, max_tokens: int, chunk: int):
    from orchestrator.config import Recipe

    return Recipe.model_validate({
        "name": "gpu-check", "steps": 1, "run_dir": str(run_dir),
        "model": {"path": str(model), "dtype": dtype},
        "data": {"train": {"cls": "orchestrator.data:Arithmetic"}},
        "roles": {
            "rollout": {"cls": "workers.rollout.vllm:VLLMRollout"},
            "learner": {"cls": "workers.learner.deepspeed:DeepSpeedLearner", "replicas": 1,
                        "args": {"zero_stage": 3, "gradient_checkpointing": True,
                                 "logprob_chunk_tokens": chunk}},
            "reward": {"cls": "workers.reward:RuleRewardWorker",
                       "args": {"verifiers": ["rewards.arithmetic:exact_answer"]}},
        },
        "sampling": {"temperature": 1.0},
        "algorithm": {"lr": 1e-6, "micro_batch_size": None,
                      "max_tokens_per_micro_batch": max_tokens},
    })


class Memory:
    """Peak memory since ``reset``: CUDA's allocator on GPU, the process's peak RSS on CPU
    (which cannot be reset: on CPU each reading is the process's peak so far)."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()

    def reset(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float:
        import torch

        from workers.learner.deepspeed import peak_memory_gib

        if self.cuda:
            torch.cuda.synchronize()
        return peak_memory_gib()


def rows(n: int, seq: int, prompt: int, vocab: int, seed: int = 0, rng=None):
    """n random rows of ``seq`` tokens, the first ``prompt`` of them the prompt."""
    rng = rng or random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(prompt)] for _ in range(n)]
    completions = [[rng.randrange(3, vocab) for _ in range(seq - prompt)] for _ in range(n)]
    return prompts, completions


def check_logprobs(model_dir: Path, dtype: str, args, mem: Memory) -> bool:
    """Chunked vs one-pass log-probs of the same packed batch, no gradient."""
    import torch
    from transformers import AutoModelForCausalLM

    from workers.learner.packing import pack
    from workers.learner.policy import TokenLogprobs, attn_implementation

    device = "cuda" if mem.cuda else "cpu"
    lm = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype),
        attn_implementation=attn_implementation(None, getattr(torch, dtype))).to(device).eval()
    p, c = rows(2, args.seq, args.prompt, lm.config.vocab_size, seed=1)
    batch = pack(p, c, 0).to(device)
    out, peaks = {}, {}
    with torch.no_grad():
        # chunked first: on CPU a reading is the process's peak so far
        for name, chunk in (("chunked", args.chunk), ("full", None)):
            model = TokenLogprobs(lm, chunk)
            mem.reset()
            out[name], _ = model(batch, 1.0, with_entropy=True)
            peaks[name] = round(mem.peak_gib(), 3)
    diff = float((out["full"] - out["chunked"]).abs().max())
    tol = 1e-4 if dtype == "float32" else 2e-2
    ok = math.isfinite(diff) and diff <= tol
    emit(check="logprobs", ok=ok, tokens=len(batch.targets), chunk=args.chunk,
         max_abs_diff=diff, tolerance=tol, peak_gib_full=peaks["full"],
         peak_gib_chunked=peaks["chunked"], device=device)
    del lm
    if mem.cuda:
        torch.cuda.empty_cache()
    return ok


def check_learner(model_dir: Path, work: Path, dtype: str, args, mem: Memory) -> bool:
    import torch

    from workers.base import WorkerContext
    from workers.learner.deepspeed import DeepSpeedLearner
    from workers.learner.terms import PolicyGradient
    from workers.types import Rollouts

    max_tokens = args.rows * args.seq // args.micro_batches
    rec = recipe(model_dir, work / "run", dtype, max_tokens, args.chunk)
    learner_args = DeepSpeedLearner.check_args(rec.roles.learner.args, "roles.learner.args")
    learner = DeepSpeedLearner(WorkerContext("learner", 0, 1, rec, learner_args))
    t0 = time.perf_counter()
    learner.setup(master_addr="127.0.0.1", master_port=args.port)
    setup_s = time.perf_counter() - t0
    n_params = sum(int(getattr(p, "ds_numel", p.numel())) for p in learner.named.values())
    cfg = learner.lm.config
    p, c = rows(args.rows, args.seq, args.prompt, cfg.vocab_size)
    r = Rollouts([i // 4 for i in range(args.rows)], p, c, [[] for _ in p], [""] * len(p),
                 ["length"] * len(p))
    rng = random.Random(0)
    times, metrics = [], {}
    mem.reset()
    for _ in range(args.steps + 1):  # the first step warms up
        adv = [rng.uniform(-1, 1) for _ in p]
        t0 = time.perf_counter()
        metrics = learner.update([PolicyGradient(rollouts=r, advantages=adv)])
        if mem.cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = mem.peak_gib()
    step_s = sorted(times[1:])[len(times[1:]) // 2]
    tokens = args.rows * args.seq
    # model FLOPs of a step: 6 N per token (forward + backward), plus causal attention
    # 6 * layers * hidden * sum(len^2); recomputation by checkpointing is not counted (MFU)
    flops = 6 * n_params * tokens + 6 * cfg.num_hidden_layers * cfg.hidden_size * \
        args.rows * args.seq ** 2
    name = torch.cuda.get_device_name() if mem.cuda else "cpu"
    peak_flops = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    ok = all(math.isfinite(v) for v in metrics.values()) and metrics["rl/grad_norm"] > 0
    emit(check="learner", ok=ok, device=name, params=n_params, dtype=dtype, rows=args.rows,
         seq=args.seq, tokens_per_step=tokens, micro_batch_tokens=max_tokens,
         peak_gib=round(peak, 3), peak_mib_per_token=round(peak * 1024 / tokens, 4),
         step_s=round(step_s, 3), tokens_per_s=round(tokens / step_s, 1),
         mfu=round(flops / step_s / peak_flops, 4) if peak_flops else None,
         setup_s=round(setup_s, 1), grad_norm=metrics["rl/grad_norm"],
         loss=metrics["rl/loss"])
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["auto", "qwen2.5-1.5b", "toy"], default="auto",
                        help="auto: qwen2.5-1.5b with CUDA, toy without")
    parser.add_argument("--seq", type=int, help="tokens per row (default 4096; toy 256)")
    parser.add_argument("--prompt", type=int, help="prompt tokens per row (default seq/16)")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=2,
                        help="the token budget is rows * seq / this")
    parser.add_argument("--chunk", type=int, help="logprob_chunk_tokens (default 1024; toy 64)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--port", type=int, default=29517)
    args = parser.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    size = args.size if args.size != "auto" else ("qwen2.5-1.5b" if cuda else "toy")
    args.seq = args.seq or (4096 if size != "toy" else 256)
    args.prompt = args.prompt or args.seq // 16
    args.chunk = args.chunk or (1024 if size != "toy" else 64)
    dtype = "bfloat16" if cuda else "float32"
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    mem = Memory()
    with tempfile.TemporaryDirectory(prefix="braid-gpu-check-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        model_dir = build_model(size, work / "model", dtype)
        emit(check="build", ok=True, size=size, dtype=dtype,
             seconds=round(time.perf_counter() - t0, 1), torch=torch.__version__,
             cuda=torch.version.cuda, gpus=torch.cuda.device_count())
        results = [check_logprobs(model_dir, dtype, args, mem),
                   check_learner(model_dir, work, dtype, args, mem)]
    emit(check="all", ok=all(results))
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
