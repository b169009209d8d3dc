"""The ``tailorkit`` command line.

Every subcommand is a thin shell over the public API.  A ``TailorkitError``
(bad input) prints one clear message and exits with status 2; anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import typing
from pathlib import Path

from tailorkit.errors import TailorkitError


def _cmd_build(args: argparse.Namespace) -> int:
    from tailorkit.builder import build
    from tailorkit.recipe import Recipe

    plan = Recipe.load(args.recipe).plan(args.dtype)
    print(f"recipe {args.recipe}: {plan.summary()}", file=sys.stderr)
    build(
        plan,
        args.out_dir,
        shard_size=args.shard_size,
        overwrite=args.overwrite,
        progress=not args.quiet,
        device=args.device,
    )
    print(f"wrote {args.out_dir}", file=sys.stderr)
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from tailorkit.recipe import Recipe

    plan = Recipe.load(args.recipe).plan(args.dtype)
    report = {
        "recipe": args.recipe,
        "fingerprint": plan.recipe.fingerprint(),
        "layers": plan.num_layers,
        "base_layers": plan.base.num_layers,
        "parameters": plan.num_parameters,
        "base_parameters": plan.base_parameters,
        "removed_layer_fraction": round(plan.removed_layer_fraction, 6),
        "removed_parameter_fraction": round(plan.removed_parameter_fraction, 6),
        "dtype": str(plan.dtype),
        "output_layers": [layer.describe() for layer in plan.layers],
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.recipe}: valid. {plan.summary()}")
        for i, layer in enumerate(plan.layers):
            print(f"  {i:3d} <- {layer.describe()}")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    import torch

    from tailorkit import combine, ops
    from tailorkit.checkpoint import builtin
    from tailorkit.version import __version__

    rows = [
        ("tailorkit", __version__),
        (
            "torch",
            f"{torch.__version__} (CUDA {'' if torch.cuda.is_available() else 'not '}available)",
        ),
        ("kernels", f"{ops.backend()}: {ops.backend_reason()}"),
        ("build merges", combine.status()),
        ("default model", f"{builtin.DEFAULT_MODEL} ({builtin.status()})"),
    ]
    for key, value in rows:
        print(f"{key:>14}: {value}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from tailorkit.eval.run import load_model
    from tailorkit.generate import generate

    loaded = load_model(args.model, device="cpu")
    reply = generate(
        loaded.model,
        loaded.tokenizer,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        chat=args.chat,
    )
    print(reply.strip() if args.chat else args.prompt + reply)
    return 0


def _cmd_default_model(args: argparse.Namespace) -> int:
    from tailorkit.checkpoint import builtin

    print(builtin.builtin_path(args.name))
    return 0


def _calibration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--calibration",
        help="text file, folder of text files, or hf:DATASET[:SPLIT[:COLUMN]] "
        "(default: public-domain text bundled with tailorkit)",
    )
    from tailorkit import calibration as c

    p.add_argument(
        "--seq-len",
        type=_at_least(2),
        default=c.DEFAULT_SEQ_LEN,
        help="tokens per window (default %(default)s)",
    )
    p.add_argument(
        "--num-windows",
        type=_at_least(1),
        default=c.DEFAULT_NUM_WINDOWS,
        help="windows drawn (default %(default)s)",
    )
    p.add_argument(
        "--batch-size",
        type=_at_least(1),
        default=c.DEFAULT_BATCH_SIZE,
        help="windows per forward (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="picks the windows (default 0)")
    p.add_argument(
        "--offload",
        nargs="?",
        const=True,
        default=None,
        metavar="DIR",
        help="stream activations to disk (a scratch folder, or DIR); default: when RAM is short",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="build the checkpoint here (with its model card)")
    p.add_argument("--recipe", help="also write the recipe to this file (fitted tensors beside)")
    p.add_argument("--shard-size", default="5GB")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _calibration(args: argparse.Namespace) -> dict:
    """The options of `_calibration_args` as keyword arguments of prune / analyze."""
    names = ("calibration", "seq_len", "num_windows", "batch_size", "seed", "offload")
    return {name: getattr(args, name) for name in names} | {"progress": not args.quiet}


def _at_least(low: int):
    """An argparse type: an integer no smaller than ``low`` (argparse names the option)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def _writable(option: str, path: str | None) -> None:
    """Fail now, naming ``option``, if ``path`` cannot be written: not after the work."""
    if path is None:
        return
    folder = Path(path).parent
    if not folder.is_dir():
        raise TailorkitError(f"{option} {path}: the folder {folder} does not exist")
    if Path(path).is_dir() or not os.access(folder, os.W_OK):
        raise TailorkitError(f"{option} {path}: cannot write a file there")


