"""How many calibration documents are enough: `tokenfuse calibrate` at several set sizes, each on R
disjoint sets, and the spread of held-out cosine across the sets (README, calibration).

    python scripts/calibration_sizes.py --sizes 4 8 16 32 64 --repeats 6 --out results/calibration_sizes

(the defaults) runs MiniLM + BBC News at keep 0.35 (about 40 minutes on 2 cores) and prints the summary;
`--summary` reprints it from the JSON files already written. The spread is given over all R sets
and over consecutive groups of three (the issue's `--repeats 3`), since one group of three is a
small sample of what a user's calibration set can be.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenfuse.eval import calibrate


def summary(out: Path, sizes: list[int], group: int = 3) -> str:
    head = f"range per group of {group}"
    lines = [f"{'size':>5} {'mean':>7} {'range':>7}  {head:<24} held-out cosine per set"]
    for size in sizes:
        spread = json.loads((out / f"size_{size}.json").read_text())["meta"]["spread"]
        held = spread["heldout"]
        groups = [held[i : i + group] for i in range(0, len(held) - group + 1, group)]
        ranges = " ".join(f"{max(g) - min(g):.4f}" for g in groups)
        values = " ".join(f"{v:.4f}" for v in held)
        lines.append(
            f"{size:>5} {sum(held) / len(held):>7.4f} {max(held) - min(held):>7.4f}  {ranges:<24} {values}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--keep", type=float, default=0.35)
    parser.add_argument("--time-limit", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=Path("results/calibration_sizes"))
    parser.add_argument("--summary", action="store_true", help="only reprint the summary")
    args = parser.parse_args()
    if not args.summary:
        args.out.mkdir(parents=True, exist_ok=True)
        for size in args.sizes:
            settings = calibrate.Settings(
                keep=args.keep,
                calib_size=size,
                repeats=args.repeats,
                time_limit=args.time_limit,
                eval_repeats=1,  # quality only: the held-out timing is not what this study is for
            )
            results, _ = calibrate.run_text(settings)
            (args.out / f"size_{size}.json").write_text(json.dumps(results, indent=2))
    print(summary(args.out, args.sizes))


if __name__ == "__main__":
    main()
