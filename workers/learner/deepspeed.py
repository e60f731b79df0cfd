"""Learner rank: DeepSpeed ZeRO-3 data parallel over its own torch.distributed world.

NCCL on GPUs, gloo with ``DS_ACCELERATOR=cpu`` here — the same class. Each rank receives the
whole step batch (Ray object-store refs, zero-copy on a node), takes its share of rows
(balanced by token count, ``packing.balance``) and splits them into micro-batches under a row
cap and a token budget; each micro-batch is one padding-free packed sequence, and the
vocabulary projection runs chunk by chunk on completion tokens only (``policy.TokenLogprobs``).
The loss of every micro-batch is normalised by the *global* token (or sequence) count and
scaled by world_size, because ZeRO averages gradients across ranks; so any micro-batch split,
row assignment and world size give the same update as one large batch
(tests/integration/test_learner_ray.py checks it). All ranks run the same number of forward
passes — ZeRO-3 gathers parameters collectively inside each one — filling with zero-weight rows.
"""

from __future__ import annotations

import os
from collections import defaultdict

from pydantic import BaseModel, ConfigDict, Field

from workers.base import LearnerWorker
from workers.learner.checkpoint import LearnerCheckpoint
from workers.learner.schedule import lr_factor, mini_batches
from workers.learner.terms import Rows, Term
from workers.learner.weights import WeightPublisher
from workers.types import Rollouts


