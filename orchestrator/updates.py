"""Turning a schedule's update ops into the learner's loss terms.

The controller calls ``learner_terms(controller, op, batch, gen)``; the learner then runs one
optimizer step over the terms (``workers/learner/deepspeed.py: update``). Rollouts stay Ray
refs; only ids, rewards and advantages are computed here.
"""

from __future__ import annotations

from orchestrator.advantages import advantages, estimator, gae
from orchestrator.prompts import answer_text
from orchestrator.schedules import MixedUpdate, RLUpdate, SFTUpdate
from workers.learner.terms import SFT, OffPolicyPG, PolicyGradient, SampleSFT, Term, Value


def tokenize_demos(prompts, records: list[dict]) -> tuple[list, list, list | None]:
    """Prompt ids (formatted as the engines see them), demonstration ids (ending the turn) and
    their loss masks (None when every demonstration is one turn, trained on whole)."""
    demos = [prompts.demonstration(r) for r in records]
    masks = [m for _, m in demos]
    return ([prompts.prompt_ids(r) for r in records], [ids for ids, _ in demos],
            masks if any(m is not None for m in masks) else None)


def sft_term(c, op: SFTUpdate, batch: list[dict], peek: bool = False,
             gen: dict | None = None) -> Term | None:
    if op.source == "samples":
        return samples_term(op, batch, gen)
    if op.source != "demos":
        raise ValueError(f"SFTUpdate.source is 'demos' or 'samples', not {op.source!r}")
    ids = op.ids if op.ids is not None else [r["id"] for r in batch]
    recs = c.demos.take(ids, peek=peek)
    if not recs:
        return None
    prompts, completions, masks = tokenize_demos(c.prompts, recs)
    return SFT(prompts=prompts, completions=completions, masks=masks, coef=op.coef,
               token_weight=op.token_weight, entropy=op.entropy)


def samples_term(op: SFTUpdate, batch: list[dict], gen: dict | None) -> SampleSFT | None:
    """Rejection-sampling fine-tuning: an SFT term on this step's own samples that scored at
    least ``op.threshold`` — the first ``op.per_prompt`` distinct texts of each prompt (of
    ``op.ids``), non-empty (a trajectory: distinct in any turn, ``gen["keys"]``); the rollouts
    stay refs."""
    if gen is None:
        raise RuntimeError("an SFTUpdate on the policy's samples needs this step's rollouts: "
                           "wants_rollouts() returned False")
    wanted = None if op.ids is None else set(op.ids)
    kept: dict[int, set] = {}
    rows = []
    keys = gen.get("keys") or gen["texts"]
    for i, (p, r) in enumerate(zip(gen["prompt_index"], gen["scores"].rewards)):
        if r is None or r < op.threshold or not gen["lengths"][i] or \
                (wanted is not None and batch[p]["id"] not in wanted):
            continue
        texts = kept.setdefault(p, set())
        if keys[i] not in texts and len(texts) < op.per_prompt:
            texts.add(keys[i])
            rows.append(i)
    if not rows:
        return None
    return SampleSFT(rollouts=gen["refs"], select=rows, coef=op.coef,
                     token_weight=op.token_weight, entropy=op.entropy)


