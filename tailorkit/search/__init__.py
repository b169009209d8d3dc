"""GPTailor's search: which layers to remove, and which fine-tune supplies (or merges
into) each layer that stays, found by CMA-ES.

* :mod:`space` -- the genome: a real vector that always decodes to a valid Recipe.
* :mod:`executors` -- where candidates are scored (by :class:`~tailorkit.trials.
  TrialRunner`, with :class:`~tailorkit.objectives.Logits`): this process, or Ray workers.
* :mod:`driver` -- the CMA-ES loop: multi-fidelity, JSONL log, resume, convergence plot.
"""
