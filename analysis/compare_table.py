"""Paper-style Markdown table from a ``gp-loss compare --json`` result.

Rows are losses, columns are cells (dataset / model / augmentation); each entry is the test
accuracy (%) at the best-validation checkpoint, mean ± std over the seeds; the best mean of a
column is bold and † marks a Holm-corrected Welch p < 0.05 against cross-entropy. The table is
``gp_loss.protocol.compare.markdown_table`` (also behind ``compare --markdown FILE``).

Usage: python analysis/compare_table.py compare.json [-o table.md] [--digits 2]
"""
from __future__ import annotations

import argparse
import json
import sys

from gp_loss.protocol.compare import markdown_table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result", help="a file written by `gp-loss compare --json` ('-' = stdin)")
    ap.add_argument("-o", "--output", default="-", help="where to write (default: stdout)")
    ap.add_argument("--digits", type=int, default=2, help="decimals of the percentages")
    args = ap.parse_args(argv)
    try:
        text = sys.stdin.read() if args.result == "-" else open(args.result, encoding="utf-8").read()
        result = json.loads(text)
        table = markdown_table(result, digits=args.digits)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"compare_table: cannot read {args.result}: {exc}", file=sys.stderr)
        return 2
    if args.output == "-":
        sys.stdout.write(table)
    else:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