def peak_memory_gib() -> float:
    """This rank's peak memory since it started (set-up included): the CUDA allocator's on GPU,
    the process's RSS on CPU."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class DeepSpeedLearner(LearnerCheckpoint, LearnerWorker):
    """The model comes from a builder (``adapters.builder``: every weight trained, or LoRA
    adapters on a frozen base) and its weights leave through an exporter (``weights``: every
    weight, the adapters alone, or merged) — chosen by the recipe, not by subclassing."""

    class Args(BaseModel):
        model_config = ConfigDict(extra="forbid")
        zero_stage: int | None = Field(
            None, ge=0, le=3, description="None: 3 (weights, gradients and optimizer states "
            "sharded); 0 with model.lora — the frozen base is replicated, which saves the "
            "gathers of every forward, and the adapters' optimizer states are small")
        backend: str = Field("auto", description="auto: nccl with CUDA, else gloo")
        threads: int | None = Field(None, description="torch threads (default: role num_cpus)")
        gradient_checkpointing: bool | None = Field(
            None, description="recompute each layer's activations in backward; None: on with "
                              "CUDA, off on CPU (small models, where compute is scarcer)")
        logprob_chunk_tokens: int | None = Field(
            1024, gt=0, description="tokens per pass through the vocabulary projection and "
                                    "fp32 log-softmax (null: all at once)")
        attn_implementation: str | None = Field(
            None, description="transformers attention; None: flash_attention_2 on CUDA in "
                              "bf16/fp16 when flash-attn is installed, else braid_varlen_sdpa")

    # --- lifecycle -------------------------------------------------------------------------
    def master_address(self) -> tuple[str, int]:
        from core.weight_sync import free_port, node_ip

        return node_ip(), free_port()

    @property
    def zero_stage(self) -> int:
        stage = self.args.zero_stage
        if stage is None:
            stage = 0 if self.builder.lora is not None else 3
        return stage

    def setup(self, master_addr: str = "127.0.0.1", master_port: int = 29500, **_) -> None:
        import torch

        from workers.learner.adapters import builder

        self.builder = self.model_builder(builder)

        cuda = torch.cuda.is_available()
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
                          RANK=str(self.ctx.rank), WORLD_SIZE=str(self.ctx.world_size),
                          LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        if cuda:  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU: it is device 0 here
            torch.cuda.set_device(0)
        self.set_threads(self.args.threads)
        # Import order matters: zero.Init patches tensor constructors, and building a model
        # inside it fails with "Signature mismatch ... new_tensor" unless these come first.
        import deepspeed
        import torch._dynamo  # noqa: F401
        from transformers import AutoTokenizer
        from transformers.integrations import HfDeepSpeedConfig

        from workers.learner import losses
        from workers.learner.policy import attn_implementation

        backend = self.args.backend if self.args.backend != "auto" else ("nccl" if cuda else "gloo")
        # DeepSpeed's CPU backend JIT-builds a shared-memory all-reduce on first use (~1 min of
        # both cores on a fresh machine, every first run); it serves only inference tensor
        # parallelism (inference_all_reduce), which a learner never calls
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend=backend)
        torch.manual_seed(self.recipe.seed)
        algo, model_cfg = self.recipe.algorithm, self.recipe.model
        self.ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            # braid owns accumulation: any number of backward() calls, then one step()
            "managed_gradient_accumulation": False,
            "gradient_clipping": algo.grad_clip,
            "zero_optimization": {"stage": self.zero_stage},
            "bf16": {"enabled": model_cfg.dtype == "bfloat16"},
            "fp16": {"enabled": model_cfg.dtype == "float16"},
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        # Kept alive so from_pretrained builds the model partitioned (zero.Init).
        self._hf_ds = HfDeepSpeedConfig(self.ds_config) if self.zero_stage == 3 else None
        dtype = getattr(torch, model_cfg.dtype)
        lm = self.model_class().from_pretrained(
            self.model_path(), dtype=dtype,
            attn_implementation=attn_implementation(self.args.attn_implementation, dtype),
            **self.model_kwargs())
        lm.config.use_cache = False
        ckpt = self.args.gradient_checkpointing
        if ckpt or (ckpt is None and cuda):
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.lm = lm = self.builder.build(lm)
        model = self.wrap(lm)
        optimizer = torch.optim.AdamW(self.builder.trainable(model), lr=self.base_lr(),
                                      weight_decay=algo.weight_decay)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config)
        # Drop it once the model is partitioned: while it lives, every from_pretrained in this
        # process (e.g. save_hf on rank 0 alone) would build under zero.Init and wait forever
        # for the other ranks.
        self._hf_ds = None
        tok = AutoTokenizer.from_pretrained(self.model_path())
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.policy_loss = losses.policy_loss(algo.policy_loss)
        self.named = dict(self.engine.module.named_parameters())
        self.weights = self._publisher()
        self.steps = 0
        self._opt_states: dict[str, dict] = {"main": self._torch_optimizer().state}
        self._step_counts: dict[str, int] = {}

    # What the critic (workers/learner/critic.py) changes: the model and its learning rate.
    def model_builder(self, default):
        """The model builder: the recipe's (``model.lora``) for the policy."""
        return default(self.recipe)

    def model_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def model_path(self) -> str:
        return self.recipe.model.path

    def model_kwargs(self) -> dict:
        return {}

    def wrap(self, lm):
        from workers.learner.policy import TokenLogprobs

        return TokenLogprobs(lm, self.args.logprob_chunk_tokens)

    def base_lr(self, terms: list[Term] | None = None) -> float:
        """The learning rate before the schedule: ``algorithm.sft_lr`` for an update of SFT
        terms alone (when set), else ``algorithm.lr``."""
        algo = self.recipe.algorithm
        if terms and all(t.update_name == "sft" for t in terms):
            return algo.sft_lr or algo.lr
        return algo.lr

    # --- weights leaving ---------------------------------------------------------------------
    def weight_manifest(self, bucket_bytes: int) -> dict:
        return self.weights.manifest_dict(bucket_bytes)

    def init_weight_sync(self, host: str, port: int, world_size: int, manifest: dict,
                         backend: str) -> None:
        self.weights.init_sync(host, port, world_size, manifest, backend)

    def push_weights(self, version: int) -> dict:
        return self.weights.push(version)

    def full_state_dict(self) -> dict | None:
        """The model's full weights (adapters merged in) on rank 0, None elsewhere; every rank
        must call it."""
        export = self.weights if self.weights.exporter.kind == "full" else \
            self._publisher("merged")
        return export.state_dict()

    def _publisher(self, sync: str | None = None) -> WeightPublisher:
        """The learner's weights as the exporter for ``sync`` makes them (default: what the
        engines get)."""
        return WeightPublisher(self.builder.exporter(self.named, sync), self.named,
                               self.ctx.rank, self.zero_stage == 3,
                               self.recipe.weight_sync.timeout_s)

    def save_hf(self, path: str) -> str | None:
        """Write a Hugging Face folder of the current policy (adapters merged; rank 0
        writes)."""
        state = self.full_state_dict()
        if self.ctx.rank != 0:
            return None
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_config(self.lm.config)
        result = model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        if result.unexpected_keys or set(result.missing_keys) - tied:
            raise RuntimeError(f"save_hf: state does not match the model: missing "
                               f"{result.missing_keys}, unexpected {result.unexpected_keys}")
        model.save_pretrained(path)
        AutoTokenizer.from_pretrained(self.recipe.model.path).save_pretrained(path)
        return path

    def save_adapter(self, path: str) -> str | None:
        """Write the LoRA adapters as a peft folder (rank 0 writes); every rank must call it."""
        if self.builder.lora is None:
            raise ValueError("save_adapter: the learner trains every weight (no model.lora)")
        state = self._publisher("adapter").state_dict()
        if self.ctx.rank != 0:
            return None
        self.builder.save_adapter(state, path)
        return path

    # --- per-token outputs ----------------------------------------------------------------------
    def reference_logprobs(self, rollouts, temperature: float | None = None) -> list | None:
        """The reference's log-probs of every completion token (as ``HFReference.logprobs``),
        computed by this model with its LoRA adapters disabled: the reference for free. Every
        rank must be called; rank 0 returns every row, the others None."""
        t = temperature or self.recipe.sampling.temperature or 1.0
        with self.builder.reference():
            return self._per_token(rollouts, lambda batch: self.engine(batch, t)[0])

    def _per_token(self, rollouts, forward) -> list[list[float]] | None:
        """``forward``'s per-completion-token output for every sample of the rollouts (a
        Rollouts, or refs to its parts), without gradients. Each rank computes its share of
        rows (ZeRO-3 gathers parameters collectively, so every rank runs as many passes);
        rank 0 returns every row, the others None."""
        import torch
        import torch.distributed as dist

        from workers.learner.packing import pack, plan, unpack

        # a rank that cannot fetch them fails every rank now, not in a collective below
        r = self._on_every_rank(lambda: Rollouts.gather(rollouts))
        algo = self.recipe.algorithm
        # the sequences read: a sample, or each turn of a step-wise trajectory
        seqs = [(i, p, r.completion_ids[i][a:b]) for i in range(len(r))
                for p, a, b in r.segments(i)]
        lengths = [len(p) + len(c) for _, p, c in seqs]
        plans = plan(lengths, self.ctx.world_size, algo.max_tokens_per_micro_batch,
                     algo.micro_batch_size)
        mine: dict[int, list[float]] = {}
        self.engine.eval()
        with torch.no_grad():
            for rows in plans[self.ctx.rank]:  # [] pads this rank to the others' count
                batch = pack([seqs[k][1] for k in rows], [seqs[k][2] for k in rows],
                             self.pad_id).to(self.engine.device)
                out = forward(batch)
                if rows:
                    for k, vals in zip(rows, unpack(out.float().cpu(), batch, len(rows))):
                        mine[k] = vals
        parts: list = [None] * self.ctx.world_size
        dist.all_gather_object(parts, mine)
        if self.ctx.rank != 0:
            return None  # rank 0 returns every row; the others' copies would only travel
        got: dict[int, list[float]] = {k: vals for part in parts for k, vals in part.items()}
        out: list[list[float]] = [[] for _ in range(len(r))]
        for k, (i, _, _) in enumerate(seqs):
            out[i] += got[k]
        return out

    # --- training --------------------------------------------------------------------------
    # A step is a list of loss terms (workers/learner/terms.py: policy gradient, LUFFY's
    # off-policy term, SFT on demonstrations or on accepted samples, the critic's value loss),
    # each over its own rows and normalised over its own global token count, weighted by its
    # coef, summed into one optimizer step. ``optimizer`` names an optimizer state: each name
    # keeps its own Adam moments over the same parameters (ReLIFT's separate SFT optimizer).
    # ``probe=True`` computes the gradient norm of the terms without changing weights or any
    # named state (SASR's signal).

    def update(self, terms: list[Term], optimizer: str = "main", lr: float | None = None,
               probe: bool = False, step: int | None = None) -> dict:
        """One update over the terms: ``algorithm.ppo_epochs`` passes over their rows, each in
        ``algorithm.ppo_mini_batches`` optimizer steps (one step with the defaults); the
        learning rate follows ``algorithm.lr_schedule`` at the run's ``step``."""
        import torch
        import torch.distributed as dist

        algo = self.recipe.algorithm
        if lr is None:
            lr = self.base_lr(terms) * lr_factor(
                algo, step if step is not None else self.steps + 1, self.recipe.steps)
        terms = self._fetched(terms)  # refs fetched once, not per mini-batch
        ppo = not probe and any(t.ppo for t in terms)
        steps = mini_batches(terms, algo.ppo_mini_batches, algo.ppo_epochs,
                             (self.recipe.seed, self.steps)) if ppo else [terms]
        if len(steps) > 1:
            self._check_behaviour_logprobs(terms)
        inner = self._torch_optimizer()
        # A probe steps with lr 0 and no weight decay on scratch moments: it leaves no trace.
        inner.state = defaultdict(dict) if probe else \
            self._opt_states.setdefault(optimizer, defaultdict(dict))
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0 if probe else lr
            group["weight_decay"] = 0.0 if probe else algo.weight_decay
        self.engine.train()
        metrics: dict[str, float] = defaultdict(float)
        calls: dict[str, int] = defaultdict(int)  # optimizer steps each term took part in
        norms = []
        try:
            for step_terms in steps:
                rows = [t.rows() for t in step_terms]
                for term, r, total in zip(step_terms, rows, self._totals(step_terms, rows)):
                    for k, v in self._backward_term(term, r, *total).items():
                        metrics[k] += v
                        calls[k.split("/")[0]] += k.endswith("/loss")
                self.engine.step()
                norms.append(float(self.engine.get_global_grad_norm() or 0.0))
        finally:
            inner.state = self._opt_states["main"]  # what DeepSpeed sees between updates
        if probe:
            return {"probe/grad_norm": norms[0]}
        self.steps += 1
        keys = sorted(metrics)
        vals = torch.tensor([metrics[k] for k in keys], dtype=torch.float64,
                            device=self.engine.device)
        dist.all_reduce(vals)
        out = dict(zip(keys, vals.tolist()))
        for prefix in {k.split("/")[0] for k in keys}:
            tokens = max(out.get(f"{prefix}/tokens", 0.0), 1.0)
            for k in [k for k in out if k.startswith(f"{prefix}/")]:
                if k.split("/", 1)[1] not in ("loss", "tokens"):
                    out[k] /= tokens  # token means
            out[f"{prefix}/loss"] /= max(calls[prefix], 1)  # mean over its optimizer steps
            if len(steps) > 1:
                out[f"{prefix}/tokens"] /= algo.ppo_epochs
        peak = torch.tensor([peak_memory_gib()], dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        kinds = {t.update_name for t in terms}
        kind = kinds.pop() if len(kinds) == 1 else "rl"
        role = self.ctx.role  # the critic's ranks report as critic/..., critic_optimizer/...
        opt = "optimizer" if role == "learner" else f"{role}_optimizer"
        out |= {f"{kind}/grad_norm": sum(norms) / len(norms), f"{kind}/lr": lr,
                f"{role}/peak_mem_gib": float(peak),
                f"{opt}/{optimizer}_steps": float(self._opt_steps(optimizer, len(steps)))}
        if len(steps) > 1:
            out[f"{kind}/optimizer_steps"] = float(len(steps))
        return out

    def _state_keys(self) -> list:
        """The tensors the wrapped optimizer keeps state for, in a stable order. ZeRO-3 steps
        its flat fp32 partitions (and empties param_groups between steps, so the optimizer's
        own state_dict cannot be used for the extra named states)."""
        flat = getattr(self.optimizer, "fp32_partitioned_groups_flat", None)
        if flat is not None:
            return list(flat)
        return [p for g in self._torch_optimizer().param_groups for p in g["params"]]

    def _torch_optimizer(self):
        import torch

        opt = self.optimizer
        while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
            opt = opt.optimizer
        return opt

    def _opt_steps(self, name: str, n: int = 1) -> int:
        self._step_counts[name] = self._step_counts.get(name, 0) + n
        return self._step_counts[name]

    def _fetched(self, terms: list[Term]) -> list[Term]:
        """The terms with their inputs fetched, by every rank before any collective. The ranks
        agree on the outcome first: if Ray lost any rank's inputs, every rank raises
        InputsLost (the driver makes them again and sends the update again); a rank that
        failed otherwise raises its error and the others say so — none is left waiting in the
        update's first collective for a rank that is gone."""
        return self._on_every_rank(lambda: [t.resolved() for t in terms])

    def _on_every_rank(self, fetch):
        """``fetch()`` on every rank, the ranks agreeing on the outcome (as ``_fetched``)."""
        import torch
        import torch.distributed as dist

        from core.errors import InputsLost

        out, failed, code = None, None, 0.0
        try:
            out = fetch()
        except Exception as err:  # noqa: BLE001 (every rank hears of it below)
            failed = err
            names = {c.__name__ for c in type(err).__mro__}
            code = 1.0 if names & {"ObjectLostError", "RayActorError"} else 2.0
        worst = torch.tensor([code], dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        if worst.item() == 1.0:
            raise InputsLost(f"rank {self.ctx.rank}: " + (
                f"{type(failed).__name__}: {str(failed).splitlines()[0] if str(failed) else ''}"
                if failed is not None else "another rank's inputs were lost"))
        if worst.item() == 2.0:
            if failed is not None:
                raise failed
            raise RuntimeError("another rank could not fetch its inputs (its error says why)")
        return out

    @staticmethod
    def _check_behaviour_logprobs(terms: list[Term]) -> None:
        """Several optimizer steps need the behaviour log-probs of every sampled token: a row
        without them would count as on-policy (ratio 1, never clipped) at every step."""
        for term in terms:
            rows = term.rows()
            old = rows.inputs.get("old_logprobs")
            missing = sum(1 for c, lp in zip(rows.completions, old or []) if c and not lp)
            if missing:
                raise ValueError(
                    f"ppo_mini_batches x ppo_epochs > 1 needs the engine's log-probs of "
                    f"every sampled token; {missing} rows have none (greedy sampling, "
                    f"min_tokens, or rollouts built without log-probs)")

    @staticmethod
    def _totals(terms: list[Term], rows: list[Rows]) -> list[tuple[float, float]]:
        """Each term's global normaliser: its completion tokens that count (loss mask 1) and
        its sequences with any — summed over the terms that share its ``joint`` key."""
        own = []
        for r in rows:
            counts = r.counts()
            own.append((sum(counts), float(sum(1 for k in counts if k))))
        joint: dict = defaultdict(lambda: [0.0, 0.0])
        for term, (tokens, seqs) in zip(terms, own):
            if term.joint is not None:
                joint[term.joint][0] += tokens
                joint[term.joint][1] += seqs
        return [tuple(joint[t.joint]) if t.joint is not None else o
                for t, o in zip(terms, own)]

    def _n_chunks(self, plans: list, completions: list) -> list:
        """Vocabulary-projection chunks of each micro-batch, the most any rank needs: ZeRO-3
        gathers the head's weight in each pass through it, so all ranks run as many."""
        return [max(self.engine.module.chunks_for(sum(len(completions[i]) for i in mbs[m]))
                    for mbs in plans) for m in range(len(plans[0]))]

    def _forward(self, term: Term, batch, chunks, temperature: float, entropy: bool):
        """The model's output the term's loss reads (log-probs of the completion tokens) and
        their entropies."""
        return self.engine(batch, temperature, True, chunks, entropy_grad=entropy)

    def _backward_term(self, term: Term, rows: Rows, total_tokens: float,
                       total_seqs: float) -> dict:
        """One term's backward passes over this rank's share of its ``rows``."""
        from workers.learner import losses
        from workers.learner.packing import pack, plan

        algo = self.recipe.algorithm
        if not len(rows):
            raise ValueError(f"learner {term.name} term got no rows")
        world, device = self.ctx.world_size, self.engine.device
        lengths = [len(p) + len(c) for p, c in zip(rows.prompts, rows.completions)]
        plans = plan(lengths, world, algo.max_tokens_per_micro_batch, algo.micro_batch_size)
        # the policy's samples and LUFFY's demonstrations: log-probs at the sampling
        # temperature, the entropy bonus and loss aggregation of the RL update
        temperature = (self.recipe.sampling.temperature or 1.0) if term.sampled else 1.0
        entropy_coef = term.entropy_coef(algo)
        agg = term.loss_agg(algo)
        norm_tokens = algo.loss_norm_tokens or self.recipe.sampling.max_tokens
        sums: dict[str, float] = defaultdict(float)
        for mine, chunks in zip(plans[self.ctx.rank], self._n_chunks(plans, rows.completions)):
            part = rows.pick(mine)
            batch = pack(part.prompts, part.completions, self.pad_id, masks=part.masks,
                         **part.inputs).to(device)
            # the entropy is always measured (rl/entropy, sft/entropy: a collapse shows there);
            # without a bonus, as a metric: no graph is kept for it
            out, ent = self._forward(term, batch, chunks, temperature, bool(entropy_coef))
            per_token, diag = term.loss(out, batch, self)
            w = batch.weight
            for k, v in diag.items():
                sums[k] += float((v.detach() * w).sum())
            loss = losses.aggregate(per_token, batch, agg, total_tokens, total_seqs,
                                    norm_tokens)
            if entropy_coef:
                loss = loss + losses.entropy_bonus(ent, batch, entropy_coef, total_tokens)
            loss = term.coef * loss * world
            self.engine.backward(loss, scale_wrt_gas=False)
            sums["loss"] += float(loss.detach()) / world
            sums["tokens"] += batch.n_tokens
            if ent is not None:
                sums["entropy"] += float((ent.detach() * w).sum())
        return {f"{term.name}/{k}": v for k, v in sums.items()}
