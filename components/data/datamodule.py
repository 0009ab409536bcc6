"""Task sources and the prompt DataModule.

Two kinds of source, both turned into :class:`~components.types.Prompt` s with stable uids:

- ``ReasoningGymTask``: a reasoning-gym generator (name, its config, a weight in the mix, a tag
  naming the difficulty slice). The task's own ``score_answer`` is its verifier.
- ``FileTask``: a JSONL file or a Hugging Face ``datasets`` folder / parquet file with ``prompt``,
  ``answer`` and optionally ``reference`` fields; verified by math-verify or exact match.

The training stream draws batches of prompts from the pool with its own seeded generator; the
generator's state is part of the DataModule's ``state_dict`` so a resumed run continues the same
stream. The DataLoader yields only a request for a batch; the prompts are drawn when the step
consumes it (``on_before_batch_transfer``), not when Lightning prefetches the next one, so the saved
state is the stream's position as of the last *consumed* batch. Samplers that need more prompts
than one batch (DAPO dynamic sampling) call :meth:`PromptDataModule.draw`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from components.data.prefilter import PrefilterConfig, PrefilterReport, apply_prefilter
from components.errors import ConfigError
from components.types import Prompt, stable_uid

if TYPE_CHECKING:
    from components.handle import StepHandle

Verifier = Callable[[str, Prompt], float]


@dataclass
class ReasoningGymTask:
    """One reasoning-gym generator in the task mix.

    ``prompt_template`` formats the item into the bare prompt; ``{question}`` is reasoning-gym's
    own question, and item fields such as ``{metadata[expression]}`` are available too.
    """

    name: str
    config: dict = field(default_factory=dict)
    weight: float = 1.0
    tag: str = ""
    prompt_template: str = "{question}"


@dataclass
class FileTask:
    """A JSONL file, parquet file or ``datasets`` folder of (prompt, answer[, reference]) records."""

    path: str
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    reference_field: str | None = "reference"
    verifier: str = "math"  # "math" (math-verify) or "exact"
    weight: float = 1.0
    tag: str = ""
    heldout_fraction: float = 0.1


def _rg_items(task: ReasoningGymTask, seed: int, size: int) -> tuple[list[dict], Any]:
    import reasoning_gym

    from components.data.tasks import LOCAL_TASKS, create_local_dataset

    try:
        if task.name in LOCAL_TASKS:  # the project's own generators (components/data/tasks.py) first
            ds = create_local_dataset(task.name, seed=seed, size=size, **task.config)
        else:
            ds = reasoning_gym.create_dataset(task.name, seed=seed, size=size, **task.config)
    except Exception as e:  # reasoning-gym raises KeyError / AssertionError / TypeError variously
        raise ConfigError(f"data.tasks[{task.name}]", f"reasoning-gym could not build it: {e}") from e
    return [ds[i] for i in range(size)], ds


def _exact_verifier(output: str, prompt: Prompt) -> float:
    return float(output.strip() == prompt.answer.strip())


def _math_verifier(output: str, prompt: Prompt) -> float:
    from math_verify import parse, verify

    # Timeouts use signal.alarm, which fails outside the main thread: switch them off.
    gold = parse(prompt.answer, parsing_timeout=None)
    pred = parse(output, parsing_timeout=None)
    return float(verify(gold, pred, timeout_seconds=None))


def _read_jsonl(path: str) -> list[dict]:
    """One JSON object per non-blank line; a bad line is named by its number."""
    field_ = "data.files.path"
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(field_, f"{path!r} cannot be read: {e.strerror}") from None
    out = []
    for n, line in enumerate(raw.splitlines(), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(field_, f"{path} line {n} is not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
        if not text.strip():
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(
                field_, f"{path} line {n} is not valid JSON ({e.msg}, column {e.colno}); each line must be one JSON object"
            ) from None
        if not isinstance(rec, dict):
            raise ConfigError(field_, f"{path} line {n} is a JSON {type(rec).__name__}; each line must be one JSON object")
        out.append(rec)
    return out


def _read_records(path: str) -> list[dict]:
    p = Path(path)
    if not p.exists():
        if any(c in str(path) for c in "*?["):
            raise ConfigError(
                "data.files.path",
                f"{path!r} does not exist; globs are not expanded: list each file as its own data.files entry",
            )
        raise ConfigError(
            "data.files.path", f"{path!r} does not exist (valid: a .jsonl file, a .parquet file or a datasets folder)"
        )
    if p.suffix in (".jsonl", ".json"):
        records = _read_jsonl(path)
        if not records:
            raise ConfigError("data.files.path", f"{path} holds no records (the file is empty); one JSON object per line")
        return records
    import datasets  # optional: only for parquet files and saved datasets folders

    try:
        ds = datasets.load_from_disk(str(p)) if p.is_dir() else datasets.load_dataset("parquet", data_files=str(p))["train"]
    except Exception as e:  # datasets / pyarrow raise many types for an unreadable file
        msg = " ".join(str(e).split())[:300]
        raise ConfigError("data.files.path", f"{path} is not a readable parquet file or datasets folder: {msg}") from None
    return [dict(r) for r in ds]


def default_tasks() -> list[ReasoningGymTask]:
    """The embedded default mix: two-term sums and differences with 1, 2 or 3 digits.

    The shipped tiny model was warm-started on 1- and 2-digit items only, so the mix has a slice it
    nearly always solves (1 digit), a learnable slice (2 digits, most of the pool) and a slice it
    never solves (3 digits): the realistic mix of degenerate and mixed groups.
    """
    return [
        ReasoningGymTask(
            "chain_sum", dict(min_terms=2, max_terms=2, min_digits=d, max_digits=d), w, f"d{d}", "{metadata[expression]} ="
        )
        for d, w in ((1, 1.0), (2, 3.0), (3, 1.0))
    ]


def resolve_tasks(tasks: list[ReasoningGymTask] | None, files: list[Any] | None) -> list[ReasoningGymTask]:
    """``data.tasks`` as the data module uses it: unset means the default mix, or none beside files.

    The default stays ``None`` rather than the mix itself: jsonargparse merges a later list of the
    same length into the earlier one element by element, so a recipe's three tasks would inherit
    the default tasks' unset fields (their prompt template). ``--print_config`` shows this result.
    """
    return list(tasks) if tasks is not None else ([] if files else default_tasks())


def reasoning_tasks(ops: str = "+-") -> list[ReasoningGymTask]:
    """The ``reasoning`` regime's mix: the dense mix's slices (1/2/3-digit terms, weights 1:3:1,
    tags d1/d2/d3) with worked-steps answers."""
    return [
        ReasoningGymTask("column_sum", dict(digits=d, ops=ops, format="worked"), w, f"d{d}")
        for d, w in ((1, 1.0), (2, 3.0), (3, 1.0))
    ]


class PromptPool:
    """A fixed list of prompts, sampled with replacement by weight."""

    def __init__(self, prompts: list[Prompt], weights: list[float]) -> None:
        self.prompts = prompts
        self.weights = torch.tensor(weights, dtype=torch.double)

    def __len__(self) -> int:
        return len(self.prompts)

    def draw(self, k: int, generator: torch.Generator) -> list[Prompt]:
        idx = torch.multinomial(self.weights, k, replacement=True, generator=generator)
        return [self.prompts[i] for i in idx.tolist()]


@dataclass(frozen=True)
class BatchRequest:
    """What the training DataLoader yields: "draw ``size`` prompts now". Resolved into prompts by
    :meth:`PromptDataModule.on_before_batch_transfer` when the step consumes it."""

    size: int


class _PromptStream(IterableDataset):
    """Endless batch requests; the length of training is set by the Trainer's ``max_steps``.

    Lightning fetches one batch ahead of the step it runs; drawing prompts here would move the
    stream one batch past what was trained on, and a checkpoint would skip that batch on resume.
    """

    def __init__(self, dm: PromptDataModule) -> None:
        self.dm = dm

    def __iter__(self) -> Iterator[BatchRequest]:
        while True:
            yield BatchRequest(self.dm.batch_size)


# Seed offsets of the held-out sets (``data.heldout_split``); the training pool uses seed * 1000 + i.
HELDOUT_SEEDS = {"test": 10_000_019, "tune": 20_000_033}


class PromptDataModule(L.LightningDataModule):
    """Train and held-out prompts from reasoning-gym generators and/or files.

    Args:
        tasks: reasoning-gym generators in the mix (weights set their share of the pool); left
            unset, :func:`resolve_tasks`: the embedded default mix, or none beside files.
        files: JSONL / parquet / ``datasets`` sources.
        batch_size: prompts per training step (samplers may draw more, see ``draw``).
        train_size: prompts in the training pool (a fixed pool, so prompts are revisited and
            per-prompt statistics mean something).
        heldout_size: held-out prompts for evaluation, generated with a different seed. Items not
            in the training pool come first; only a task whose item space is too small to avoid
            overlap (1-digit sums) fills its share with training items.
        heldout_split: which held-out set evaluation reads. ``test`` (default): the set that judges
            methods (docs/results.md). ``tune``: a second set from a third seed, kept apart from the
            training pool and from ``test`` where the item space allows, for choosing shared
            settings (lr, schedule) without looking at the items that judge the methods. Generated
            tasks only: a file task has one held-out slice (its ``heldout_fraction``).
        seed: seeds the pool and the training stream.
        prefilter: keep only training prompts the initial policy solves between a min and a max
            count of k samples (components/data/prefilter.py; cached on disk). None: no filter.
    """

    def __init__(
        self,
        tasks: list[ReasoningGymTask] | None = None,
        files: list[FileTask] | None = None,
        batch_size: int = 32,
        train_size: int = 2000,
        heldout_size: int = 300,
        heldout_split: str = "test",
        seed: int = 0,
        prefilter: PrefilterConfig | None = None,
    ) -> None:
        super().__init__()
        self.tasks = resolve_tasks(tasks, files)
        self.files = list(files or [])
        if not self.tasks and not self.files:
            raise ConfigError("data.tasks", "no task source given: set data.tasks and/or data.files")
        if batch_size < 1:
            raise ConfigError("data.batch_size", f"must be >= 1, got {batch_size}")
        for t in [*self.tasks, *self.files]:
            if not (t.weight > 0 and math.isfinite(t.weight)):
                raise ConfigError("data.tasks.weight", f"must be a positive number, got {t.weight}")
        if heldout_split not in HELDOUT_SEEDS:
            raise ConfigError("data.heldout_split", f"{heldout_split!r} is not one of {sorted(HELDOUT_SEEDS)}")
        if heldout_split != "test" and self.files:
            raise ConfigError(
                "data.heldout_split",
                f"{heldout_split!r} needs generated tasks only: file tasks have one held-out slice "
                "(data.files.heldout_fraction); use 'test' or drop data.files",
            )
        self.heldout_split = heldout_split
        self.batch_size = batch_size
        self.train_size = train_size
        self.heldout_size = heldout_size
        self.seed = seed
        self.prefilter = prefilter
        self.prefilter_report = None
        self.verifiers: dict[str, Verifier] = {}
        self.train_pool: PromptPool | None = None
        self.heldout: list[Prompt] = []
        self.generator = torch.Generator().manual_seed(seed)
        self._rank_offset = 0
        # The stream's state just before the current step's batch was drawn: a step abandoned on a
        # stop signal rolls the stream back to it, so resuming redoes the step exactly.
        self.batch_start_state: dict[str, Any] | None = None

    # ---- building the pools -------------------------------------------------------------------
    def _shares(self, total: int) -> list[int]:
        ws = [t.weight for t in [*self.tasks, *self.files]]
        raw = [total * w / sum(ws) for w in ws]
        n = [int(math.floor(x)) for x in raw]
        for i in sorted(range(len(raw)), key=lambda i: raw[i] - n[i], reverse=True)[: total - sum(n)]:
            n[i] += 1
        return n

    def _rg_prompts(self, task: ReasoningGymTask, i: int, seed: int, size: int) -> list[Prompt]:
        key = f"rg:{task.name}:{i}"
        items, ds = _rg_items(task, seed, size)
        self.verifiers[key] = lambda out, p, _ds=ds: float(_ds.score_answer(out, p.entry))
        out = []
        for it in items:
            try:
                text = task.prompt_template.format(**it)
            except (KeyError, IndexError) as e:
                raise ConfigError("data.tasks.prompt_template", f"{task.prompt_template!r} names a missing field {e}") from e
            ref = (it.get("metadata") or {}).get("answer_cot")
            item_key = [task.name, task.config, it["question"], str(it["answer"])]
            uid = stable_uid(key, item_key)
            marker = getattr(ds, "answer_marker", None)  # set by worked-steps tasks (components/data/tasks.py)
            out.append(
                Prompt(uid, key, text, str(it["answer"]), dict(it), task.tag or task.name, ref, marker, question=it["question"])
            )
        return out

    def _file_prompts(self, ft: FileTask, i: int) -> tuple[list[Prompt], list[Prompt]]:
        key = f"file:{Path(ft.path).name}:{i}"
        if ft.verifier not in ("math", "exact"):
            raise ConfigError("data.files.verifier", f"{ft.verifier!r} is not one of 'math', 'exact'")
        self.verifiers[key] = _math_verifier if ft.verifier == "math" else _exact_verifier
        prompts = []
        for j, rec in enumerate(_read_records(ft.path)):
            for name, fld in (("prompt_field", ft.prompt_field), ("answer_field", ft.answer_field)):
                if fld not in rec:
                    raise ConfigError(
                        f"data.files.{name}",
                        f"record {j} of {ft.path} has no field {fld!r}; its fields are {sorted(rec)} "
                        f"(set data.files.{name} to one of them)",
                    )
            ref = rec.get(ft.reference_field) if ft.reference_field else None
            prompts.append(
                Prompt(
                    stable_uid(key, [rec[ft.prompt_field], str(rec[ft.answer_field])]),
                    key,
                    rec[ft.prompt_field],
                    str(rec[ft.answer_field]),
                    rec,
                    ft.tag or Path(ft.path).stem,
                    ref,
                    question=rec[ft.prompt_field],
                )
            )
        n_held = int(round(len(prompts) * ft.heldout_fraction))
        g = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(prompts), generator=g).tolist()
        return [prompts[k] for k in order[n_held:]], [prompts[k] for k in order[:n_held]]

    def setup(self, stage: str | None = None) -> None:
        if self.train_pool is not None:
            self.filter_pool()
            return
        train: list[Prompt] = []
        weights: list[float] = []
        held: list[Prompt] = []
        train_n = self._shares(self.train_size)
        held_n = self._shares(self.heldout_size)
        for i, task in enumerate(self.tasks):
            ps = self._rg_prompts(task, i, self.seed * 1000 + i, train_n[i])
            seen = {p.text for p in ps}
            if self.heldout_split != "test":
                # The tuning set also keeps clear of the test set's items (where the space allows).
                test = self._rg_prompts(task, i, HELDOUT_SEEDS["test"] + self.seed * 1000 + i, held_n[i] * 2 + 16)
                seen |= {p.text for p in test}
            # Held-out items from another seed, minus anything already in the training pool.
            cand = self._rg_prompts(task, i, HELDOUT_SEEDS[self.heldout_split] + self.seed * 1000 + i, held_n[i] * 2 + 16)
            # Small item spaces (1-digit sums have 200 items) cannot avoid overlap: fill from it last.
            fresh = [p for p in cand if p.text not in seen]
            held += (fresh + [p for p in cand if p.text in seen])[: held_n[i]]
            train += ps
            weights += [task.weight / max(len(ps), 1)] * len(ps)
        for j, ft in enumerate(self.files):
            tr, he = self._file_prompts(ft, len(self.tasks) + j)
            train += tr
            held += he
            weights += [ft.weight / max(len(tr), 1)] * len(tr)
        if not train:
            raise ConfigError("data", "the training pool is empty: check data.tasks sizes and data.files contents")
        self.train_pool = PromptPool(train, weights)
        self.heldout = held
        self.filter_pool()
        # Each data-parallel rank draws its own prompts.
        if self.trainer is not None and self.trainer.world_size > 1:
            self.generator.manual_seed(self.seed + 7919 * self.trainer.global_rank)

    # ---- serving prompts ---------------------------------------------------------------------
    def draw(self, k: int) -> list[Prompt]:
        """``k`` more training prompts from the stream (used for batches and for refills)."""
        if self.train_pool is None:
            self.setup("fit")
        if self.prefilter is not None and self.prefilter_report is None:
            self.filter_pool(required=True)  # no policy module gave a handle: data.prefilter.model must be set
        return self.train_pool.draw(k, self.generator)

    def filter_pool(self, handle: StepHandle | None = None, required: bool = False) -> PrefilterReport | None:
        """Apply ``data.prefilter`` once (components/data/prefilter.py) with the run's initial policy
        through its ``handle`` (the policy module calls this from its ``setup``), or with
        ``data.prefilter.model`` when that is set. Without either it waits for a handle, unless
        ``required``. Returns the report when the filter ran in this call, else None."""
        if self.prefilter is None or self.prefilter_report is not None:
            return None
        if handle is None and self.prefilter.model is None and not required:
            return None
        pool = self.train_pool
        kept, weights, self.prefilter_report = apply_prefilter(
            self.prefilter, pool.prompts, pool.weights.tolist(), self.verifier, handle
        )
        self.train_pool = PromptPool(kept, weights)
        return self.prefilter_report

    def verifier(self, prompt: Prompt) -> Verifier:
        return self.verifiers[prompt.task]

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Turn the training stream's :class:`BatchRequest` into prompts, at the step that uses them."""
        if isinstance(batch, BatchRequest):
            self.batch_start_state = self.state_dict()
            return self.draw(batch.size)
        return batch

    def train_dataloader(self) -> DataLoader:
        # Its own generator: a DataLoader iterator otherwise draws its base seed from torch's global
        # RNG, and a resumed run (which builds a new iterator) would shift the sampling RNG by one.
        return DataLoader(_PromptStream(self), batch_size=None, collate_fn=_identity, num_workers=0, generator=torch.Generator())

    def val_dataloader(self) -> DataLoader:
        if not self.heldout:
            raise ConfigError("data.heldout_size", "the held-out split is empty; set data.heldout_size > 0")
        return DataLoader(self.heldout, batch_size=256, collate_fn=_identity, num_workers=0, generator=torch.Generator())

    def all_prompts(self) -> list[Prompt]:
        """Every training and held-out prompt (for set-up checks such as prompt length)."""
        if self.train_pool is None:
            self.setup("fit")
        return [*self.train_pool.prompts, *self.heldout]

    # ---- checkpointed state ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def _identity(x: Any) -> Any:
    return x
