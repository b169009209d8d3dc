"""Publishing on the Hugging Face Hub: the model card, and the upload of a built folder.

``make_model_card(plan, ...)`` returns a ``huggingface_hub.ModelCard``: metadata the Hub
reads (``base_model`` and ``base_model_relation`` for the model tree, ``library_name``,
``pipeline_tag``, tags, the base model's licence when known), and a body that says
how the model was made — the method and its settings, how much was removed, where
every output layer came from, the figures, the evaluation against the dense model,
the recipe and the command that rebuilds it, and the papers to cite.

``push_folder(folder, repo_id, ...)`` checks that ``folder`` is a checkpoint built by
tailorkit, creates the repo if needed and uploads the whole folder as one commit
(huggingface_hub moves the shards through LFS / Xet).  The token comes from the
argument, else ``HF_TOKEN``, else the saved login, and is never written to a file, a
log record or an error message.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from tailorkit.checkpoint import builtin
from tailorkit.errors import CheckpointError, RecipeError, TailorkitError
from tailorkit.plan import Plan
from tailorkit.recipe import Recipe

log = logging.getLogger(__name__)

TAGS = ("tailorkit", "layer-pruning", "depth-pruning")


class HubError(TailorkitError, ValueError):
    """Publishing failed: a bad repo id, no token, or the Hub refused the upload."""


# --------------------------------------------------------------------------- methods

GPTAILOR_BIB = """@article{su2025gptailor,
  title   = {{GPTailor}: Large Language Model Pruning Through Layer Cutting and Stitching},
  author  = {Su, Guinan and Shen, Li and Yin, Lu and Liu, Shiwei and Yang, Yanwu
             and Geiping, Jonas},
  journal = {arXiv preprint arXiv:2506.20480},
  year    = {2025}
}"""

SLM_BIB = """@article{ding2025slm,
  title   = {A Sliding Layer Merging Method for Efficient Depth-Wise Pruning in {LLMs}},
  author  = {Ding, Xuan and Sun, Rui and Zhang, Yunjian and Yan, Xiu and Zhou, Yueqi
             and Huang, Kaihao and Fu, Suzhong and Xie, Chuanlong and Zhu, Yao},
  journal = {arXiv preprint arXiv:2502.19159},
  year    = {2025}
}"""

_METHOD_BIBS = {
    "shortgpt": """@article{men2024shortgpt,
  title   = {{ShortGPT}: Layers in Large Language Models are More Redundant Than You Expect},
  author  = {Men, Xin and Xu, Mingyu and Zhang, Qingyu and Wang, Bingning and Lin, Hongyu
             and Lu, Yaojie and Han, Xianpei and Chen, Weipeng},
  journal = {arXiv preprint arXiv:2403.03853},
  year    = {2024}
}""",
    "angular": """@article{gromov2024unreasonable,
  title   = {The Unreasonable Ineffectiveness of the Deeper Layers},
  author  = {Gromov, Andrey and Tirumala, Kushal and Shapourian, Hassan and Glorioso, Paolo
             and Roberts, Daniel A.},
  journal = {arXiv preprint arXiv:2403.17887},
  year    = {2024}
}""",
    "laco": """@article{yang2024laco,
  title   = {{LaCo}: Large Language Model Pruning via Layer Collapse},
  author  = {Yang, Yifei and Cao, Zouying and Zhao, Hai},
  journal = {arXiv preprint arXiv:2402.11187},
  year    = {2024}
}""",
}

METHODS = {
    "gptailor": (
        "GPTailor (Su et al., 2025, arXiv:2506.20480)",
        "A zero-order search over one operation per layer: remove it, take it from one of "
        "several fine-tuned candidates of the same base model, or merge it across candidates "
        "(task arithmetic against the base layer of the same depth). tailorkit searches the "
        "plan with CMA-ES; no weights were retrained.",
    ),
    "slm": (
        "Sliding Layer Merging (Ding et al., 2025, arXiv:2502.19159)",
        "Layer outputs are compared with centered kernel alignment (CKA). From the top of the "
        "network downward, a window of consecutive layers grows while the model with that "
        "window fused into one layer stays above a similarity threshold; then the window is "
        "fused. No weights were retrained.",
    ),
    "shortgpt": (
        "ShortGPT (Men et al., 2024, arXiv:2403.03853)",
        "The layers with the lowest Block Influence (1 - cos(input, output) of the layer on "
        "calibration text) are removed.",
    ),
    "angular": (
        "angular distance (Gromov et al., 2024, arXiv:2403.17887)",
        "The contiguous block of layers whose input and output are closest in angular "
        "distance on calibration text is removed.",
    ),
    "laco": (
        "LaCo (Yang et al., 2024, arXiv:2402.11187)",
        "Consecutive layers are folded into one: theta_l + sum_k (theta_(l+k) - theta_l).",
    ),
}
_ALIASES = {"gromov": "angular", "sliding_layer_merging": "slm", "sliding-layer-merging": "slm"}

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


def _describe_ref(ref: str) -> str:
    hub = _hub_id(ref)
    if hub:
        revision = ref.partition("@")[2]
        at = f" at revision `{revision}`" if revision else ""
        return f"[{hub}](https://huggingface.co/{hub}){at}"
    if builtin.is_builtin(ref):
        try:
            spec = builtin.get_builtin(ref)
            return f"`{ref}`: tailorkit's built-in {spec.description}"
        except CheckpointError:
            return f"`{ref}` (a tailorkit built-in model)"
    # A local directory: its name only, never the full path of someone's disk.
    return f"local checkpoint `{Path(ref).name or ref}` (not on the Hub)"


def _name_ref(ref: str) -> str:
    """The base model for a sentence: a Hub link, or a name that says where it lives."""
    if _hub_id(ref):
        return _describe_ref(ref)
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


def _front_matter(text: str) -> dict[str, Any]:
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


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
    for path in candidates:
        if path.is_file():
            value = _front_matter(path.read_text(errors="replace")).get("license")
            if isinstance(value, str) and value.strip():
                return value.strip()
    return None


# --------------------------------------------------------------------------- the card


def _plan(plan: Plan | Recipe) -> Plan:
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, Recipe):
        return plan.plan()
    raise TypeError(f"make_model_card takes a Plan or a Recipe, not {type(plan).__name__}")


def _method_key(method: str | None) -> str | None:
    if not method:
        return None
    key = method.strip().lower()
    return _ALIASES.get(key, key)


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
    parts += [f"{k} = {v:.4g}" for k, v in layer.params.items()]
    return "; ".join(parts)


def _provenance(plan: Plan) -> str:
    rows = [
        "| output layer | method | source layer(s) | base of the task vectors | weights |",
        "|---:|---|---|---|---|",
    ]
    for i, layer in enumerate(plan.layers):
        sources = ", ".join(f"{m}[{idx}]" for m, idx in layer.sources)
        base = f"{layer.base[0]}[{layer.base[1]}]" if layer.base else ""
        rows.append(f"| {i} | {layer.method} | {sources} | {base} | {_weights(layer)} |")
    return "\n".join(rows)


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


def _size_table(plan: Plan) -> str:
    base_layers, layers = plan.base.num_layers, plan.num_layers
    base_params, params = plan.base_parameters, plan.num_parameters
    return "\n".join(
        [
            "| | base model | this model | removed |",
            "|---|---:|---:|---:|",
            f"| transformer layers | {base_layers} | {layers} | {base_layers - layers} "
            f"({plan.removed_layer_fraction:.1%}) |",
            f"| parameters | {base_params:,} | {params:,} | {base_params - params:,} "
            f"({plan.removed_parameter_fraction:.1%}) |",
        ]
    )


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
    plan = _plan(plan)
    recipe = plan.recipe
    used = _used_models(plan)
    hub_ids = list(dict.fromkeys(h for h in (_hub_id(recipe.models[n]) for n in used) if h))
    key = _method_key(method)
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
    from tailorkit import __version__

    body = [f"# {name}"]
    body.append(
        f"A depth-compressed copy of {_name_ref(base_ref)}: {plan.num_layers} of its "
        f"{plan.base.num_layers} transformer layers remain "
        f"({plan.removed_layer_fraction:.1%} of the layers and "
        f"{plan.removed_parameter_fraction:.1%} of the parameters removed), built with "
        f"[tailorkit](https://pypi.org/project/tailorkit/) {__version__} from the recipe in "
        "`recipe.yaml`. It is a standard transformers checkpoint: "
        "`AutoModelForCausalLM.from_pretrained` loads it, no tailorkit needed."
    )
    body.append("## Method")
    if key in METHODS:
        label, text = METHODS[key]
        body.append(f"**{label}.** {text}")
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
    body.append(_size_table(plan))
    body.append("## Source models")
    body.append(_sources_table(plan))
    body.append("## Layer provenance")
    body.append(
        "Each output layer and where it came from (`name[i]` is layer i of the source model "
        "`name`, counted from 0). Merged layers merge every tensor of the layer, norms "
        "included, with the rule and coefficients shown."
    )
    body.append(_provenance(plan))
    if images:
        body.append("## Figures")
        body.append(_images(images))
    if evaluation:
        body.append("## Evaluation")
        body.append(_evaluation(evaluation))
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
    if command:
        body.append(f"Made with:\n\n```bash\n{command}\n```\n\nRebuild from the recipe with:")
    else:
        body.append("Rebuild it with:")
    body.append(f"```bash\npip install tailorkit\n{rebuild}\n```")
    body.append("## Citation")
    bibs = [GPTAILOR_BIB, SLM_BIB]
    if key in _METHOD_BIBS:
        bibs.append(_METHOD_BIBS[key])
    body.append(
        "The methods tailorkit implements:\n\n" + "\n\n".join(f"```bibtex\n{b}\n```" for b in bibs)
    )
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(body) + "\n"
    return ModelCard(content)


# --------------------------------------------------------------------------- upload


def check_built_folder(folder: str | Path) -> Path:
    """Raise unless ``folder`` is a checkpoint built by tailorkit (weights, config, recipe)."""
    from tailorkit.checkpoint.source import Source

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such directory")
    missing = [n for n in ("config.json", "recipe.yaml") if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(
            f"{folder}: not a checkpoint built by tailorkit (no {' or '.join(missing)}); "
            "build one with `tailorkit build RECIPE DIR` or PruneResult.save_pretrained"
        )
    try:
        Recipe.load(folder / "recipe.yaml")
        Source(str(folder))  # config.json + every shard header, strictly
    except (CheckpointError, RecipeError) as e:
        raise type(e)(f"{folder}: not a valid built checkpoint: {e}") from None
    return folder


def folder_files(folder: Path) -> list[str]:
    """Every file under ``folder`` (POSIX paths relative to it) but VCS and cache folders.

    A symlink that leads out of ``folder`` is refused: uploading it would publish
    whatever it points at (a key, a token file) under an innocent name.
    """
    skip = {".git", ".cache", "__pycache__"}
    root = folder.resolve()
    files = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if skip.intersection(rel.parts) or not p.is_file():
            continue
        if p.is_symlink() and not p.resolve().is_relative_to(root):
            raise HubError(
                f"{p}: a symlink to {p.resolve()}, outside {folder}; refusing to upload it "
                "(copy the file into the folder if it belongs there)"
            )
        files.append(rel.as_posix())
    return sorted(files)


def check_repo_id(repo_id: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or not repo_id.strip():
        raise HubError("repo id is empty; give 'namespace/name', e.g. 'me/smollm2-22L'")
    if "@" in repo_id:
        raise HubError(
            f"invalid repo id {repo_id!r}: a revision is not part of the id; "
            "pass it separately (revision=, --revision)"
        )
    if repo_id.count("/") > 1:
        raise HubError(f"invalid repo id {repo_id!r}: the form is 'namespace/name' (one '/')")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        reason = str(e).split("\n")[0]
        raise HubError(
            f"invalid repo id {repo_id!r}: {reason} (letters, digits, '-', '_', '.'; "
            "at most 96 characters; no '--' or '..')"
        ) from None
    return repo_id


def resolve_token(token: str | None = None) -> str:
    """The token: the argument, else ``HF_TOKEN``, else the saved login."""
    if token:
        return token
    env = os.environ.get("HF_TOKEN", "").strip()
    if env:
        return env
    from huggingface_hub import get_token

    saved = get_token()
    if saved:
        return saved
    raise HubError(
        "no Hugging Face token: pass token= (--token), set HF_TOKEN, or log in once with "
        "`hf auth login`; a token with write access is needed to push"
    )


def _scrub(text: str, token: str) -> str:
    return text.replace(token, "***") if token else text


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload a built folder to ``repo_id`` as one commit; returns the commit (or PR) URL.

    The repo is created if it does not exist (``private`` applies then); ``revision``
    names a branch, created from main when missing; ``create_pr`` opens a pull request
    instead of committing to the branch.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = check_built_folder(folder)
    check_repo_id(repo_id)
    files = folder_files(folder)  # before the repo is created: a refused link stops it all
    secret = resolve_token(token)
    api = HfApi(token=secret)
    message = commit_message or f"Upload {folder.name} (built with tailorkit)"
    failure: HubError | None = None
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        full_id = url.repo_id or repo_id
        if revision and revision != "main" and not revision.startswith("refs/pr/"):
            api.create_branch(full_id, branch=revision, exist_ok=True)
        # create_commit, not upload_folder: with hf_xet installed, upload_folder may split
        # a large folder into several commits; this is always exactly one.
        info = api.create_commit(
            repo_id=full_id,
            operations=[
                CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(folder / rel))
                for rel in files
            ],
            commit_message=message,
            revision=revision,
            create_pr=create_pr,
        )
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        hint = {
            401: "the token was refused; check it (HF_TOKEN / `hf auth login`)",
            403: "the token may not write to this namespace; use a write token",
            404: "the repo or revision was not found",
        }.get(status, "")
        detail = _scrub(str(e).split("\n")[0], secret)
        failure = HubError(
            f"pushing {folder} to {repo_id} failed: {detail}" + (f" ({hint})" if hint else "")
        )
    except Exception as e:
        # The transport's own errors (requests, httpx or httpx2, by huggingface_hub version:
        # a refused connection, a timeout, a bad endpoint) share no base class with OSError.
        failure = HubError(
            f"pushing {folder} to {repo_id} failed: {type(e).__name__}: {_scrub(str(e), secret)}"
        )
    if failure is not None:
        # Raised outside the handler: the original error, which may quote the token back
        # from the server, is not kept even as __context__.
        raise failure
    result = info.pr_url if create_pr and info.pr_url else info.commit_url
    log.info("pushed %s to %s: %s", folder, full_id, result)
    return str(result)
