"""GPTailor's search: the genome, the evaluator's exactness and caches, the driver's
resume, the executors, and the CLI, on a tiny Llama family."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import tailorkit as tk
from tailorkit import objectives
from tailorkit.cli import main
from tailorkit.search.driver import LOG_NAME, SearchSettings, run_search
from tailorkit.search.executors import LocalExecutor
from tailorkit.search.space import SearchSpace, encode
from tailorkit.trials import RunnerConfig, TrialRunner

LAYERS = 4


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 96, (8, 24), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def space(family):
    return SearchSpace(
        base=str(family.base),
        candidates=tuple(str(c) for c in family.candidates),
        num_layers=LAYERS,
        remove=1,
    )


def _config(family, tokens, objective="kl", lm_eval=None, **settings) -> RunnerConfig:
    """The tiny family's search runner: two fine-tunes, two batches of 4 windows."""
    candidates = {"c1": str(family.candidates[0]), "c2": str(family.candidates[1])}
    logits = objectives.Logits.parse(objective, lm_eval)
    return RunnerConfig(str(family.base), tokens, candidates, logits, batch_size=4, **settings)


@pytest.fixture(scope="module")
def evaluator(family, tokens):
    return TrialRunner(_config(family, tokens))


def test_every_genome_decodes_to_a_valid_recipe_removing_exactly_r(space):
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        recipe = space.decode(rng.normal(size=space.dimension) * 2)
        layers = recipe.output_layers()
        assert len(layers) == LAYERS - 1
        depths = [layer.sources[0][1] for layer in layers]
        assert depths == sorted(set(depths))  # kept layers in order, each once
        for layer in layers:
            if layer.method == "task_arithmetic":
                # The task vector is taken against the base layer at the SAME depth.
                assert layer.base == ("base", layer.sources[0][1])
                assert all(i == layer.base[1] for _, i in layer.sources)
                assert 0 <= layer.param("lambda") <= 1
            seen.add(layer.method)
        recipe.plan()  # validates against the real files
    assert seen == {"passthrough", "task_arithmetic"}


def test_encode_inverts_decode_and_removal_only(space):
    rng = np.random.default_rng(1)
    for _ in range(20):
        recipe = space.decode(rng.normal(size=space.dimension))
        assert space.decode(encode(space, recipe)) == recipe
    only = SearchSpace(space.base, space.candidates, LAYERS, 2, removal_only=True)
    assert only.dimension == LAYERS
    recipe = only.decode(np.array([0.3, -1.0, 2.0, -0.5]))
    assert [layer.sources for layer in recipe.output_layers()] == [
        (("base", 0),),
        (("base", 2),),
    ]
    linear = SearchSpace(space.base, space.candidates, LAYERS, 1, allow_linear=True)
    x = linear.initial([4, 3, 2, 1])
    x[LAYERS : LAYERS + 2] = 1.0  # layer 0 from both candidates
    x[-LAYERS] = 1.0  # as an average
    first = linear.decode(x).output_layers()[0]
    assert first.method == "linear" and first.sources == (("c1", 0), ("c2", 0))


def test_initial_mean_is_block_influence_removal_with_base_layers(space):
    recipe = space.decode(space.initial([0.5, 0.1, 0.3, 0.9]))  # layer 1 matters least
    assert [layer.sources for layer in recipe.output_layers()] == [
        (("base", 0),),
        (("base", 2),),
        (("base", 3),),
    ]


def test_evaluator_logits_equal_the_assembled_and_built_model(space, evaluator, tokens, tmp_path):
    x = space.initial([4, 3, 2, 1])
    x[LAYERS + 0 * 2 : LAYERS + 0 * 2 + 2] = [1.0, 1.0]  # layer 0: merge both fine-tunes
    x[LAYERS + 1 * 2] = 1.0  # layer 1: from c1
    x[LAYERS + 2 * LAYERS] = 0.7  # layer 0's lambda gene
    recipe = space.decode(x)
    methods = [layer.method for layer in recipe.output_layers()]
    assert methods == ["task_arithmetic", "passthrough", "passthrough"]
    scored = torch.cat(evaluator.logits(recipe))
    assembled = tk.assemble(recipe)
    out = tk.build(recipe, tmp_path / "built", progress=False)
    built = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(scored, assembled(input_ids=tokens).logits)
        assert torch.equal(scored, built(input_ids=tokens).logits)


