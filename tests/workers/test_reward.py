"""The reward worker driven in a plain process (no Ray): verifiers that raise, hang or return
garbage score None for exactly the samples they fail on, are counted, and the worker stays up."""

import pytest

from core.errors import RecipeError
from workers.base import WorkerContext
from workers.reward import RuleRewardWorker
from workers.types import Rollouts

FLAKY = '''
import time
def picky(prompts, completions, answer, **_):
    if any(c == "boom" for c in completions):
        raise ValueError("cannot parse boom")
    if any(c == "hang" for c in completions):
        time.sleep(60)
    return [1.0 if c == a else 0.0 for c, a in zip(completions, answer)]
def garbage(prompts, completions, **_):
    return "not a list"
def always(prompts, completions, **_):
    return [0.5] * len(completions)
def short(prompts, completions, **_):
    return [1.0] * (len(completions) - 1)
def thought(prompts, completions, **_):
    return [1.0 if c.startswith("<think>") and "</think>" in c else 0.0 for c in completions]
def refused(prompts, completions, **_):
    from core.errors import VerifierCallError
    raise VerifierCallError("http://h/score/v answered HTTP 400: record lacks 'answer'")
def greedy(prompts, completions, **_):
    if any(c == "grow" for c in completions):
        held = [bytearray(256 * 2**20) for _ in range(8)]  # 2 GB
    return [1.0] * len(completions)
'''


def _rollouts(texts):
    n = len(texts)
    return Rollouts(list(range(n)), [[1]] * n, [[5]] * n, [[-0.1]] * n, texts, ["stop"] * n)


@pytest.fixture
def worker(tmp_path, monkeypatch):
    (tmp_path / "flaky_verifiers.py").write_text(FLAKY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(verifiers, timeout_s=2.0, **more):
        args = RuleRewardWorker.check_args({"verifiers": verifiers, "timeout_s": timeout_s}
                                           | more, "roles.reward.args")
        w = RuleRewardWorker(WorkerContext("reward", 0, 1, None, args))
        w.setup()
        return w

    yield make


def test_failures_are_isolated_counted_and_named(worker):
    w = worker(["flaky_verifiers:picky", {"fn": "flaky_verifiers:always", "weight": 2.0}])
    texts = ["3", "boom", "hang", "4"]
    records = [{"id": f"p{i}", "prompt": "x", "answer": "3"} for i in range(4)]
    s = w.score(_rollouts(texts), records)
    assert s.per_verifier["picky"] == [1.0, None, None, 0.0]
    assert s.per_verifier["always"] == [0.5] * 4
    assert s.rewards == [2.0, None, None, 1.0]
    assert s.failures == {"picky": 2}
    assert s.failed_ids == ["p1#0", "p2#0"]
    # the first failure says what went wrong, where in the user's code, and on which sample
    assert s.errors == {"picky": "ValueError: cannot parse boom (at flaky_verifiers.py:5 in "
                                 "picky) (sample p1#0)"}
    # the worker is still healthy: a clean batch scores normally afterwards
    ok = w.score(_rollouts(["3"]), records[:1])
    assert ok.rewards == [2.0] and not ok.failures
    w.shutdown()


def test_a_refused_call_stops_the_run_instead_of_scoring_none(worker):
    """A verifier that refuses the call itself (a remote server's 4xx: a wrong name, token or
    record fields) is the set-up's error: it is raised, naming the verifier, not scored None
    sample by sample until scoring.max_unscored_frac stops the run with a vaguer message."""
    from core.errors import VerifierCallError

    w = worker(["flaky_verifiers:refused"])
    with pytest.raises(VerifierCallError, match=r"verifier flaky_verifiers:refused: .*HTTP 400: "
                                                r"record lacks 'answer'"):
        w.score(_rollouts(["a"]), [{"id": "q0", "prompt": "x"}])
    w.shutdown()


def test_garbage_output_is_a_failure(worker):
    w = worker(["flaky_verifiers:garbage"])
    s = w.score(_rollouts(["a", "b"]), [{"id": "q0", "prompt": "x"}, {"id": "q1", "prompt": "y"}])
    assert s.rewards == [None, None] and s.failures == {"garbage": 2}
    assert s.errors == {"garbage": "returned a str, not a list of 1 rewards (sample q0#0)"}
    w.shutdown()


def test_a_wrong_number_of_rewards_is_named(worker):
    w = worker(["flaky_verifiers:short"])
    s = w.score(_rollouts(["a", "b"]), [{"id": "q0", "prompt": "x"}, {"id": "q1", "prompt": "y"}])
    assert s.failures == {"short": 2}
    assert s.errors == {"short": "returned 0 rewards for 1 completions (sample q0#0)"}
    w.shutdown()


def test_unknown_verifier_is_a_recipe_error(worker):
    with pytest.raises(RecipeError, match="roles.reward.args.verifiers.0: no module named"):
        worker(["no_such_module:fn"])


def test_verifiers_see_the_response_prefix_the_prompt_ends_with(worker, make_recipe):
    """The engine generates after prompt.response_prefix (it is in the prompt's ids), so the
    completion's text lacks it; verifiers get it back in front."""
    w = worker(["flaky_verifiers:thought"])
    w.recipe = make_recipe(**{"prompt.response_prefix": "<think>\n"})
    s = w.score(_rollouts(["hmm</think> 4", "4"]), [{"id": "q0", "prompt": "x"},
                                                    {"id": "q1", "prompt": "y"}])
    assert s.rewards == [1.0, 0.0]
    w.shutdown()


def test_a_verifier_growing_past_its_memory_fails_its_samples_not_the_node(worker):
    """Ray's memory monitor cannot see the verifier process's memory (seen here: a verifier
    holding 3 GB made it kill every actor of the run, the reward actor counted at 0 GB), so
    the verifier process has a cap of its own: past it, its samples score None."""
    w = worker(["flaky_verifiers:greedy"], verifier_memory_gb=0.5)
    records = [{"id": f"g{i}", "prompt": "x"} for i in range(2)]
    s = w.score(_rollouts(["grow", "fine"]), records)
    assert s.rewards == [None, 1.0] and s.failures == {"greedy": 1}
    assert s.errors["greedy"].startswith("MemoryError") and "(sample g0#0)" in \
        s.errors["greedy"]
    w.shutdown()


def test_the_verifier_process_ends_with_a_sigkilled_reward_actor():
    """The verifier process is forked from the reward actor and holds its connections to Ray:
    if it outlived an actor killed with SIGKILL, Ray would not see the actor die."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from tests.conftest import ROOT

    script = ("import multiprocessing as mp, os, time\n"
              "from workers.reward import _child_init\n"
              "pool = mp.get_context('fork').Pool(1, initializer=_child_init,"
              " initargs=(os.getpid(), None))\n"
              "print(pool.apply(os.getpid), flush=True)\n"
              "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    child = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while psutil.pid_exists(child) and psutil.Process(child).status() != "zombie":
        assert time.monotonic() < deadline, \
            f"the verifier process {child} outlived its actor by 30 s: {psutil.Process(child)}"
        time.sleep(0.1)
