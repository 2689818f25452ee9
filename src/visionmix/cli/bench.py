"""``visionmix bench``: profile models (params, MACs, latency, throughput, memory), or time deploy's backends."""

from __future__ import annotations

import argparse
from typing import Any

from visionmix.cli.common import add_command
from visionmix.errors import InvalidValue
from visionmix.files import check_new


def add_parser(subparsers: Any) -> None:
    from visionmix.deployment import BACKENDS, QUANTIZE

    p = add_command(subparsers, "bench", "measure models: params, MACs, latency, throughput, peak memory", """\
Profile registered models with random weights at their default input size (or --img-size/--in-chans): parameters,
MACs (FlopCounterMode multiply-adds of one image), latency at batch 1 and images/s at --batch-size (median and
inter-quartile spread over repeated runs after warm-up, eval mode, torch.inference_mode), and the peak memory of the
tensors one forward pass at --batch-size creates. --deploy adds the re-parameterised form of each model that
re-parameterisation changes.
MODEL may be an fnmatch pattern ('*_nano').

example: visionmix bench resnet_nano dbb_resnet_nano --deploy --json bench.json""")
    p.add_argument("models", nargs="+", metavar="MODEL", help="registered model names or patterns")
    p.add_argument("--batch-size", type=int, default=8, help="batch size of the throughput measurement")
    p.add_argument("--img-size", type=int, help="input height = width (default: the model's own)")
    p.add_argument("--in-chans", type=int, help="input channels (default: the model's own)")
    p.add_argument("--num-classes", type=int, help="classifier size (default: the model's own)")
    p.add_argument("--deploy", action="store_true", help="also profile visionmix.reparameterize(model)")
    p.add_argument("--backend", type=_backends, metavar="LIST",
                   help="instead: images/s of the deployed model on each inference backend of visionmix.deploy "
                        f"(comma-separated of {', '.join(BACKENDS)}, or all) next to eager, timed alternately in one "
                        "process, each checked against eager (default: off)")
    p.add_argument("--quantize", choices=QUANTIZE, help="with --backend: also time the int8 onnxruntime form "
                                                        "(dynamic int8 Linear weights; its difference is reported)")
    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="time torch.compile(model, backend=BACKEND) (inductor if no value; a cold compile takes "
                        "about a minute per model and input shape)")
    p.add_argument("--vs-matmul", action="store_true",
                   help="also time a 2048^3 fp32 matmul and show each model's GFLOP/s as a fraction of it")
    p.add_argument("--repeats", type=int, default=10, help="timed samples per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before the samples")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"), help="auto = cuda when available")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--csv", metavar="FILE", help="also write the results as CSV")
    p.add_argument("--force", action="store_true", help="overwrite existing --json/--csv files")
    p.set_defaults(run=run)


def _backends(text: str) -> tuple[str, ...]:
    """``--backend``: a comma-separated list of visionmix.deploy's backends, or ``all``."""
    from visionmix.deployment import BACKENDS

    names = BACKENDS if text == "all" else tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected backends among {', '.join(BACKENDS)} (or all), got {text!r}")
    return names


def run(args: argparse.Namespace) -> int:
    from visionmix.bench.profile import (
        backend_table,
        bench_backends,
        bench_models,
        matmul_gflops,
        results_table,
        save_results,
    )
    from visionmix.engine.distributed import resolve_device
    from visionmix.models import expand_model_names

    names = expand_model_names(args.models)
    for path in (args.json, args.csv):
        check_new(path, args.force)
    common = dict(batch_size=args.batch_size, img_size=args.img_size, in_chans=args.in_chans, warmup=args.warmup,
                  repeats=args.repeats, model_kwargs={"num_classes": args.num_classes})
    reference = None
    if args.quantize and not args.backend:
        raise InvalidValue("--quantize times the int8 form beside --backend's; pass --backend too (e.g. --backend "
                           "onnxruntime)")
    if args.backend:
        if args.deploy or args.compile or args.vs_matmul or args.device != "cpu":
            raise InvalidValue("--backend times visionmix.deploy's CPU backends of the deployed model; it does not "
                               "combine with --deploy, --compile, --vs-matmul or --device")
        results: list[Any] = bench_backends(names, args.backend, quantize=args.quantize, **common)
        print(backend_table(results))
    else:
        device = resolve_device(args.device)
        reference = matmul_gflops(device=device) if args.vs_matmul else None
        results = bench_models(names, deploy=args.deploy, device=device, compile_backend=args.compile,
                               reference_gflops=reference, **common)
        print(results_table(results))
        if reference is not None:
            print(f"2048^3 fp32 matmul: {reference:.1f} GFLOP/s")
    meta = {"matmul_gflops": reference, "command": args.command_line}
    for path in (args.json, args.csv):
        if path:
            print(f"wrote {save_results(results, path, force=args.force, meta=meta)}")
    return 0
