"""The training job: building a run, then running its phases with the loop's hooks.

``train(config, workdir)`` = :func:`build_job` (model, plan, mesh, optimizer, objective, data checks,
restore) then :func:`run_job`. It loads the frozen model, caches VAE latents once (:mod:`dataset`),
then runs the jit-compiled ``step(state, batch, rng) -> (state, metrics)`` (:mod:`step`) over a
``data`` mesh axis (batch sharded, learned rows replicated), with Orbax checkpoints every N
steps and on SIGTERM. The loop knows no method by name: the objective is built from
``config.loss`` weights, the phases from the config (:mod:`phases`). Defaults (the embedded
toy job, XLA's cache) are the command layer's business, not this module's.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from tqdm import tqdm

from jax_inversion.artifacts import checkpoints
from jax_inversion.artifacts.export import initial_rows_from_file
from jax_inversion.configs.ti import resolve_unset
from jax_inversion.core.aot import GIB, compile_ahead, device_memory_bytes
from jax_inversion.core.errors import TrainError
from jax_inversion.core.files import is_remote
from jax_inversion.core.platform import platform_name, resolve_dtype
from jax_inversion.core.sharding import make_mesh, replicated
from jax_inversion.data import images as data_lib
from jax_inversion.data.dataset import build_dataset, check_phase_images, check_phase_masks, check_prompt_lengths, concept_batch, concept_phase, global_batch
from jax_inversion.data.phases import ConceptSpec, Phase, RunPlan, plan_run, read_concept_list
from jax_inversion.diffusion.schedule import NoiseSchedule
from jax_inversion.models.loading import Pretrained, load_pretrained
from jax_inversion.models.provenance import base_model_info
from jax_inversion.models.unet import cross_attention_layers
from jax_inversion.objectives.terms import Objective, TermSetup
from jax_inversion.sampling.generate import Validator
from jax_inversion.text import tokens as tokens_lib
from jax_inversion.text.conditioning import encoders_of, input_embedding_table, vae_factor, with_clip_skip
from jax_inversion.training.hooks import (CheckpointHook, ExportHook, Hook, MetricsHook, ProfileHook, StepEnd, ValidationHook,
                                          open_writers, wandb_module)
from jax_inversion.training.optim import make_optimizer
from jax_inversion.training.step import StepConfig, TrainState, init_state, make_train_step, timestep_bounds

log = logging.getLogger("jax_inversion")


def check_writable(workdir: str) -> None:
    """Fails with one line, before anything is written, when ``workdir`` cannot be written."""
    if not is_remote(workdir):
        try:
            os.makedirs(workdir, exist_ok=True)
            probe = os.path.join(workdir, f".write_test_{os.getpid()}")
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as e:
            raise TrainError(f"workdir {workdir} is not writable ({e.strerror}): pass a --workdir you can write to") from None
        return
    quiet = logging.getLogger("gcsfs")  # its retries log tracebacks; the one line below says it all
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:  # gs://...: a bucket that is missing, unreachable or not ours fails here, whatever the client raises
        probe = epath.Path(workdir) / f".write_test_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except Exception as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise TrainError(
            f"workdir {workdir} cannot be written ({type(e).__name__}: {reason}): check the bucket name and your "
            "credentials (gcloud auth application-default login), or pass a local --workdir"
        ) from None
    finally:
        quiet.setLevel(level)


def run_metadata(config, placeholder_ids: dict, model: Pretrained, plan: RunPlan) -> dict:
    """What export, sampling and resume need to read back, stored with every checkpoint."""
    return {
        "model": model.path,
        "layout": placeholder_ids["text_encoder"].to_dict(),
        "layouts": {name: ids.to_dict() for name, ids in placeholder_ids.items()},  # key kept: checkpoints read alike
        "placeholder_token": config.data.placeholder_token,
        "num_vectors": config.data.num_vectors,
        "concepts": plan.concepts_metadata(),
        "plan": plan.to_dict(),
        "num_train_timesteps": int(model.scheduler_config.get("num_train_timesteps", 1000)),
        "embedding_dim": int(model.text_encoder.config.hidden_size),
        "embedding_dims": {name: int(module.config.hidden_size) for name, (module, _) in encoders_of(model).items()},
        "config": json.loads(config.to_json_best_effort()),
        "base_model": base_model_info(model, training_resolution(config, model)),  # name, family, hash: exports record it
    }


def initial_rows(config, model: Pretrained, plan: RunPlan) -> dict:
    """``{encoder: rows}`` to start from: ``[n, d]``, or ``[S, K, n, d]`` with timestep stages / K-V parts."""
    initial = {}
    context = config.loss_options.get("context", {})
    positives = None  # Lego's init_from_positives: one word list per concept vector
    if context.get("init_from_positives") and context.get("positives"):
        concept, lists = plan.concept, [list(words) for words in context.positives]
        if len(lists) not in (1, concept.num_vectors):
            raise TrainError(f"loss_options.context.positives has {len(lists)} word lists for {concept.num_vectors} "
                             f"concept vectors: give 1 (shared) or {concept.num_vectors}")
        positives = lists * concept.num_vectors if len(lists) == 1 else lists
    for i, (name, (_, tok)) in enumerate(encoders_of(model).items()):
        table = input_embedding_table(model, name)
        rng = np.random.default_rng([config.seed, 2, i])
        init_ids = []
        for group in plan.groups:  # a word or phrase, spread over the group's vectors in order
            if group.initializer:
                init_ids += tokens_lib.initializer_groups(tok, group.initializer, group.num_vectors)
            else:
                init_ids += [None] * group.num_vectors
        initial[name] = tokens_lib.initial_embeddings(table, init_ids, rng)
        for k, words in enumerate(positives or ()):  # each concept vector starts at the mean of its positive words
            initial[name][plan.concept.start + k] = np.mean([tokens_lib.word_embedding(tok, table, w) for w in words], axis=0)
    if config.init_from:
        concept = plan.concept
        widths = {name: rows.shape[-1] for name, rows in initial.items()}
        loaded = initial_rows_from_file(config.init_from, widths, concept.num_vectors)
        for name in initial:
            initial[name][concept.start : concept.stop] = loaded[name]
    if plan.num_stages > 1 or plan.separate_kv:
        parts = 2 if plan.separate_kv else 1
        initial = {name: np.tile(rows, (plan.num_stages, parts, 1, 1)) for name, rows in initial.items()}
    return initial


def concept_config(config, concept: ConceptSpec):
    """The config of training ``concept`` alone: its seed and initializer."""
    alone = ml_collections.ConfigDict(config.to_dict())
    alone.seed = concept.seed
    alone.data.initializer_token = concept.initializer
    return alone


def class_word_ids(config, model: Pretrained) -> Optional[dict]:
    """``{encoder: id}`` of the concept's class word (``data.class_word``, else its initializer), or None."""
    word = config.data.class_word or config.data.initializer_token
    if not word:
        return None
    return {name: tokens_lib.initializer_id(tok, word) for name, (_, tok) in encoders_of(model).items()}


