"""The share of batch cells that are padding: in the sampler's stream order, with length grouping, and packed.

    python bench/padding.py                                         # tiny's byte tokenizer, built-in mixture, batch 16
    python bench/padding.py --model smollm2_135m --batch-size 8     # SmolLM2's tokenizer and chat template
    python bench/padding.py --paper-files /tmp/paper                # data=paper_mix on local files in the papers' schemas

Padding is what a GPU step pays for and does not learn from: a batch is as long as its longest example,
so the cells of every shorter one up to that length are wasted. `schedule.group_by_length=G` draws G
batches at once and batches their examples by length (the same examples, the mixture unchanged). This
script draws `--batches` batches from a copy of the project's own sampler, as a run of these settings
would, each way, and prints the padded share of the cells for each task mixture: padded to the batch's longest
example, grouped by length, and packed (`data.packing=true`: the stream's batches, each packed into rows of at
most max_len tokens by `epi.data.format.plan_rows`), at each mixture's own `data.max_len` unless `--max-len`. `--paper-files DIR`
writes small files in the schemas of the papers' five datasets there (tests/paper_files.py: synthetic
rows, not the real datasets, which need the hub) and points `data=paper_mix` at them.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import OmegaConf
from bench_trainer import ROOT, Work, project_trainer  # `python bench/padding.py` puts bench/ first on the import path

from epi.data.format import plan_rows
from epi.trainer import Trainer


def padding(project: Trainer, batches: int, group: int, packed: bool = False) -> tuple[float, int]:
    """(padded share of the cells, batches) over the next `batches` batches of a copy of the run's sampler, each
    batch padded to its longest example or (`packed`, data.packing) packed into rows of at most data.max_len."""
    sampler = copy.deepcopy(project.sampler)
    size, width = project.cfg.schedule.batch_size, project.cfg.data.max_len
    cells = real = 0
    for _ in range(batches):
        lengths = [len(project.train_sets[task][i]["input_ids"]) for task, i in sampler.next_batch(size, group)]
        if packed:
            rows = [sum(lengths[i] for i in row) for row in plan_rows(lengths, width)]
            cells += max(rows) * len(rows)
        else:
            cells += max(lengths) * len(lengths)
        real += sum(lengths)
    return 1 - real / cells, batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=None, help="data.max_len (default: each mixture's own: built-in 128, paper_mix 1024)")
    parser.add_argument("--batches", type=int, default=200, help="batches drawn each way (a multiple of --group)")
    parser.add_argument("--group", type=int, default=50, help="schedule.group_by_length: batches per length-sorted pool")
    parser.add_argument("--paper-files", type=Path, default=None, help="also data=paper_mix, on files written here")
    args = parser.parse_args()
    work = Work(args.model, args.batch_size, 0, "fp32", args.batches, device=torch.device("cpu"))  # max_len: per mixture
    mixtures = {"built-in": []}
    if args.paper_files is not None:
        spec = importlib.util.spec_from_file_location("paper_files", ROOT / "tests" / "paper_files.py")
        paper_files = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(paper_files)
        mixtures["paper_mix (synthetic files)"] = paper_files.write_paper_files(args.paper_files)
    print(f"model={args.model}, batch {args.batch_size}, {args.batches} batches each way, group_by_length={args.group}")
    print("| mixture | max_len | padding, stream order | padding, group_by_length | cells saved | padding, data.packing (stream order) |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides) in enumerate(mixtures.items()):
            group = "paper_mix" if overrides else "builtin"
            max_len = args.max_len or OmegaConf.load(ROOT / "conf" / "data" / f"{group}.yaml").max_len
            project = project_trainer(replace(work, max_len=max_len), Path(tmp) / str(i), overrides)
            before, _ = padding(project, args.batches, 0)
            after, _ = padding(project, args.batches, args.group)
            packed, _ = padding(project, args.batches, 0, packed=True)
            saved = 1 - (1 - before) / (1 - after)  # same real tokens: cells scale as 1 / (1 - padding)
            print(f"| {name} | {project.cfg.data.max_len} | {before:.1%} | {after:.1%} | {saved:.1%} | {packed:.1%} |")


if __name__ == "__main__":
    main()
