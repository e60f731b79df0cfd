"""The data that moves between roles. Plain dataclasses of lists: they pickle into Ray's object
store and pass between actors as refs; the controller reads only the small fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def resolve_refs(x: Any) -> Any:
    """Fetch Ray object refs (a list of them) when running under Ray; pass values through, so
    workers run the same in a plain process."""
    if isinstance(x, list) and x and type(x[0]).__name__ == "ObjectRef":
        import ray

        return ray.get(x)
    return x


@dataclass
class Rollouts:
    """n samples per prompt, grouped: sample i belongs to prompt ``prompt_index[i]``."""

    prompt_index: list[int]          # index into the step's prompt list
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    logprobs: list[list[float]]      # behaviour log-probs of each completion token
    texts: list[str]
    finish_reasons: list[str]
    weight_version: int = 0          # the oldest weights any token came from
    # per sample: the weight versions of its first and last token (they differ when an
    # asynchronous engine took new weights while it ran); empty: all at weight_version
    versions: list[tuple[int, int]] = field(default_factory=list)
    # Trajectories (workers/agent: several turns with an environment), per sample; all empty
    # for single-turn samples, which are one sampled turn, all of it trained on, status "ok".
    # ``completion_ids`` is then everything after the prompt: the sampled turns and the
    # environment's answers between them, rendered by the chat template.
    loss_mask: list[list[int]] = field(default_factory=list)  # per completion token: 1 sampled
    turns: list[list[tuple[int, int]]] = field(default_factory=list)  # sampled spans [a, b)
    status: list[str] = field(default_factory=list)  # ok | truncated | env_error
    env_rewards: list[float | None] = field(default_factory=list)  # None: env_error
    env_info: list[dict] = field(default_factory=list)  # reward components, tool counts, ...
    # thinking_history strip: the prompt each turn was sampled from (the first is prompt_ids);
    # the turns then cover completion_ids back to back, each trained as a sample of its own
    turn_prompts: list[list[list[int]]] = field(default_factory=list)

    FIELDS = ("prompt_index", "prompt_ids", "completion_ids", "logprobs", "texts",
              "finish_reasons")
    TRAJECTORY = {"loss_mask": list, "turns": list, "status": lambda: "ok",
                  "env_rewards": lambda: 0.0, "env_info": dict, "turn_prompts": list}

    def __len__(self) -> int:
        return len(self.completion_ids)

    def __setstate__(self, state: dict) -> None:  # pickled before these fields existed
        self.__dict__.update({"versions": []} | {k: [] for k in self.TRAJECTORY} | state)

    @property
    def multi_turn(self) -> bool:
        return bool(self.loss_mask)

    def mask(self, i: int) -> list[int] | None:
        """Sample i's loss mask (None: every completion token is trained on)."""
        return (self.loss_mask[i] or None) if self.loss_mask else None

    def segments(self, i: int) -> list[tuple[list[int], int, int]]:
        """Sample i as the sequences a model reads: (prompt ids, start, end) of its completion.
        One, unless its turns were each sampled from a prompt of their own (step-wise)."""
        prompts = self.turn_prompts[i] if self.turn_prompts else None
        if not prompts:
            return [(self.prompt_ids[i], 0, len(self.completion_ids[i]))]
        return [(p, a, b) for p, (a, b) in zip(prompts, self.turns[i])]

    def _trajectory(self, name: str) -> list:
        """A trajectory field with one entry per sample (defaults for single-turn samples)."""
        return getattr(self, name) or [self.TRAJECTORY[name]() for _ in range(len(self))]

    @classmethod
    def gather(cls, x) -> Rollouts:
        """One Rollouts from a Rollouts, a list of them, or a list of Ray refs to them."""
        return x if isinstance(x, cls) else cls.concat(resolve_refs(x))

    def shard(self, k: int, of: int) -> tuple[Rollouts, int]:
        """The k-th of ``of`` contiguous slices, and the index of its first sample (reward
        replicas each score one slice of a step's rollouts)."""
        per = -(-len(self) // of) if of > 1 else len(self)
        lo, hi = min(k * per, len(self)), min((k + 1) * per, len(self))
        if (lo, hi) == (0, len(self)):
            return self, 0
        return Rollouts(*(getattr(self, f)[lo:hi] for f in self.FIELDS), self.weight_version,
                        self.versions[lo:hi],
                        **{k: getattr(self, k)[lo:hi] for k in self.TRAJECTORY}), lo

    @classmethod
    def concat(cls, parts: list[Rollouts]) -> Rollouts:
        if len(parts) == 1:
            return parts[0]
        out = cls([], [], [], [], [], [], min(p.weight_version for p in parts))
        for p in parts:
            for name in cls.FIELDS:
                getattr(out, name).extend(getattr(p, name))
            out.versions.extend(p.versions or [(p.weight_version,) * 2] * len(p))
        if any(p.multi_turn for p in parts):
            for name in cls.TRAJECTORY:
                setattr(out, name, [x for p in parts for x in p._trajectory(name)])
        return out


def summary(r: Rollouts) -> dict:
    """What the controller reads of a generation's rollouts (the rollouts stay refs)."""
    out = {"prompt_index": r.prompt_index, "lengths": [len(c) for c in r.completion_ids],
           "truncated": [f == "length" for f in r.finish_reasons], "texts": r.texts,
           "weight_version": r.weight_version,
           "spanning": sum(first != last for first, last in r.versions)}
    if r.multi_turn:
        out["lengths"] = [sum(m) for m in r.loss_mask]  # the policy's own tokens
        out["masks"] = r.loss_mask  # GAE runs over the policy's tokens alone
        # what tells trajectories apart (RFT keeps distinct ones): all their turns, not the last
        out["keys"] = [hash(tuple(c)) for c in r.completion_ids]
        out["truncated"] = [s == "truncated" for s in r.status]
        counts: dict[str, float] = {f"status_{s}": 0.0 for s in ("ok", "truncated", "env_error")}
        for status, info in zip(r.status, r.env_info):
            counts[f"status_{status}"] = counts.get(f"status_{status}", 0.0) + 1
            for k, v in info.items():
                if isinstance(v, float):
                    counts[k] = counts.get(k, 0.0) + v
        out["agent"] = counts | {"samples": float(len(r))}
    return out


@dataclass
class Scores:
    rewards: list[float | None]                            # None: could not be scored
    per_verifier: dict[str, list[float | None]] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)  # verifier -> failed samples
    failed_ids: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)    # verifier -> its first failure

    @classmethod
    def concat(cls, parts: list[Scores]) -> Scores:
        out = cls(rewards=[])
        for p in parts:
            n_before = len(out.rewards)
            out.rewards.extend(p.rewards)
            for k in set(out.per_verifier) | set(p.per_verifier):
                cur = out.per_verifier.setdefault(k, [None] * n_before)
                cur.extend(p.per_verifier.get(k, [None] * len(p.rewards)))
            for k, v in p.failures.items():
                out.failures[k] = out.failures.get(k, 0) + v
            out.failed_ids.extend(p.failed_ids)
            for k, v in p.errors.items():
                out.errors.setdefault(k, v)
        return out

