"""How much host memory each role of a run will hold — estimated before anything starts, so a
run that cannot fit is said at once instead of being killed by Ray's memory monitor mid-step.

Per replica, from the model's config (its parameters counted on the meta device, no weights
read) and dtype, the learner's ZeRO stage and optimizer, the engine's KV cache and the process
overhead of each kind of actor measured on the development machine (benchmarks/memory.py;
docs/benchmarks.md, "Memory"):

- learner / critic: its ZeRO share of the weights, DeepSpeed's fp32 master copy of them (kept
  even when the model is fp32), the gradients and AdamW's two fp32 moments (stages below 3
  keep whole copies of what they do not partition), a second AdamW state when the schedule
  trains SFT with its own optimizer; whole-model buffers: the weights while loading, the
  weights gathered for forward and backward, and the gradient bucket (DeepSpeed's
  ``reduce_bucket_size``, 5e8 values, filled up to the model's size); one micro-batch's
  activations and its logits over the vocabulary (in fp32, with their log-softmax and
  gradient);
- rollout / teacher: the weights, twice (the checkpoint's pages mapped while loading stay
  counted), vLLM's KV cache (``cpu_kv_cache_gb``; on a GPU it lives in GPU memory), and
  vLLM's own process overhead;
- reference: the weights and one micro-batch's activations and logits (its own micro-batch
  settings); reward: the verifiers' process;
- on a GPU role, the weights and optimizer live in GPU memory: the host holds a loading copy
  of the weights and the overhead.

These are estimates, against what benchmarks/memory.py measured (docs/benchmarks.md, "Memory"):
within 5% for the demo, 10-13% below for the SmolLM2 recipe.
A placement is refused when a node's share exceeds what the node has (Ray's ``memory`` and
``object_store_memory`` resources together: what was available when Ray started on it), and
warned about above 85% of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GB = 2**30
# resident memory of an idle actor of each kind on the development machine, with a tiny
# model (benchmarks/memory.py): Python, torch, transformers, Ray's worker, and for the engine
# vLLM and its engine core; the driver runs the controller
OVERHEAD_GB = {"rollout": 1.0, "teacher": 1.0, "learner": 0.65, "critic": 0.65,
               "reference": 0.6, "reward": 0.25, "driver": 0.75}
REDUCE_BUCKET = 500_000_000  # DeepSpeed ZeRO's default reduce_bucket_size, in values
TIGHT = 0.85
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Estimate:
    role: str
    replicas: int
    gb: float      # per replica
    parts: str     # what it is made of, for the message

    def __str__(self) -> str:
        return f"{self.role} {self.replicas} x {self.gb:.2f} GB ({self.parts})"


def parameters(model_path: str) -> tuple[int, int, int, int]:
    """(parameters, hidden size, layers, vocabulary) of a Hugging Face model folder, counted on
    the meta device from its config (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    hidden = getattr(config, "hidden_size", 0)
    layers = getattr(config, "num_hidden_layers", 0)
    vocab = getattr(config, "vocab_size", 0)
    return sum(p.numel() for p in model.parameters()), hidden, layers, vocab


def spec_parameters(spec) -> tuple[int, int, int, int]:
    """``parameters()`` of a tiny Llama that ``model.build`` will make (its character
    vocabulary is a few dozen tokens; the embeddings are tied)."""
    h, i, n, v = spec.hidden_size, spec.intermediate_size, spec.num_layers, 64
    return v * h + n * (4 * h * h + 3 * h * i + 2 * h) + h, h, n, v


def estimate_roles(recipe, roles: dict, model: tuple[int, int, int, int],
                   others: dict[str, tuple[int, int, int, int]] | None = None
                   ) -> list[Estimate]:
    """Each started role's estimate per replica. ``roles``: role -> (class, validated args);
    ``model``: ``parameters()`` of the policy; ``others``: of a role's own model folder
    (a teacher's)."""
    others = others or {}
    b = DTYPE_BYTES[recipe.model.dtype]
    out = []
    for role, (_, args) in roles.items():
        cfg = getattr(recipe.roles, role)
        params, hidden, layers, vocab = others.get(role, model)
        weights = params * b
        gpu = cfg.resources.num_gpus > 0
        parts = {"process": OVERHEAD_GB.get(role, 0.5) * GB}
        if role in ("learner", "critic"):
            if gpu:
                parts["loading copy"] = weights
            else:
                lora = recipe.model.lora if role == "learner" else None
                stage, n = getattr(args, "zero_stage", 3), cfg.replicas
                if stage is None:  # the learner's default (workers/learner/deepspeed.py)
                    stage = 0 if lora is not None else 3
                # what trains: every weight, or LoRA's adapters — about 19·r·hidden a layer
                # with all-linear on a Llama-shaped model (r·(in+out) per matrix)
                trained = params if lora is None else 19 * lora.rank * hidden * layers + \
                    len(lora.modules_to_save) * vocab * hidden  # (a head or embedding in full)
                optimizers = 2 if _sft_optimizer(recipe) else 1
                # ZeRO stage k partitions over the n ranks: 1 the optimizer state (its fp32
                # master weights and AdamW's two moments), 2 also the gradients, 3 also the
                # weights
                parts["weights"] = weights / (n if stage >= 3 else 1)
                if stage >= 1 or b < 4:  # stage 0 in fp32 steps the model's own weights
                    parts["fp32 master"] = trained * 4 / (n if stage >= 1 else 1)
                parts["grads"] = trained * b / (n if stage >= 2 else 1)
                parts[f"{optimizers} AdamW"] = optimizers * 2 * trained * 4 / (
                    n if stage >= 1 else 1)
                parts["loading copy"] = weights
                if stage >= 3:
                    parts["gathered"] = weights
                parts["grad bucket"] = min(params, REDUCE_BUCKET) * b
                parts["activations"] = _activations(recipe, hidden, layers, b)
                parts["logits"] = 3 * _logits(recipe, vocab)  # with log-softmax and gradient
        elif role in ("rollout", "teacher"):
            parts["weights"] = weights
            if not gpu:
                parts["loading copy"] = weights
                # the engine rounds it to whole GiB, at least 1 (workers/rollout/vllm.py)
                kv = getattr(args, "cpu_kv_cache_gb", None)
                parts["KV cache"] = max(1, int(kv)) * GB if kv is not None else 0.0
        elif role == "reference":
            parts["weights"] = weights
            if not gpu:
                parts["activations"] = _activations(recipe, hidden, layers, b, args)
                parts["logits"] = _logits(recipe, vocab, args)  # no gradient: one copy
        total = sum(parts.values())
        text = ", ".join(f"{k} {v / GB:.2f}" for k, v in parts.items() if v >= 0.005 * GB)
        out.append(Estimate(role, cfg.replicas, total / GB, text))
    return out


def _sft_optimizer(recipe) -> bool:
    """The schedule keeps an SFT optimizer state of its own (ReLIFT's ``sft`` optimizer)."""
    policies = {recipe.schedule.policy} | {
        str(p.get("policy")) for p in recipe.schedule.args.get("phases", [])
        if isinstance(p, dict)}
    return "relift" in policies


def _rows(recipe, args=None) -> int:
    """A micro-batch's rows: the learner's ``algorithm`` settings, or a reference worker's own
    (``args``); a token budget caps rows x tokens."""
    s = args if args is not None and hasattr(args, "micro_batch_size") else recipe.algorithm
    rows = s.micro_batch_size or 16
    budget = getattr(s, "max_tokens_per_micro_batch", None)
    tokens = recipe.sampling.max_tokens + 64
    return max(1, min(rows, budget // tokens)) if budget else rows


def _activations(recipe, hidden: int, layers: int, b: int, args=None) -> float:
    """One micro-batch's activations kept for backward: rows x tokens (a completion and a short
    prompt) x hidden x layers x ~16 values a layer (attention and MLP inputs and outputs), in
    the model's dtype."""
    tokens = recipe.sampling.max_tokens + 64
    return float(_rows(recipe, args) * tokens * hidden * layers * 16 * b)


def _logits(recipe, vocab: int, args=None) -> float:
    """One micro-batch's logits over the vocabulary in fp32, on completion tokens only (the
    projection skips the prompt): rows x completion tokens x vocab x 4 bytes (what a real
    vocabulary of ~50k adds; a character vocabulary, nothing)."""
    return float(_rows(recipe, args) * recipe.sampling.max_tokens * vocab * 4)


def check_placement(estimates: list[Estimate], placed: dict[str, list[str]],
                    nodes: dict[str, float], driver_node: str | None) -> list[str]:
    """Sum the estimates on each node (``placed``: role -> the node of each replica, in rank
    order; ``nodes``: node -> GB it can hold; the driver's own process on ``driver_node``).
    Raises MemoryError naming the roles and numbers of a node that cannot hold its share;
    returns warnings for nodes above 85%."""
    by_role = {e.role: e for e in estimates}
    load: dict[str, list[tuple[str, float]]] = {n: [] for n in nodes}
    for role, where in placed.items():
        for node in where:
            load.setdefault(node, []).append((role, by_role[role].gb))
    if driver_node is not None:
        load.setdefault(driver_node, []).append(("driver", OVERHEAD_GB["driver"]))
    warnings = []
    for node, items in load.items():
        need, have = sum(gb for _, gb in items), nodes.get(node, 0.0)
        counts: dict[str, int] = {}
        for role, _ in items:
            counts[role] = counts.get(role, 0) + 1
        what = "; ".join(f"{r} {k} x {by_role[r].gb:.2f} GB ({by_role[r].parts})"
                         if r in by_role else f"driver {OVERHEAD_GB['driver']} GB"
                         for r, k in counts.items())
        text = (f"node {node[:8]}: the roles placed there need ~{need:.1f} GB and it has "
                f"{have:.1f} GB ({what})")
        if need > have:
            raise MemoryError(text)
        if need > TIGHT * have:
            warnings.append(f"{text}: above {TIGHT:.0%}, Ray's memory monitor may kill "
                            "actors if anything else grows")
    return warnings


def summary(estimates: list[Estimate]) -> str:
    """One line for `braid validate` and set-up."""
    total = sum(e.gb * e.replicas for e in estimates) + OVERHEAD_GB["driver"]
    return (f"memory (estimated, host): {'; '.join(str(e) for e in estimates)}; driver "
            f"{OVERHEAD_GB['driver']} GB; ~{total:.1f} GB in all")


def model_path(recipe) -> str | None:
    path = Path(recipe.model.path)
    return str(path) if (path / "config.json").is_file() else None