def test_token_objectives_match_a_direct_computation(space, family, tokens):
    config = _config(family, tokens, objective={"kl": 1.0, "loss": 0.5})
    evaluator = TrialRunner(config)
    recipe = space.decode(space.initial([1, 2, 3, 4]))
    got = evaluator.score(recipe)
    assert evaluator.stats.objective_passes == 2  # one LM-head pass per batch serves both terms
    base = AutoModelForCausalLM.from_pretrained(space.base)
    cand = tk.assemble(recipe)
    with torch.no_grad():
        p = torch.log_softmax(base(input_ids=tokens).logits.double(), -1)
        q = torch.log_softmax(cand(input_ids=tokens).logits.double(), -1)
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    loss = float(-q[:, :-1].gather(-1, tokens[:, 1:, None]).mean())
    assert got == pytest.approx(kl + 0.5 * loss, rel=1e-5)


def test_a_small_state_cache_stays_in_its_bound_and_changes_nothing(space, family, tokens):
    probe = TrialRunner(_config(family, tokens))
    state = probe.traces[0].states[0]
    bound = 3 * state.numel() * state.element_size()  # room for three prefix states
    small = TrialRunner(_config(family, tokens, state_cache_bytes=bound))
    rng = np.random.default_rng(5)
    for _ in range(8):
        recipe = space.decode(rng.normal(size=space.dimension))
        assert small.score(recipe) == probe.score(recipe)
        assert 0 < small._states.used <= bound
    assert small.stats.layer_forwards > probe.stats.layer_forwards  # it evicted


def test_token_sums_keep_float64_accuracy_over_a_large_vocabulary():
    # KL from the teacher's cached probabilities (sum p log p - p.z + lse) must not lose
    # the precision a direct float64 computation has, at a real vocabulary size.
    g = torch.Generator().manual_seed(0)
    teacher_logits = torch.randn(2, 16, 49152, generator=g) * 4 + 3
    student = teacher_logits + torch.randn(2, 16, 49152, generator=g)
    ids = torch.randint(0, 49152, (2, 16), generator=g)
    stack = SimpleNamespace(logits=lambda state: state.clone())  # a fresh tensor, as a head gives
    teacher = objectives.Teacher.of(stack, SimpleNamespace(states=[teacher_logits]))
    sums = objectives.token_sums(
        ["kl", "loss"], stack, student, SimpleNamespace(input_ids=ids), teacher
    )
    p = torch.log_softmax(teacher_logits.double(), -1)
    q = torch.log_softmax(student.double(), -1)
    kl = float((p.exp() * (p - q)).sum(-1).sum())
    loss = float(-q[:, :-1].gather(-1, ids[:, 1:, None]).sum())
    assert sums["kl"] == (pytest.approx(kl, rel=1e-6), 32)
    assert sums["loss"] == (pytest.approx(loss, rel=1e-6), 30)


def test_token_sums_on_a_subset_of_positions_are_those_positions_exactly(gen):
    """kl_positions: the same sums as a float64 computation over just those positions."""
    teacher_logits = torch.randn(2, 16, 300, generator=gen) * 3
    student = teacher_logits + torch.randn(2, 16, 300, generator=gen)
    ids = torch.randint(0, 300, (2, 16), generator=gen)
    at = objectives.Logits(positions=5).scored(16)
    assert at.tolist() == [0, 4, 7, 10, 14] and objectives.Logits(positions=15).scored(16) is None
    stack = SimpleNamespace(logits=lambda state: state.clone())
    teacher = objectives.Teacher.of(stack, SimpleNamespace(states=[teacher_logits]), at)
    sums = objectives.token_sums(
        ["kl", "loss"], stack, student, SimpleNamespace(input_ids=ids), teacher, at
    )
    p = torch.log_softmax(teacher_logits[:, at].double(), -1)
    q = torch.log_softmax(student[:, at].double(), -1)
    kl = float((p.exp() * (p - q)).sum(-1).sum())
    loss = float(-q.gather(-1, ids[:, at + 1, None]).sum())
    assert sums["kl"] == (pytest.approx(kl, rel=1e-6), 10)
    assert sums["loss"] == (pytest.approx(loss, rel=1e-6), 10)


