"""Placement limits (what a cluster can never hold is refused at once), per-call deadlines
(failures.deadline: fixed by 'role.method' or role, else derived from recent calls with a floor),
and how every way Ray reports a failure is read (a death, lost inputs, or the call's error)."""

import pytest

from core.errors import RecipeError
from orchestrator.config import DeadlineConfig, load_recipe
from orchestrator.groups import Deadlines
from tests.conftest import ROOT


def test_a_deadline_is_the_floor_until_calls_were_timed_then_factor_times_the_slowest():
    d = Deadlines(DeadlineConfig(floor_s=60, factor=4, window=3), "rollout")
    assert d.seconds("generate") == 60  # nothing timed yet
    d.observe("generate", 10.0)
    d.observe("generate", 30.0)
    assert d.seconds("generate") == 120  # 4 x 30
    d.observe("generate", 5.0)
    d.observe("generate", 5.0)
    d.observe("generate", 5.0)  # the window (3) forgot the 30 s call
    assert d.seconds("generate") == 60  # 4 x 5 = 20 < the floor
    assert d.seconds("receive_weights") == 60  # methods are timed apart
    d.observe("setup of replacement rank 1", 200.0)  # the first word is the method
    assert d.seconds("setup of replacement rank 0") == 800


def test_fixed_deadlines_by_role_and_method_win_and_zero_means_none():
    cfg = DeadlineConfig(floor_s=60, calls={"rollout": 30, "rollout.generate": 0,
                                            "learner.update": 900})
    rollout, learner = Deadlines(cfg, "rollout"), Deadlines(cfg, "learner")
    rollout.observe("score", 100.0)
    assert rollout.seconds("receive_weights") == 30  # the role's
    assert rollout.seconds("generate") is None  # 0: no deadline
    assert learner.seconds("update") == 900 and learner.seconds("push_weights") == 60


def test_deadline_keys_name_roles_and_null_turns_deadlines_off():
    with pytest.raises(ValueError, match="rolout.generate"):
        DeadlineConfig(calls={"rolout.generate": 10})
    with pytest.raises(ValueError, match="seconds >= 0"):
        DeadlineConfig(calls={"reward": -1})
    recipe = ROOT / "recipes" / "arith_grpo_cpu.yaml"
    assert load_recipe(recipe).failures.deadline.floor_s == 1800
    assert load_recipe(recipe, ["failures.deadline=null"]).failures.deadline is None
    with pytest.raises(RecipeError, match="failures.deadline: .*calls: rewrd"):
        load_recipe(recipe, ["failures.deadline.calls={reward.scor: 5, rewrd: 1}"])


def _roles(**spec):
    from orchestrator.config import RoleConfig

    return {role: RoleConfig(cls="x:Y", replicas=n, resources={"num_cpus": cpus, "num_gpus": gpus},
                             strategy=strategy)
            for role, (n, cpus, gpus, strategy) in spec.items()}


def test_a_recipe_the_cluster_can_never_hold_is_refused_at_once_naming_what_it_has():
    from orchestrator.groups import WorkerError, check_capacity

    one_node = [{"CPU": 4.0, "memory": 8e9}]
    with pytest.raises(WorkerError) as err:  # a learner of 8 ranks on a 4-CPU cluster
        check_capacity(_roles(rollout=(1, 1, 0, "PACK"), learner=(8, 1, 0, "PACK")),
                       one_node, autoscaling=False)
    assert str(err.value) == (
        "the cluster can never run this recipe: the roles need 9 CPU in all (rollout 1 x 1 CPU; "
        "learner 8 x 1 CPU). It has 4 CPU on 1 node(s) and no autoscaler (ray.autoscaling: "
        "false): lower roles.<role>.replicas or resources, or add nodes")
    # with an autoscaler the cluster may grow: the run waits for room instead
    check_capacity(_roles(learner=(8, 1, 0, "PACK")), one_node, autoscaling=True)
    gpu_nodes = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]
    with pytest.raises(WorkerError, match=r"roles.learner: a replica needs 1 CPU, 2 GPU; no node "
                                          r"has that.*It has 16 CPU, 2 GPU on 2 node"):
        check_capacity(_roles(learner=(1, 1, 2, "PACK")), gpu_nodes, autoscaling=False)
    with pytest.raises(WorkerError, match="STRICT_PACK puts its 2 replicas on one node; no node "
                                          "has 2 CPU, 2 GPU"):
        check_capacity(_roles(learner=(2, 1, 1, "STRICT_PACK")), gpu_nodes, autoscaling=False)
    with pytest.raises(WorkerError, match="STRICT_SPREAD needs 3 nodes that hold 1 CPU; the "
                                          "cluster has 2"):
        check_capacity(_roles(reward=(3, 1, 0, "STRICT_SPREAD")), gpu_nodes, autoscaling=False)
    # what fits passes: 2 GPU learner ranks spread over the two nodes, fractional CPUs
    check_capacity(_roles(rollout=(1, 4, 0, "PACK"), learner=(2, 1, 1, "SPREAD"),
                          reward=(1, 0.25, 0, "PACK")), gpu_nodes, autoscaling=False)


