"""Progressive delivery: a new model earns its traffic (canary, shadow) on live signals.

* :mod:`~labelmatch.delivery.rules`: the canary's rules file (traffic share, window, thresholds).
* :mod:`~labelmatch.delivery.signals`: error rate and latency from the pods' ``/metrics``.
* :mod:`~labelmatch.delivery.canary`: the decision (every rule, its evidence), promote or roll back.
* :mod:`~labelmatch.delivery.shadow`: the shadow comparison report (agreement, score shift, latency).
* :mod:`~labelmatch.delivery.kserve`: the InferenceService changes, per KServe mode and version.

Public names import lazily (:mod:`labelmatch.core.lazy`): importing the package costs nothing.
"""

from labelmatch.core.lazy import lazy_exports

_EXPORTS = {
    "CanaryRules": "rules",
    "load_rules": "rules",
    "CanaryDecision": "canary",
    "CanaryTarget": "canary",
    "RuleResult": "canary",
    "TrafficControl": "canary",
    "watch_canary": "canary",
    "ShadowReport": "shadow",
    "build_shadow_report": "shadow",
    "shadow_report": "shadow",
    "write_shadow_report": "shadow",
    "KServeTraffic": "kserve",
    "deploy_canary": "kserve",
    "deploy_shadow": "kserve",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