def test_kl_positions_through_the_runner(space, family, tokens):
    """A runner scoring on a few positions ranks as the direct KL over those positions."""
    config = _config(family, tokens)
    few = TrialRunner(dataclasses.replace(config, objective=objectives.Logits(positions=4)))
    recipe = space.decode(space.initial([1, 2, 3, 4]))
    at = objectives.Logits(positions=4).scored(tokens.shape[1])
    base = AutoModelForCausalLM.from_pretrained(space.base)
    with torch.no_grad():
        p = torch.log_softmax(base(input_ids=tokens).logits[:, at].double(), -1)
        q = torch.log_softmax(tk.assemble(recipe)(input_ids=tokens).logits[:, at].double(), -1)
    assert few.score(recipe) == pytest.approx(float((p.exp() * (p - q)).sum(-1).mean()), rel=1e-5)


class _Head(torch.nn.Module):
    """An LM head over given hidden states (no final norm), for the top-k KL tests."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.weight.T


def _head_stack(weight: torch.Tensor):
    from tailorkit.forward import DecoderStack

    stack = object.__new__(DecoderStack)  # only the head: final() and logits() need no model
    stack.head, stack.norm, stack.model = _Head(weight), None, SimpleNamespace(config=object())
    return stack


def _bucketed_kl(p_logits, q_logits, k):
    """The KL of the teacher's top-k tokens plus one bucket for the rest, every logit known."""
    p = torch.log_softmax(p_logits.double(), -1).exp()
    q = torch.log_softmax(q_logits.double(), -1).exp()
    top = p.topk(k, -1).indices
    rest = torch.ones_like(p, dtype=torch.bool).scatter_(-1, top, False)
    p_s, q_s = p.gather(-1, top), q.gather(-1, top)
    p_t, q_t = (p * rest).sum(-1), (q * rest).sum(-1)
    tail = torch.xlogy(p_t, p_t) - torch.xlogy(p_t, q_t)  # 0 when the top k hold everything
    return float(((p_s * (p_s / q_s).log()).sum(-1) + tail).sum())


@pytest.mark.parametrize("k", [1, 8, 40])
def test_top_k_kl_is_the_bucketed_kl_when_the_sample_covers_the_vocabulary(gen, k):
    """With a vocabulary smaller than TAIL_SAMPLE the trial's tail mass is exact: the top-k
    KL is the KL of the bucketed distributions, at most the full KL, equal with k = V."""
    vocab, d = 40, 16
    stack = _head_stack(torch.randn(vocab, d, generator=gen))
    teacher_h = torch.randn(2, 12, d, generator=gen)
    student_h = teacher_h + 0.5 * torch.randn(2, 12, d, generator=gen)
    teacher = objectives.TopKTeacher.of(stack, SimpleNamespace(states=[teacher_h]), None, k)
    total, count = objectives.top_k_kl(stack, student_h, teacher, None)
    p_logits, q_logits = stack.logits(teacher_h), stack.logits(student_h)
    full = objectives.Teacher.of(stack, SimpleNamespace(states=[teacher_h]))
    ids = SimpleNamespace(input_ids=torch.zeros(2, 12, dtype=torch.long))
    exact = objectives.token_sums(["kl"], stack, student_h, ids, full)["kl"][0]
    assert count == 24
    assert total == pytest.approx(_bucketed_kl(p_logits, q_logits, k), rel=1e-6)  # float32 logits
    assert total <= exact * (1 + 1e-6)  # up to float32 rounding of the logits
    if k == vocab:
        assert total == pytest.approx(exact, rel=1e-6)