def rl_terms(c, op: RLUpdate, batch: list[dict], gen: dict, step: int) -> list[Term]:
    if gen is None:
        raise RuntimeError(f"step {step}: the schedule asked for an RL update but "
                           "wants_rollouts() returned False")
    index = gen["prompt_index"]
    wanted = None if op.ids is None else set(op.ids)
    drop = c.recipe.scoring.unscored == "drop"
    raw = gen["scores"].rewards
    train = gen.get("train_prompts")  # DAPO's dynamic sampling: the groups with signal
    rows = [i for i, p in enumerate(index) if (wanted is None or batch[p]["id"] in wanted)
            and not (drop and raw[i] is None) and (train is None or p in train)]
    if not rows:
        return []
    rewards = [raw[i] if raw[i] is not None else 0.0 for i in rows]
    groups = [index[i] for i in rows]
    lengths = [gen["lengths"][i] for i in rows]
    algo = c.recipe.algorithm
    if op.demos_in_group and algo.advantage == "gae":
        raise ValueError("algorithm.advantage gae has no values for demonstrations in the "
                         "group (LUFFY): use a group-baseline estimator such as grpo")
    demo_recs, demo_ids = [], ([], [], None)
    if op.demos_in_group:
        prompts_here = sorted({index[i] for i in rows})
        candidates = c.demos.take([batch[p]["id"] for p in prompts_here], peek=True)
        by_id = {batch[p]["id"]: p for p in prompts_here}
        # scored as the engine's samples are: after the response prefix (added back by the
        # reward worker, as for every rollout); an unscorable one follows scoring.unscored,
        # and only the ones trained on count against data.demo_budget
        scored = c.score_texts(candidates, [c.prompts.strip_prefix(answer_text(r))
                                            for r in candidates])
        usable = [r["id"] for r, s in zip(candidates, scored) if not (drop and s is None)]
        taken = {r["id"] for r in c.demos.take(usable)}
        kept = [k for k, r in enumerate(candidates) if r["id"] in taken]
        demo_recs = [candidates[k] for k in kept]
        demo_ids = tokenize_demos(c.prompts, demo_recs)
        rewards += [scored[k] if scored[k] is not None else 0.0 for k in kept]
        groups += [by_id[r["id"]] for r in demo_recs]
        lengths += [len(ids) if m is None else sum(m)
                    for ids, m in zip(demo_ids[1], demo_ids[2] or [None] * len(demo_ids[1]))]
    select = None if len(rows) == len(index) else rows
    if algo.advantage == "gae":
        adv = gae_terms(c, gen, rows, rewards, select)
    else:
        adv = advantages(estimator(algo.advantage), rewards, groups, lengths, algo,
                         algo.advantage)
    full_adv: list = [0.0] * len(index)
    for k, i in enumerate(rows):
        full_adv[i] = adv[k]
    # LUFFY: one token mean over the policy's samples and the demonstrations
    joint = "luffy" if demo_recs else None
    terms: list[Term] = [PolicyGradient(rollouts=gen["refs"], advantages=full_adv,
                                        ref=c.reference_logprobs(gen), select=select,
                                        coef=op.coef, joint=joint)]
    if demo_recs:
        terms.append(OffPolicyPG(prompts=demo_ids[0], completions=demo_ids[1],
                                 masks=demo_ids[2], advantages=adv[len(rows):], gamma=op.gamma,
                                 coef=op.coef, joint=joint))
    return terms


def gae_terms(c, gen: dict, rows: list[int], rewards: list[float], select) -> list:
    """PPO with a critic: the critic's values of this step's samples, GAE advantages per token
    for the policy, and the critic's own term (its returns) left in ``gen["critic_term"]``."""
    values = c.critic_values(gen)
    masks = [gen["masks"][i] for i in rows] if gen.get("masks") else None
    adv, returns = gae(rewards, [values[i] for i in rows], c.recipe.algorithm, masks)
    full_returns: list = [[] for _ in values]
    for k, i in enumerate(rows):
        full_returns[i] = returns[k]
    gen["critic_term"] = Value(rollouts=gen["refs"], returns=full_returns, old_values=values,
                               select=select)
    return adv


def learner_terms(c, op, batch: list[dict], gen: dict | None, step: int) -> list[Term]:
    parts = op.terms if isinstance(op, MixedUpdate) else (op,)
    terms = []
    for part in parts:
        if isinstance(part, RLUpdate):
            terms += rl_terms(c, part, batch, gen, step)
        elif isinstance(part, SFTUpdate):
            term = sft_term(c, part, batch, gen=gen)
            if term is not None:
                terms.append(term)
        else:
            raise TypeError(f"step {step}: a MixedUpdate holds RLUpdate and SFTUpdate terms, "
                            f"not {part!r}")
    return terms
