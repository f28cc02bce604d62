"""The ``grpo`` component: the SFT model improved with GRPO on a feedback export."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components._image import IMAGE_TRAIN


@dsl.component(base_image=IMAGE_TRAIN, packages_to_install=[], install_kfp_package=False)
def grpo(
    sft_model: Input[Model],
    feedback: Input[Artifact],
    dataset: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    epochs: int = 3,
    steps: int = 0,
    group_size: int = 16,
    batch_size: int = 16,
    beta: float = 0.1,
    lr: float = 1e-3,
    max_principal_share: float = 0.25,
    replay_kl_weight: float = 1.0,
    replay_bce_weight: float = 0.5,
    seed: int = 0,
) -> float:
    """Train a new LoRA on the SFT model from user feedback (GRPO with a KL penalty).

    Calls :func:`labelmatch.feedback.grpo.train_grpo`; thresholds are re-tuned on the dataset's
    validation split.

    Args:
        sft_model: Input Model artifact (from ``tune_sft``): the frozen reference and the
            starting policy; verified against its manifest.
        feedback: Input FeedbackExport artifact (``labelmatch feedback export``):
            ``feedback.jsonl`` (+ ``labels.json``) and ``manifest.json``; verified.
        dataset: Input Dataset artifact (from ``data_prep``): its ``val`` split re-tunes thresholds;
            feedback on its ``test`` documents is not trained on (the gate scores them); its
            ``train`` split is what the replay terms replay.
        model: Output Model artifact: merged ``encoder/`` (SFT + GRPO), recomputed label
            embeddings and thresholds, ``labelmatch.json`` with the reference and feedback digests.
        metrics: Output KFP metrics: ``final_kl``, ``final_reward``, ``steps``, ``feedback_records``,
            ``feedback_excluded_test_overlap`` and the per-principal cap: ``principals``,
            ``principal_cap`` (the bound enforced), ``capped_principals``,
            ``largest_principal_share_before``/``_after``, ``principal_weight_moved``; the top
            principals with their records and shares are in the model's ``labelmatch.json``.
        epochs: Passes over the feedback (ignored when ``steps`` > 0).
        steps: Exact number of GRPO steps (0: derived from ``epochs``).
        group_size: Label sets sampled per document (the GRPO group).
        batch_size: Feedback documents per step.
        beta: Weight of the KL penalty to the reference.
        lr: Learning rate of the new LoRA.
        max_principal_share: Largest share of the run's feedback weight one principal may carry
            (records without a principal count per source); 1.0 disables the cap.
        replay_kl_weight: Weight of the KL to the SFT model on replayed training documents (0: off).
        replay_bce_weight: Weight of the BCE on replayed training documents with their labels (0: off).
        seed: Random seed.

    Returns:
        The KL divergence to the reference after the last step.
    """
    from labelmatch.core.artifacts import verify_artifact
    from labelmatch.data.dataset import load_dataset
    from labelmatch.feedback.grpo import GRPOConfig, train_grpo

    verify_artifact(dataset.path, "Dataset")
    data = load_dataset(dataset.path)
    config = GRPOConfig(
        epochs=epochs,
        steps=steps or None,
        group_size=group_size,
        batch_size=batch_size,
        beta=beta,
        lr=lr,
        max_principal_share=max_principal_share,
        replay_kl_weight=replay_kl_weight,
        replay_bce_weight=replay_bce_weight,
        seed=seed,
        progress=False,
    )
    summary = train_grpo(
        sft_model.path, feedback.path, model.path, config, val_dataset=data.split("val"),
        test_texts=[d.text for d in data.split("test").documents], replay_dataset=data.split("train"),
    )
    metrics.log_metric("final_kl", summary["final_kl"])
    metrics.log_metric("final_reward", summary["reward_curve"][-1] if summary["reward_curve"] else 0.0)
    metrics.log_metric("steps", summary["steps"])
    metrics.log_metric("feedback_records", summary["feedback_records"])
    metrics.log_metric("feedback_excluded_test_overlap", summary["feedback_excluded_test_overlap"])
    cap = summary["principals"]
    metrics.log_metric("principals", cap["principals"])
    metrics.log_metric("principal_cap", cap["effective_share"])
    metrics.log_metric("capped_principals", cap["capped_principals"])
    metrics.log_metric("largest_principal_share_before", cap["largest_share_before"])
    metrics.log_metric("largest_principal_share_after", cap["largest_share_after"])
    metrics.log_metric("principal_weight_moved", cap["weight_moved"])
    model.metadata.update({"kind": "Model", "feedback_digest": summary["feedback_digest"]})
    return float(summary["final_kl"])