def test_top_k_kl_at_a_real_vocabulary_ranks_trials_as_the_full_kl(gen):
    """At SmolLM2's vocabulary the tail is estimated from TAIL_SAMPLE tokens: trials further
    from the teacher still score higher, and where the top k hold most of the teacher's mass
    (here ~99%, logits of std ~6) each score stays near the full KL."""
    vocab, d = 49152, 64
    stack = _head_stack(torch.randn(vocab, d, generator=gen) / 4)
    teacher_h = 3 * torch.randn(2, 16, d, generator=gen)
    teacher = objectives.TopKTeacher.of(stack, SimpleNamespace(states=[teacher_h]), None, 256)
    assert float(teacher.tail.mean()) < 0.05
    full = objectives.Teacher.of(stack, SimpleNamespace(states=[teacher_h]))
    noise = torch.randn(2, 16, d, generator=gen)
    ids = SimpleNamespace(input_ids=torch.zeros(2, 16, dtype=torch.long))
    approx, exact = [], []
    for scale in (0.1, 0.3, 0.6, 1.0, 1.5):
        student_h = teacher_h + scale * noise
        approx.append(objectives.top_k_kl(stack, student_h, teacher, None)[0])
        exact.append(objectives.token_sums(["kl"], stack, student_h, ids, full)["kl"][0])
    assert approx == sorted(approx) and exact == sorted(exact)
    for a, e in zip(approx, exact):
        assert a == pytest.approx(e, rel=0.2)


def test_top_k_through_the_runner_and_its_errors(space, family, tokens):
    """The runner's top-k score is the bucketed KL of the assembled models (the tiny
    vocabulary is below TAIL_SAMPLE, so exact); loss cannot be approximated this way."""
    config = _config(family, tokens)
    top = TrialRunner(dataclasses.replace(config, objective=objectives.Logits(top_k=5)))
    recipe = space.decode(space.initial([1, 2, 3, 4]))
    base = AutoModelForCausalLM.from_pretrained(space.base)
    with torch.no_grad():
        p, q = base(input_ids=tokens).logits, tk.assemble(recipe)(input_ids=tokens).logits
    expected = _bucketed_kl(p, q, 5) / p.shape[0] / p.shape[1]
    assert top.score(recipe) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(tk.TailorkitError, match="kl term only"):
        objectives.Logits.parse("kl+loss", top_k=8)
    with pytest.raises(tk.TailorkitError, match="at least 1"):
        objectives.Logits.parse("kl", top_k=0)


def test_lm_eval_objective_scores_the_assembled_candidate_once(space, family, tokens):
    from transformers import AutoTokenizer

    from tailorkit.eval.tasks import run_tasks

    settings = {"tasks": ["tk_next_line_code"], "limit": 4}
    config = _config(family, tokens, objective={"kl": 1.0, "lm_eval": 0.5}, lm_eval=settings)
    evaluator = TrialRunner(config)
    recipe = space.decode(space.initial([1, 2, 3, 4]))
    got = evaluator.score(recipe)
    kl = TrialRunner(_config(family, tokens)).score(recipe)
    tokenizer = AutoTokenizer.from_pretrained(space.base)
    row = run_tasks(tk.assemble(recipe), tokenizer, settings["tasks"], limit=settings["limit"])
    accuracy = row["tk_next_line_code"]["acc_norm"]
    assert got == pytest.approx(kl + 0.5 * (1 - accuracy), abs=1e-12)
    assert evaluator.score(recipe) == got  # served from the memo: lm-eval does not run again
    assert evaluator.stats.scores_reused == 3  # two batches and the lm-eval score


