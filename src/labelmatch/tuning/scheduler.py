"""Ray Tune's PBT scheduler with its synchronous mode made resumable."""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import PopulationBasedTraining


class ResumablePBT(PopulationBasedTraining):
    """``PopulationBasedTraining`` that does not hang after ``Tuner.restore`` in synchronous mode.

    A restored synchronous scheduler restarts its clock at the first perturbation point while
    the restored trials are already past it; after their next perturbation it waits for a
    time no paused trial is behind, and the run hangs (Ray 2.60). Once every unfinished trial
    is at or past the sync point, the point moves one interval past the slowest trial.
    """

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        unfinished = [t for t in tune_controller.get_trials() if not t.is_finished()]
        times = [self._trial_state[t].last_train_time for t in unfinished]
        if self._synch and times and min(times) >= self._next_perturbation_sync:
            self._next_perturbation_sync = min(times) + self._perturbation_interval
        return decision
