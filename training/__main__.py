"""`python -m training demo --out models/chest_xray [--quick]`: train and export demo weights."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

from pipelines.base import DEMO_DISCLAIMER


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help=f"train demo weights on synthetic data ({DEMO_DISCLAIMER})")
    demo.add_argument("--out", type=Path, required=True, help="bundle folder to (re)create")
    demo.add_argument("--quick", action="store_true", help="tiny run (seconds) for tests")
    demo.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    from training.demo import FULL, QUICK, train_demo  # imports torch

    cfg = QUICK if args.quick else FULL
    if args.seed is not None:
        cfg = replace(cfg, seed=args.seed)
    metrics = train_demo(args.out, cfg)
    print(json.dumps({"bundle": str(args.out), **metrics}, indent=2))
    print(f"NOTE: {DEMO_DISCLAIMER}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
