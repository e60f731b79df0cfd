"""Shared fixtures. Tests own their temp, Ray, HF, mlflow and torch-extension folders: the
environment below is set before anything heavy is imported, and Ray workers inherit it."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_BASE = Path(tempfile.mkdtemp(prefix="braid-tests-", dir="/tmp"))
for var, sub in (("TMPDIR", "tmp"), ("HF_HOME", "hf"), ("XDG_CONFIG_HOME", "config"),
                 ("XDG_CACHE_HOME", "cache")):
    os.environ[var] = str(_BASE / sub)
    (_BASE / sub).mkdir(parents=True, exist_ok=True)
# DeepSpeed JIT-compiles native ops on first use (the learner turns off the one it would build,
# workers/learner/deepspeed.py): a build cache kept with the virtual environment, not ~/.cache.
os.environ["TORCH_EXTENSIONS_DIR"] = str(ROOT / ".venv" / "torch-extensions")
tempfile.tempdir = os.environ["TMPDIR"]
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("RAY_ADDRESS", None)
sys.path.insert(0, str(ROOT))


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_BASE, ignore_errors=True)


def pytest_terminal_summary(terminalreporter):
    """The innermost lines of each failure, at the end of the log (before pytest's short
    summary): a CI log kept only by its tail (a hang's timeout included) still says where each
    test stopped."""
    failed = [r for kind in ("failed", "error") for r in terminalreporter.stats.get(kind, [])]
    if failed:
        terminalreporter.section("where the failures stopped")
    for rep in failed[:8]:
        lines = [ln for ln in str(rep.longrepr).splitlines() if ln.strip()]
        terminalreporter.write_line(f"{rep.nodeid} ({rep.when}):")
        for ln in lines[-10:]:
            terminalreporter.write_line("    " + ln[:200])


@pytest.fixture(scope="session")
def base_dir() -> Path:
    return _BASE


@pytest.fixture(scope="session")
def tiny_model(base_dir) -> Path:
    """A random tiny Llama (hidden 64, 2 layers) with the character tokenizer."""
    from workers.models import TinyModelSpec, build_tiny_model

    return build_tiny_model(base_dir / "tiny-model",
                            TinyModelSpec(hidden_size=64, intermediate_size=128, num_layers=2,
                                          num_heads=2, max_position_embeddings=64, seed=0))


@pytest.fixture(scope="session")
def tiny_chat_model(base_dir) -> Path:
    """A random tiny Llama whose tokenizer has a ChatML chat template (end of turn
    ``<|im_end|>``, not EOS) and room for prompts longer than one KV-cache block."""
    from workers.models import TinyModelSpec, build_tiny_model

    return build_tiny_model(base_dir / "tiny-chat-model",
                            TinyModelSpec(hidden_size=64, intermediate_size=128, num_layers=2,
                                          num_heads=2, max_position_embeddings=256, seed=0,
                                          chat=True))


@pytest.fixture(scope="session")
def tiny_bpe_chat_model(base_dir) -> Path:
    """The chat model with ~400 merged (BPE) tokens: a decoded text re-tokenises to other ids
    than the ones sampled, as with real tokenizers."""
    from workers.models import TinyModelSpec, build_tiny_model

    return build_tiny_model(base_dir / "tiny-bpe-chat-model",
                            TinyModelSpec(hidden_size=64, intermediate_size=128, num_layers=2,
                                          num_heads=2, max_position_embeddings=256, seed=0,
                                          chat=True, bpe_merges=400))


@pytest.fixture(scope="session")
def _ray_session(base_dir):
    """A private local Ray cluster for the session (never `ray stop`: that kills every Ray),
    and how to start it again."""
    import ray

    def start() -> None:  # also a restart: shutdown is a no-op before the first init
        ray.shutdown()
        ray.init(address="local", num_cpus=6, include_dashboard=False,
                 _temp_dir=str(base_dir / "ray"), log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})  # tests.fixtures in workers

    start()
    yield ray, start
    ray.shutdown()


@pytest.fixture
def ray_local(_ray_session, request):
    """The session's Ray cluster. A test must leave it as it found it — every CPU free, no
    placement group or actor alive — or it errors at teardown naming what it left, and the
    cluster is started afresh: a leak would otherwise starve every test after it until its
    timeout. A test that uses it is marked slow (`make test-fast` runs none of them)."""
    if request.node.get_closest_marker("slow") is None:
        pytest.fail("a test on the Ray cluster must be marked slow (pytest.mark.slow)",
                    pytrace=False)
    ray, start = _ray_session
    left = _in_use(ray, wait_s=10)
    if left:  # held by something outside the tests that use it (another cluster's test)
        warnings.warn(f"the session's Ray cluster was found in use, started afresh: {left}",
                      stacklevel=2)
        start()
    yield ray
    left = _in_use(ray)
    if left:
        start()
        pytest.fail(f"the test left the session's Ray cluster in use: {left}", pytrace=False)


def _in_use(ray, wait_s: float = 60) -> str:
    """What still holds the cluster after ``wait_s`` (kills and removals land asynchronously);
    empty when nothing does."""
    import time

    from ray.util import placement_group_table

    deadline = time.time() + wait_s
    while True:
        total = ray.cluster_resources().get("CPU", 0)
        free = ray.available_resources().get("CPU", 0)
        groups = [f"{g['placement_group_id'][:8]} {g['state']} {g['bundles']}"
                  for g in placement_group_table().values() if g["state"] != "REMOVED"]
        actors = [f"{a['ActorClassName']} {a['State']}"
                  for a in ray._private.state.actors().values() if a["State"] != "DEAD"]
        if free == total and not groups and not actors:
            return ""
        if time.time() > deadline:
            return f"{free:g} of {total:g} CPUs free; placement groups {groups}; actors {actors}"
        time.sleep(1)


def recipe_dict(model_path: Path, default_run_dir: Path, **over) -> dict:
    """The smallest full recipe: tiny model, 1 rollout engine, 2 ZeRO-3 learner ranks."""
    d = {
        "name": "test", "seed": 0, "steps": 4, "run_dir": str(default_run_dir),
        "model": {"path": str(model_path), "dtype": "float32"},
        "data": {"train": {"cls": "orchestrator.data:Arithmetic", "args": {"digits": [1, 2]}},
                 "eval": {"cls": "orchestrator.data:Arithmetic",
                          "args": {"digits": [1, 2], "size": 16, "seed": 9}},
                 "prompts_per_step": 8},
        "roles": {
            "rollout": {"cls": "workers.rollout.vllm:VLLMRollout", "resources": {"num_cpus": 1},
                        "args": {"max_model_len": 64}},
            "learner": {"cls": "workers.learner.deepspeed:DeepSpeedLearner", "replicas": 2,
                        "resources": {"num_cpus": 1}, "args": {"zero_stage": 3, "threads": 1}},
            "reward": {"cls": "workers.reward:RuleRewardWorker", "resources": {"num_cpus": 0.5},
                       "args": {"verifiers": ["rewards.arithmetic:exact_answer"]}},
        },
        "sampling": {"n": 4, "temperature": 1.0, "max_tokens": 5},
        "algorithm": {"lr": 1e-3, "micro_batch_size": 8},
    }
    for k, v in over.items():
        cur = d
        *path, last = k.split(".")
        for p in path:
            cur = cur.setdefault(p, {})
        cur[last] = v
    return d


@pytest.fixture
def make_recipe(tiny_model, tmp_path):
    from orchestrator.config import Recipe

    def make(**over) -> Recipe:
        return Recipe.model_validate(recipe_dict(tiny_model, tmp_path / "run", **over))

    return make


@pytest.fixture
def make_chat_recipe(tiny_chat_model, tmp_path):
    """The smallest recipe on the chat model: prompts through its chat template, an engine
    with room for 256 tokens."""
    from orchestrator.config import Recipe

    def make(**over) -> Recipe:
        over = {"roles.rollout.args.max_model_len": 256, "sampling.max_tokens": 8} | over
        return Recipe.model_validate(recipe_dict(tiny_chat_model, tmp_path / "run", **over))

    return make
