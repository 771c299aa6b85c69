"""Bar charts (PNG) from the JSON that latency.py / offline_throughput.py write, e.g. for results
fetched from the GPU machine:

    python benchmarks/plot.py docs/results/*.json --out-dir docs/results
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bar_chart

_METRIC = {
    "latency": ("tpot_ms", "ms per output token", "time per output token (batch {batch_size})"),
    "offline_throughput": ("output_tok_s", "output tokens / s", "offline output tokens/s"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json_files", nargs="+")
    ap.add_argument("--out-dir", default=".")
    args = ap.parse_args()
    for name in args.json_files:
        data = json.loads(Path(name).read_text())
        if data.get("benchmark") not in _METRIC:
            continue
        key, ylabel, title = _METRIC[data["benchmark"]]
        results = data["results"]
        title = f"{data['model']}: " + title.format(**data.get("args", {}))
        title += f"\n{data['device']}, commit {data['commit']}"
        out = Path(args.out_dir) / (Path(name).stem + ".png")
        bar_chart(str(out), title, list(results), [r[key] for r in results.values()], ylabel)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
