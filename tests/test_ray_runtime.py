"""Ray as the project starts it: a real Ray Train run in embedded mode prints no warning that reads like a fault."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent

TRAIN_RUN = textwrap.dedent(
    """
    import logging, sys, time
    from services.ray_runtime import ensure_ray, shutdown_ray
    from services.settings import Settings

    ensure_ray(Settings.load(home=sys.argv[1], ray={"num_cpus": 2}))
    import ray
    import ray.train
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    @ray.remote
    def other_warning():
        logging.getLogger("diki.test").warning("a warning of another logger still shows")

    ray.get(other_warning.remote())

    def loop():
        time.sleep(5)  # the PlacementGroupCleaner checks the controller every second meanwhile

    trainer = DataParallelTrainer(
        loop,
        scaling_config=ray.train.ScalingConfig(num_workers=1),
        run_config=ray.train.RunConfig(storage_path=sys.argv[1] + "/ray-train", name="quiet"),
    )
    trainer.fit()
    time.sleep(2)  # worker logs reach the driver
    print("trained", flush=True)
    shutdown_ray()
    """
)


def test_a_train_run_in_embedded_mode_prints_no_state_api_warnings(tmp_path: Path) -> None:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", TRAIN_RUN, str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0 and "trained" in out.stdout, text[-3000:]
    assert "Failed to query Ray Train Controller actor state" not in text, text[-3000:]
    assert "a warning of another logger still shows" in text, text[-3000:]
