"""Bundled benchmark data: names -> files, splits and licenses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmdistill.errors import DataError, Problem

ROOT = Path(__file__).resolve().parent.parent / "benchmarks"


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    splits: dict[str, str]  # split -> file name inside the benchmark folder
    default_split: str
    license: str
    note: str = ""
    in_average: bool = True   # counted in the evaluation's average column unless the user asks for every benchmark

    def path(self, split: str | None = None) -> Path:
        split = split or self.default_split
        if split not in self.splits:
            raise DataError([Problem(self.name, None, None,
                                     f"has no split {split!r}; splits: {', '.join(self.splits)}")])
        return ROOT / self.name / self.splits[split]


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in [
    Benchmark("dolly", "Dolly (databricks-dolly-15k, MiniLLM split)",
              {"train": "train.jsonl", "valid": "valid.jsonl", "test": "test.jsonl"}, "test", "CC BY-SA 3.0"),
    Benchmark("selfinst", "Self-Instruct user-oriented",
              {"test": "test.jsonl", "test252": "test252.jsonl"}, "test", "Apache-2.0",
              "test = MiniLLM's 242-row subset"),
    Benchmark("vicuna", "Vicuna 80", {"test": "test.jsonl"}, "test", "Apache-2.0",
              "references are gpt-3.5-turbo answers"),
    Benchmark("sni", "Super-NaturalInstructions (MiniLLM sinst/11_)", {"test": "test.jsonl"}, "test", "Apache-2.0"),
    Benchmark("unni", "Unnatural Instructions (1-2-word bucket, PARTIAL)", {"test": "test.jsonl"}, "test",
              "MIT", "the 1-2-word response bucket, not the MiniLLM >=11-word set; not comparable with papers; "
              "not in the average unless asked (--average-all)", in_average=False),
]}

EVAL_BENCHMARKS = ("dolly", "selfinst", "vicuna", "sni", "unni")


def resolve(name: str, split: str | None = None) -> Path:
    if name not in BENCHMARKS:
        raise DataError([Problem(name, None, None, f"is not a bundled benchmark; choose one of {', '.join(BENCHMARKS)}")])
    return BENCHMARKS[name].path(split)


def count_rows(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())
