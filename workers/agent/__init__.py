"""Multi-turn trajectories: the environment interface (env.py), the agent loop the rollout
worker runs (loop.py) and function tools (tools.py)."""