def training_resolution(config, model: Pretrained) -> int:
    """Training images' side: ``data.resolution``, else the model's native one."""
    return config.data.resolution or model.unet.config.sample_size * vae_factor(model)


@dataclasses.dataclass
class RunSetup:
    """What a job builds before it reads any image: the model, the plan, the mesh, the optimizer, the
    objective and step 0's state; :meth:`make_step` gives each phase's jitted step. ``train`` runs it;
    ``jax-inversion compile`` lowers the same steps for a TPU topology from a shapes-only model."""

    config: ml_collections.ConfigDict
    model: Pretrained
    plan: RunPlan
    concepts: Optional[list]
    placeholder_ids: dict
    mesh: jax.sharding.Mesh
    optimizer: Any
    lr_schedule: Any
    objective: Any
    reference_ids: Optional[dict]
    with_masks: bool
    schedule: NoiseSchedule
    timesteps: tuple[int, int]
    accumulation: int
    state: TrainState

    @property
    def resolution(self) -> int:
        return training_resolution(self.config, self.model)

    def make_step(self, phase: Phase, resolution: int):
        """The jitted step of ``phase`` (:func:`step.make_train_step`) at ``resolution``."""
        return make_train_step(self.model, self.schedule, self.placeholder_ids, self.optimizer, self.objective,
                               self.lr_schedule, self.mesh, self.step_config(phase, resolution), self.reference_ids)

    def step_config(self, phase: Phase, resolution: int) -> StepConfig:
        """``phase``'s :class:`step.StepConfig` at ``resolution``: batch inversion learns plain rows, without
        stages or per-term gradient norms."""
        train = self.config.train
        common = StepConfig(resolution=resolution, min_snr_gamma=train.min_snr_gamma, trainable=phase.trainable,
                            remat=train.remat, noise_offset=train.noise_offset, timestep_range=self.timesteps,
                            accumulation=self.accumulation,
                            whole_reference_forward=platform_name(self.mesh.devices.flat[0].platform) == "tpu")
        if self.concepts:
            return dataclasses.replace(common, concepts=tuple((c.name, c.seed) for c in self.concepts))
        return dataclasses.replace(common, num_stages=self.plan.num_stages, separate_kv=self.plan.separate_kv,
                                   log_every=train.log_every)


