"""Precision and recall of afina's personal-data detectors, per type, on the generated labeled set.

    python benchmarks/pii_detection.py                 # 3,000 texts in Spanish, Portuguese and English
    python benchmarks/pii_detection.py --count 600 --seed 1

A finding counts as right when its type and its span match a planted value exactly. The set
(`afina.data.example.pii_samples`) plants every type about equally among look-alikes that are not
personal data: order and case numbers, amounts, dates, times, versions, and identifier-shaped
numbers whose check digits are wrong.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

from afina.data.example.pii_samples import labeled_samples
from afina.data.pii import TYPES, find_pii


def measure(count: int, seed: int) -> dict:
    samples = labeled_samples(count, seed)
    right, found, truth = Counter(), Counter(), Counter()
    started = time.perf_counter()
    for text, labels in samples:
        spans = {(f.type, f.start, f.end) for f in find_pii(text)}
        truth.update(kind for kind, *_ in labels)
        found.update(kind for kind, *_ in spans)
        right.update(kind for kind, *_ in spans & set(labels))
    seconds = time.perf_counter() - started
    return {"texts": count, "seed": seed, "texts_per_second": count / seconds,
            "types": {kind: {"planted": truth[kind], "found": found[kind],
                             "precision": right[kind] / found[kind] if found[kind] else 1.0,
                             "recall": right[kind] / truth[kind] if truth[kind] else 1.0} for kind in TYPES}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="Print the results as JSON")
    args = parser.parse_args()
    results = measure(args.count, args.seed)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"| type | planted | precision | recall |\n| --- | ---: | ---: | ---: |")
    for kind, row in results["types"].items():
        print(f"| {kind} | {row['planted']} | {row['precision']:.3f} | {row['recall']:.3f} |")
    print(f"\n{results['texts']} texts, seed {results['seed']}, {results['texts_per_second']:,.0f} texts/s")


if __name__ == "__main__":
    main()