def test_restart_budgets_count_the_whole_run_per_role_and_in_all(tmp_path):
    """Replacements are counted per run in restarts.json (a resumed attempt continues the
    count); failures.actor_restarts limits each role, max_restarts all of them."""
    from types import SimpleNamespace

    from orchestrator.config import FailuresConfig
    from orchestrator.groups import WorkerError
    from orchestrator.recovery import replace_dead, restarts_so_far

    class Group:
        def __init__(self, role, dead):
            self.role, self.down, self.restarted = role, list(dead), []

        def dead(self):
            return self.down

        def restart(self, rank):
            self.restarted.append(rank)

    def attempt(failures, **dead):
        c = SimpleNamespace(run_dir=tmp_path, restarts=restarts_so_far(tmp_path),
                            recipe=SimpleNamespace(failures=failures),
                            groups={role: Group(role, r) for role, r in dead.items()})
        return c, replace_dead(c, WorkerError("boom", "reward", died=True))

    budget = FailuresConfig(actor_restarts=2, max_restarts=3)
    c, replaced = attempt(budget, reward=[0, 1], learner=[])
    assert replaced and c.groups["reward"].restarted == [0, 1]
    assert restarts_so_far(tmp_path) == {"reward": 2}
    with pytest.raises(WorkerError, match="reward actors failed 3 times in this run, more than "
                                          "failures.actor_restarts=2"):
        attempt(budget, reward=[1])  # the next attempt (a resume) continues the count
    c, replaced = attempt(budget, reference=[0])
    assert restarts_so_far(tmp_path) == {"reward": 2, "reference": 1}
    with pytest.raises(WorkerError, match="4 actor failures in this run, more than "
                                          "failures.max_restarts=3"):
        attempt(budget, rollout=[0])
    assert not attempt(budget, reward=[])[1]  # nothing dead: the error stands
    assert restarts_so_far(tmp_path, "another-run") == {}  # a file another run left


# --- how Ray's failures are read (orchestrator/groups.py: ray_failure, WorkerGroup.error) ----

# the text of a real OutOfMemoryError: Ray 2.60's memory monitor killing two actors (seen here
# with a 0.27 threshold and an actor allocating past it; the object store lines cut)
OOM = ("2 worker(s) were killed due to the node running low on memory. Memory on the node (IP: "
       "192.0.2.2, ID: 12de3cf67f1) was 6.45GB used / 23.54GB limit (0.273856)\n"
       "OOM kill reason: Memory usage 6867496960B exceeded threshold of 6865011200B (27.2% of "
       "25276182528B limit)\nRay killed 2 worker(s) based on the killing policy\n"
       "Considered workers: [\nSelected to kill: (Actor(3cfa12ba9a6b9087e16351a101000000): job "
       "ID=01000000, lease ID=0100, task name=A.__init__, required resources={}, pid=6269, "
       "actual memory used=0.06GB, worker ID=9f56)\nSelected to kill: (Actor(78087e77cd6eee72"
       "fcbaf3201000000): job ID=01000000, lease ID=0000, task name=A.__init__, required "
       "resources={}, pid=6268, actual memory used=0.92GB, worker ID=2480)\n]\n")


def test_every_way_ray_reports_a_lost_worker_is_a_death_lost_data_or_an_error():
    import ray.exceptions as rx

    from orchestrator.groups import ray_failure

    died = [rx.ActorDiedError(), rx.OutOfMemoryError(OOM), rx.WorkerCrashedError(),
            rx.NodeDiedError("node gone"), rx.LocalRayletDiedError(),
            rx.ActorUnschedulableError("no node"), rx.TaskUnschedulableError("no node"),
            rx.ActorPlacementGroupRemoved(), rx.TaskPlacementGroupRemoved()]
    lost = [rx.ObjectLostError("ab" * 14, None, ""), rx.OwnerDiedError("ab" * 14, None, ""),
            rx.ObjectFetchTimedOutError("ab" * 14, None, ""),
            rx.ObjectReconstructionFailedError("ab" * 14)]
    errors = [rx.OutOfDiskError(), rx.ObjectStoreFullError(), rx.RaySystemError("x"),
              rx.RayTaskError("update", "Traceback ...", ValueError("bad input"))]
    assert [ray_failure(e) for e in died] == ["died"] * len(died)
    assert [ray_failure(e) for e in lost] == ["lost"] * len(lost)
    assert [ray_failure(e) for e in errors] == ["error"] * len(errors)
    # a method that fetched a lost object (the learner's rollouts), or the result of an actor
    # that died (its input is gone, not the actor that asked), is judged lost
    inner = rx.RayTaskError("update", "Traceback ...", rx.OwnerDiedError("ab" * 14, None, ""))
    assert ray_failure(inner) == "lost"
    assert ray_failure(rx.RayTaskError("score", "Traceback ...", rx.ActorDiedError())) == "lost"
    # the learner's ranks agreeing that one could not fetch its inputs
    from core.errors import InputsLost

    assert ray_failure(rx.RayTaskError("update", "Traceback ...", InputsLost("rank 1"))) == "lost"


def test_an_oom_kill_names_the_node_the_threshold_and_what_each_killed_rank_used():
    import ray.exceptions as rx

    from orchestrator.groups import WorkerGroup, oom_details

    where, used = oom_details(rx.OutOfMemoryError(OOM))
    assert where == " (node at 27% of 23.54GB, threshold 27.2%)"
    assert used == {"3cfa12ba9a6b9087e16351a101000000": 0.06,
                    "78087e77cd6eee72fcbaf3201000000": 0.92}

    class Actor:  # what error() reads of an actor handle: Ray's actor id
        def __init__(self, hexid):
            self._actor_id = type("Id", (), {"hex": lambda self: hexid})()

    group = WorkerGroup.__new__(WorkerGroup)
    group.role, group.actors = "reward", [Actor("78087e77cd6eee72fcbaf3201000000")]
    err = group.error(rx.OutOfMemoryError(OOM), "score")
    assert str(err) == ("reward actor killed by Ray's memory monitor during score (node at 27% "
                        "of 23.54GB, threshold 27.2%); rank 0 used 0.92 GB")
    assert err.died and err.oom and not err.lost and err.role == "reward"