def test_prefix_states_and_scores_are_reused(space, evaluator, family, tokens):
    two = len(evaluator.traces)  # counts are per (layer, batch)
    assert two == 2
    before = dataclasses.replace(evaluator.stats)
    a = space.initial([4, 3, 2, 1])  # keeps 0, 1, 2
    b = a.copy()
    b[LAYERS + 2 * 2] = 1.0  # only layer 2 differs (from c1)
    evaluator.score(space.decode(a))
    mid = dataclasses.replace(evaluator.stats)
    evaluator.score(space.decode(b))
    after = dataclasses.replace(evaluator.stats)
    assert after.layers_reused - mid.layers_reused == 2 * two  # layers 0 and 1
    assert after.layer_forwards - mid.layer_forwards == 1 * two
    first = evaluator.score(space.decode(a))  # seen before: nothing runs
    assert evaluator.stats.layer_forwards == after.layer_forwards
    assert evaluator.stats.scores_reused == after.scores_reused + two
    assert mid.evaluations == before.evaluations + 1
    assert mid.layer_forwards == before.layer_forwards  # a's layers are the base's: recorded
    report = evaluator.cache_report()
    assert 0 < report["prefix_hit_rate"] < 1 and 0 < report["layer_work_saved"] < 1
    # A candidate scored on the small slice (batch 0) reruns only batch 1 at full fidelity.
    c = a.copy()
    c[LAYERS + 0 * 2 + 1] = 1.0  # layer 0 from c2
    evaluator.score(space.decode(c), windows=4)
    small = dataclasses.replace(evaluator.stats)
    full = evaluator.score(space.decode(c))
    assert evaluator.stats.layer_forwards - small.layer_forwards == LAYERS - 1
    assert evaluator.stats.scores_reused == small.scores_reused + 1
    # The caches change nothing but the time taken.
    fresh = TrialRunner(_config(family, tokens, caches=False))
    assert fresh.score(space.decode(c)) == full
    assert fresh.score(space.decode(a)) == first
    assert fresh.stats.layers_reused == fresh.stats.scores_reused == 0


def _search(space, evaluator, out_dir, resume=False, budget=18):
    settings = SearchSettings(budget=budget, popsize=6, seed=7, fidelity_windows=4)
    x0 = space.initial([4, 1, 3, 2])
    runner = LocalExecutor.__new__(LocalExecutor)
    runner.runner = evaluator
    return run_search(space, runner, x0, settings, out_dir, resume=resume, progress=False)


def test_search_improves_on_its_start_and_logs_every_generation(space, evaluator, tmp_path):
    result = _search(space, evaluator, tmp_path)
    assert result.fitness <= result.start_fitness
    lines = (tmp_path / LOG_NAME).read_text().splitlines()
    assert len(lines) == result.generations == 3
    assert all(len(json.loads(line)["fitness"]) == 6 for line in lines)
    assert (tmp_path / "convergence.png").read_bytes()[:4] == b"\x89PNG"
    state = json.loads((tmp_path / "search_state.json").read_text())
    assert state["best_fitness"] == result.fitness


def test_resume_after_a_kill_reaches_the_same_result(space, evaluator, tmp_path):
    straight = _search(space, evaluator, tmp_path / "straight")
    log = tmp_path / "straight" / LOG_NAME
    killed = tmp_path / "killed"
    killed.mkdir()
    lines = log.read_text().splitlines()
    # Killed during generation 2: two whole generations logged, the third cut mid-line.
    (killed / LOG_NAME).write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])
    resumed = _search(space, evaluator, killed, resume=True)
    assert resumed.recipe == straight.recipe
    assert resumed.fitness == straight.fitness
    assert resumed.history == straight.history
    with pytest.raises(tk.TailorkitError, match="cannot resume"):
        _search(space, evaluator, killed, resume=True, budget=24)


def test_resume_of_a_log_that_does_not_say_how_it_scored(space, evaluator, tmp_path, caplog):
    """A log written before the scoring was recorded resumes, with a warning that it
    cannot be checked."""
    straight = _search(space, evaluator, tmp_path / "straight")
    lines = [json.loads(x) for x in (tmp_path / "straight" / LOG_NAME).read_text().splitlines()]
    for line in lines:
        del line["settings"]["scoring"]
    old = tmp_path / "old"
    old.mkdir()
    (old / LOG_NAME).write_text("".join(json.dumps(line) + "\n" for line in lines[:2]))
    resumed = _search(space, evaluator, old, resume=True)
    assert resumed.recipe == straight.recipe and resumed.history == straight.history
    assert "does not say how candidates were scored" in caplog.text


