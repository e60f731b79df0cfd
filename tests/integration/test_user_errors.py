"""A user's worker class that raises — in setup() or in its constructor, inside a Ray actor —
is reported in one line naming the exception, the user's own frame and the recipe field."""

import pytest

from orchestrator.config import RoleConfig
from orchestrator.groups import WorkerError, WorkerGroup
from tests.fixtures import broken

pytestmark = pytest.mark.slow


class _Recipe:
    name = "user-errors"


@pytest.mark.parametrize("cls, expected", [
    (broken.FailsInSetup, "reward setup failed: ValueError: cannot reach the grading service "
                          "(at tests/fixtures/broken.py:8 in setup) "
                          "(roles.reward.cls: tests.fixtures.broken:FailsInSetup)"),
    (broken.FailsInInit, "reward actor died during setup: KeyError: 'threshold' "
                         "(at tests/fixtures/broken.py:14 in __init__) "
                         "(roles.reward.cls: tests.fixtures.broken:FailsInInit)"),
])
def test_a_failing_user_worker_is_named(ray_local, monkeypatch, cls, expected):
    from tests.conftest import ROOT

    monkeypatch.chdir(ROOT)
    cfg = RoleConfig(cls=f"tests.fixtures.broken:{cls.__name__}",
                     resources={"num_cpus": 0.25})
    args = cls.check_args({"verifiers": ["rewards.math:answer_is"]}, "roles.reward.args")
    group = WorkerGroup("reward", cfg, _Recipe(), cls, args, {})
    try:
        with pytest.raises(WorkerError) as err:
            group.call(group.fanout("setup"), "setup")
    finally:
        group.shutdown()
    assert str(err.value) == expected


def test_a_failed_set_up_releases_what_it_made(ray_local, make_recipe, monkeypatch):
    """Controller.setup() raising leaves no actor or placement group behind (the caller has no
    controller to shut down), and ends its mlflow run as FAILED."""
    import mlflow

    from orchestrator.controller import Controller
    from tests.conftest import ROOT, _in_use

    monkeypatch.chdir(ROOT)
    recipe = make_recipe(**{"roles.reward.cls": "tests.fixtures.broken:FailsInSetup"})
    c = Controller(recipe)
    with pytest.raises(WorkerError, match="cannot reach the grading service"):
        c.setup()
    assert not c.groups
    assert _in_use(ray_local) == ""
    run = mlflow.MlflowClient(c.logger.uri).get_run(c.logger.run_id)
    assert run.info.status == "FAILED"
