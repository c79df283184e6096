"""Pipeline parallelism: GPipe and 1F1B schedules over distrib's transport, with data-parallel
replicas of the pipeline.

- :class:`GPipe` (``gpipe.py``): the wrapper, ``train_step`` and inference;
- ``schedule.py``: the task order of each schedule, with clock-cycle drawings;
- ``link.py``: activations and gradients between neighbouring stages;
- ``microbatch.py``: splitting batches and joining outputs;
- ``balance.py``: :func:`balance_by_params`, :func:`balance_by_time`;
- ``replicas.py``: averaging a stage's gradients over pipeline replicas;
- ``memory.py``: measured activation memory of a stage.
"""
from . import schedule
from .balance import balance_by_params, balance_by_time
from .gpipe import GPipe
from .schedule import gpipe_order, one_f_one_b_order

__all__ = ["GPipe", "balance_by_params", "balance_by_time", "schedule", "gpipe_order",
           "one_f_one_b_order"]
