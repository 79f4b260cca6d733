"""Small local files in the schemas of the papers' five hub datasets, and the overrides that point
`data=paper_mix` at them: the ready configs run through the local path, as a user without the hub would.

    python -m tests.paper_files /tmp/paper   # writes the files and prints the overrides
"""

from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

N_ROWS = 40  # per file: enough for holdout=0.2 to leave val and test examples in every task


def _gsm8k(rng: random.Random) -> dict:
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    return {"question": f"Tom has {a} apples and buys {b}. How many now?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}


def _codealpaca(rng: random.Random) -> dict:
    n = rng.randint(2, 99)
    return {"instruction": f"Write a function that adds {n}.", "input": rng.choice(["", "x = 1"]), "output": f"def f(x): return x + {n}"}


def _logiqa(rng: random.Random) -> dict:
    a, b = rng.randint(0, 50), rng.randint(51, 99)
    return {
        "context": f"Ann is {a}. Bo is {b}.",
        "query": "Who is older?",
        "options": ["Ann", "Bo", "Both", "Neither"],
        "correct_option": 1,
    }


def _alpaca(rng: random.Random) -> dict:
    w = rng.choice(["cat", "dog", "sun", "sea", "tree"])
    n = rng.randint(0, 999)
    return {"instruction": f"Say {w} {n} backwards.", "input": "", "output": f"{n} {w}"[::-1], "text": ""}


def _ultrachat(rng: random.Random) -> dict:
    a = rng.randint(0, 999)
    return {
        "prompt": f"hi {a}",
        "prompt_id": str(a),
        "messages": [
            {"role": "user", "content": f"hi {a}"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "and again?"},
            {"role": "assistant", "content": f"hello {a}"},
        ],
    }


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_paper_files(root: Path) -> list[str]:
    """One file per task and split, in every supported format; returns the `data=paper_mix` overrides."""
    root.mkdir(parents=True, exist_ok=True)

    def rows(make, seed: int) -> list[dict]:
        rng = random.Random(seed)
        return [make(rng) for _ in range(N_ROWS)]

    write_jsonl(root / "gsm8k_train.jsonl", rows(_gsm8k, 0))
    write_jsonl(root / "gsm8k_test.jsonl", rows(_gsm8k, 1))
    (root / "codealpaca.json").write_text(json.dumps(rows(_codealpaca, 2)))
    pq.write_table(pa.Table.from_pylist(rows(_logiqa, 3)), root / "logiqa_train.parquet")
    write_jsonl(root / "logiqa_test.jsonl", rows(_logiqa, 4))
    with open(root / "alpaca.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output", "text"])
        writer.writeheader()
        writer.writerows(rows(_alpaca, 5))
    write_jsonl(root / "ultrachat_train.jsonl", rows(_ultrachat, 6))
    pq.write_table(pa.Table.from_pylist(rows(_ultrachat, 7)), root / "ultrachat_test.parquet")

    files = {
        "gsm8k": ("gsm8k_train.jsonl", "gsm8k_test.jsonl"),
        "codealpaca": ("codealpaca.json", None),
        "logiqa": ("logiqa_train.parquet", "logiqa_test.jsonl"),
        "alpaca": ("alpaca.csv", None),
        "ultrachat": ("ultrachat_train.jsonl", "ultrachat_test.parquet"),
    }
    overrides = ["data=paper_mix"]
    for task, (train, test) in files.items():
        overrides += [
            f"data.sources.{task}.hub=null",
            f"data.sources.{task}.train={root / train}",
            f"data.sources.{task}.eval={root / test if test else 'null'}",
            f"data.sources.{task}.holdout=0.2",
        ]
    return overrides


if __name__ == "__main__":
    print(" ".join(write_paper_files(Path(sys.argv[1]))))
