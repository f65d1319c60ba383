"""The ``flashstep`` command line: ``info``, ``upscale``, ``generate``."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

EXIT_FAILED_ITEMS = 1
EXIT_USAGE = 2


class UsageError(ValueError):
    """A command-line option or argument is wrong; the message says which and how to fix it."""


def _cmd_info(args: argparse.Namespace) -> int:
    from .system_info import info

    details = info()
    print(json.dumps(details.as_dict(), indent=2) if args.json else details)
    return 0


def _pipeline_options(args: argparse.Namespace) -> Dict:
    options = {"device": args.device, "dtype": args.dtype, "max_memory": args.max_memory, "progress": not args.quiet}
    for name in ("base", "lora", "de_net", "adapter", "latent_tiling"):
        value = getattr(args, name, None)
        if value is not None:
            options[name] = value
    return options


def load_pipeline(args: argparse.Namespace, kind_hint: Optional[str] = None):
    from . import pipelines

    model = args.model or kind_hint or "default"
    options = _pipeline_options(args)
    if getattr(args, "latent_tiling", None) and model in ("default", "pixel-sr"):
        raise UsageError(f"--latent-tiling applies to the diffusion SR models (osediff, s3diff), not {model}; drop it")
    if model == "default":
        options["scale"] = args.scale
    elif model not in pipelines.KINDS:
        if not Path(model).exists():
            raise UsageError(f"--model {model!r} is neither a kind ({', '.join(pipelines.KINDS)}) nor an existing file")
    return pipelines.load(model, **options)


def output_paths(inputs: List[Path], output: Path, fmt: Optional[str]) -> List[Path]:
    from .imageio import WRITE_FORMATS

    single_file = len(inputs) == 1 and output.suffix.lower() in WRITE_FORMATS and not output.is_dir()
    if single_file:
        return [output]
    if output.exists() and not output.is_dir():
        raise UsageError(f"-o {output}: several inputs need an output folder, and {output} is a file")
    paths, seen = [], {}
    for path in inputs:
        suffix = f".{fmt.lstrip('.')}" if fmt else (path.suffix.lower() if path.suffix.lower() in WRITE_FORMATS else ".png")
        target = output / f"{path.stem}{suffix}"
        if target in seen:
            raise UsageError(f"{path} and {seen[target]} would both be written to {target}; use --format or rename one")
        seen[target] = path
        paths.append(target)
    return paths


def _check_options(args: argparse.Namespace) -> None:
    """A UsageError, before any work, for an option value that cannot work; the message lists the valid ones."""
    from .imageio import WRITE_FORMATS
    from .pipelines.base import check_scale, check_tile, parse_device
    from .runner.memory import parse_memory

    checks = (("--device", "device", parse_device), ("--max-memory", "max_memory", parse_memory),
              ("--scale", "scale", check_scale), ("--tile", "tile", check_tile))
    for option, name, check in checks:
        value = getattr(args, name, None)
        if value is not None:
            try:
                check(value)
            except ValueError as error:
                raise UsageError(f"{option}: {error}") from None
    if not 1 <= args.quality <= 100:
        raise UsageError(f"--quality {args.quality}: valid values are whole numbers from 1 to 100")
    fmt = getattr(args, "format", None)
    if fmt is not None and f".{fmt.lower().lstrip('.')}" not in WRITE_FORMATS:
        raise UsageError(f"--format {fmt!r}: valid values are {', '.join(s.lstrip('.') for s in WRITE_FORMATS)}")


def _cmd_upscale(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import cli_scale
    from .imageio import ImageReadError, ImageWriteError, list_images, read_image, remove_stale_partials, write_image

    _check_options(args)
    if cli_scale.handles(args):
        return cli_scale.run(args)
    inputs = list_images(args.inputs)
    if not inputs:
        raise UsageError(f"no images found in {', '.join(args.inputs)}")
    outputs = output_paths(inputs, Path(args.output), args.format)
    for folder in sorted({target.parent for target in outputs}):
        for stale in remove_stale_partials(folder):
            print(f"removed {stale}, left by an interrupted run", file=sys.stderr)
    protected = set(inputs)
    todo = [(i, o) for i, o in zip(inputs, outputs) if args.overwrite or not o.exists()]
    skipped = len(inputs) - len(todo)
    failures: List[Tuple[Path, str]] = []
    pipe = load_pipeline(args) if todo else None
    for source, target in tqdm(todo, desc="images", unit="image", disable=args.quiet or len(todo) < 2):
        try:
            image = read_image(source)
            result = pipe(image, prompt=args.prompt, seed=args.seed, scale=args.scale, tile=args.tile,
                          color_fix=args.color_fix)
            write_image(result, target, quality=args.quality, overwrite=args.overwrite, protected=protected)
        except ImageReadError as error:
            failures.append((source, str(error)))
        except ImageWriteError as error:
            failures.append((source, f"{source}: {error}"))
        except (ValueError, RuntimeError, MemoryError) as error:
            failures.append((source, f"{source}: {type(error).__name__}: {error}"))
    done = len(todo) - len(failures)
    if not args.quiet or failures:
        print(f"upscaled {done}, skipped {skipped} (output exists; --overwrite to redo), failed {len(failures)}",
              file=sys.stderr)
    for _, message in failures:
        print(f"  failed: {message}", file=sys.stderr)
    return EXIT_FAILED_ITEMS if failures else 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .imageio import write_image

    _check_options(args)
    pipe = load_pipeline(args, kind_hint="sd-turbo")
    extra = {} if args.scale is None else {"scale": args.scale}
    images = pipe(prompt=args.prompt, seed=args.seed, height=args.height, width=args.width, output_type="pil", **extra)
    output = Path(args.output)
    targets = [output] if len(images) == 1 else [output.with_name(f"{output.stem}_{i}{output.suffix}") for i in range(len(images))]
    for image, target in zip(images, targets):
        write_image(image, target, quality=args.quality, overwrite=args.overwrite)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    return bench.main(args)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="compute precision (default: fp16 on GPU, fp32 on CPU)")
    parser.add_argument("--max-memory", dest="max_memory", help="memory budget for activations, e.g. 8GB (default: from free memory)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality 1..100 (default 95)")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--base", help="base model (diffusers folder or single-file checkpoint) for diffusion kinds")
    parser.add_argument("--lora", help="adapter file (osediff.pkl, s3diff.pkl, a LoRA)")
    parser.add_argument("--de-net", dest="de_net", help="S3Diff degradation estimator (de_net.pth)")
    parser.add_argument("--adapter", help="latent upscaler weights (latent-upscale)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashstep", description="One-step diffusion SR and generation, fast.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    info_parser = commands.add_parser("info", help="version, build, devices and the backends of every op")
    info_parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info_parser.set_defaults(handler=_cmd_info)

    upscale = commands.add_parser("upscale", help="upscale images (files or folders) or videos")
    upscale.add_argument("inputs", nargs="+", metavar="IN", help="image files, folders of images, or video files")
    upscale.add_argument("-o", "--output", required=True, help="output file (one input) or folder")
    upscale.add_argument("--model", help="default (bundled), a kind (osediff, s3diff, pixel-sr, ...) or an SR checkpoint")
    upscale.add_argument("--scale", type=float, help="output scale (default: the model's own, 4 for default)")
    upscale.add_argument("--tile", type=int, help="tile side in output pixels; 0 = never tile (default: from the memory budget)")
    upscale.add_argument("--latent-tiling", dest="latent_tiling", choices=["exact", "gaussian"],
                         help="diffusion SR on latents beyond --tile or the budget: exact (default; the UNet streamed "
                              "with whole-latent statistics, equal to the untiled result) or gaussian (the "
                              "reference's blended tiles)")
    upscale.add_argument("--color-fix", dest="color_fix", choices=["adain", "wavelet", "none"], help="colour correction (default: the model's reference)")
    upscale.add_argument("--prompt", help="text prompt for diffusion SR (default: empty)")
    upscale.add_argument("--format", help="output extension when writing to a folder (default: the input's, else png)")
    upscale.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                         help="run on a Ray cluster: ADDRESS (auto, host:6379, ray://host:10001), or a new local "
                              "one when none is given; put it after the inputs")
    _add_common(upscale)
    upscale.set_defaults(handler=_cmd_upscale)

    generate = commands.add_parser("generate", help="generate an image from a prompt with a one-step generator")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("-o", "--output", required=True, help="output image file")
    generate.add_argument("--model", help="sd-turbo (default), sdxl-turbo, instaflow, latent-upscale")
    generate.add_argument("--scale", type=float, help="latent-upscale only: the upscaler head (2 or 4; default its smallest)")
    generate.add_argument("--height", type=int, default=512)
    generate.add_argument("--width", type=int, default=512)
    _add_common(generate)
    generate.set_defaults(handler=_cmd_generate)

    bench_parser = commands.add_parser("bench", help="time a pipeline on random weights here, beside its peers")
    from .bench import add_arguments as add_bench_arguments

    add_bench_arguments(bench_parser)
    bench_parser.set_defaults(handler=_cmd_bench)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USAGE
    logging.basicConfig(level=logging.WARNING, format="flashstep: %(message)s")
    try:
        return args.handler(args)
    except (UsageError, ValueError, FileNotFoundError) as error:
        print(f"flashstep {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"flashstep {args.command}: interrupted; finished outputs are complete, no partial file was left", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