def test_ray_executor_gives_the_local_result(space, family, tokens, tmp_path):
    pytest.importorskip("ray")
    from tailorkit.search.executors import RayExecutor

    config = _config(family, tokens, threads=1)
    settings = SearchSettings(budget=12, popsize=6, seed=3, fidelity_windows=4)
    x0 = space.initial([4, 1, 3, 2])
    local = LocalExecutor(config)
    want = run_search(space, local, x0, settings, tmp_path / "local", progress=False)
    ray_runner = RayExecutor(config, workers=2)
    try:
        got = run_search(space, ray_runner, x0, settings, tmp_path / "ray", progress=False)
        report = ray_runner.cache_report()
    finally:
        ray_runner.close()
    assert got.recipe == want.recipe and got.fitness == want.fitness
    assert got.history == want.history
    assert report["workers"] == 2 and report["evaluations"] > 0


def test_cli_gptailor_builds_and_resumes(family, tmp_path, capsys):
    out = tmp_path / "tailored"
    args = ["prune", "--method", "gptailor", "--base", str(family.base)]
    args += [f"--candidate={c}" for c in family.candidates]
    args += ["--target-ratio", "0.22", "--calibration", str(tmp_path / "text.txt")]
    args += ["--seq-len", "16", "--num-windows", "8", "--batch-size", "4", "-q"]
    args += ["--set", "budget=12", "--set", "popsize=6", "--set", "fidelity_windows=4"]
    (tmp_path / "text.txt").write_text("To be, or not to be, that is the question.\n" * 20)
    assert main([*args, "--out", str(out)]) == 0
    recipe = tk.Recipe.load(out / "recipe.yaml")
    assert len(recipe.output_layers()) == LAYERS - 1
    assert (out / "search" / LOG_NAME).is_file()
    assert (out / "convergence.png").is_file()
    card = (out / "README.md").read_text()
    assert "convergence.png" in card
    report = json.loads((out / "report.json").read_text())
    cache = report["search"]["runner"]
    assert cache["evaluations"] > 12 and cache["prefix_hit_rate"] > 0
    assert report["settings"]["dtype"] == recipe.dtype == "float32"  # auto, float32 weights
    # Resume into the same folder: the logged generations are replayed, same recipe.
    assert main([*args, "--out", str(out), "--resume", "--overwrite"]) == 0
    assert tk.Recipe.load(out / "recipe.yaml") == recipe
    # Scored otherwise, the logged fitness values would not compare: refused, saying why.
    other = [*args, "--set", "kl_top_k=5", "--out", str(out), "--resume", "--overwrite"]
    assert main(other) != 0
    assert "cannot resume" in capsys.readouterr().err


def test_gptailor_refuses_a_candidate_of_another_shape(family, tiny_model_factory, tokens):
    other = tiny_model_factory("qwen2")
    with pytest.raises(tk.TailorkitError, match="fine-tunes of the same base"):
        tk.prune(
            str(family.base),
            method="gptailor",
            candidates=[str(other)],
            target_ratio=0.22,
            calibration=tokens,
            progress=False,
        )


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"budget": 4, "popsize": 6}, "smaller than one generation"),
        ({"objective": "accuracy"}, "unknown objective 'accuracy'"),
        ({"target_ratio": 0.99}, "cannot be reached"),
        ({"executor": "slurm"}, "executor: Input should be 'local' or 'ray'"),
        ({"state_cache": "lots"}, "state_cache 'lots': expected a number with a unit"),
        ({"kl_top_k": 8, "objective": "kl+loss"}, "approximates the kl term only"),
        ({"kl_top_k": 0}, "kl_top_k must be at least 1, 'auto' or null"),
        ({"kl_top_k": "most"}, "kl_top_k"),
        ({"dtype": "float8"}, "dtype: Input should be 'auto'"),
    ],
)
def test_gptailor_bad_settings(family, tokens, settings, message):
    kwargs = {"target_ratio": 0.22, "budget": 12, "popsize": 6} | settings
    with pytest.raises(tk.TailorkitError, match=message):
        tk.prune(
            str(family.base),
            method="gptailor",
            candidates=[str(c) for c in family.candidates],
            calibration=tokens,
            progress=False,
            **kwargs,
        )


