"""GPTailor's search: which layers to remove, and which fine-tune supplies (or merges
into) each layer that stays, found by CMA-ES.

* :mod:`space` -- the genome: a real vector that always decodes to a valid Recipe.
* :mod:`evaluator` -- scores a Recipe on the calibration batch, reusing everything
  candidates share (mapped source tensors, merged layers, hidden states of prefixes).
* :mod:`objectives` -- KL to the base (default), LM loss, lm-eval tasks.
* :mod:`executors` -- where evaluations run: this process, or Ray workers.
* :mod:`driver` -- the CMA-ES loop: multi-fidelity, JSONL log, resume, convergence plot.
"""