def setup_run(config: ml_collections.ConfigDict, devices: Optional[list] = None, shapes_only: bool = False) -> RunSetup:
    """Checks the config against ``devices`` (default all) and builds the :class:`RunSetup`.

    ``shapes_only``: the model's weights are shapes (``load_pretrained(shapes_only=True)``), and so is
    the returned state's leaves' content (zeros): enough to lower and compile the steps.
    """
    config = resolve_unset(config)  # unset num_steps / num_vectors / min_timestep: ti.py's defaults
    if config.train.num_steps < 0:
        raise TrainError("train.num_steps is negative: pass --config.train.num_steps=N with N >= 0")
    devices = devices if devices is not None else jax.devices()
    n_devices = len(devices)
    concepts = read_concept_list(config.concepts, config) if config.get("concepts") else None
    per_step = config.train.batch_size * (len(concepts) if concepts else 1)
    if config.train.batch_size <= 0 or per_step % n_devices:
        what = f"{len(concepts)} concepts x train.batch_size={config.train.batch_size}" if concepts else f"train.batch_size={config.train.batch_size}"
        good = n_devices // math.gcd(len(concepts) if concepts else 1, n_devices)
        raise TrainError(
            f"{what} is not a positive multiple of the {n_devices} devices: pass --config.train.batch_size={good} or a multiple of it"
        )
    accumulation = check_accumulation(config.train)
    plan = plan_run(config)
    if concepts:
        if len(plan.groups) > 1 or plan.num_stages > 1 or plan.separate_kv or config.init_from:
            raise TrainError(
                "batch inversion (config.concepts) learns plain multi-vector tokens: unset data.subject_token, "
                "data.num_stages, data.separate_kv and init_from, or train those concepts one per job"
            )
        if not config.model:
            raise TrainError("batch inversion needs a model: pass --config.model=PATH")
    model = load_pretrained(config.model, dtype=resolve_dtype(config.dtype, platform_name(devices[0].platform)),
                            attention_backend=config.attention_backend, shapes_only=shapes_only,
                            tokenizer=config.get("model_tokenizer", ""))
    model = with_clip_skip(model, config.get("clip_skip", 1))
    encoders = encoders_of(model)
    placeholder_ids = {name: tokens_lib.add_placeholder_tokens(tok, plan.tokens) for name, (_, tok) in encoders.items()}

    mesh = make_mesh(devices)
    optimizer, lr_schedule = make_optimizer(config.train, config.train.batch_size, per_concept=bool(concepts))
    if concepts:  # each concept starts where training it alone (its seed, its initializer) starts
        rows = [initial_rows(concept_config(config, c), model, plan) for c in concepts]
        embeddings = {name: np.stack([r[name] for r in rows]) for name in encoders}
    else:
        embeddings = initial_rows(config, model, plan)
    if not shapes_only:
        embeddings = {name: jnp.asarray(rows) for name, rows in embeddings.items()}
        state = init_state(embeddings, optimizer, config.seed)
    else:  # no device to put values on: the state's shapes, replicated over the mesh
        shapes = jax.eval_shape(lambda e: init_state(e, optimizer, config.seed), embeddings)
        same = replicated(mesh)
        state = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=same), shapes)
    schedule = NoiseSchedule.from_config(model.scheduler_config)
    timesteps = timestep_bounds((config.train.min_timestep, config.train.max_timestep), schedule)  # fails before latents or checkpoints are written
    resolution = training_resolution(config, model)
    setup = TermSetup(
        options=config.get("loss_options"),
        tokenizers={name: tok for name, (_, tok) in encoders.items()},
        tables={name: input_embedding_table(model, name) for name in encoders},
        concept_rows=(plan.concept.start, plan.concept.stop),
        initializer=config.data.initializer_token,
        class_word=config.data.class_word or config.data.initializer_token,
        attention_layers=cross_attention_layers(model.unet.config, resolution // vae_factor(model)),
    )
    objective = Objective(dict(config.loss), setup)
    reference_ids = class_word_ids(config, model) if "reference_maps" in objective.needs else None
    return RunSetup(config, model, plan, concepts, placeholder_ids, mesh, optimizer, lr_schedule, objective, reference_ids,
                    "masks" in objective.needs, schedule, timesteps, accumulation, state)


@dataclasses.dataclass
class Job:
    """A run built, checked and restored, ready to step (:func:`build_job`); :func:`run_job` runs it."""

    run: RunSetup
    workdir: str
    state: TrainState  # step 0's, or the latest checkpoint's
    manager: checkpoints.CheckpointManager
    metadata: dict
    validate: Optional[Validator]
    wandb: Any  # the wandb package when train.wandb is on

    def prepare_phase(self, phase: Phase):
        """``(step_fn, batch_at)`` of ``phase``: its jitted step and ``batch_at(step)``, the global batch of that step."""
        config, run = self.run.config, self.run
        if run.concepts:
            datasets = [build_dataset(config, run.model, concept_phase(phase, c), self.workdir, run.with_masks) for c in run.concepts]
            samplers = [
                data_lib.BatchSampler(d.num_images, d.num_prompts, config.train.batch_size, c.seed, config.data.flip_probability)
                for d, c in zip(datasets, run.concepts)
            ]
            step_fn = run.make_step(phase, datasets[0].resolution)
            return step_fn, lambda step: concept_batch(datasets, samplers, step - phase.start, run.mesh, run.with_masks)
        dataset = build_dataset(config, run.model, phase, self.workdir, run.with_masks)
        sampler = data_lib.BatchSampler(
            dataset.num_images, dataset.num_prompts, config.train.batch_size,
            config.seed + 1_000_003 * run.plan.phases.index(phase), config.data.flip_probability,
        )
        batch_at = lambda step: global_batch(dataset, sampler, step - phase.start, run.mesh, run.with_masks)
        return run.make_step(phase, dataset.resolution), batch_at

    def reset_optimizer(self, state: TrainState) -> TrainState:
        """``state`` with a fresh optimizer state: a phase after the first starts its own AdamW moments."""
        return jax.device_put(state.replace(opt_state=self.run.optimizer.init(state.embeddings)), replicated(self.run.mesh))


def _phases_with_data(config: ml_collections.ConfigDict, plan=None, concepts=None) -> list[Phase]:
    """The phases whose images the run reads: each phase with steps, or with ``config.concepts`` each concept's."""
    plan = plan or plan_run(config)
    if config.get("concepts"):
        return [concept_phase(plan.phases[0], c) for c in concepts or read_concept_list(config.concepts, config)]
    return [p for p in plan.phases if p.num_steps > 0]


def build_job(config: ml_collections.ConfigDict, workdir: str, devices: Optional[list] = None) -> Job:
    """Builds the run (:func:`setup_run`), checks every phase's data, restores the latest checkpoint of
    ``workdir`` and writes ``config.json``. Bad input fails here, before the workdir is written."""
    check_writable(workdir)
    resolved = resolve_unset(config)
    for phase in _phases_with_data(resolved):  # images first: a bad folder fails before the model loads
        check_phase_images(resolved, phase)
    run = setup_run(config, devices)
    config = run.config  # unset fields resolved: what config.json and the checkpoints' metadata record
    wandb = wandb_module() if config.train.get("wandb") else None
    for phase in _phases_with_data(config, run.plan, run.concepts):  # what needs the model and the objective
        if run.with_masks:
            check_phase_masks(config, phase)
        check_prompt_lengths(config, phase, run.model)
    metadata = run_metadata(config, run.placeholder_ids, run.model, run.plan)
    if run.concepts:
        metadata["concept_batch"] = [{"name": c.name, "index": i, "seed": c.seed, "dir": c.image_dir} for i, c in enumerate(run.concepts)]
    # Replicated over the mesh before restoring, so a checkpoint is read straight into the run's
    # sharding: several processes cannot spread a restored host-local (committed) array.
    state = jax.device_put(run.state, replicated(run.mesh))
    manager = checkpoints.CheckpointManager(workdir, config.train.checkpoint_every, config.train.keep_checkpoints)
    restored = manager.restore_latest(state, metadata)
    if restored is not None:
        state = restored
        log.info("resumed from step %d in %s", int(state.step), workdir)
    validate = None
    if (config.train.validation_every > 0 or config.train.get("validation_at_start", False)) and config.train.validation_prompts:
        validate = Validator(
            run.model, workdir, config.train.validation_prompts, config.train.validation_images,
            config.train.validation_steps, config.train.validation_scheduler, seed=config.seed,
            negative_prompt=config.train.get("validation_negative_prompt", ""),
        )
    (epath.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))
    return Job(run, workdir, state, manager, metadata, validate, wandb)


