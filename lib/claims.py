"""A paper's claim and where our records measure it: the one claim type of notebooks 01-05.

A :class:`Claim` is read off a paper (``paper``: its number, None where the paper gives only a
direction or a figure; ``source``: where it says so; :mod:`lib.papers` holds them all) and
comes in one of two shapes:

* a *value* (notebooks 01-03, the report): the paper's score of ``metric`` on ``task`` and the
  record ``runs`` of ours that measure it (where the paper gives its best over several settings,
  all of them: the best of our means is compared). :func:`lib.sweep.compare_with_report` puts
  our mean ± std over seeds beside it.
* an *effect* (notebooks 04-05): "``better`` scores above ``worse``" (run labels, or ``"base"``)
  by ``paper`` points, measured where ``pools``/``sizes`` say. :func:`lib.pool.compare_effects`
  gives our paired difference with its t-interval, the subsets won, whether it has the paper's
  sign (``agrees``) and flags a baseline at chance or below the base, which is never counted as
  agreement.

``in_paper=False`` marks a comparison the paper does not make (ours only: it can neither agree
nor disagree with the paper); ``note`` says where our setting is not the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Claim:
    what: str
    paper: float | None
    source: str = ""
    note: str = ""
    # a value: the best of our ``runs`` on ``task``'s ``metric``
    runs: tuple[str, ...] = ()
    task: str | None = None
    metric: str = "accuracy"
    # an effect: ``better`` minus ``worse``, in points
    better: str | None = None
    worse: str | None = None
    pools: tuple[str, ...] | None = None
    sizes: tuple[int, ...] | None = None
    in_paper: bool = True

    def __post_init__(self):
        value, effect = bool(self.runs) and self.task is not None, self.better is not None and self.worse is not None
        if value == effect or (not effect and (self.better or self.worse)):
            raise ValueError(
                f"claim {self.what!r} needs either runs and a task (a value) or better and worse "
                "(an effect), not both or neither"
            )

    @property
    def is_effect(self) -> bool:
        return self.better is not None or self.worse is not None
