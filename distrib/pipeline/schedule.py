"""Pipeline schedules: the order in which each stage runs its forward (F) and backward (B) tasks.

A task is ``("F", i)`` or ``("B", i)`` for micro-batch ``i``. ``F(i)`` on stage ``j`` needs
``F(i)`` of stage ``j - 1``; ``B(i)`` on stage ``j`` needs ``B(i)`` of stage ``j + 1`` (and its own
``F(i)``). ``GPipe.train_step`` runs exactly the list these functions return, one task after the
other, so the order below *is* what executes (``pipe.last_order`` records it).

**GPipe** (Huang et al., 2019; drawing after torchgpipe): every forward, then every backward. In
forward clock ``k`` stage ``j`` runs micro-batch ``k - j``, so the forward phase takes
``m + p - 1`` clock cycles and the backward phase mirrors it. Each stage holds the activations of
all ``m`` micro-batches at once. m = 4 micro-batches, p = 3 stages, one clock per task::

    clock     0  1  2  3  4  5  6  7  8  9 10 11
    stage 0  F0 F1 F2 F3             B3 B2 B1 B0
    stage 1     F0 F1 F2 F3       B3 B2 B1 B0
    stage 2        F0 F1 F2 F3 B3 B2 B1 B0

**1F1B** (PipeDream-Flush, Narayanan et al., 2021): stage ``j`` runs ``p - 1 - j`` warm-up
forwards, then alternates one forward and one backward, then drains the remaining backwards. The
clock count is the same (so is the bubble, ``(p - 1) / (m + p - 1)`` of each stage's time), but a
micro-batch's activations are freed as soon as its backward has run: stage ``j`` never holds more
than ``p - j`` micro-batches of activations, whatever ``m`` is::

    clock     0  1  2  3  4  5  6  7  8  9 10 11
    stage 0  F0 F1 F2       B0 F3 B1    B2    B3
    stage 1     F0 F1    B0 F2 B1 F3 B2    B3
    stage 2        F0 B0 F1 B1 F2 B2 F3 B3

(``draw(clock_cycles(orders))`` prints these; the drawings above are its output.)
"""
from __future__ import annotations

SCHEDULES = ("gpipe", "1f1b")


def _check(m: int, p: int, stage):
    if m < 1 or p < 1:
        raise ValueError(f"a schedule needs m >= 1 micro-batches and p >= 1 stages, got {m}, {p}")
    if stage is not None and not 0 <= stage < p:
        raise ValueError(f"stage {stage} is outside 0..{p - 1}")


def gpipe_order(m: int, p: int, stage: int | None = None) -> list:
    """GPipe's tasks for ``stage`` (all forwards, then the backwards in reverse order);
    without ``stage``, the list of every stage's tasks."""
    _check(m, p, stage)
    if stage is None:
        return [gpipe_order(m, p, s) for s in range(p)]
    return [("F", i) for i in range(m)] + [("B", i) for i in reversed(range(m))]


def one_f_one_b_order(m: int, p: int, stage: int | None = None) -> list:
    """1F1B's tasks for ``stage``: warm-up forwards, one-forward-one-backward, then the last
    backwards; without ``stage``, the list of every stage's tasks."""
    _check(m, p, stage)
    if stage is None:
        return [one_f_one_b_order(m, p, s) for s in range(p)]
    warmup = min(p - 1 - stage, m)
    order = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):
        order += [("F", warmup + i), ("B", i)]
    order += [("B", i) for i in range(m - warmup, m)]
    return order


def order(schedule: str, m: int, p: int, stage: int | None = None) -> list:
    """The tasks of ``schedule`` ("gpipe" or "1f1b")."""
    if schedule == "gpipe":
        return gpipe_order(m, p, stage)
    if schedule == "1f1b":
        return one_f_one_b_order(m, p, stage)
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")


def max_alive(tasks: list) -> int:
    """Most micro-batches whose forward has run but not yet their backward, along ``tasks``."""
    alive = peak = 0
    for kind, _ in tasks:
        alive += 1 if kind == "F" else -1
        peak = max(peak, alive)
    return peak


def check_order(tasks: list, m: int) -> None:
    """Raise ValueError unless ``tasks`` runs each of the ``m`` micro-batches forward exactly once
    and backward exactly once, the backward after the forward."""
    seen_f, seen_b = set(), set()
    for kind, i in tasks:
        if kind not in ("F", "B") or not 0 <= i < m:
            raise ValueError(f"bad task {(kind, i)!r} for {m} micro-batches")
        seen = seen_f if kind == "F" else seen_b
        if i in seen:
            raise ValueError(f"micro-batch {i} runs {kind} twice")
        if kind == "B" and i not in seen_f:
            raise ValueError(f"micro-batch {i} runs backward before forward")
        seen.add(i)
    if len(seen_f) != m or len(seen_b) != m:
        raise ValueError(f"not every micro-batch ran: F {sorted(seen_f)}, B {sorted(seen_b)}")


def clock_cycles(orders: list) -> list:
    """Simulate per-stage task lists with one clock per task.

    Returns the clock cycles, each a list of ``(stage, kind, microbatch)`` run in that clock. A
    stage runs its next task as soon as what it needs finished in an earlier clock. Raises
    ValueError if the orders deadlock (some stage waits for a task that never comes).
    """
    p = len(orders)
    done, pos, clocks = {}, [0] * p, []
    left = sum(len(o) for o in orders)
    while left:
        t = len(clocks)
        cycle = []
        for s in range(p):
            if pos[s] == len(orders[s]):
                continue
            kind, i = orders[s][pos[s]]
            if kind == "F":
                needs = [("F", s - 1, i)] if s > 0 else []
            else:
                needs = [("F", s, i)] + ([("B", s + 1, i)] if s < p - 1 else [])
            if all(done.get(n, t) < t for n in needs):
                cycle.append((s, kind, i))
        if not cycle:
            stuck = {s: orders[s][pos[s]] for s in range(p) if pos[s] < len(orders[s])}
            raise ValueError(f"schedule deadlocks at clock {t}; next tasks {stuck}")
        for s, kind, i in cycle:
            done[(kind, s, i)] = t
            pos[s] += 1
        left -= len(cycle)
        clocks.append(cycle)
    return clocks


def draw(clocks: list) -> str:
    """An ASCII chart of ``clock_cycles``' output: one row per stage, one column per clock."""
    p = 1 + max(s for cycle in clocks for s, _, _ in cycle)
    width = max(2, max(len(f"{k}{i}") for cycle in clocks for _, k, i in cycle))
    cells = [[" " * width] * len(clocks) for _ in range(p)]
    for t, cycle in enumerate(clocks):
        for s, kind, i in cycle:
            cells[s][t] = f"{kind}{i}".rjust(width)
    head = "clock    " + " ".join(str(t).rjust(width) for t in range(len(clocks)))
    rows = [f"stage {s:<2} " + " ".join(row) for s, row in enumerate(cells)]
    return "\n".join([head] + [r.rstrip() for r in rows])
