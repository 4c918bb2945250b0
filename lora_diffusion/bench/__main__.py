"""The command line: `python -m lora_diffusion.bench <suite> ...` (see `lora_diffusion.bench`)."""

from __future__ import annotations

import argparse
import sys
import time

import lora_diffusion.bench as bench
from lora_diffusion.offline import use_offline_defaults
from lora_diffusion.bench.common import (
    BenchError, add_common_arguments, check_device, check_finite, run_worker, size_of, write_result,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lora_diffusion.bench", description=bench.__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="suite", required=True, metavar="SUITE")
    for name, mod in bench.suites().items():
        sp = sub.add_parser(name, help=mod.__doc__.split("\n")[0].split(": ", 1)[-1], description=mod.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        add_common_arguments(sp)
        mod.add_arguments(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_worker":
        run_worker(*argv[1:4])
        return 0
    use_offline_defaults()
    args = build_parser().parse_args(argv)
    mod = bench.get_suite(args.suite)
    try:
        args.device = check_device(args.device)
        if args.threads is not None and args.threads < 1:
            raise BenchError(f"--threads {args.threads}: must be >= 1")
        t0 = time.perf_counter()
        result = mod.run(args, size_of(args))
        result["wall_s"] = time.perf_counter() - t0
    except BenchError as e:
        print(f"bench {args.suite}: {e}", file=sys.stderr)
        return 2
    result = {"suite": args.suite, "size": size_of(args), "command": "python -m lora_diffusion.bench " + " ".join(argv), **result}
    bad = check_finite(result)
    result["non_finite"] = bad
    md = mod.markdown(result)
    md += f"\n\nCommand: `{result['command']}` ({result['wall_s']:.0f} s)\n"
    if bad:
        md += f"\nNon-finite values: {', '.join(bad)}\n"
    json_path, md_path = write_result(result, md, args.out, args.suite)
    print(md)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
