"""TextArena games through braid's agent loop, played by a scripted policy (no engine): a game
won to reward 1, invalid moves as TextArena rules them, the game closed on every path, games
seeded per record without touching the process's random state, clear errors for bad games."""

import asyncio
import random

import pytest

pytest.importorskip("textarena", reason="the textarena extra: pip install 'braid-rl[textarena]'")

from tests.workers.test_agent import Script, run  # noqa: E402
from workers.agent.loop import AgentLoop, Budgets, Renderer  # noqa: E402
from workers.agent.textarena_env import Game, TextArenaEnv, TextArenaGames  # noqa: E402


@pytest.fixture(scope="module")
def tok(tiny_chat_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat_model)


class Kept(TextArenaEnv):
    """The environment the loop made, kept to look at after the trajectory."""

    last = None

    def __init__(self, **args):
        super().__init__(**args)
        Kept.last = self


def play(tok, record, moves, max_turns=10):
    loop = AgentLoop(lambda: Kept(), Renderer(tok), None,
                     Budgets(max_turns=max_turns, max_tokens_per_turn=40))
    return run(loop, Script(tok, moves), record=record)


def guess_record(seed=0):
    return next(iter(TextArenaGames(games=["GuessTheNumber-v0"], size=1, seed=seed)))


def secret(record) -> int:
    game = Game(record["env_id"], record["env_args"], record["game_seed"])
    return game.env.state.game_state["game_number"]


def test_a_game_won_over_several_turns_gives_reward_1(tok):
    rec = guess_record()
    n = secret(rec)
    wrong = 1 if n != 1 else 2
    out = play(tok, rec, [f"I guess [{wrong}]", f"[{n}]"])
    assert out.status == ["ok"] and out.env_rewards == [1.0]
    assert len(out.turns[0]) == 2 and out.env_info[0]["invalid_move"] == 0.0
    ids, mask = out.completion_ids[0], out.loss_mask[0]
    between = tok.decode([t for t, m in zip(ids, mask) if m == 0])
    hint = "higher" if wrong < n else "lower"
    assert f"The target number is {hint}." in between  # the game's reply, masked
    assert "I guess" not in between  # the policy's own move is not echoed back
    assert Kept.last.game is None  # closed


def test_tower_of_hanoi_solved_move_by_move(tok):
    rec = next(iter(TextArenaGames(games=["TowerOfHanoi-v0"], size=1)))
    assert "A: [3, 2, 1]" in rec["prompt"]  # the opening shows the board
    moves = ["[A C]", "[A B]", "[C B]", "[A C]", "[B A]", "[B C]", "[A C]"]
    out = play(tok, rec, moves)
    assert out.status == ["ok"] and out.env_rewards == [1.0] and len(out.turns[0]) == 7


def test_an_invalid_move_is_answered_and_a_second_in_a_row_ends_the_game(tok):
    rec = guess_record()
    out = play(tok, rec, ["no idea", "[5]"] if secret(rec) != 5 else ["no idea", "[6]"],
               max_turns=2)
    # the first invalid move: a message, the game goes on
    assert "You attempted an invalid move" in tok.decode(out.completion_ids[0])
    assert out.status == ["truncated"] and out.env_info[0]["truncated_by"] == "max_turns"
    assert Kept.last.game is None  # a game cut short by a budget is closed too
    out = play(tok, rec, ["no idea", "still none"])
    # TextArena's rule: the second invalid move in a row ends it, with the game's own reward
    # (GuessTheNumber's: how close the last valid guess was; none was made: 0)
    assert out.status == ["ok"] and out.env_rewards == [0.0] and len(out.turns[0]) == 2
    assert out.env_info[0]["invalid_move"] == 1.0


def test_games_follow_their_records_seed_and_leave_the_process_random_alone():
    recs = list(TextArenaGames(games=["GuessTheNumber-v0"], size=6, seed=1))
    assert len({r["game_seed"] for r in recs}) == 6
    alone = [secret(r) for r in recs]
    random.seed(123)
    expected = random.random()
    random.seed(123)
    games = [Game(r["env_id"], r["env_args"], r["game_seed"]) for r in recs]  # interleaved
    assert random.random() == expected
    assert [g.env.state.game_state["game_number"] for g in games] == alone
    assert len(set(alone)) > 1
    assert [r["id"] for r in TextArenaGames(games=["GuessTheNumber-v0"], size=6, seed=1)] == \
        [r["id"] for r in recs]


def test_a_record_whose_prompt_is_not_the_games_opening_is_refused_without_a_system():
    env = TextArenaEnv(env_id="GuessTheNumber-v0")
    rec = {"id": "x", "prompt": "2+2"}
    with pytest.raises(ValueError, match="its prompt is not the opening of GuessTheNumber-v0"):
        asyncio.run(env.reset(rec, seed=3))
    env = TextArenaEnv(env_id="GuessTheNumber-v0", system="Play well.")
    obs = asyncio.run(env.reset(rec, seed=3))
    assert [m["role"] for m in obs.messages] == ["system", "user"]
    assert "Guess The Number" in obs.messages[1]["content"]


@pytest.mark.parametrize("game, match", [
    ("GuessTheNumbr-v0", r"textarena has no game 'GuessTheNumbr-v0' \(did you mean "
                         r"GuessTheNumber-v0"),
    ("TicTacToe-v0", "TicTacToe-v0: braid plays single-player games"),
])
def test_a_bad_game_is_named(game, match):
    with pytest.raises(ValueError, match=match):
        TextArenaGames(games=[game])