def train(config: ml_collections.ConfigDict, workdir: str, devices: Optional[list] = None) -> TrainState:
    """Runs (or resumes) the job described by ``config`` in ``workdir`` over ``devices`` (default all)."""
    return run_job(build_job(config, workdir, devices))


def check_accumulation(train_config) -> int:
    """``train.gradient_accumulation``, checked to split ``train.batch_size`` into equal micro-batches."""
    k, batch = int(train_config.get("gradient_accumulation", 1)), train_config.batch_size
    if k < 1 or batch % k:
        good = max(d for d in range(1, max(k, 1) + 1) if batch % d == 0)
        raise TrainError(
            f"train.gradient_accumulation={k} does not split train.batch_size={batch} into equal micro-batches: "
            f"pass a divisor of the batch, e.g. --config.train.gradient_accumulation={good}"
        )
    return k


def _agreed_stop(stop: dict, check: bool) -> bool:
    """Whether to stop (and save) now. One process: as soon as SIGTERM came (read once: it may land
    at any moment). Several: each sees the signal at its own step, but saving is collective, so
    they agree (a tiny all-gather, only at ``check`` steps, where the host syncs anyway) and all
    stop at the same step, even one that saw no signal."""
    if jax.process_count() == 1:
        return stop["signal"] is not None
    if check and not stop.get("agreed"):
        seen = multihost_utils.process_allgather(np.int32(stop["signal"] is not None))
        stop["agreed"] = bool(np.asarray(seen).any())
    return bool(stop.get("agreed"))