def _given(value) -> bool:
    """Whether a settings option was given: unset options are None (False for a switch).
    Not a truth test, which would drop a given 0 (`--steps 0` must be checked, not ignored)."""
    return value is not None and value is not False


def _setting(text: str) -> tuple[str, object]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.replace("-", "_"), yaml.safe_load(value)


def _width_share(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        share = float(text)
    except ValueError:
        share = float("nan")
    if not 0 <= share <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or auto, got {text!r}")
    return share


def _cmd_prune(args: argparse.Namespace) -> int:
    from tailorkit.methods import METHODS
    from tailorkit.pruning import prune

    _writable("--recipe", args.recipe)
    spec = METHODS[args.method]
    settings = dict(args.set or [])
    for name in _method_flags():
        if not _given(getattr(args, name)):
            continue
        if name not in spec.settings.model_fields:
            takers = [m.name for m in METHODS.values() if name in m.settings.model_fields]
            raise TailorkitError(
                f"--{name.replace('_', '-')} is for --method {' or '.join(takers)}"
            )
        settings[name] = getattr(args, name)
    search = "search_dir" in spec.settings.model_fields
    if search and args.out:
        # The search log lives under the output folder while the search runs, and is
        # shipped inside the finished checkpoint.
        settings["search_dir"] = Path(args.out) / "search"
    result = prune(
        args.base,
        method=args.method,
        candidates=args.candidate,
        bridge=args.bridge,
        width_share=args.width_share,
        **_calibration(args),
        **settings,
    )
    overwrite = args.overwrite
    if search and args.out and Path(args.out).is_dir():
        # Only the search log is there yet: the checkpoint takes its place (log included).
        overwrite = overwrite or {p.name for p in Path(args.out).iterdir()} <= {"search"}
    return _write_result(result, args, overwrite, args.method)


def _cmd_bridge(args: argparse.Namespace) -> int:
    from tailorkit.pruning import bridge

    _writable("--recipe", args.recipe)
    result = bridge(args.recipe_file, device=args.device, **_calibration(args))
    return _write_result(result, args, args.overwrite, "bridge")


def _write_result(result, args: argparse.Namespace, overwrite: bool, what: str) -> int:
    """A PruneResult where the options say: a checkpoint (--out), a recipe (--recipe),
    or the recipe on stdout."""
    from tailorkit.card import spans
    from tailorkit.result import command_line

    result.command = command_line(args.argv)
    print(f"{what}: {result.summary()}", file=sys.stderr)
    for fit in result.report.get("bridges", []):
        removed = spans(range(*fit["removed"]))
        verdict = "kept" if fit["kept"] else "dropped: no better on held-back tokens"
        print(
            f"  {fit['name']} (output layer {fit['layer']}, for base layers {removed}): "
            f"held-back error {fit['error']:.3f}, {fit['error_without']:.3f} without; {verdict}",
            file=sys.stderr,
        )
    width = result.report.get("width")
    for split in width["splits"] if width else []:
        chosen = " (chosen)" if split["share"] == width["share"] else ""
        print(
            f"  width share {split['share']:.2f}: {split['layers']} layers, "
            f"{split['intermediate_size']} MLP channels, KL {split['kl']:.4f}{chosen}",
            file=sys.stderr,
        )
    if width:
        print(
            f"  width: every layer keeps {width['intermediate_size']} of its "
            f"{width['base_intermediate_size']} MLP channels",
            file=sys.stderr,
        )
    if args.recipe:
        result.recipe.to_yaml(args.recipe)
        print(f"wrote {args.recipe}", file=sys.stderr)
    if args.out:
        result.save_pretrained(
            args.out, shard_size=args.shard_size, overwrite=overwrite, progress=not args.quiet
        )
        print(f"wrote {args.out}", file=sys.stderr)
    if not (args.out or args.recipe):
        if result.recipe.tensors is not None:
            raise TailorkitError(
                "the recipe has fitted tensors (bridges, kept channels), which YAML on stdout "
                "cannot carry: "
                "give --recipe FILE or --out DIR"
            )
        print(result.recipe.to_yaml(), end="")
    return 0


def _cmd_heal(args: argparse.Namespace) -> int:
    from tailorkit.healing import HealSettings, heal

    flags = {name: getattr(args, name) for name in HealSettings.model_fields}
    settings = {name: value for name, value in flags.items() if _given(value)}
    out = args.out or _healed_name(args.model)
    result = heal(
        args.model,
        teacher=args.teacher,
        data=args.data,
        out=out,
        checkpoints=args.checkpoints,
        resume=args.resume,
        overwrite=args.overwrite,
        device=args.device,
        progress=not args.quiet,
        **settings,
    )
    if not result.is_main:
        return 0  # the main process of an `accelerate launch` reports and writes
    held = result.report["held_back"]
    print(
        f"heal: {result.report['steps']} steps, {result.report['tokens_seen']:,} tokens; "
        f"held-back perplexity {held['before_ppl']} -> {held['after_ppl']} "
        f"(teacher {held['teacher_ppl']})",
        file=sys.stderr,
    )
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _healed_name(model: str) -> str:
    path = Path(model).expanduser()
    stem = path.parent / path.stem if path.is_file() else path
    return f"{str(stem).rstrip('/')}-healed"


def _add_heal_command(sub) -> None:
    from tailorkit.healing import HealSettings

    h = sub.add_parser(
        "heal",
        help="distil the dense model back into a pruned one (LoRA or full, KL to the teacher)",
        description="Train a pruned model to match its dense model's next-token "
        "distributions on text (knowledge distillation), through a LoRA merged back at the "
        "end (a plain checkpoint of the same shape) or the chosen layers' own weights. Runs "
        "under accelerate: `accelerate launch -m tailorkit.cli heal ...` uses several GPUs.",
    )
    h.add_argument("model", metavar="MODEL", help="a built model folder or a recipe file")
    h.add_argument("--teacher", help="the dense model (default: the recipe's base model)")
    h.add_argument(
        "--data",
        help="training text: a text file, a folder of them, a JSONL file (its text field), "
        "or hf:DATASET[:SPLIT[:COLUMN]] (default: the bundled public-domain text)",
    )
    mode = h.add_mutually_exclusive_group()
    for name, field in HealSettings.model_fields.items():
        target = mode if name in ("lora_rank", "full") else h
        target.add_argument(
            f"--{name.replace('_', '-')}",
            help=field.description
            + ("" if "default" in field.description else f" (default {field.default})"),
            **_flag_options(field),
        )
    h.add_argument("--out", help="write the healed checkpoint here (default: MODEL-healed)")
    h.add_argument(
        "--checkpoints", help="checkpoint folder (default: OUT-checkpoints; removed at the end)"
    )
    h.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    h.add_argument("--overwrite", action="store_true", help="replace a previous tailorkit output")
    h.add_argument("--device", help="train here, e.g. cuda (default: the CPU)")
    h.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    h.set_defaults(func=_cmd_heal)


def _cmd_cka(args: argparse.Namespace) -> int:
    from tailorkit.analysis import analyze

    _writable("--plot", args.plot)
    _writable("--json", args.json)
    report = analyze(
        args.model,
        kernel=args.kernel,
        plot=args.plot,
        device=args.device,
        keep_sinks=args.keep_sinks,
        **_calibration(args),
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    cka = report["cka"]
    adjacent = [(cka[i][i + 1], i) for i in range(len(cka) - 1)]
    top = sorted(adjacent, reverse=True)[:5]
    sinks = f"{report['sink_tokens']} attention-sink tokens " + (
        "left out" if report["sinks_left_out"] else "kept"
    )
    print(
        f"{report['model']}: {report['layers']} layers, {report['tokens']} tokens ({sinks}), "
        f"{report['kernel']} CKA"
    )
    print("most similar adjacent layers: " + ", ".join(f"{i}-{i + 1} ({v:.3f})" for v, i in top))
    bi = report["block_influence"]
    low = sorted(range(len(bi)), key=bi.__getitem__)[:5]
    print("lowest Block Influence: " + ", ".join(f"{i} ({bi[i]:.4f})" for i in low))
    for path in (args.plot, args.json):
        if path:
            print(f"wrote {path}")
    return 0


def _method_flags() -> dict[str, list]:
    """Each setting some method offers as an option -> the methods that take it."""
    from tailorkit.methods import METHODS

    flags: dict[str, list] = {}
    for spec in METHODS.values():
        for name in spec.settings.flags:
            flags.setdefault(name, []).append(spec)
    return flags


def _flag_options(field) -> dict:
    """argparse options for a setting: its choices, a switch, or its number type."""
    kind = field.annotation
    if typing.get_origin(kind) is typing.Literal:
        return {"choices": typing.get_args(kind)}
    kinds = set(typing.get_args(kind) or (kind,)) - {type(None)}
    if kinds == {bool}:
        return {"action": "store_true"}
    return {"type": kinds.pop()} if kinds in ({int}, {float}) else {}


def _methods_help() -> str:
    """Every method with its settings, defaults and ranges (the epilog of `prune --help`)."""
    from tailorkit.methods import METHODS

    lines = ["methods (--method) and their settings (an option above, or --set NAME=VALUE):"]
    for spec in METHODS.values():
        lines += ["", f"  {spec.name}: {spec.summary}"]
        for name, field in spec.settings.model_fields.items():
            if field.exclude:
                continue
            rule = [
                f"{op} {getattr(m, key)}"
                for m in field.metadata
                for key, op in _BOUNDS
                if hasattr(m, key)
            ]
            if "choices" in _flag_options(field):
                rule.append(" | ".join(_flag_options(field)["choices"]))
            default = "required" if field.is_required() else f"default {field.default}"
            detail = ", ".join([default, *rule])
            lines.append(f"    {name:<17} {field.description or ''} ({detail})")
    return "\n".join(lines)


_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def _add_analysis_commands(sub) -> None:
    from tailorkit.checkpoint.builtin import DEFAULT_MODEL
    from tailorkit.methods import METHODS

    pr = sub.add_parser(
        "prune",
        help="choose which layers to remove or merge, then build",
        epilog=_methods_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pr.add_argument(
        "--base", default=DEFAULT_MODEL, help=f"model to prune (default {DEFAULT_MODEL})"
    )
    pr.add_argument(
        "--method", default="slm", choices=list(METHODS), help="the method (default slm; below)"
    )
    pr.add_argument(
        "--candidate",
        action="append",
        metavar="MODEL",
        help="a fine-tune of --base (gptailor; repeat for each)",
    )
    for name, specs in _method_flags().items():
        field = specs[0].settings.model_fields[name]
        methods = ", ".join(spec.name for spec in specs)
        pr.add_argument(
            f"--{name.replace('_', '-')}",
            help=f"{methods}: {field.description}",
            **_flag_options(field),
        )
    pr.add_argument(
        "--set",
        action="append",
        type=_setting,
        metavar="KEY=VALUE",
        help="another method setting, e.g. --set fold=3 (repeatable)",
    )
    pr.add_argument(
        "--bridge",
        action="store_true",
        help="then fit a linear bridge after every run of removed layers (see `bridge`)",
    )
    pr.add_argument(
        "--width-share",
        type=_width_share,
        metavar="S|auto",
        help="share of the removed parameters taken by width pruning (every layer's MLP keeps "
        "the same number of its most important channels): 0 = depth only (default), 1 = width "
        "only, auto = the best of a few splits by KL on the calibration text; needs "
        "--target-ratio",
    )
    _output_args(pr)
    _calibration_args(pr)
    pr.set_defaults(func=_cmd_prune)

    br = sub.add_parser(
        "bridge",
        help="fit linear bridges for the removed layers of any recipe, then build",
        description="After every run of layers a recipe removes (or merges), fit a hidden x "
        "hidden map on calibration text that takes the residual stream where the removed "
        "layers would have, and fold it into the MLP output projection of the layer before "
        "the gap (ReplaceMe): no new parameters, a standard checkpoint. Bridges the recipe "
        "had are refitted.",
    )
    br.add_argument("recipe_file", metavar="RECIPE", help="recipe file (.yaml or .json)")
    br.add_argument("--device", help="run the model and the fit here, e.g. cuda (default: CPU)")
    _output_args(br)
    _calibration_args(br)
    br.set_defaults(func=_cmd_bridge)

    ck = sub.add_parser("cka", help="layer similarity: CKA heatmap, Block Influence")
    ck.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="model directory or reference")
    ck.add_argument("--kernel", choices=["linear", "rbf"], default="linear")
    ck.add_argument("--plot", help="write the CKA heatmap here (PNG)")
    ck.add_argument("--json", help="write the figures here (JSON)")
    ck.add_argument("--device", help="compute the CKA here, e.g. cuda (default: the CPU)")
    ck.add_argument(
        "--keep-sinks",
        action="store_true",
        help="also count the attention-sink tokens (massive activations; left out by default)",
    )
    _calibration_args(ck)
    ck.set_defaults(func=_cmd_cka)


def _cmd_eval(args: argparse.Namespace) -> int:
    from tailorkit.eval import evaluate

    _writable("--json", args.json)
    tasks = args.tasks
    if not args.ppl and not tasks and not args.speed:
        tasks = "tk_next_line"
        print("no --ppl or --tasks: running the offline suite tk_next_line", file=sys.stderr)
    result = evaluate(
        args.model,
        ppl=args.ppl,
        tasks=tasks,
        limit=args.limit,
        context_length=args.context_length,
        stride=args.stride,
        compare=args.compare,
        tokenizer=args.tokenizer,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        task_paths=args.task_path,
        speed=args.speed,
        speed_prompt_tokens=args.speed_prompt_tokens,
        speed_new_tokens=args.speed_new_tokens,
        speed_repeats=args.speed_repeats,
    )
    print(result.table())
    if args.json:
        result.to_json(args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from tailorkit.hub import push_folder

    url = push_folder(
        args.folder,
        args.repo_id,
        private=True if args.private else None,
        revision=args.revision,
        create_pr=args.create_pr,
        token=args.token,
        commit_message=args.message,
    )
    print(url)
    return 0


def _add_publish_commands(sub) -> None:
    from tailorkit.recipe import DTYPES

    e = sub.add_parser(
        "eval",
        help="perplexity, zero-shot tasks (lm-eval) and speed, optionally against the dense model",
    )
    e.add_argument("model", help="built checkpoint directory, recipe file, or model reference")
    e.add_argument(
        "--ppl", nargs="+", action="extend", metavar="PATH", help="text files for perplexity"
    )
    e.add_argument(
        "--tasks",
        help="comma-separated lm-eval tasks or groups; offline: tk_next_line (= "
        "tk_next_line_prose,tk_next_line_verse,tk_next_line_code); default without --ppl "
        "and --speed: tk_next_line",
    )
    e.add_argument("--limit", type=_at_least(1), help="at most N documents per task")
    e.add_argument("--compare", metavar="BASE", help="also evaluate the dense model BASE")
    e.add_argument("--json", metavar="OUT", help="write the results here (JSON)")
    e.add_argument(
        "--context-length",
        type=_at_least(2),
        help="perplexity window (default: model's, at most 2048)",
    )
    e.add_argument(
        "--stride", type=_at_least(1), help="perplexity window step (default: half the window)"
    )
    e.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    e.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="compute dtype (default: the checkpoint's)",
    )
    e.add_argument(
        "--batch-size", type=_at_least(1), default=8, help="sequences per forward (default 8)"
    )
    e.add_argument("--tokenizer", help="tokenizer directory or reference (default: the model's)")
    e.add_argument(
        "--task-path",
        action="append",
        metavar="DIR",
        help="a folder of lm-eval task YAMLs (repeatable)",
    )
    e.add_argument(
        "--speed",
        action="store_true",
        help="also measure prefill and decode tokens/s (with --compare: both models, in turn, "
        "and the speed-up); alone: speed only",
    )
    e.add_argument(
        "--speed-prompt-tokens",
        type=_at_least(1),
        default=512,
        help="prompt length of the speed test (default 512)",
    )
    e.add_argument(
        "--speed-new-tokens",
        type=_at_least(1),
        default=64,
        help="tokens decoded in the speed test (default 64)",
    )
    e.add_argument(
        "--speed-repeats",
        type=_at_least(1),
        default=3,
        help="timed runs of the speed test, median reported (default 3)",
    )
    e.set_defaults(func=_cmd_eval)

    pu = sub.add_parser("push", help="upload a built checkpoint to the Hugging Face Hub")
    pu.add_argument("folder", help="a directory written by `tailorkit build` or `prune --out`")
    pu.add_argument("repo_id", help="namespace/name on the Hub")
    pu.add_argument("--private", action="store_true", help="create the repo private")
    pu.add_argument("--revision", help="branch to commit to (created if missing)")
    pu.add_argument("--create-pr", action="store_true", help="open a pull request instead")
    pu.add_argument("--message", help="commit message")
    pu.add_argument(
        "--token",
        help="Hub token (default: HF_TOKEN, then the saved login; prefer those: a command "
        "line is visible to other users of the machine)",
    )
    pu.set_defaults(func=_cmd_push)


# Commands that start without torch; the other commands' parsers list the methods'
# settings, whose modules import it.
QUICK_COMMANDS = ("build", "validate")


def make_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; for one of QUICK_COMMANDS, only as much of it as that command needs."""
    from tailorkit.recipe import DTYPES

    p = argparse.ArgumentParser(
        prog="tailorkit", description="Depth-wise compression of language models."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("build", help="stream a recipe into a Hugging Face checkpoint")
    b.add_argument("recipe", help="recipe file (.yaml or .json)")
    b.add_argument("out_dir", help="output directory (created atomically)")
    b.add_argument(
        "--shard-size", default="5GB", help="largest shard, e.g. 5GB, 500MB, 1GiB (default 5GB)"
    )
    b.add_argument(
        "--dtype",
        choices=DTYPES,
        help="output dtype (default: recipe's, else base's)",
    )
    b.add_argument(
        "--device",
        default="cpu",
        help="where merges run: cpu (default), or cuda / cuda:N to stream them through a GPU "
        "(same output bytes)",
    )
    b.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_cmd_build)

    v = sub.add_parser(
        "validate", help="check a recipe against its models and show the plan (reads headers only)"
    )
    v.add_argument("recipe")
    v.add_argument("--dtype", choices=DTYPES)
    v.add_argument("--json", action="store_true", help="print a JSON report")
    v.set_defaults(func=_cmd_validate)
    if command in QUICK_COMMANDS:
        return p

    g = sub.add_parser(
        "generate", help="greedy text from a built model, or from a recipe assembled in memory"
    )
    g.add_argument("model", help="built checkpoint directory, recipe file, or model reference")
    g.add_argument("prompt", nargs="?", default="The capital of France is")
    g.add_argument("--max-new-tokens", type=_at_least(1), default=40)
    g.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template"
    )
    g.set_defaults(func=_cmd_generate)

    _add_analysis_commands(sub)
    _add_heal_command(sub)
    _add_publish_commands(sub)

    d = sub.add_parser("doctor", help="show which kernels are active and why")
    d.set_defaults(func=_cmd_doctor)

    m = sub.add_parser(
        "default-model", help="convert the built-in default model once and print its directory"
    )
    m.add_argument("name", nargs="?", default="smollm2-135m-instruct")
    m.set_defaults(func=_cmd_default_model)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM as an exception, so that whatever is being written is removed, as on Ctrl-C."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = make_parser(command).parse_args(argv)
    args.argv = argv  # recorded in model cards: the exact command that made the model
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return args.func(args)
    except TailorkitError as e:
        print(f"tailorkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        why = "terminated" if isinstance(e, Terminated) else "interrupted"
        kept = getattr(e, "kept", "nothing was written")
        print(f"tailorkit {args.command}: {why}; {kept}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
