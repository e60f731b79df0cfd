"""A node lost mid-run: a Ray cluster of two nodes on this machine (a head and a second
`ray start` with its own ports), the run's roles spread across both, and the second node's
raylet killed by PID in the middle of a step — what a KubeRay pod eviction or a reclaimed spot
instance looks like to Ray. The actors there die with it; the learner rank among them ends the
attempt, and ``failures.auto_resume`` brings the run back up on the node that remains, from the
last checkpoint, to the end. And an engine's node lost after it generated, before anyone read
its rollouts: they are lost with the node's object store and generated again.

The clusters are waited for by what they are (nodes the GCS counts alive, asked directly), with
bounds for a loaded 2-core machine, and a wait that fails shows each node's own log tail
(tests/integration/ray_nodes.py)."""

import json
import os
import re
import signal
import subprocess
import sys
import threading

import pytest
import yaml

from tests.conftest import ROOT, recipe_dict
from tests.integration.ray_nodes import two_nodes

pytestmark = pytest.mark.slow


@pytest.mark.long
def test_a_node_lost_mid_step_is_survived_with_auto_resume(tiny_model, tmp_path):
    with two_nodes(head_cpus=4, second_cpus=2) as (address, nodes, raylet):
        _lose_a_learner_rank(address, nodes, raylet, tiny_model, tmp_path)


def _lose_a_learner_rank(address, nodes, raylet, tiny_model, tmp_path):
    env = nodes.env
    d = recipe_dict(tiny_model, tmp_path / "run", steps=6)
    d["data"]["prompts_per_step"] = 4
    d["checkpoint"] = {"every": 2}
    d["failures"] = {"auto_resume": 1}
    d["ray"] = {"address": address}
    # SPREAD: one learner rank and one reward actor on each node (4 + 2 CPUs; the head alone
    # holds the whole recipe, 3.5 CPUs, for the attempt after the loss)
    d["roles"]["learner"]["strategy"] = "SPREAD"
    d["roles"]["reward"] |= {"replicas": 2, "strategy": "SPREAD",
                             "resources": {"num_cpus": 0.25}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(d))
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", "recipe.yaml"],
                            cwd=tmp_path, env=dict(env, PYTHONPATH=str(ROOT)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
    out, killed = [], None
    try:
        for line in proc.stdout:  # the kill lands while step 4 runs
            out.append(line)
            if killed is None and re.match(r"step\s+3/6", line):
                # the driver held still while the node goes (a step here takes ~0.1 s, less
                # than Ray needs to notice a lost node), released once the GCS counts it dead
                os.kill(proc.pid, signal.SIGSTOP)
                try:
                    killed = raylet()
                    os.kill(killed, signal.SIGKILL)
                    nodes.wait(address, alive=1, up=("head",))
                finally:
                    os.kill(proc.pid, signal.SIGCONT)
        proc.wait(timeout=300)  # the stream ended: the run is exiting
    finally:
        if proc.poll() is None:
            proc.kill()
    stdout, stderr = "".join(out), "".join(err)
    assert killed is not None, stdout[-3000:] + stderr[-3000:]
    assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    assert re.search(r"learner rank\(s\) \[\d\] died", stderr), stderr[-3000:]
    assert f"auto_resume: restarting from {ckpt}" in stderr
    assert f"resumed from {ckpt} at step 2" in stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["eval"][-1]["step"] == 6
    assert summary["restarts"].get("learner") == 1


@pytest.mark.long
def test_rollouts_lost_with_their_node_are_generated_again(tiny_model, tmp_path):
    """Two engines, the second alone on the second node; step 4's rollouts are generated ahead
    (rollout.max_staleness: 1) while step 3 learns, and the second node dies before anyone
    fetched them. Its engine is replaced on the head, and its share of step 4's rollouts —
    lost with the node's object store — is generated again and scored: no step lost. (Objects
    above 1 KiB go to the object store here, as real rollouts of megabytes do; the summaries,
    smaller, travel with the reply.)"""
    with two_nodes(head_cpus=5, second_cpus=1,
                   system_config={"max_direct_call_object_size": 1024}) as (address, nodes,
                                                                            raylet):
        d = recipe_dict(tiny_model, tmp_path / "run", steps=6)
        d["rollout"] = {"max_staleness": 1}
        d["ray"] = {"address": address}
        # one engine per node (the second node holds one CPU); the rest packs on the head,
        # which keeps room for the replacement engine
        d["roles"]["rollout"] |= {"replicas": 2, "strategy": "SPREAD"}
        (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(d))
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", "recipe.yaml"],
                                cwd=tmp_path, env=dict(nodes.env, PYTHONPATH=str(ROOT)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        err: list[str] = []
        threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
        out, killed = [], None
        try:
            for line in proc.stdout:
                out.append(line)
                if killed is None and re.match(r"step\s+3/6", line):
                    # step 4's rollouts are done (the engines run their calls in order, and
                    # step 3's sync came after them): held until the node is counted dead
                    os.kill(proc.pid, signal.SIGSTOP)
                    try:
                        killed = raylet()
                        os.kill(killed, signal.SIGKILL)
                        nodes.wait(address, alive=1, up=("head",))
                    finally:
                        os.kill(proc.pid, signal.SIGCONT)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    stdout, stderr = "".join(out), "".join(err)
    assert killed is not None and proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
    assert "Ray lost the rollouts of 1 engine share(s); generated again with the same " \
           "prompts and seeds" in stdout, stdout[-3000:] + stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-5000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 6 and len(summary["reward_curve"]) == 6
    assert summary["restarts"] == {"rollout": 1}
