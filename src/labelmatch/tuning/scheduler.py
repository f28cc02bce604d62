"""Ray Tune's PBT scheduler with its synchronous mode made resumable."""

from __future__ import annotations

import logging
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import PopulationBasedTraining

logger = logging.getLogger(__name__)


class ResumablePBT(PopulationBasedTraining):
    """``PopulationBasedTraining`` that does not hang after ``Tuner.restore`` in synchronous mode.

    A restored synchronous scheduler restarts its clock at the first perturbation point while
    the restored trials are already past it; after their next perturbation it waits for a
    time no paused trial is behind, and the run hangs (Ray 2.60). Once every unfinished trial
    is at or past the sync point, the point moves one interval past the slowest trial.

    A resume after the driver was killed (not stopped) restores trials from checkpoints of
    different iterations, and every unfinished trial can end up paused at or past the sync point
    with none running (seen once in ``tests/test_tune_cluster.py``: Ray waited for minutes with
    all four trials paused). No result will then come to move the clock, and Ray waits forever;
    in that state the point moves one interval past the slowest trial too (that perturbation
    is skipped).
    """

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        unfinished = [t for t in tune_controller.get_trials() if not t.is_finished()]
        times = [self._trial_state[t].last_train_time for t in unfinished]
        if self._synch and times and min(times) >= self._next_perturbation_sync:
            self._next_perturbation_sync = min(times) + self._perturbation_interval
        return decision

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        """The paused trial to run next; moves a sync point that no trial can reach any more.

        Args:
            tune_controller: Ray Tune's controller.

        Returns:
            The trial to start, or ``None``.
        """
        trial = super().choose_trial_to_run(tune_controller)
        if trial is not None or not self._synch:
            return trial
        unfinished = [t for t in tune_controller.get_trials() if not t.is_finished()]
        if not unfinished or any(t.status != Trial.PAUSED for t in unfinished):
            return None  # a running or starting trial's next result moves the clock
        sync = min(self._trial_state[t].last_train_time for t in unfinished) + self._perturbation_interval
        logger.info(
            "Sync: every unfinished trial is paused at or past time %s and none runs; moving the sync "
            "point to %s", self._next_perturbation_sync, sync,
        )
        self._next_perturbation_sync = sync
        return super().choose_trial_to_run(tune_controller)
