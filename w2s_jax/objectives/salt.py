"""`salt`: a small LM helps train a large one (SALT, Rawat et al. 2024).

For the first n_KD optimizer steps the loss at every completion token is
(1 − ω)·CE + ω·KD, then plain CE. CE is the student's next-token loss; KD is the
divergence between the frozen teacher's and the student's full next-token
distributions at temperature τ (`divergence.fused_distillation`: forward
KL(teacher‖student) by default, reverse KL or JS), without a τ² factor. ω follows the
step (`KDSchedule.omega`): `step` keeps it at `kd_weight` until n_KD, `linear` decays
it from `kd_weight` to 0 over the n_KD steps.

The teacher (`LossContext.teacher`) runs in the same jitted step, only while ω > 0
(`lax.cond`); both models' hidden states are projected onto the vocabulary by the
fused kernels, `loss_chunk_size` positions at a time, so [B, T, V] logits never exist.
Records are the `sft` objective's (prompt_ids, completion_ids). Metrics: ce, kd,
ce_weight = 1 − ω, kd_weight = ω, teacher_agreement (student and teacher top-1
agree; 0 once the teacher no longer runs).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from w2s_jax.divergence import fused_contrastive_loss, fused_distillation
from w2s_jax.objectives.base import LossContext, Objective
from w2s_jax.objectives.contrastive import positions_hidden
from w2s_jax.objectives.sft import completion_targets


@dataclasses.dataclass(frozen=True)
class KDSchedule:
    """SALT's knowledge-distillation phase: n_KD steps, weight ω, temperature, direction."""

    steps: int = 0
    weight: float = 0.5
    temperature: float = 1.0
    direction: str = "forward"
    transition: str = "step"

    def omega(self, step):
        """ω at 0-based optimizer step `step` (a Python int or a traced integer).

        step: `weight` for step < n_KD, then 0. linear: weight · (1 − step / n_KD) for
        step < n_KD, then 0.
        """
        step = jnp.asarray(step, jnp.float32)
        in_phase = step < self.steps
        if self.transition == "linear":
            value = self.weight * (1.0 - step / max(self.steps, 1))
        else:
            value = jnp.float32(self.weight)
        return jnp.where(in_phase, value, 0.0).astype(jnp.float32)

    @classmethod
    def from_settings(cls, settings) -> KDSchedule:
        """The schedule of a run's `TrainSettings` (its `--kd-*` flags)."""
        if settings.kd_steps < 1:
            raise ValueError("--objective salt needs --kd-steps N >= 1 (the KD phase's length)")
        return cls(
            steps=settings.kd_steps,
            weight=settings.kd_weight,
            temperature=settings.kd_temperature,
            direction=settings.kd_direction,
            transition=settings.kd_transition,
        )


def salt_loss(model, micro: dict, ctx: LossContext, *, schedule: KDSchedule):
    """(1 − ω)·mean CE + ω·mean KD over the micro-batch's positions, with aux sums.

    aux: ce, kd (means), agree (count of positions where the top-1 ids agree), omega.
    """
    omega = schedule.omega(ctx.step)
    hidden_pd = positions_hidden(model, micro)
    head, layout = model.lm_head_matrix()
    ids_pk, weights_pk = micro["target_ids"], micro["target_weights"]
    positions = ids_pk.shape[0]
    chunk = ctx.loss_chunk_size or positions
    vocab = model.token_count

    def with_teacher():
        teacher_head, teacher_layout = ctx.teacher.lm_head_matrix()
        ce, kd, agree = fused_distillation(
            hidden_pd,
            head,
            positions_hidden(ctx.teacher, micro),
            teacher_head,
            ids_pk[:, 0],
            chunk_size=chunk,
            temperature=schedule.temperature,
            direction=schedule.direction,
            vocab_size=min(vocab, ctx.teacher.token_count),
            student_head_layout=layout,
            teacher_head_layout=teacher_layout,
        )
        return jnp.mean(ce), jnp.mean(kd), jnp.sum(agree).astype(jnp.float32)

    def ce_only():
        selected = jnp.ones((positions,), bool)
        ce = fused_contrastive_loss(
            hidden_pd,
            head,
            ids_pk,
            weights_pk,
            selected,
            chunk_size=chunk,
            vocab_size=vocab,
            head_layout=layout,
        )
        return ce, jnp.float32(0.0), jnp.float32(0.0)

    ce, kd, agree = jax.lax.cond(omega > 0, with_teacher, ce_only)
    loss = (1.0 - omega) * ce + omega * kd
    return loss, {"ce": ce, "kd": kd, "agree": agree, "omega": omega}


def salt_metrics(mean_loss, aux: dict, batch: dict) -> dict:
    """ce, kd and ω averaged over the micro-batches; teacher_agreement per position."""
    a, p = batch["target_ids"].shape[:2]
    kd_weight = aux["omega"] / a
    return {
        "ce": aux["ce"] / a,
        "kd": aux["kd"] / a,
        "ce_weight": 1.0 - kd_weight,
        "kd_weight": kd_weight,
        "teacher_agreement": aux["agree"] / (a * p),
    }


def salt_objective(schedule: KDSchedule) -> Objective:
    """The `salt` objective with this KD schedule (notebooks, tests, benchmarks)."""
    return Objective(
        name="salt",
        record_targets=completion_targets,
        loss=functools.partial(salt_loss, schedule=schedule),
        metrics=salt_metrics,
        needs_teacher=True,
        configure=lambda settings: salt_objective(KDSchedule.from_settings(settings)),
    )


OBJECTIVE = salt_objective(KDSchedule())
