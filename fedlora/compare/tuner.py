"""Each cell's search (``compare.tune`` with ranges) with Optuna: trials asked as run slots free up, stopped
early by asynchronous successive halving on the clients' validation accuracy, round by round.

A trial is an ordinary ``fedlora run`` of the cell at the search's values and the tuning seed
(``runs/<cell>/tuning/trial-N``), evaluating every round. While it runs, each round's
``client_eval_accuracy`` (the clients' own validation splits; never the test set) is reported to Optuna
as the trial's intermediate value at that round; Optuna's ``SuccessiveHalvingPruner`` (rungs at
``min_rounds`` x ``reduction_factor``^k rounds) says when it falls out of the top 1/reduction_factor of
the trials that reached the same rung, and the trial is then stopped (SIGTERM, its finished rounds
kept). A finished trial's value is its last round's validation accuracy. Values are drawn by Optuna's
quasi-random (scrambled Sobol) sampler, log-uniformly over log ranges: spread over the range whatever
the order trials end in, so a search gives the same trials with one job or two.

The studies live in ``tuning/journal.log`` (Optuna's journal storage), one per cell: an interrupted
comparison resumes its search, and trials that were running continue from their last round.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from fedlora.compare.grid import Cell, Grid, Setting, Task
from fedlora.compare.runner import Event, prepare_config
from fedlora.compare.search import Range, Search
from fedlora.core.records.rundir import atomic_write, read_rounds
from fedlora.report.tuning import VALIDATION_KEY, validation_accuracy
from fedlora.run.experiment import preflight

JOURNAL = Path("tuning") / "journal.log"
RESULTS = "tuning.json"
"""Beside comparison.json: per cell, every trial and the chosen values (what the report reads)."""


def distributions(search: Search) -> dict[str, BaseDistribution]:
    """Optuna's distribution of every searched key."""
    found: dict[str, BaseDistribution] = {}
    for p in search.params:
        if isinstance(p, Range) and p.integer:
            found[p.key] = IntDistribution(int(p.low), int(p.high), log=p.log)
        elif isinstance(p, Range):
            found[p.key] = FloatDistribution(p.low, p.high, log=p.log)
        else:
            found[p.key] = CategoricalDistribution(p.values)
    return found


@dataclass
class Live:
    """A trial that is running: its cell, Optuna's handle, the rounds reported so far."""

    cell: Cell
    trial: optuna.Trial
    reported: set[int] = field(default_factory=set)
    seen: float = -1.0
    """Modification time of its rounds.jsonl when last read."""
    prune: bool = False