def compile_phase_step(step_fn, state, batch, rng, phase_name: str):
    """``step(state, batch, rng)`` compiled ahead of time for these arguments (:func:`aot.compile_ahead`),
    and its report; compile time (and, on accelerators, memory per device) logged before step one.

    Raises:
      TrainError: on an accelerator, the step needs more memory than a device has (one line: the fix).
    """
    compiled, report = compile_ahead(step_fn.jitted, step_fn.frozen, state, batch, rng)
    capacity = device_memory_bytes(jax.local_devices()[0])
    log.warning("phase %s: %s%s", phase_name, report.summary(),
                "" if capacity is None else f", device memory {capacity / GIB:.2f} GiB")
    if not report.fits(capacity):
        raise TrainError(
            f"the {phase_name} step needs {report.peak_bytes / GIB:.2f} GiB per device and a device has "
            f"{capacity / GIB:.2f} GiB: set --config.train.remat=blocks (or dots), or lower --config.train.batch_size "
            "(or raise --config.train.gradient_accumulation)"
        )
    return (lambda state, batch, rng: compiled(step_fn.frozen, state, batch, rng)), report


def run_job(job: Job) -> TrainState:
    """Runs the plan's phases from ``job.state.step`` with the loop's hooks; a phase after the first starts
    with a fresh optimizer. Validation also runs at step 0 of a fresh run with ``train.validation_at_start``."""
    config, plan, mesh = job.run.config, job.run.plan, job.run.mesh
    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
    is_main = jax.process_index() == 0
    writer, metrics_file = open_writers(config, job.workdir, job.wandb)
    state, first = job.state, int(job.state.step)
    progress = tqdm(total=plan.num_steps, initial=first, disable=not is_main, desc="train", dynamic_ncols=True)
    hooks = loop_hooks(job, writer, metrics_file, progress)
    base_rng = jax.device_put(np.asarray(state.rng), replicated(mesh))  # not donated with the state
    try:
        with jax.set_mesh(mesh):
            if job.validate is not None and first == 0 and config.train.get("validation_at_start", False) and is_main:
                job.validate(0, jax.device_get(state.embeddings), job.metadata, writer)  # the initial rows: the base model's view
            for index, phase in enumerate(plan.phases):
                if int(state.step) >= phase.stop or _agreed_stop(stop, check=False):
                    continue
                if index > 0 and int(state.step) == phase.start:
                    state = job.reset_optimizer(state)
                progress.set_description(f"train ({phase.name})" if len(plan.phases) > 1 else "train")
                state = run_phase(config, state, phase, job.prepare_phase(phase), base_rng, hooks, stop)
            if plan.num_steps == first and job.manager.latest_step() != plan.num_steps:
                job.manager.save(plan.num_steps, state, job.metadata, force=True)
    finally:
        job.manager.wait()
        progress.close()
        signal.signal(signal.SIGTERM, previous)
        for closable in (writer, metrics_file):
            if closable:
                closable.close()
    return state