def test_gptailor_with_kl_top_k_end_to_end(family, tokens, tmp_path):
    """The top-k KL through tk.prune: a valid plan of the right size, its search logged,
    and the settings in the report; the built model is the plan's."""
    result = tk.prune(
        str(family.base),
        method="gptailor",
        candidates=[str(c) for c in family.candidates],
        calibration=tokens,
        progress=False,
        target_ratio=0.22,
        budget=12,
        popsize=6,
        kl_top_k=8,
    )
    assert len(result.recipe.output_layers()) == LAYERS - 1
    assert result.report["search"]["evaluations"] == 12
    assert result.report["settings"]["kl_top_k"] == 8
    out = result.save_pretrained(tmp_path / "out")
    assert tk.Recipe.load(out / "recipe.yaml") == result.recipe


def test_evaluator_refuses_a_device_it_cannot_use(family, tokens, capsys):
    config = RunnerConfig(base=str(family.base), windows=tokens, device="tpu")
    with pytest.raises(tk.TailorkitError, match="runs on 'cpu'"):
        TrialRunner(config)
    assert main(["prune", "--base", str(family.base), "--device", "cuda", "-q"]) != 0
    assert "--device is for --method gptailor" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_evaluator_on_cuda_agrees_with_the_cpu_and_its_caches_change_nothing(space, family, tokens):
    config = _config(family, tokens)
    cpu = TrialRunner(config)
    gpu = TrialRunner(dataclasses.replace(config, device="cuda"))
    uncached = TrialRunner(dataclasses.replace(config, device="cuda", caches=False))
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ()).item()))  # fresh each run
    genomes = [rng.normal(size=space.dimension) for _ in range(6)]
    genomes += [g + rng.normal(size=space.dimension) * 0.1 for g in genomes]  # shared prefixes
    for x in genomes:
        recipe = space.decode(x)
        on = gpu.score(recipe, windows=4)
        assert on == pytest.approx(cpu.score(recipe, windows=4), rel=1e-4, abs=1e-6)
        assert on == uncached.score(recipe, windows=4)
        assert gpu.score(recipe) == uncached.score(recipe)
    assert gpu.stats.layers_reused > 0 and gpu.stats.scores_reused > 0


@pytest.mark.parametrize("native", [True, False])
def test_auto_trial_dtype_is_bfloat16_for_a_bfloat16_checkpoint_on_native_hardware(
    tiny_model_factory, family, monkeypatch, native
):
    from tailorkit.checkpoint.source import Source
    from tailorkit.methods import gptailor

    monkeypatch.setattr(gptailor, "computes_bfloat16", lambda device: native)
    bf16 = Source(str(tiny_model_factory("llama", dtype=torch.bfloat16)))
    f32 = Source(str(family.base))
    assert gptailor.trial_dtype("auto", bf16, "cpu") == ("bfloat16" if native else "float32")
    assert gptailor.trial_dtype("auto", f32, "cpu") == "float32"
    assert gptailor.trial_dtype("float16", bf16, "cpu") == "float16"


def test_auto_kl_top_k_where_the_vocabulary_is_large_and_the_objective_has_no_loss(family):
    """``auto`` is top 256 at SmolLM2's vocabulary, the whole vocabulary at the tiny models'
    (where the head is cheap and the full KL exact) and whenever a loss term needs every
    logit; a number or null is kept as given."""
    from tailorkit.checkpoint.source import Source
    from tailorkit.methods import gptailor

    tiny = Source(str(family.base))
    large = Source(str(family.base))
    large.config = {**tiny.config, "vocab_size": 49152}
    kl, with_loss = objectives.Logits.parse("kl"), objectives.Logits.parse("kl+0.5*loss")
    assert tiny.config["vocab_size"] < gptailor.AUTO_TOP_K_VOCAB
    assert gptailor.kl_top_k("auto", kl, tiny) is None
    assert gptailor.kl_top_k("auto", kl, large) == gptailor.AUTO_TOP_K == 256
    assert gptailor.kl_top_k("auto", with_loss, large) is None
    assert gptailor.kl_top_k(64, kl, tiny) == 64
    assert gptailor.kl_top_k(None, kl, large) is None
