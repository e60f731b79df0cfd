"""One typed config for a run: the recipe.

A recipe is YAML loaded with OmegaConf (so ``key.sub=value`` overrides and ``${...}``
interpolation work) and validated into the pydantic models below. Every model forbids unknown
keys, so a misspelt field fails with its path. ``load_recipe`` raises ``RecipeError`` whose
message names the field path and what was expected — the CLI prints it without a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.errors import RecipeError, validate_model
from workers.models import TinyModelSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraConfig(_Strict):
    """LoRA adapters on the learner (peft): only the adapters train; the engines receive the
    adapters (``sync: adapter``, vLLM's LoRA support, loaded from memory) or the weights with
    the adapters merged in fp32 (``sync: merged``, for engines or models without LoRA support);
    with ``algorithm.kl`` the reference is the learner with its adapters disabled."""

    rank: int = Field(16, gt=0, description="r, the adapters' rank")
    alpha: float = Field(32.0, gt=0, description="lora_alpha: the update is scaled by alpha/r")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names (e.g. [q_proj, v_proj]) or all-linear (every "
        "linear layer but the output head, peft's meaning)")
    modules_to_save: list[str] = Field(
        default_factory=list, description="modules trained in full beside the adapters (e.g. "
        "[lm_head] where the head is not tied to the embeddings); needs sync: merged")
    sync: Literal["adapter", "merged"] = Field(
        "adapter", description="what the engines receive: the adapter tensors, or the full "
        "weights with the adapters merged (in fp32, module by module)")

    @model_validator(mode="after")
    def _sync_modules(self) -> LoraConfig:
        if self.modules_to_save and self.sync == "adapter":
            raise ValueError("model.lora.modules_to_save trains whole modules, which vLLM's "
                             "LoRA support does not load beside adapters: set model.lora.sync "
                             "to merged")
        return self


class ModelConfig(_Strict):
    path: str = Field(description="Hugging Face model folder the run starts from")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    build: TinyModelSpec | None = Field(
        None, description="build a tiny Llama + character tokenizer at `path` when it is missing")
    lora: LoraConfig | None = Field(
        None, description="train LoRA adapters instead of every weight (None: full fine-tuning)")


class Component(_Strict):
    """Anything named by import path, with keyword arguments for it."""

    cls: str = Field(description="import path, `module:Name`")
    args: dict[str, Any] = Field(default_factory=dict)


class DataConfig(_Strict):
    train: Component
    eval: Component | None = None
    prompts_per_step: int = Field(16, gt=0, description="prompts drawn per step (before n samples)")
    demo_budget: int | None = Field(None, ge=0, description="distinct demonstrations a run may "
                                    "use (None: no limit)")


class Resources(_Strict):
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)


class RoleConfig(_Strict):
    cls: str = Field(description="worker class, `module:Name`, subclass of the role's base class")
    replicas: int = Field(1, ge=1)
    resources: Resources = Field(default_factory=Resources)
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="placement-group strategy for this role's bundles")
    env: dict[str, str] = Field(default_factory=dict, description="environment for the actors")
    args: dict[str, Any] = Field(default_factory=dict, description="validated by the class's Args")


class Roles(_Strict):
    rollout: RoleConfig
    learner: RoleConfig
    reward: RoleConfig
    reference: RoleConfig | None = Field(None, description="needed only when algorithm.kl > 0")
    critic: RoleConfig | None = Field(
        None, description="the value model of PPO (algorithm.advantage: gae): its own ZeRO-3 "
        "group, e.g. workers.learner.critic:DeepSpeedCritic")
    teacher: RoleConfig | None = Field(
        None, description="a rollout class running another model (args.model) that writes "
        "demonstrations for prompts no sample solved; verified by the reward before use")


class TeacherConfig(_Strict):
    samples: int = Field(4, ge=1, description="teacher samples per unsolved prompt")
    max_prompts: int | None = Field(None, gt=0, description="per step (None: all unsolved)")


class PromptConfig(_Strict):
    """How a record becomes prompt token ids — in one place, for the rollout engines, SFT
    demonstrations, the reference, the teacher and eval (orchestrator/prompts.py)."""

    style: Literal["auto", "chat", "plain"] = Field(
        "auto", description="chat: the tokenizer's chat template; plain: the formatted text as "
        "it is (base models); auto: chat when the tokenizer has a chat template")
    template: str = Field("{prompt}", description="format string over the record's fields: "
                          "the user message (chat) or the whole prompt text (plain)")
    system: str | None = Field(None, description="system message (chat)")
    chat_template: str | None = Field(None, description="a Jinja chat template file used instead "
                                      "of the tokenizer's")
    template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra arguments of the chat template, e.g. "
        "{enable_thinking: false}")
    add_generation_prompt: bool = Field(True, description="end with the assistant header (chat)")
    tools: list[str] = Field(
        default_factory=list, description="function tools (import paths) whose JSON schemas "
        "the chat template gets as tools= in every prompt, RL and SFT alike "
        "(docs/environments.md)")
    response_prefix: str = Field("", description="text the response starts with, appended to "
                                 "the prompt (e.g. '<think>\\n'); a demonstration that starts "
                                 "with it has it removed")
    max_prompt_tokens: int | None = Field(
        None, gt=0, description="longer prompts are dropped before a step and counted "
        "(default: the rollout's max_model_len minus sampling.max_tokens)")


class SamplingConfig(_Strict):
    n: int = Field(8, ge=1, description="samples per prompt (the GRPO group size)")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1, description="must be 1 for training (see below); "
                         "eval.top_p may differ")
    max_tokens: int = Field(16, gt=0)
    min_tokens: int = Field(0, ge=0, description="no end-of-sequence or stop token before this "
                            "many tokens (vLLM's min_tokens; its log-probs are then not used: "
                            "the learner's own are the old ones)")
    stop: list[str] = Field(default_factory=list, description="stop strings (kept in the "
                            "completion's tokens, cut from its text)")
    stop_token_ids: list[int] = Field(
        default_factory=list, description="more stop tokens, besides the tokenizer's EOS, the "
        "generation config's and the chat template's end-of-turn token")

    @model_validator(mode="after")
    def _trainable(self) -> SamplingConfig:
        if self.top_p < 1:
            raise ValueError(
                f"top_p = {self.top_p} < 1: vLLM reports the log-probs of the top-p-truncated "
                "distribution it sampled from, the learner recomputes them over the whole "
                "vocabulary (temperature only), so the PPO ratio would not start at 1 and the "
                "clip would act on a mismatch rather than on policy change. Sample with top_p 1 "
                "(eval.top_p may differ)")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens {self.min_tokens} > max_tokens {self.max_tokens}")
        return self


class RolloutConfig(_Strict):
    max_staleness: int = Field(
        0, ge=0, description="k: the engines generate steps t+1..t+k while the learner trains "
        "on step t, so a step trains on rollouts of weights at most k versions old (older ones "
        "are regenerated, and counted); 0: lockstep, every step on the newest weights")


class AlgorithmConfig(_Strict):
    """The RL update: an advantage estimator and a policy loss, each a built-in name or an
    import path (docs/algorithms.md), with the options below."""

    advantage: str = Field(
        "grpo", description="advantage estimator: grpo, drgrpo, rloo, reinforce_pp, "
        "reinforce_pp_baseline, gae (PPO with roles.critic), or `module:function` "
        "(orchestrator/advantages.py)")
    policy_loss: str = Field(
        "ppo_clip", description="per-token policy loss: ppo_clip, gspo (sequence-level ratio), "
        "or `module:function` (workers/learner/losses.py)")
    std_normalize: bool = Field(True, description="grpo: divide group advantages by their std")
    clip: float | None = Field(0.2, ge=0, description="ratio clip, low side (also the high "
                               "side unless clip_high is set); null: no clip (-A * ratio)")
    clip_high: float | None = Field(None, ge=0, description="DAPO's clip-higher")
    dual_clip: float | None = Field(
        None, gt=1, description="dual-clip c (Ye et al. 2020): a negative-advantage token's loss "
        "is at most -A * c; null: off (verl's default is 3)")
    log_ratio_clamp: float | None = Field(
        20.0, gt=0, description="log pi/pi_old clamped to +-this before exp (verl: 20); null: off")
    kl: float = Field(0.0, ge=0, description="k3 KL coefficient to the reference policy")
    kl_clamp: float | None = Field(
        10.0, gt=0, description="per-token k3 KL clamped to at most this (verl: 10); null: off")
    entropy: float = Field(0.0, description="entropy bonus coefficient")
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = Field(
        "token_mean", description="token_mean: every token of the batch weighs the same; "
        "seq_mean_token_mean: each sequence's token mean, averaged over sequences; "
        "seq_mean_token_sum_norm (Dr. GRPO): each sequence's token sum over a constant "
        "loss_norm_tokens, averaged over sequences")
    gamma: float = Field(1.0, ge=0, le=1, description="gae: discount")
    lam: float = Field(0.95, ge=0, le=1, description="gae: lambda")
    gae_whiten: bool = Field(True, description="gae: advantages whitened over the batch's "
                             "tokens (verl)")
    value_clip: float | None = Field(
        0.5, gt=0, description="gae: the critic's value clip around its values before the "
        "update (verl: 0.5); null: no clip")
    critic_warmup: int = Field(0, ge=0, description="gae: RL steps in which only the critic "
                               "trains (the policy waits for useful values)")
    dynamic_sampling: int | None = Field(
        None, ge=1, description="DAPO's dynamic sampling: draw up to this many batches of "
        "data.prompts_per_step prompts in a step until that many groups have rewards that "
        "differ, and train on those groups (the first ones); null: off")
    loss_norm_tokens: int | None = Field(
        None, gt=0, description="the constant of seq_mean_token_sum_norm (default: "
        "sampling.max_tokens)")
    lr: float = Field(1e-5, gt=0)
    sft_lr: float | None = Field(None, gt=0, description="learning rate of SFT steps (default lr)")
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    micro_batch_size: int | None = Field(16, gt=0, description="most rows (prompt + completion) "
                                         "per forward/backward per rank; null: no cap")
    ppo_mini_batches: int = Field(1, ge=1, description="optimizer steps per pass over a step's "
                                  "rows (each on a 1/k part, reshuffled every pass)")
    ppo_epochs: int = Field(1, ge=1, description="passes over a step's rows; after the first "
                            "optimizer step the ratio to vLLM's behaviour log-probs departs "
                            "from 1 and the clip acts")
    lr_warmup_steps: int = Field(0, ge=0, description="linear warm-up over this many run steps")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="after warm-up: decay to lr_min_ratio * lr at the last step")
    lr_min_ratio: float = Field(0.0, ge=0, le=1)
    tis_cap: float | None = Field(
        None, gt=0, description="truncated importance sampling: the ratio is taken to the "
        "learner's own (proximal) log-probs and each token's loss weighted by min(pi_prox / "
        "pi_behaviour, tis_cap) — the correction for stale rollouts (max_staleness > 0) and "
        "engine/learner mismatch; null: the ratio is to vLLM's behaviour log-probs, clipped")
    max_tokens_per_micro_batch: int | None = Field(
        16384, gt=0, description="most tokens per forward/backward per rank (rows are packed "
        "without padding; a longer row goes alone); null: no budget")

    @model_validator(mode="after")
    def _bounded_micro_batches(self) -> AlgorithmConfig:
        if self.clip is None and self.clip_high is not None:
            raise ValueError("clip_high is set but clip is null (no clip): set both or neither")
        if self.micro_batch_size is None and self.max_tokens_per_micro_batch is None:
            raise ValueError("micro_batch_size and max_tokens_per_micro_batch are both null: "
                             "set at least one, or a whole step's batch is one forward pass")
        if self.tis_cap is not None and self.ppo_mini_batches * self.ppo_epochs > 1:
            raise ValueError("tis_cap with ppo_mini_batches x ppo_epochs > 1 needs the "
                             "learner's log-probs from before the update for every row, which "
                             "braid does not compute yet: use one optimizer step per update")
        return self


class ScheduleConfig(_Strict):
    policy: str = Field("rl", description="built-in name (rl, sft, phases) or `module:Name`")
    args: dict[str, Any] = Field(default_factory=dict)


class EvalConfig(_Strict):
    every: int = Field(0, ge=0, description="evaluate every N steps (0: only before and after)")
    max_tokens: int | None = Field(None, gt=0, description="default: sampling.max_tokens")
    bucket_key: str | None = Field(None, description="record field to report accuracy by "
                                    "(and the training rollouts' train/pass@n, train/avg@n)")
    greedy: bool = Field(True, description="greedy accuracy (eval/accuracy)")
    samples: int = Field(0, ge=0, description="k: sampled completions per prompt for avg@k "
                         "(mean accuracy) and pass@k (any correct); 0: none")
    temperature: float | None = Field(None, ge=0, description="of the k samples (default: "
                                      "sampling.temperature)")
    top_p: float | None = Field(None, gt=0, le=1, description="default: sampling.top_p")

    @model_validator(mode="after")
    def _something(self) -> EvalConfig:
        if not self.greedy and not self.samples:
            raise ValueError("eval measures nothing: greedy is false and samples is 0")
        return self


class LoggingConfig(_Strict):
    mlflow_uri: str | None = Field(None, description="default: sqlite store in the run directory")
    experiment: str = "braid"
    console_every: int = Field(1, ge=1)


class CheckpointConfig(_Strict):
    every: int = Field(0, ge=0, description="save every N steps (0: only the final policy)")
    keep_last: int = Field(2, ge=1)


class EnvironmentConfig(_Strict):
    """Multi-turn trajectories (workers/agent): the rollout engines run an environment per
    sample — its turns, tools and rewards — under these budgets (docs/environments.md)."""

    cls: str = Field(description="import path of the environment class, `module:Name` "
                     "(workers.agent.env: reset, step, close)")
    args: dict[str, Any] = Field(default_factory=dict, description="its constructor's arguments")
    max_turns: int = Field(8, ge=1, description="policy turns per trajectory")
    max_tokens_per_turn: int | None = Field(
        None, gt=0, description="tokens one turn may sample (default: sampling.max_tokens); a "
        "turn cut by it ends the trajectory as truncated")
    max_total_tokens: int | None = Field(
        None, gt=0, description="tokens after the prompt, the environment's included (default: "
        "what the engine's max_model_len leaves)")
    max_env_tokens: int | None = Field(
        512, gt=0, description="tokens of one environment message (a tool's output); longer "
        "ones are cut, and the message says so")
    wall_s: float | None = Field(120.0, gt=0, description="wall clock per trajectory; past it "
                                 "the trajectory ends as truncated")
    tool_parser: str | None = Field(
        None, description="vLLM's tool-call parser for the policy's turns (hermes, "
        "llama3_json, ... : vllm/tool_parsers); None: no tool calls are parsed")
    thinking_history: Literal["keep", "strip"] = Field(
        "keep", description="keep: one sequence, every turn as sampled (earlier <think> "
        "blocks included) and the environment's deltas masked; strip: each turn sampled from "
        "the conversation re-rendered by the chat template (which drops earlier <think> "
        "blocks where it does) and trained as a sample of its own, with the trajectory's "
        "advantage (max_total_tokens then counts the sampled tokens)")


class ScoringConfig(_Strict):
    unscored: Literal["zero", "drop"] = Field(
        "zero", description="a sample no verifier could score (None): counts as reward 0, or "
        "is dropped from the RL update (and from its prompt's group baseline)")
    max_unscored_frac: float = Field(
        0.5, ge=0, le=1, description="stop the run when a step has more unscored samples than "
        "this fraction, instead of training on noise (1: never)")


class DeadlineConfig(_Strict):
    """How long the controller waits for a call before treating its actor as hung: killed, then
    replaced with the step's work issued again (rollout, reward, reference, teacher) or, for a
    learner or critic rank, the run stops naming its checkpoint (``auto_resume`` resumes)."""

    floor_s: float = Field(1800.0, gt=0, description="no call gets less than this")
    factor: float = Field(
        5.0, ge=1, description="otherwise a call may take this many times the slowest of the "
        "role's last `window` calls of the same method")
    window: int = Field(20, ge=1)
    calls: dict[str, float] = Field(
        default_factory=dict, description="fixed deadlines in seconds by 'role.method' (e.g. "
        "rollout.generate, learner.update, reward.score) or by role; 0: none")

    @model_validator(mode="after")
    def _known_roles(self) -> DeadlineConfig:
        for key, seconds in self.calls.items():
            if key.split(".")[0] not in Roles.model_fields or seconds < 0:
                raise ValueError(f"calls: {key}: {seconds} — keys are 'role' or 'role.method' "
                                 f"with role one of {', '.join(Roles.model_fields)}, values "
                                 "seconds >= 0 (0: no deadline)")
        return self


class FailuresConfig(_Strict):
    deadline: DeadlineConfig | None = Field(
        default_factory=DeadlineConfig, description="per-call deadlines (null: wait forever)")
    actor_restarts: int = Field(
        3, ge=0, description="per role and run (resumes included): how many times a dead or "
        "hung rollout, reward, reference or teacher actor is replaced (it rejoins the weight "
        "sync and gets the current weights)")
    max_restarts: int | None = Field(
        None, ge=0, description="all roles together, per run: replacements allowed (None: "
        "only the per-role limit)")
    auto_resume: int = Field(
        0, ge=0, description="after a learner rank dies, restart the run from its latest "
        "checkpoint up to this many times (0: stop with a message naming the checkpoint)")


class WeightSyncConfig(_Strict):
    bucket_mb: float = Field(64.0, gt=0, description="bucket size of the bucketed broadcast")
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: float = Field(
        300.0, gt=0, description="a broadcast that waits longer fails (an engine died "
        "mid-sync: the survivors give up and rejoin a new group after this long)")


class RayConfig(_Strict):
    address: str | None = Field(
        None, description="default: RAY_ADDRESS, else a private local cluster")
    num_cpus: int | None = Field(None, description="logical CPUs of a private local cluster")
    autoscaling: bool = Field(
        False, description="the cluster grows on demand (KubeRay enableInTreeAutoscaling): "
        "wait for room rather than refuse a recipe larger than the cluster")
    memory_check: Literal["refuse", "warn", "off"] = Field(
        "refuse", description="a node whose share of the roles' estimated memory "
        "(orchestrator/memory.py) exceeds what it has: refuse the run before any model loads, "
        "only warn (the estimate can be 10-15% low), or do not check")


class Recipe(_Strict):
    name: str
    seed: int = 0
    steps: int = Field(gt=0)
    run_dir: str | None = Field(None, description="default: runs/<name>")
    model: ModelConfig
    data: DataConfig
    roles: Roles
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    weight_sync: WeightSyncConfig = Field(default_factory=WeightSyncConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    failures: FailuresConfig = Field(default_factory=FailuresConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    environment: EnvironmentConfig | None = Field(
        None, description="multi-turn trajectories with an environment (None: one completion "
        "per sample, scored by the reward role's verifiers)")

    def _check_environment(self) -> None:
        if "unscored" not in self.scoring.model_fields_set:
            # an environment's failure is not a wrong answer: out of the group baseline
            self.scoring.unscored = "drop"
        if self.environment.thinking_history == "strip" and self.prompt.style == "plain":
            raise ValueError("environment.thinking_history strip re-renders each turn's prompt "
                             "with the chat template: prompt.style plain has none")

    def _check_lora(self) -> None:
        # an engine keeps one adapter per weight version its requests in flight may use
        need = self.rollout.max_staleness + 1
        got = self.roles.rollout.args.get("max_loras")
        if self.model.lora.sync == "adapter" and got is not None and got < need:
            raise ValueError(f"roles.rollout.args.max_loras={got} is fewer than the adapter "
                             f"versions in flight, rollout.max_staleness + 1 = {need}: a "
                             f"rollout must finish under its own adapter")
        if self.model.lora.sync == "adapter" and \
                self.roles.rollout.args.get("update_mode") == "keep":
            raise ValueError("roles.rollout.args.update_mode keep continues running requests "
                             "under new weights, and a request keeps the LoRA adapter it "
                             "started with: use update_mode wait, or model.lora.sync merged")

    @model_validator(mode="after")
    def _checks(self) -> Recipe:
        if self.run_dir is None:
            self.run_dir = str(Path("runs") / self.name)
        if self.environment is not None:
            self._check_environment()
        if self.algorithm.kl > 0 and self.roles.reference is None and self.model.lora is None:
            raise ValueError("algorithm.kl > 0 needs roles.reference (or model.lora: the "
                             "learner with its adapters disabled is then the reference)")
        if self.model.lora is not None:
            self._check_lora()
        if self.algorithm.advantage == "gae" and self.roles.critic is None:
            raise ValueError("algorithm.advantage gae needs roles.critic (the value model), e.g. "
                             "{cls: workers.learner.critic:DeepSpeedCritic, replicas: 2}")
        a, smp = self.algorithm, self.sampling
        if (self.rollout.max_staleness or a.tis_cap) and (smp.temperature == 0 or
                                                           smp.min_tokens):
            raise ValueError("rollout.max_staleness > 0 and algorithm.tis_cap correct for the "
                             "weights that generated each token with the engine's log-probs, "
                             "which greedy sampling and sampling.min_tokens do not give")
        if a.dynamic_sampling and self.rollout.max_staleness:
            raise ValueError("algorithm.dynamic_sampling draws more prompts when a step's "
                             "groups carry too little signal, which needs the step generated "
                             "now: set rollout.max_staleness to 0")
        if a.ppo_mini_batches * a.ppo_epochs > 1 and (smp.temperature == 0 or smp.min_tokens):
            raise ValueError("algorithm.ppo_mini_batches x ppo_epochs > 1 needs the engine's "
                             "log-probs of the sampled tokens, which greedy sampling and "
                             "sampling.min_tokens do not give")
        return self


def _replace_components(base, child) -> None:
    """A mapping of the child that names a class (``cls``) or a ``policy`` replaces the base's
    mapping wholesale: its ``args`` belong to that class, so merging them would mix two."""
    from omegaconf import DictConfig

    for key in list(child.keys()):
        if key in base and isinstance(child[key], DictConfig) and \
                isinstance(base[key], DictConfig):
            if "cls" in child[key] or "policy" in child[key]:
                base[key] = child[key]
            else:
                _replace_components(base[key], child[key])


def _load_yaml(path: Path, seen: tuple = ()):
    """A recipe file; ``extends: other.yaml`` (relative to it) layers it over another."""
    from omegaconf import OmegaConf

    if path in seen:
        raise RecipeError(f"{path}: 'extends' loops back to itself")
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    cfg = OmegaConf.load(path)
    parent = cfg.pop("extends", None) if hasattr(cfg, "pop") else None
    if parent is None:
        return cfg
    base = _load_yaml((path.parent / str(parent)).resolve(), seen + (path,))
    _replace_components(base, cfg)
    return OmegaConf.merge(base, cfg)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe (and the one it ``extends``), apply ``a.b=c`` overrides, resolve
    ``${...}``, validate."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    try:
        cfg = _load_yaml(path.resolve())
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise RecipeError(f"override {bad[0]!r} is not of the form key.sub=value")
            for o in overrides:
                key, _, value = o.partition("=")
                value = yaml.safe_load(value)
                # a mapping naming a class or a policy replaces the recipe's, as under extends:
                # its args belong to it (schedule={policy: rl} drops relift's buffer_size)
                whole = isinstance(value, dict) and ("cls" in value or "policy" in value)
                # list indices (a.0.b=...) work with update, not with a dotlist merge
                OmegaConf.update(cfg, key.strip(), value, merge=not whole, force_add=True)
        data = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise RecipeError(f"{path}: {str(err).splitlines()[0]}") from None
    except Exception as err:  # yaml.YAMLError and friends
        if isinstance(err, RecipeError):
            raise
        raise RecipeError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of fields, got {type(data).__name__}")
    return validate_model(Recipe, data, "")