def loop_hooks(job: Job, writer, metrics_file, progress) -> list[Hook]:
    """The loop's side tasks, in the order they run after a step: the profiler (its trace ends with the
    step), metrics and the NaN check before the checkpoint of the same step, then export and validation."""
    train = job.run.config.train
    hooks = [
        ProfileHook(train.get("profile_steps"), job.workdir),
        MetricsHook(train.log_every, max(1, train.checkpoint_every), metrics_file, writer, progress, job.manager.latest_step),
        CheckpointHook(train.checkpoint_every, job.manager, job.metadata, writer),
        ExportHook(train.get("export_every", 0), job.workdir, job.metadata),
    ]
    if job.validate is not None:
        hooks.append(ValidationHook(train.validation_every, job.validate, job.metadata, writer))
    return hooks


def run_phase(config, state: TrainState, phase: Phase, prepared, base_rng, hooks: list[Hook], stop: dict) -> TrainState:
    """Steps ``phase`` from ``state.step`` to its end (or a stop), compiled ahead of time first; every hook
    sees every step."""
    step_fn, batch_at = prepared
    first = int(state.step)
    step_fn, report = compile_phase_step(step_fn, state, batch_at(first), base_rng, phase.name)
    for hook in hooks:
        hook.start_phase(phase, first, report.seconds)
    for step in range(first, phase.stop):
        for hook in hooks:
            hook.before_step(step)
        state, metrics = step_fn(state, batch_at(step), base_rng)
        done = step + 1
        stopping = _agreed_stop(stop, check=done % config.train.log_every == 0)
        end = StepEnd(done, state, metrics, phase, last=done == phase.stop or stopping)
        for hook in hooks:
            hook(end)
        if stopping:
            log.warning("SIGTERM: saved step %d, stopping", done)
            break
    return state
