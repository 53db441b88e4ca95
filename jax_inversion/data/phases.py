"""What a run learns and in which order: token groups and training phases, read from the config.

A run has one or two token groups (rows stacked in that order in the learned array) and one
phase per group. Plain inversion: one group, one phase. Subject separation (Lego): the
subject group is learned first on ``data.subject_dir``, then the concept group on
``data.concept_dir`` with prompts holding both, the subject's rows frozen. The train loop
runs whatever phases this returns; it never asks which method produced them.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from jax_inversion.configs.ti import resolve_unset
from jax_inversion.data.images import DataError, placeholder_string


@dataclasses.dataclass(frozen=True)
class TokenGroup:
    """A placeholder and its vectors: rows ``[start, start + num_vectors)`` of the learned array."""

    placeholder: str
    num_vectors: int
    initializer: str
    start: int
    class_word: str = ""  # follows the tokens in the prompts when data.append_class_word ("" = nothing)

    @property
    def tokens(self) -> list[str]:
        return placeholder_string(self.placeholder, self.num_vectors).split(" ")

    @property
    def prompt_text(self) -> str:
        """The group in a prompt: ``<c> <c>_1 ...``, then its class word if it has one (``<c> cat``)."""
        return " ".join(self.tokens + ([self.class_word] if self.class_word else []))

    @property
    def stop(self) -> int:
        return self.start + self.num_vectors


@dataclasses.dataclass(frozen=True)
class Phase:
    """Steps ``[start, stop)`` of the run: which images, what the prompts say, which rows move."""

    name: str
    start: int
    stop: int
    image_dir: str
    mask_dir: str
    prompt_text: str  # fills the templates' "{}"
    trainable: tuple[int, int]  # learned rows [a, b) updated in this phase; the others stay bit-identical

    @property
    def num_steps(self) -> int:
        return self.stop - self.start


@dataclasses.dataclass(frozen=True)
class RunPlan:
    groups: tuple[TokenGroup, ...]
    phases: tuple[Phase, ...]
    num_stages: int  # timestep stages with their own rows (SeFi-IDE); 1 = shared
    separate_kv: bool  # separate rows feeding cross-attention keys and values

    @property
    def tokens(self) -> list[str]:
        return [t for g in self.groups for t in g.tokens]

    @property
    def concept(self) -> TokenGroup:
        """The group the concept-level terms (context, anchor) act on: the last one."""
        return self.groups[-1]

    @property
    def num_steps(self) -> int:
        return self.phases[-1].stop

    def phase_at(self, step: int) -> Phase:
        for phase in self.phases:
            if step < phase.stop:
                return phase
        return self.phases[-1]

    def concepts_metadata(self) -> list[dict]:
        return [{"name": g.placeholder, "rows": [g.start, g.stop]} for g in self.groups]

    def to_dict(self) -> dict:
        return {
            "phases": [{"name": p.name, "start": p.start, "stop": p.stop, "trainable": list(p.trainable)} for p in self.phases],
            "num_stages": self.num_stages,
            "separate_kv": self.separate_kv,
        }


def _class_words(data) -> tuple[str, str]:
    """The (concept, subject) class words appended to the prompts; ("", "") unless data.append_class_word."""
    if not data.get("append_class_word", False):
        return "", ""
    concept = (data.class_word or data.initializer_token).strip()
    subject = data.subject_initializer_token.strip() if data.subject_token else ""
    if not concept and not subject:
        raise DataError(
            "data.append_class_word needs a class word: set --config.data.class_word (or data.initializer_token), e.g. cat"
        )
    return concept, subject


def plan_run(config: ml_collections.ConfigDict) -> RunPlan:
    """Token groups and phases of ``config`` (checked: one-line errors name the key to set).

    With ``data.append_class_word`` each group's class word follows its tokens ("a photo of
    <c> <c>_1 cat"; the concept's is ``data.class_word`` or its initializer, the subject's its
    initializer). Lego's concept phase says "<cpt> <subj>" (``data.concept_before_subject``, the
    default: the paper's concepts are adjectives and states, "frozen", written before the
    subject) or "<subj> <cpt>". Unset ``data.num_vectors`` / ``train.num_steps`` read as ti.py's defaults.
    """
    config = resolve_unset(config)
    data, train = config.data, config.train
    if data.num_stages < 1:
        raise DataError(f"data.num_stages={data.num_stages} must be at least 1: set --config.data.num_stages")
    concept_word, subject_word = _class_words(data)
    if not data.subject_token:
        concept = TokenGroup(data.placeholder_token, data.num_vectors, data.initializer_token, 0, concept_word)
        phase = Phase("concept", 0, train.num_steps, data.concept_dir, data.mask_dir, concept.prompt_text, (0, concept.stop))
        return RunPlan((concept,), (phase,), data.num_stages, bool(data.separate_kv))
    if data.subject_token == data.placeholder_token:
        raise DataError("data.subject_token equals data.placeholder_token: give the subject its own token, e.g. '<subj>'")
    if not data.subject_dir:
        raise DataError("data.subject_token is set but data.subject_dir is empty: pass --config.data.subject_dir=DIR of subject-only images")
    if train.subject_steps < 0:
        raise DataError("train.subject_steps is negative: pass --config.train.subject_steps=N with N >= 0")
    subject = TokenGroup(data.subject_token, data.subject_num_vectors, data.subject_initializer_token, 0, subject_word)
    concept = TokenGroup(data.placeholder_token, data.num_vectors, data.initializer_token, subject.stop, concept_word)
    pair = (concept, subject) if data.get("concept_before_subject", True) else (subject, concept)
    first = train.subject_steps
    phases = (
        Phase("subject", 0, first, data.subject_dir, data.subject_mask_dir, subject.prompt_text, (subject.start, subject.stop)),
        Phase(
            "concept", first, first + train.num_steps, data.concept_dir, data.mask_dir,
            " ".join(g.prompt_text for g in pair), (concept.start, concept.stop),
        ),
    )
    return RunPlan((subject, concept), phases, data.num_stages, bool(data.separate_kv))


@dataclasses.dataclass(frozen=True)
class ConceptSpec:
    """One concept of a batch inversion: its token (export name), images, initializer and seed."""

    name: str
    image_dir: str
    initializer: str
    seed: int
    mask_dir: str = ""


def read_concept_list(source: str, config: ml_collections.ConfigDict) -> list[ConceptSpec]:
    """Concepts of ``config.concepts``: a YAML list (or mapping) of concepts, or a folder of concept folders.

    YAML entries: ``{name: "<cat>", dir: images/cat, initializer: cat, seed: 1, masks: images/cat_masks}``
    (``initializer``/``seed``/``masks`` optional; relative dirs are relative to the YAML file). A
    folder: each sub-folder ``cat`` is the concept ``<cat>``. Seeds default to ``config.seed + index``.
    """
    import os

    import yaml

    if os.path.isdir(source):
        names = sorted(n for n in os.listdir(source) if os.path.isdir(os.path.join(source, n)))
        if not names:
            raise DataError(f"concepts folder {source} has no concept sub-folders: put one folder of images per concept in it")
        entries = [{"name": f"<{n}>", "dir": os.path.join(source, n)} for n in names]
        base = source
    elif os.path.isfile(source):
        try:
            with open(source) as f:
                loaded = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise DataError(f"cannot parse {source} as YAML ({str(e).splitlines()[0]}): fix the file") from None
        if isinstance(loaded, dict):
            loaded = [{"name": k, **(v if isinstance(v, dict) else {"dir": v})} for k, v in loaded.items()]
        if not isinstance(loaded, list) or not loaded:
            raise DataError(f"{source} must be a non-empty list of concepts like '- {{name: \"<cat>\", dir: images/cat}}'")
        entries, base = loaded, os.path.dirname(os.path.abspath(source))
    else:
        raise DataError(f"config.concepts {source!r} is neither a YAML file nor a folder: pass concepts.yaml or a folder of concept folders")
    concepts = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("name") or not entry.get("dir"):
            raise DataError(f"{source}: concept {i + 1} needs 'name' and 'dir' (e.g. {{name: \"<cat>\", dir: images/cat}})")
        unknown = sorted(set(entry) - {"name", "dir", "initializer", "seed", "masks"})
        if unknown:
            raise DataError(f"{source}: concept {entry['name']!r} has unknown keys {unknown}: use name, dir, initializer, seed, masks")
        resolve = lambda p: p if not p or os.path.isabs(p) else os.path.join(base, p)
        concepts.append(ConceptSpec(
            name=str(entry["name"]), image_dir=resolve(str(entry["dir"])),
            initializer=str(entry.get("initializer", config.data.initializer_token) or ""),
            seed=int(entry.get("seed", config.seed + i)), mask_dir=resolve(str(entry.get("masks", "") or "")),
        ))
    names = [c.name for c in concepts]
    if len(set(names)) != len(names):
        raise DataError(f"{source}: concept names repeat ({names}): give each concept its own name")
    return concepts
