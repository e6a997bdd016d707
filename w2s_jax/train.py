"""Fine-tuning: distil sparse soft targets into a model, packed, sharded and resumable.

The objective is a plug-in (`w2s_jax.objectives`): it reads the records' targets,
lays out the step's arrays and gives the loss; the step here is written once and
asks it. `contrastive` (LightReasoner's fine-tuning stage): at every selected
position t of a trajectory, the soft cross-entropy -Σ_a v_C(a) log πθ(a | s_t)
(= KL(v_C ‖ πθ) + H(v_C)), averaged over the selected positions of the step.
`sft` is the same with one-hot targets on every completion token (prompt masked).

Packing: one forward pass per trajectory (prompt + rollout ids) gives the hidden
states of all its positions; the loss gathers the supervised ones. Because each
micro-batch holds exactly positions_per_step / grad_accum positions, the step's
loss and gradient are the mean over its positions, i.e. the reference's
one-position-per-forward objective on the same positions.

The step is one jitted function (micro-batches scanned, gradients averaged, then
clipping and AdamW with a linear schedule) with explicit in/out shardings on a
("data", "fsdp", "tensor") mesh and the trainable state donated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from w2s_jax import sharding
from w2s_jax.data.kd_selection import kd_selection, step_stream
from w2s_jax.data.packing import check_samples_match, load_training_data  # noqa: F401 (public)
from w2s_jax.files import DataError, atomic_write_json
from w2s_jax.lora import apply_lora, trainable_filter
from w2s_jax.metrics import MetricsLog, StepMeter
from w2s_jax.objectives import LossContext, Objective, get_objective
from w2s_jax.objectives.base import PACKED_LAYOUT, ROWS
from w2s_jax.run_folder import claim
from w2s_jax.teacher import load_teacher, student_tokenizer_folder
from w2s_jax.train_config import FREE_SETTINGS, TrainSettings

RUN_FILE = "train_config.json"


def build_optimizer(config: TrainSettings):
    """(optax transformation, learning-rate schedule): clip, then AdamW with linear decay to 0.

    With warmup the rate rises linearly from 0 over `warmup_steps` first (as the HF
    trainer's linear schedule).
    """
    decay = optax.linear_schedule(config.learning_rate, 0.0, config.steps - config.warmup_steps)
    schedule = decay
    if config.warmup_steps:
        warmup = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
        schedule = optax.join_schedules([warmup, decay], [config.warmup_steps])
    tx = optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.adamw(
            schedule,
            b1=config.adam_b1,
            b2=config.adam_b2,
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
        ),
    )
    return tx, schedule


def make_loss_and_grads(
    graphdef,
    *,
    objective: str | Objective = "contrastive",
    dropout: bool = False,
    loss_chunk_size: int = 0,
    teacher_graphdef=None,
):
    """fn(params, rest, batch, key) -> (metrics, grads) of one step, un-jitted.

    The loss is the objective's (a name in `w2s_jax.objectives`, or an `Objective`),
    once per micro-batch: batch arrays carry a leading micro-batch axis A (the
    objective's `collate`); the A micro-batches are scanned and their mean losses and
    gradients averaged. As each holds the same number of positions, that is the mean
    over all the step's positions. `rest` is the frozen state; with `teacher_graphdef`
    (objectives that need a teacher) it is the pair (frozen state, teacher state) and
    the teacher runs in the same step. `step` (the 0-based optimizer step, traced) reaches
    the loss as `LossContext.step`. metrics: loss, then the objective's (contrastive and
    sft: kl = KL(v_C ‖ πθ), agreement = argmax of πθ == the target's top token).
    """
    objective = get_objective(objective) if isinstance(objective, str) else objective

    def micro_loss(params, rest, micro, key, step):
        teacher = None
        if teacher_graphdef is not None:
            rest, teacher_state = rest
            teacher = nnx.merge(teacher_graphdef, teacher_state, copy=True)
        model = nnx.merge(graphdef, params, rest, copy=True)
        if dropout:
            nnx.reseed(model, dropout=key)
        return objective.loss(model, micro, LossContext(loss_chunk_size, teacher, step))

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def loss_and_grads(params, rest, batch, key, step=0):
        a = jax.tree.leaves(batch)[0].shape[0]
        step = jnp.asarray(step, jnp.int32)

        def body(carry, xs):
            micro, index = xs
            micro_key = jax.random.fold_in(key, index)
            (loss, aux), grads = grad_fn(params, rest, micro, micro_key, step)
            return jax.tree.map(jnp.add, carry, (grads, loss, aux)), None

        # the loss's and aux's shapes and dtypes, without running it
        first = jax.tree.map(lambda x: x[0], batch)
        shapes = jax.eval_shape(micro_loss, params, rest, first, key, step)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        zero = (jax.tree.map(jnp.zeros_like, params), *zeros)
        (grads, loss, aux), _ = jax.lax.scan(body, zero, (batch, jnp.arange(a)))
        metrics = {"loss": loss / a, **objective.metrics(loss / a, aux, batch)}
        return metrics, jax.tree.map(lambda g: g / a, grads)

    return loss_and_grads


def make_train_step(graphdef, tx, **loss_options):
    """The (un-jitted) step: ((params, opt_state), rest, batch, key) -> (new state, metrics).

    Gradients from `make_loss_and_grads(graphdef, **loss_options)`, then `tx` (clipping
    + AdamW); metrics add grad_norm (before clipping). The step's index is the optimizer's
    update count (restored with it on resume), as for the learning-rate schedule.
    """
    loss_and_grads = make_loss_and_grads(graphdef, **loss_options)

    def step(state, rest, batch, key):
        params, opt_state = state
        index = optax.tree_utils.tree_get_all_with_path(opt_state, "count")[0][1]
        metrics, grads = loss_and_grads(params, rest, batch, key, index)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state), {**metrics, "grad_norm": optax.tree.norm(grads)}

    return step


def shard_batch(arrays: dict, mesh, layout=PACKED_LAYOUT) -> dict:
    """Global arrays on `mesh` (`batch_shardings`) from identical host copies on all processes."""
    return jax.tree.map(
        sharding.to_global,
        arrays,
        batch_shardings(mesh, layout),
    )


def batch_shardings(mesh, layout=PACKED_LAYOUT) -> dict:
    """A sharding per array of an objective's `layout`: ROWS arrays [A, R, ...] split their
    rows over the mesh's batch axes; the others (positions) are replicated."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from w2s_jax.sharding import BATCH_AXES

    rows = NamedSharding(mesh, P(None, BATCH_AXES))
    replicated = NamedSharding(mesh, P())
    return {name: rows if kind == ROWS else replicated for name, kind in layout.items()}


def configured_objective(config: TrainSettings) -> Objective:
    """The run's objective, bound to its settings when it has some (`Objective.configure`)."""
    objective = get_objective(config.objective)
    return objective.configure(config) if objective.configure else objective


def _load_model(config: TrainSettings, mesh):
    """The model to train, its dtypes and run-time choices from `config` (`model_options`)."""
    from w2s_jax.models import ModelConfig, init_random, load_pretrained
    from w2s_jax.settings import model_options

    options = model_options(config, master_weights=config.full_finetuning)
    if config.init == "random":
        dtype = options.pop("dtype")
        model_config = dataclasses.replace(ModelConfig.from_hf_json(config.model_config), **options)
        return init_random(model_config, seed=config.seed, dtype=dtype, mesh=mesh)
    return load_pretrained(
        config.expert, mesh=mesh, allow_unused=config.allow_unused_weights, **options
    )


def _check_resumable(out: Path, config: TrainSettings) -> None:
    claim(
        out / RUN_FILE,
        config.settings(),
        ignore=FREE_SETTINGS,
        what="a training run",
        write=sharding.is_leader(),
        has_results=(out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()),
    )


def compile_step(config: TrainSettings, mesh, *, token_count: int | None = None, teacher=None):
    """Load the model, add adapters, build the optimizer and jit the step on `mesh`.

    `token_count`: real token ids (the tokenizer's size); padded rows above it are
    never a prediction (default: every output row). `teacher`: the frozen teacher model
    an objective with `needs_teacher` asks for; its state rides in `rest`.

    Returns (step_fn, (params, opt_state), rest, schedule): `step_fn(state, rest,
    shard_batch(arrays, mesh), key) -> (state, metrics)` donates `state`.
    """
    objective = configured_objective(config)
    if objective.needs_teacher != (teacher is not None):
        need = "needs" if objective.needs_teacher else "takes no"
        raise ValueError(f"objective {objective.name!r} {need} a teacher model")
    lora = config.lora
    model = _load_model(config, mesh)
    if token_count is not None:
        model.restrict_vocab(token_count)
    apply_lora(model, lora, seed=config.seed)
    graphdef, params, rest = nnx.split(model, trainable_filter(lora), ...)
    params, rest = sharding.replicate(params, mesh), sharding.replicate(rest, mesh)
    teacher_graphdef = None
    if teacher is not None:
        teacher_graphdef, teacher_state = nnx.split(teacher)
        rest = (rest, sharding.replicate(teacher_state, mesh))
    tx, schedule = build_optimizer(config)
    state = (params, sharding.replicate(jax.jit(tx.init)(params), mesh))
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    step = make_train_step(
        graphdef,
        tx,
        objective=objective,
        dropout=bool(lora.rank and lora.dropout),
        loss_chunk_size=config.loss_chunk_size,
        teacher_graphdef=teacher_graphdef,
    )
    step_fn = jax.jit(
        step,
        in_shardings=(
            state_shardings,
            jax.tree.map(lambda x: x.sharding, rest),
            batch_shardings(mesh, objective.layout),
            None,
        ),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )
    return step_fn, state, rest, schedule


def _restore(checkpoints, state, data_fingerprint: str, config: TrainSettings):
    """(first step, state, metrics of the steps not logged yet): the latest checkpoint's,
    refused if it saw other samples."""
    start = checkpoints.latest_step() or 0
    if not start:
        return 0, state, []
    *state, meta = checkpoints.restore(start, *state)
    if meta.get("samples_fingerprint") != data_fingerprint:
        raise DataError(
            f"{config.out}: the checkpoint of step {start} was trained on different samples "
            f"than {config.samples} now holds; use another --out"
        )
    return start, tuple(state), meta.get("unlogged_metrics", [])


def _checkpoint_meta(config: TrainSettings, data_fingerprint: str, model_config) -> dict:
    """What every checkpoint records besides its arrays (export and eval read it)."""
    from w2s_jax.fingerprint import weights_fingerprint_record

    return {
        "lora": config.lora.to_dict(),
        "samples_fingerprint": data_fingerprint,
        "model_config": model_config.to_hf_dict(),
        "tokenizer": student_tokenizer_folder(config),
        "init": config.init,
        "seed": config.seed,
        "expert_weights_hashed": (
            weights_fingerprint_record(config.expert) if config.expert else None
        ),
        "teacher_weights_hashed": (
            weights_fingerprint_record(config.teacher) if config.teacher else None
        ),
    }


def _default_stop_rule(stop_signal, checkpoints) -> Callable[[int], bool]:
    """Stop after a SIGTERM, or (multi-host) when the cluster announces a preemption."""
    return lambda step: (
        stop_signal.requested or (jax.process_count() > 1 and checkpoints.reached_preemption(step))
    )


@dataclasses.dataclass
class _Steps:
    """The step loop of one `train` call and what it needs besides the state."""

    config: TrainSettings
    objective: Objective
    mesh: object
    data: tuple  # (trajectories, data stats, pad id)
    compiled: tuple  # (step_fn, rest, schedule)
    checkpoints: object
    log: object
    meta: dict
    validator: object = None  # w2s_jax.validation.Validator, with --eval-every

    def run(self, state, start: int, steps, should_stop, pending=()) -> tuple[int, bool]:
        """Steps from `start` to the end, or to the first at which `should_stop(step)` holds
        on any process (all processes stop at the same step); returns (last saved, stopped).
        `pending`: the metrics of the steps before `start` not logged yet."""
        from tqdm.auto import tqdm

        config, (trajectories, data_stats, pad_id) = self.config, self.data
        step_fn, rest, schedule = self.compiled
        is_leader = sharding.is_leader()
        row_multiple = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        base_key = jax.random.key(config.seed)
        meter, last_saved = StepMeter(pending), start
        bar = tqdm(total=config.steps, initial=start, disable=not (config.progress and is_leader))
        try:
            for step in range(start, config.steps):
                arrays = self.objective.collate(
                    trajectories,
                    next(steps),
                    k=data_stats["k"],
                    pad_id=pad_id,
                    length_bucket=config.length_bucket,
                    row_multiple=row_multiple,
                )
                batch = shard_batch(arrays, self.mesh, self.objective.layout)
                state, metrics = step_fn(state, rest, batch, jax.random.fold_in(base_key, step))
                _check_step_finite(metrics, step + 1, last_saved)
                tokens = int(arrays["attention_mask"].sum())
                meter.add(metrics, tokens=tokens, positions=config.batch_positions)
                done = step + 1
                stop = sharding.any_process(should_stop(done))  # a SIGTERM may reach one only
                if done % config.log_every == 0 or done == config.steps or stop:
                    values = meter.values(lr=float(schedule(step)))
                    if is_leader:
                        self.log.write(done, values)
                    else:  # kept for the summary; only process 0 writes files
                        self.log.records.append({"step": done, **values})
                    bar.set_postfix({k: f"{values[k]:.4f}" for k in ("loss", "kl") if k in values})
                bar.update(1)
                meta = {**self.meta, "data_step": done, "unlogged_metrics": list(meter.metrics)}
                validate = self.validator is not None and self.validator.due(done)
                # every process takes part in a save (Orbax's saves are collective)
                force = stop or validate or done == config.steps
                if self.checkpoints.save(done, *state, meta, force=force):
                    last_saved = done
                if validate:
                    self.validator.validate(done, self.checkpoints)
                if stop:
                    return last_saved, done < config.steps
        finally:
            bar.close()
        return last_saved, False


def train(
    config: TrainSettings, *, should_stop: Callable[[int], bool] | None = None, mesh=None
) -> dict:
    """Run (or resume) training into `config.out`; returns the run summary.

    Writes OUT/checkpoints (every `save_every` steps and at the end), metrics.jsonl,
    tensorboard/, loss_curve.png and summary.json. `should_stop(step)` is asked
    after every step (default: has SIGTERM arrived?); when true the state is
    saved and the summary has "stopped": True. Re-running resumes. `mesh` (a
    jax Mesh) overrides `config.mesh`. Under multi-host JAX every process runs this;
    process 0 alone writes the files other than the checkpoints (which all write).
    """
    from w2s_jax.checkpointing import StopSignal, TrainCheckpoints
    from w2s_jax.models.dtypes import resolve_dtypes, warn_if_slow

    config = resolve_dtypes(config, master_weights=config.full_finetuning)
    warn_if_slow(config.dtype)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    trajectories, data_stats, fingerprint, pad_id, model_config, tokens = load_training_data(config)
    kd_subset, fingerprint = kd_selection(config, trajectories, fingerprint)
    objective = configured_objective(config)  # its settings checked before the folder is claimed
    mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
    teacher = load_teacher(config, mesh, tokens)  # checked before the folder is claimed
    _check_resumable(out, config)
    step_fn, state, rest, schedule = compile_step(config, mesh, token_count=tokens, teacher=teacher)
    checkpoints = TrainCheckpoints(out, save_every=config.save_every, keep=config.keep_checkpoints)
    start, state, pending = _restore(checkpoints, state, fingerprint, config)
    is_leader = sharding.is_leader()
    log = MetricsLog(out, resume_step=start, tensorboard=is_leader)
    steps = _Steps(
        config,
        objective,
        mesh,
        (trajectories, data_stats, pad_id),
        (step_fn, rest, schedule),
        checkpoints,
        log,
        _checkpoint_meta(config, fingerprint, model_config),
        _validator(config, out, is_leader),
    )
    stop_signal = StopSignal()
    if should_stop is None:
        should_stop = _default_stop_rule(stop_signal, checkpoints)
    stream = step_stream(trajectories, config, start, kd_subset)
    try:
        with stop_signal:
            last_saved, stopped = steps.run(state, start, stream, should_stop, pending)
    finally:  # waits for a save in flight, also when interrupted; the first error wins
        errors = _close_all(checkpoints.close, log.close)
    if errors:
        raise errors[0]
    summary = {"steps": last_saved, "stopped": stopped, "data": data_stats}
    return _summarize(out, summary, log, checkpoints, steps.validator, is_leader)


def _validator(config: TrainSettings, out: Path, is_leader: bool):
    """The run's Validator (w2s_jax.validation) with --eval-every, else None."""
    if not config.eval_every:
        return None
    from w2s_jax.validation import Validator

    return Validator(config, out, is_leader=is_leader, log=print if is_leader else lambda _: None)


def _close_all(*closers) -> list[Exception]:
    """Call every closer; the errors they raised, in order (an error of the run itself,
    in flight, stays the one reported)."""
    errors = []
    for close in closers:
        try:
            close()
        except Exception as exc:  # noqa: BLE001 (reported by the caller)
            errors.append(exc)
    return errors


def _check_step_finite(metrics: dict, step: int, last_saved: int) -> None:
    """NonFiniteError when a step's loss or gradient norm is not finite; that state is
    never saved (the last checkpoint, of step `last_saved`, holds finite weights)."""
    from w2s_jax.files import NonFiniteError

    values = jax.device_get({k: metrics[k] for k in ("loss", "grad_norm") if k in metrics})
    bad = [k for k, v in values.items() if not np.isfinite(v)]
    if bad:
        shown = ", ".join(f"{k}={values[k]}" for k in bad)
        kept = (
            f"the last checkpoint (step {last_saved}) is kept"
            if last_saved
            else "no checkpoint was saved before it"
        )
        raise NonFiniteError(
            f"step {step}: non-finite {shown}; {kept}; lower the learning rate or check "
            "the data and weights"
        )


def _summarize(out: Path, summary: dict, log, checkpoints, validator, is_leader) -> dict:
    """The run's summary: `summary` (steps, stopped, data) with the final metrics, the
    last checkpoint and the validation's best step (also summary.json and loss_curve.png
    on the leader)."""
    summary = {
        **summary,
        "final": log.records[-1] if log.records else None,
        "checkpoint": str(checkpoints.directory / str(summary["steps"])),
    }
    if validator is not None and validator.best() is not None:
        from w2s_jax.validation import BEST_DIR

        best = validator.best()
        summary["validation"] = {
            "best_step": best["step"],
            "best": best,
            "best_checkpoint": str(out / BEST_DIR / str(best["step"])),
            "steps": validator.records,
        }
    if is_leader:
        log.plot(out / "loss_curve.png")
        atomic_write_json(out / "summary.json", summary)
    return summary
