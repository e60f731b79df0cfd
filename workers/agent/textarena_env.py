"""TextArena's single-player text games as braid environments (the ``textarena`` extra).

Why TextArena, of the multi-turn libraries, is in docs/environments.md: it installs under
constraints.txt moving nothing, and its games run in-process, offline, without a server or an
API key. ``TextArenaGames`` is a dataset of games (a record: the game's id, arguments, seed, and
its opening text as the prompt); ``TextArenaEnv`` plays the record's game: each turn's text is the
move, the game's replies come back as a user message, its reward at the end.

The games are played raw: their own messages as they come, not TextArena's LLM observation
wrappers (which repeat the whole history every turn: the conversation already holds it) nor its
action wrapper (which adds brackets to a move without them). Invalid moves follow TextArena: the
first gets a message asking for a valid move, a second in a row ends the game with the game's
own reward for it (``invalid_move`` 1 in the trajectory's info).

TextArena seeds the process-wide ``random`` (``random.seed`` in each game's state); each
game here draws from a state of its own, swapped in around every call into the library, so
trajectories that run together neither disturb each other nor the worker.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from workers.agent.env import Environment, Observation, StepResult, Turn

PLAYER = 0  # the policy: games are single-player


def _textarena():
    try:
        import textarena
    except ImportError:
        raise ImportError("workers.agent.textarena_env needs textarena: pip install "
                          "'braid-rl[textarena]' (make setup installs it)") from None
    return textarena


def check_game(env_id: str) -> None:
    """A ValueError naming the game when TextArena has no such id."""
    from textarena.envs.registration import ENV_REGISTRY

    if env_id not in ENV_REGISTRY:
        import difflib

        near = difflib.get_close_matches(env_id, list(ENV_REGISTRY), n=3)
        raise ValueError(f"textarena has no game {env_id!r}"
                         + (f" (did you mean {', '.join(near)}?)" if near else ""))


class Game:
    """One TextArena game, raw, drawing from a ``random`` state of its own."""

    def __init__(self, env_id: str, env_args: dict, seed: int):
        ta = _textarena()
        check_game(env_id)
        env = ta.make(env_id, **env_args)
        while isinstance(env, ta.Wrapper):  # the raw game (module docstring)
            env = env.env
        self.env, self.env_id, self.rng = env, env_id, None
        try:
            with self.own_random():  # the game's state calls random.seed(seed)
                env.reset(num_players=1, seed=seed)
        except AssertionError as err:  # "The number of players has to be 2"
            raise ValueError(f"{env_id}: braid plays single-player games ({err})") from None
        except LookupError as err:  # Wordle, Hangman, ...: NLTK data fetched on first use
            first = str(err).strip().splitlines()[1:2] or [str(err)]
            raise ValueError(f"{env_id} needs NLTK data this machine does not have "
                             f"({first[0].strip()})") from None

    @contextlib.contextmanager
    def own_random(self):
        outer = random.getstate()
        if self.rng is not None:
            random.setstate(self.rng)
        try:
            yield
        finally:
            self.rng = random.getstate()
            random.setstate(outer)

    def messages(self) -> str:
        """What the game said since the last call (the player's own moves left out)."""
        _, obs = self.env.get_observation()
        return "\n".join(text for sender, text, _ in obs if sender != PLAYER)

    def move(self, text: str) -> tuple[bool, str]:
        with self.own_random():
            done, _ = self.env.step(text)
        return done, self.messages()

    def close(self) -> tuple[float | None, dict]:
        """The player's reward (None before the game ended) and TextArena's game info."""
        rewards, info = self.env.close()
        return (rewards or {}).get(PLAYER), info[PLAYER]


class TextArenaEnv(Environment):
    """Plays the record's game (``env_id``, ``env_args``, ``game_seed``: a ``TextArenaGames``
    record), or — for records without them — the game named here, seeded by the trajectory.

    ``system``: a system message before the game's opening, which is then the user message;
    without it, the record's prompt as the recipe formats it, which must be the game's opening
    (a ``TextArenaGames`` record's is).
    """

    def __init__(self, env_id: str | None = None, env_args: dict | None = None,
                 system: str | None = None):
        _textarena()
        if env_id is not None:
            check_game(env_id)
        self.env_id, self.env_args, self.system = env_id, dict(env_args or {}), system
        self.game: Game | None = None

    async def reset(self, record: dict, seed: int) -> Observation:
        env_id = record.get("env_id") or self.env_id
        if env_id is None:
            raise ValueError("no game: the record has no env_id and environment.args none")
        self.game = Game(env_id, record.get("env_args", self.env_args),
                         record.get("game_seed", seed))
        opening = self.game.messages()
        if self.system is not None:
            return Observation(messages=[{"role": "system", "content": self.system},
                                         {"role": "user", "content": opening}])
        if record.get("prompt") != opening:
            raise ValueError(f"record {record.get('id')}: its prompt is not the opening of "
                             f"{env_id}: set environment.args.system, or use TextArenaGames")
        return Observation()

    async def step(self, turn: Turn) -> StepResult:
        done, text = self.game.move(turn.text)
        if not done:
            return StepResult([{"role": "user", "content": text}])
        reward, info = self.game.close()
        self.game, reward = None, float(reward)
        return StepResult(reward=reward, terminated=True, info={
            "invalid_move": float(info.get("invalid_move", False)),
            "reward_components": {"game": reward}})

    async def close(self) -> None:
        if self.game is not None:  # a game cut short (a budget, an error): closed unscored
            self.game.close()
            self.game = None


class TextArenaGames:
    """Games to play with ``TextArenaEnv``: record i is ``games[i % len(games)]`` with
    ``env_args``, seeded ``seed * 10**6 + i`` (a train and an eval seed never share a game
    below a million records), its prompt the game's opening text.

    >>> r = next(iter(TextArenaGames(games=["GuessTheNumber-v0"], size=1, seed=2)))
    >>> r["id"], r["env_id"], r["game_seed"]
    ('GuessTheNumber-v0-2-0', 'GuessTheNumber-v0', 2000000)
    >>> r["prompt"].splitlines()[1]
    'You have to guess the number between 1 and 20 within 10 turns.'
    """

    class Args(BaseModel):
        model_config = ConfigDict(extra="forbid")
        games: list[str] = Field(min_length=1, description="TextArena game ids, e.g. "
                                 "GuessTheNumber-v0, TowerOfHanoi-v0 (single-player)")
        env_args: dict[str, Any] = Field(default_factory=dict, description="arguments for "
                                         "every game (e.g. max_turns)")
        size: int | None = Field(None, gt=0, description="a fixed set of this many games; "
                                 "None streams fresh ones")
        seed: int = Field(0, ge=0)

    def __init__(self, **kwargs):
        self.args = self.Args(**kwargs)
        _textarena()
        for env_id in self.args.games:  # each game's id, arguments and data checked now
            Game(env_id, self.args.env_args, 0).close()

    def record(self, i: int) -> dict:
        a = self.args
        env_id, seed = a.games[i % len(a.games)], a.seed * 10**6 + i
        game = Game(env_id, a.env_args, seed)
        opening = game.messages()
        game.close()
        return {"id": f"{env_id}-{a.seed}-{i}", "prompt": opening, "env_id": env_id,
                "env_args": a.env_args, "game_seed": seed}

    def __iter__(self):
        import itertools

        return map(self.record, range(self.args.size) if self.args.size else itertools.count())

    def __len__(self) -> int:
        if self.args.size is None:
            raise TypeError("a streaming TextArenaGames dataset has no length")
        return self.args.size
