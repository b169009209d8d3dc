"""The ``tailorkit`` command line.

Every subcommand is a thin shell over the public API.  A ``TailorkitError``
(bad input) prints one clear message and exits with status 2; anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from tailorkit.errors import TailorkitError


def _cmd_build(args: argparse.Namespace) -> int:
    from tailorkit.build import build
    from tailorkit.recipe import Recipe

    plan = Recipe.load(args.recipe).plan(args.dtype)
    print(f"recipe {args.recipe}: {plan.summary()}", file=sys.stderr)
    build(
        plan,
        args.out_dir,
        shard_size=args.shard_size,
        overwrite=args.overwrite,
        progress=not args.quiet,
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
        "dtype": str(plan.dtype).removeprefix("torch."),
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

    from tailorkit import __version__, ops
    from tailorkit.checkpoint import builtin

    rows = [
        ("tailorkit", __version__),
        (
            "torch",
            f"{torch.__version__} (CUDA {'' if torch.cuda.is_available() else 'not '}available)",
        ),
        ("kernels", f"{ops.backend()}: {ops.backend_reason()}"),
        ("default model", f"{builtin.DEFAULT_MODEL} ({builtin.status()})"),
    ]
    for key, value in rows:
        print(f"{key:>14}: {value}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from tailorkit.generate import generate, load_for_generation

    model, tokenizer = load_for_generation(args.model)
    reply = generate(
        model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, chat=args.chat
    )
    print(reply.strip() if args.chat else args.prompt + reply)
    return 0


def _cmd_default_model(args: argparse.Namespace) -> int:
    from tailorkit.checkpoint import builtin

    print(builtin.builtin_path(args.name))
    return 0


def make_parser() -> argparse.ArgumentParser:
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
        choices=["float32", "bfloat16", "float16"],
        help="output dtype (default: recipe's, else base's)",
    )
    b.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_cmd_build)

    v = sub.add_parser(
        "validate", help="check a recipe against its models and show the plan (reads headers only)"
    )
    v.add_argument("recipe")
    v.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    v.add_argument("--json", action="store_true", help="print a JSON report")
    v.set_defaults(func=_cmd_validate)

    g = sub.add_parser(
        "generate", help="greedy text from a built model, or from a recipe assembled in memory"
    )
    g.add_argument("model", help="built checkpoint directory, recipe file, or model reference")
    g.add_argument("prompt", nargs="?", default="The capital of France is")
    g.add_argument("--max-new-tokens", type=int, default=40)
    g.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template"
    )
    g.set_defaults(func=_cmd_generate)

    d = sub.add_parser("doctor", help="show which kernels are active and why")
    d.set_defaults(func=_cmd_doctor)

    m = sub.add_parser(
        "default-model", help="convert the built-in default model once and print its directory"
    )
    m.add_argument("name", nargs="?", default="smollm2-135m-instruct")
    m.set_defaults(func=_cmd_default_model)
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    try:
        return args.func(args)
    except TailorkitError as e:
        print(f"tailorkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tailorkit {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