class Tuner:
    """A :class:`fedlora.compare.runner.Source` of trials: every cell's search, cell after cell."""

    def __init__(self, grid: Grid, extra: list[str], root: Path) -> None:
        if grid.search is None:
            raise ValueError("a Tuner needs compare.tune with a range")
        self.grid, self.extra, self.root, self.search = grid, extra, root, grid.search
        self.searches = {cell.label: grid.search_of(cell) for cell in grid.cells}
        (root / JOURNAL).parent.mkdir(parents=True, exist_ok=True)
        storage = JournalStorage(JournalFileBackend(str(root / JOURNAL)))
        self.studies = {cell.label: self._study(cell, storage) for cell in grid.cells}
        self.live: dict[str, Live] = {}
        self.pending: list[Task] = []
        self.best: dict[str, int] = {}
        """Per cell label, the number of its best finished trial (set by :meth:`choices`)."""
        for cell in grid.cells:  # trials an interrupted comparison left running continue
            study = self.studies[cell.label]
            for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                task = grid.trial(cell, frozen.number, frozen.params, extra)
                self.live[task.key] = Live(cell, optuna.Trial(study, frozen._trial_id))
                self.pending.append(task)

    def _study(self, cell: Cell, storage: JournalStorage) -> optuna.Study:
        budget = self.search.budget
        with warnings.catch_warnings():  # QMCSampler is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.QMCSampler(
                qmc_type="sobol",
                scramble=True,
                seed=self.grid.tune_seeds[0],
                independent_sampler=optuna.samplers.RandomSampler(seed=self.grid.tune_seeds[0]),
                warn_independent_sampling=False,
                warn_asynchronous_seeding=False,
            )
        pruner = optuna.pruners.SuccessiveHalvingPruner(
            min_resource=budget.min_rounds, reduction_factor=budget.reduction_factor
        )
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return optuna.create_study(
            study_name=cell.slug,
            storage=storage,
            direction="maximize",
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )

    def _budget_left(self, cell: Cell) -> bool:
        """Whether ``cell`` may start another trial: fewer than ``trials`` so far, and (with ``minutes``)
        its first trial started less than that long ago."""
        budget = self.search.budget
        trials = self.studies[cell.label].get_trials(deepcopy=False)
        if len(trials) >= budget.trials:
            return False
        starts = [t.datetime_start for t in trials if t.datetime_start is not None]
        if budget.minutes is not None and starts:
            spent = datetime.datetime.now() - min(starts)
            return spent.total_seconds() < 60 * budget.minutes
        return True

    def take(self) -> Task | None:
        """A trial to continue, or a new one of the first cell with budget left (None: none left)."""
        if self.pending:
            return self._written(self.pending.pop(0))
        for cell in self.grid.cells:
            if self._budget_left(cell):
                trial = self.studies[cell.label].ask(distributions(self.searches[cell.label]))
                task = self.grid.trial(cell, trial.number, trial.params, self.extra)
                self.live[task.key] = Live(cell, trial)
                return self._written(task)
        return None

    def _written(self, task: Task) -> Task:
        """``task`` with its config resolved as its run will resolve it, written where the runner reads it."""
        task = dataclasses.replace(task, config=preflight(task.config, simulation=True))
        prepare_config(task, self.root)
        return task

    def trials_ended(self) -> int:
        """How many trials have ended (finished, pruned or failed) in every cell's search so far."""
        done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        return sum(len(s.get_trials(deepcopy=False, states=done)) for s in self.studies.values())

    def exhausted(self) -> bool:
        return not self.pending and not any(self._budget_left(c) for c in self.grid.cells)

    def watch(self, task: Task, run_dir: Path) -> bool:
        """Report the rounds the trial has finished since the last look; True once Optuna prunes it."""
        live = self.live.get(task.key)
        path = run_dir / "rounds.jsonl"
        if live is None or not path.is_file():
            return False
        seen = path.stat().st_mtime
        if seen != live.seen:
            live.seen = seen
            live.prune = self._report(live, run_dir)
        return live.prune

    def _report(self, live: Live, run_dir: Path) -> bool:
        """Tell Optuna each new round's validation accuracy; whether the pruner stops the trial."""
        try:
            rows = read_rounds(run_dir)
        except (OSError, ValueError):  # a line being written: read it at the next look
            return False
        for row in rows:
            step, value = int(row["round"]), row.get(VALIDATION_KEY)
            if value is None or step in live.reported:
                continue
            live.trial.report(float(value), step)
            live.reported.add(step)
            if live.trial.should_prune():
                return True
        return False

    def ended(self, event: Event) -> None:
        """Record the trial's outcome: its last validation accuracy, pruned, or failed (an interrupted one
        stays running: it continues when the comparison is resumed)."""
        live = self.live.pop(event.task.key, None)
        if live is None or event.kind == "interrupted":
            return
        study = self.studies[live.cell.label]
        if event.kind == "finished":
            run_dir = self.root / "runs" / event.task.key
            value = validation_accuracy(read_rounds(run_dir))
            if value is not None:
                study.tell(live.trial, value)
                return
        state = TrialState.PRUNED if event.kind == "pruned" else TrialState.FAIL
        study.tell(live.trial, state=state)

    def choices(self) -> dict[str, Setting]:
        """Per cell with a finished trial: the setting of its best (highest validation accuracy; ties to
        the earlier trial). Writes ``tuning.json`` with every trial and the edge flags."""
        chosen, report = {}, []
        for cell in self.grid.cells:
            trials = self.studies[cell.label].get_trials(deepcopy=False)
            complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
            best = max(complete, key=lambda t: (t.value, -t.number)) if complete else None
            if best is not None:
                chosen[cell.label] = self.grid.searched(best.params)
                self.best[cell.label] = best.number
            report.append(self._cell_report(cell, trials, best))
        atomic_write(self.root / RESULTS, json.dumps({"cells": report}, indent=2) + "\n")
        return chosen

    def _cell_report(self, cell: Cell, trials: list[Any], best: Any) -> dict[str, Any]:
        tried = [t.params for t in trials if t.params]
        search = self.searches[cell.label]
        return {
            "cell": cell.label,
            "ranges": {p.key: p.text() for p in search.params},
            "chosen": None if best is None else best.params,
            "label": None if best is None else search.label(best.params),
            "value": None if best is None else best.value,
            "trial": None if best is None else best.number,
            "edges": [] if best is None else search.edges(best.params, tried),
            "trials": [
                {
                    "number": t.number,
                    "params": t.params,
                    "state": t.state.name.lower(),
                    "value": t.value,
                    "rounds": max(t.intermediate_values, default=0),
                }
                for t in trials
            ],
        }
