"""Which candidates the planner rehearses: every method's all-in merge first, then subsets."""

from __future__ import annotations

from mergekit_collapse.planner.search import Judged, pick_for_rehearsal
from mergekit_collapse.planner.space import Candidate, Screen


def _judged(members: tuple[int, ...], method: str, value: float) -> Judged:
    return Judged(Candidate(members, method, None), Screen({}, {}), value=value)


def test_every_methods_all_in_merge_is_rehearsed_before_subsets():
    """The screen ranks subsets above the all-in merges (as it does when a task is far from the
    others): each method's all-in merge is still rehearsed, best screened first, leaving one
    rehearsal at least for a subset."""
    ranked = [_judged((0, 1), "linear", 0.9), _judged((0, 2), "ties", 0.8),
              _judged((0, 1, 2), "ties", 0.7), _judged((0, 1, 2), "linear", 0.6),
              _judged((1, 2), "linear", 0.5), _judged((0, 1, 2), "task_arithmetic", 0.4)]
    picks = [(j.candidate.members, j.candidate.method) for j in pick_for_rehearsal(ranked, 4, 3)]
    assert picks == [((0, 1, 2), "ties"), ((0, 1, 2), "linear"), ((0, 1, 2), "task_arithmetic"),
                     ((0, 1), "linear")]
    assert [j.candidate.method for j in pick_for_rehearsal(ranked, 2, 3)] == ["ties", "linear"]
    assert pick_for_rehearsal(ranked, 0, 3) == []
