"""The model card of a tailored model: ``make_model_card(plan, ...)``.

It returns a ``huggingface_hub.ModelCard``: metadata the Hub reads (``base_model`` and
``base_model_relation`` for the model tree, ``library_name``, ``pipeline_tag``, tags, the
base model's licence when known), and a body that says how the model was made — the
method and its settings (the method's own description and citation, from its
registration), how much was removed, where every output layer came from, the figures,
the evaluation against the dense model, the recipe and the command that rebuilds it.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.repocard import metadata_load

from tailorkit import citations
from tailorkit.checkpoint import builtin
from tailorkit.errors import CheckpointError, HubError
from tailorkit.plan import Plan
from tailorkit.recipe import Recipe
from tailorkit.version import __version__

if TYPE_CHECKING:
    from tailorkit.methods.registry import MethodSpec

log = logging.getLogger(__name__)

TAGS = ("tailorkit", "layer-pruning", "depth-pruning")
CITED_ALWAYS = (citations.GPTAILOR, citations.SLM)  # the methods tailorkit implements

_IMAGE_CAPTIONS = {
    "similarity": "Layer similarity (CKA) of the base model",
    "heatmap": "Layer similarity (CKA) of the base model",
    "convergence": "Search convergence",
}

# --------------------------------------------------------------------------- sources

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_id(ref: str) -> str | None:
    """The Hub repo id behind a model reference, or None for local and built-in models."""
    if builtin.is_builtin(ref) or Path(ref).expanduser().exists():
        return None
    repo_id = ref.partition("@")[0]
    return repo_id if _REPO_ID.match(repo_id) and ".." not in repo_id else None


def _lineage(ref: str) -> str | None:
    """The Hub repo a model's weights come from: its own id, or a built-in model's origin
    (the Hub's model tree then links it; the card says the weights were dequantised)."""
    if builtin.is_builtin(ref):
        try:
            return builtin.get_builtin(ref).hub_id
        except CheckpointError:
            return None
    return _hub_id(ref)


def _describe_ref(ref: str) -> str:
    hub = _hub_id(ref)
    if hub:
        revision = ref.partition("@")[2]
        at = f" at revision `{revision}`" if revision else ""
        return f"[{hub}](https://huggingface.co/{hub}){at}"
    if builtin.is_builtin(ref):
        try:
            spec = builtin.get_builtin(ref)
            origin = (
                f" ([{spec.hub_id}](https://huggingface.co/{spec.hub_id}))" if spec.hub_id else ""
            )
            return f"`{ref}`: tailorkit's built-in {spec.description}{origin}"
        except CheckpointError:
            return f"`{ref}` (a tailorkit built-in model)"
    # A local directory: its name only, never the full path of someone's disk.
    return f"local checkpoint `{Path(ref).name or ref}` (not on the Hub)"


def _name_ref(ref: str) -> str:
    """The base model for a sentence: a Hub link, or a name that says where it lives."""
    if builtin.is_builtin(ref):
        return f"{_short_name(ref)} (tailorkit's built-in model `{ref}`)"
    return _describe_ref(ref)


def _short_name(ref: str) -> str:
    if builtin.is_builtin(ref):
        try:
            return builtin.get_builtin(ref).dirname
        except CheckpointError:
            pass
    return Path(_hub_id(ref) or ref).name or ref


def base_license(plan: Plan) -> str | None:
    """The licence in the base model's README.md metadata, when it can be read offline."""
    base = plan.base
    candidates = [base.path / "README.md"]
    hub = _hub_id(base.ref)
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(hub, "README.md")
            if isinstance(cached, str):
                candidates.append(Path(cached))
        except Exception as e:  # the cache layout is huggingface_hub's business
            log.debug("no cached README for %s: %s", hub, e)
    for path in filter(Path.is_file, candidates):
        try:
            value = (metadata_load(path) or {}).get("license")
        except (ValueError, yaml.YAMLError):  # not UTF-8, not YAML, not a mapping
            continue
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


# --------------------------------------------------------------------------- the card


def _cell(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, (dict, list, tuple)):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 200 else text[:197] + "..."


def _weights(layer) -> str:
    parts = []
    if layer.method == "passthrough":
        return ""
    if layer.weights:
        parts.append("weights " + ", ".join(f"{w:.4g}" for w in layer.weights))
    parts += [f"{k} = {v:.4g}" for k, v in layer.params]
    return "; ".join(parts)


def _provenance(plan: Plan) -> str:
    rows = [
        "| output layer | method | source layer(s) | base of the task vectors | weights |",
        "|---:|---|---|---|---|",
    ]
    for i, layer in enumerate(plan.layers):
        sources = ", ".join(f"{m}[{idx}]" for m, idx in layer.sources)
        base = f"{layer.base[0]}[{layer.base[1]}]" if layer.base else ""
        method = f"{layer.method} + {layer.bridge}" if layer.bridge else layer.method
        rows.append(f"| {i} | {method} | {sources} | {base} | {_weights(layer)} |")
    return "\n".join(rows)


def _bridges(plan: Plan, fits: list[dict] | None) -> str:
    text = (
        "Linear bridges (ReplaceMe, arXiv:2505.02819), fitted on calibration text, stand in "
        "for removed layers: each hidden x hidden map T is folded into the MLP output "
        "projection of the layer before the gap (W <- T^T W), so the checkpoint keeps the "
        f"base's shape and needs no custom code. The maps are in `{plan.recipe.tensors.file}`"
        " beside `recipe.yaml`, which names it with its sha256."
    )
    if not fits:
        return text
    rows = [
        "| output layer | bridge | stands in for base layers | tokens fitted | held-back error "
        "| without the bridge |",
        "|---:|---|---|---:|---:|---:|",
    ]
    for fit in fits:
        name = fit["name"] if fit["kept"] else "(dropped: no better on held-back tokens)"
        rows.append(
            f"| {fit['layer']} | {name} | {spans(range(*fit['removed']))} "
            f"| {fit['tokens']} "
            f"| {fit['error']:.4f} | {fit['error_without']:.4f} |"
        )
    error = (
        "The error is the weighted relative distance of the residual stream after the "
        "bridged layer to the dense model's at the next kept layer, on calibration windows "
        "held back from the fit."
    )
    return "\n\n".join([text, "\n".join(rows), error])


def _used_models(plan: Plan) -> list[str]:
    used = {m for layer in plan.layers for m, _ in layer.sources}
    used |= {layer.base[0] for layer in plan.layers if layer.base}
    used |= {plan.recipe.base_model, plan.recipe.embeddings_model, plan.recipe.head_model}
    return [name for name in plan.recipe.models if name in used]


def _sources_table(plan: Plan) -> str:
    rows = ["| name | model | role | layers | layers used |", "|---|---|---|---:|---:|"]
    for name in plan.recipe.models:
        ref = plan.recipe.models[name]
        src = plan.sources[name]
        role = []
        if name == plan.recipe.base_model:
            role.append("base (config, tokenizer)")
        if name == plan.recipe.embeddings_model:
            role.append("embeddings")
        if name == plan.recipe.head_model:
            role.append("final norm, head")
        used = {i for layer in plan.layers for m, i in layer.sources if m == name}
        used |= {layer.base[1] for layer in plan.layers if layer.base and layer.base[0] == name}
        rows.append(
            f"| {name} | {_describe_ref(ref)} | {', '.join(role) or 'candidate'} "
            f"| {src.num_layers} | {len(used)} |"
        )
    return "\n".join(rows)


def _compared_speed(evaluation: Any) -> dict[str, Any] | None:
    """The evaluation's measured speed when it has both this model's and the base's."""
    if not evaluation:
        return None
    data = evaluation.to_dict() if hasattr(evaluation, "to_dict") else dict(evaluation)
    speed = data.get("speed") or {}
    return speed if speed.get("model") and speed.get("base") else None


def _size_table(plan: Plan, speed: dict[str, Any] | None = None) -> str:
    """Layers and parameters, base against this model; with ``speed`` (an evaluation's
    ``speed`` holding both models) also prefill and decode tokens/s and the speed-ups."""
    base_layers, layers = plan.base.num_layers, plan.num_layers
    base_params, params = plan.base_parameters, plan.num_parameters
    rows = [
        f"| | base model | this model | removed{' / speed-up' if speed else ''} |",
        "|---|---:|---:|---:|",
        f"| transformer layers | {base_layers} | {layers} | {base_layers - layers} "
        f"({plan.removed_layer_fraction:.1%}) |",
        f"| parameters | {base_params:,} | {params:,} | {base_params - params:,} "
        f"({plan.removed_parameter_fraction:.1%}) |",
    ]
    if plan.recipe.width is not None:
        full, kept = _channels_per_layer(plan), plan.recipe.width.intermediate_size
        rows.insert(
            3,
            f"| MLP channels per layer | {full} | {kept} | {full - kept} ({1 - kept / full:.1%}) |",
        )
    if not speed:
        return "\n".join(rows)
    from tailorkit.eval.compare import format_rate, format_speedup, speed_note  # torch
    from tailorkit.eval.speed import speed_ratio

    mine, base = speed["model"], speed["base"]
    ups = speed_ratio(base, mine)
    for phase in ("prefill", "decode"):
        key = f"{phase}_tokens_per_s"
        rows.append(
            f"| {phase} tokens/s | {format_rate(base.get(key))} | {format_rate(mine.get(key))} "
            f"| {format_speedup(ups[phase])} |"
        )
    return "\n".join(rows) + "\n\n" + speed_note(mine)


def _width_clause(plan: Plan) -> str:
    width = plan.recipe.width
    if width is None:
        return ""
    return (
        f", each keeping {width.intermediate_size} of its {_channels_per_layer(plan)} MLP channels"
    )


def _channels_per_layer(plan: Plan) -> int:
    from tailorkit.width import channels_per_layer  # torch: only width-pruned plans get here

    return channels_per_layer(plan.base)


def _method_spec(key: str | None) -> MethodSpec | None:
    """The registered method ``key`` (None for a hand-written recipe or an unknown name).

    Imported here, not above: the methods' code needs torch, and a build of a recipe
    without a method writes its card (citations from :mod:`tailorkit.citations`) without it.
    """
    if not key:
        return None
    from tailorkit.methods import METHODS

    return METHODS.get(key)


def _images(images: dict[str, str]) -> str:
    lines = []
    for key, rel in images.items():
        path = Path(rel)
        if path.is_absolute() or ".." in path.parts or not rel:
            raise HubError(
                f"image {key!r}: {rel!r} must be a path relative to the model folder "
                "(the card links the file inside the repo)"
            )
        caption = _IMAGE_CAPTIONS.get(key, key)
        lines.append(f"![{caption}]({path.as_posix()})\n\n*{caption}.*")
    return "\n\n".join(lines)


def _report(report: dict[str, Any]) -> str:
    skip = {"method", "settings"}
    scalars = {
        k: v
        for k, v in report.items()
        if k not in skip and (v is None or isinstance(v, (str, int, float, bool)))
    }
    nested = {k: v for k, v in report.items() if k not in skip and k not in scalars}
    parts = []
    if scalars:
        parts.append(
            "\n".join(
                ["| | |", "|---|---|", *(f"| {k} | {_cell(v)} |" for k, v in scalars.items())]
            )
        )
    if nested:
        body = json.dumps(nested, indent=1, default=str)
        parts.append(
            "<details><summary>Full report (JSON)</summary>\n\n```json\n"
            + body
            + "\n```\n\n</details>"
        )
    return "\n\n".join(parts)


def _evaluation(evaluation: Any) -> str:
    from tailorkit.eval.compare import Evaluation, render_tables

    data = evaluation.to_dict() if isinstance(evaluation, Evaluation) else dict(evaluation)
    if _compared_speed(data):
        data.pop("speed")  # the size table shows it
    if not (data.get("tasks") or data.get("perplexity") or data.get("speed")):
        return ""
    text = render_tables(data)
    settings = data.get("settings", {})
    notes = []
    if data.get("baseline"):
        notes.append(
            "Retention is this model's score divided by the dense base model's, on each task's "
            "primary metric; the average row divides the mean scores."
        )
    if settings.get("limit"):
        notes.append(f"Each task was limited to {settings['limit']} documents.")
    if settings.get("context_length"):
        notes.append(
            f"Perplexity: sliding windows of {settings['context_length']} tokens, "
            f"stride {settings.get('stride')}."
        )
    versions = settings.get("versions") or {}
    if versions:
        notes.append("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".")
    return text + ("\n\n" + " ".join(notes) if notes else "")


def make_model_card(
    plan: Plan | Recipe,
    *,
    method: str | None = None,
    settings: dict | None = None,
    report: dict | None = None,
    images: dict[str, str] | None = None,
    evaluation: dict | Any | None = None,
    command: str | None = None,
    license: str | None = None,
    title: str | None = None,
    healing: dict | None = None,
) -> ModelCard:
    """The model card of a tailored model (``card.content`` is the README.md text).

    ``method``: the method that produced the recipe (gptailor, slm, shortgpt, angular,
    laco; None for a hand-written recipe) and ``settings`` its settings; ``report``:
    anything else worth recording (scalars become a table, the rest a JSON block);
    ``images``: caption (or ``similarity`` / ``convergence``) -> image path relative to
    the model folder; ``evaluation``: an ``Evaluation`` or its ``to_dict()``;
    ``command``: the command line that made the model.  ``license`` overrides the one
    read from the base model's README.md.
    """
    plan = plan if isinstance(plan, Plan) else plan.plan()
    recipe = plan.recipe
    used = _used_models(plan)
    hub_ids = list(dict.fromkeys(h for h in (_lineage(recipe.models[n]) for n in used) if h))
    key = method.strip().lower() if method else None
    tags = list(TAGS)
    if key:
        tags.append(key)
    if len(used) > 1:
        tags.append("merge")
    data = ModelCardData(
        base_model=hub_ids or None,
        # Valid values are adapter, merge, quantized and finetune; a pruned or re-stitched
        # copy of one model is a derivative of its weights, hence "finetune".
        base_model_relation=("merge" if len(used) > 1 else "finetune") if hub_ids else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license or base_license(plan),
        tags=tags,
    )

    base_ref = recipe.models[recipe.base_model]
    name = title or f"{_short_name(base_ref)} tailored to {plan.num_layers} layers"
    body = [f"# {name}"]
    body.append(
        f"A {'depth- and width-' if plan.recipe.width else 'depth-'}compressed copy of "
        f"{_name_ref(base_ref)}: {plan.num_layers} of its "
        f"{plan.base.num_layers} transformer layers remain{_width_clause(plan)} "
        f"({plan.removed_layer_fraction:.1%} of the layers and "
        f"{plan.removed_parameter_fraction:.1%} of the parameters removed), built with "
        f"[tailorkit](https://pypi.org/project/tailorkit/) {__version__} from the recipe in "
        "`recipe.yaml`. It is a standard transformers checkpoint: "
        "`AutoModelForCausalLM.from_pretrained` loads it, no tailorkit needed."
    )
    if healing:
        body.append(
            "**Its weights were trained after the recipe** (`tailorkit heal`, below): the "
            "recipe alone rebuilds the pruned model before healing, not these weights."
        )
    body.append("## Method")
    spec = _method_spec(key)
    if spec is not None:
        body.append(f"**{spec.label}.** {spec.description}")
    elif key:
        body.append(f"**{method}.**")
    else:
        body.append("A hand-written recipe: layers removed, stitched and merged as listed below.")
    if settings:
        body.append(
            "\n".join(
                ["| setting | value |", "|---|---|"]
                + [f"| {k} | {_cell(v)} |" for k, v in settings.items()]
            )
        )
    body.append("## Size")
    body.append(_size_table(plan, _compared_speed(evaluation)))
    body.append("## Source models")
    body.append(_sources_table(plan))
    body.append("## Layer provenance")
    body.append(
        "Each output layer and where it came from (`name[i]` is layer i of the source model "
        "`name`, counted from 0). Merged layers merge every tensor of the layer, norms "
        "included, with the rule and coefficients shown."
    )
    body.append(_provenance(plan))
    bridged = any(layer.bridge for layer in plan.layers)
    if bridged:
        body.append("## Bridges")
        body.append(_bridges(plan, (report or {}).get("bridges")))
    if healing:
        body.append("## Healing")
        body.append(healing_section(healing))
    if images:
        body.append("## Figures")
        body.append(_images(images))
    evaluated = _evaluation(evaluation) if evaluation else ""
    if evaluated:
        body.append("## Evaluation")
        body.append(evaluated)
    if report:
        rendered = _report(report)
        if rendered:
            body.append("## Report")
            body.append(rendered)
    body.append("## Reproduce")
    body.append(
        "The recipe (also in this repo as `recipe.yaml`):\n\n```yaml\n"
        + recipe.to_yaml().rstrip()
        + "\n```"
    )
    rebuild = "tailorkit build recipe.yaml OUT_DIR"
    local = [
        n
        for n in used
        if not _hub_id(recipe.models[n]) and not builtin.is_builtin(recipe.models[n])
    ]
    if local:
        body.append(
            f"Model(s) {', '.join(f'`{n}`' for n in local)} are local checkpoints: a rebuild "
            "needs them at the paths the recipe names (or edit `models:` to point at copies)."
        )
    if healing:
        body.append(
            "The recipe rebuilds the model as it was before healing; `heal.json` "
            "holds the healing run's settings and history."
        )
    if command:
        body.append(f"Made with:\n\n```bash\n{command}\n```\n\nRebuild from the recipe with:")
    else:
        body.append("Rebuild it with:")
    body.append(f"```bash\npip install tailorkit\n{rebuild}\n```")
    body.append("## Citation")
    bibs = [*CITED_ALWAYS]
    if spec is not None and spec.citation not in bibs:
        bibs.append(spec.citation)
    if bridged:
        bibs.append(citations.REPLACEME)
    body.append(
        "The methods tailorkit implements:\n\n" + "\n\n".join(f"```bibtex\n{b}\n```" for b in bibs)
    )
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(body) + "\n"
    return ModelCard(content)


def healing_section(report: dict) -> str:
    """What a healing run did: teacher, data, what trained, tokens, perplexity before and
    after on held-back windows."""
    held = report["held_back"]
    settings = report["settings"]
    rows = [
        ("teacher", f"`{report['teacher']}`"),
        ("data", report["data"]),
        (
            "trained",
            f"{report['mode']}; output layers {spans(report['trained_layers'])}; "
            f"{report['trainable_parameters']:,} trainable parameters",
        ),
        (
            "loss",
            f"KL to the teacher x {settings['kl_weight']} (temperature "
            f"{settings['temperature']}"
            + (f", top-{settings['top_k']} + tail" if settings["top_k"] else "")
            + f") + next-token loss x {1 - settings['kl_weight']:g}",
        ),
        ("steps", f"{report['steps']} of {settings['steps']} (stopped by {report['stopped']})"),
        ("tokens seen", f"{report['tokens_seen']:,} ({report['tokens_per_second']:,} tokens/s)"),
        (
            "learning rate",
            f"{report['learning_rate']:g} peak, "
            f"{settings['batch_size']} x {settings['seq_len']} tokens per step",
        ),
    ]
    table = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {_cell(v)} |" for k, v in rows])
    ppl = (
        f"Held-back perplexity ({held['windows']} windows, {held['tokens']:,} tokens of the "
        f"data never trained on): **{held['before_ppl']} before healing, {held['after_ppl']} "
        f"after**; the teacher scores {held['teacher_ppl']}. KL to the teacher: "
        f"{held['before_kl']} -> {held['after_kl']} nats per token."
    )
    return table + "\n\n" + ppl


def spans(indices) -> str:
    """Sorted layer indices as ``0-3,7,9-10``."""
    out, start = [], None
    for i, x in enumerate(indices):
        start = x if start is None else start
        if i + 1 == len(indices) or indices[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ",".join(out)


def make_heal_card(recipe: Recipe | None, report: dict, images: dict[str, str]) -> ModelCard:
    """The card of a healed model: the pruned model's card with a Healing section, or,
    for a model without a recipe, a short card of its own."""
    if recipe is not None:
        return make_model_card(recipe.plan(), images=images, healing=report)
    data = ModelCardData(
        library_name="transformers", pipeline_tag="text-generation", tags=[*TAGS, "distillation"]
    )
    body = [
        f"# {report['student']}, healed",
        f"`{report['student']}` trained by distillation from `{report['teacher']}` with "
        f"[tailorkit](https://pypi.org/project/tailorkit/) {__version__} (`tailorkit heal`).",
        "## Healing",
        healing_section(report),
    ]
    if images:
        body += ["## Figures", _images(images)]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(body) + "\n")
