"""Teacher-cache shards are verified (issue 30, item 3): the manifest records each shard's size and SHA-256 (written
after the shard), opening a cache checks every size, reading a shard checks its checksum; a damaged shard is one
line naming it, the rows it holds and the `lmdistill capture` command that rewrites it, and that command rewrites
only the damaged shard, after which training equals training on the undamaged cache."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmdistill.cli import main
from lmdistill.data import load_examples, tokenize_examples
from lmdistill.teachers import TeacherCache
from lmdistill.teachers import capture as capture_mod
from lmdistill.teachers.cache import DamagedCacheError
from lmdistill.train import load_config, train

LEN = ["--max-length", "96", "--max-prompt-length", "80", "--template", "alpaca"]
SHARD_ROWS = 4


def capture_args(teacher, out) -> list[str]:
    return ["capture", "--teacher", teacher, "--data", "dolly:train", "--out", str(out), "--top-k", "16",
            "--limit", "16", *LEN, "--shard-rows", str(SHARD_ROWS), "--no-progress"]


@pytest.fixture(scope="module")
def reference(model_dirs, tmp_path_factory):
    """An undamaged cache of 16 Dolly examples (10 rows after the prompt filter) in shards of 4 rows."""
    root = tmp_path_factory.mktemp("ref") / "cache"
    assert main(capture_args(model_dirs["teacher"], root)) == 0
    return root


@pytest.fixture
def cache(reference, tmp_path):
    root = tmp_path / "cache"
    shutil.copytree(reference, root)   # copy2: mtimes kept, so "unchanged" is checked against the original
    return root


def manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def rows_of(tokenizer):
    examples = load_examples("dolly:train").examples[:16]
    return tokenize_examples(examples, tokenizer, max_prompt_length=80, max_length=96)[0]


def read_every_row(root: Path, tokenizer) -> None:
    cache = TeacherCache(root)
    for r in rows_of(tokenizer):
        cache.row(r.input_ids, r.loss_mask, r.id)


def flip_bytes_in(path: Path, member: str, n: int = 8) -> None:
    """Invert ``n`` bytes in the middle of the compressed data of one array of an npz (the file keeps its size)."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    data = bytearray(path.read_bytes())
    local_header = 30 + len(info.filename.encode()) + int.from_bytes(data[info.header_offset + 28:
                                                                         info.header_offset + 30], "little")
    start = info.header_offset + local_header + info.compress_size // 2
    for i in range(start, start + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def damage(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "flipped":
        flip_bytes_in(path, "logprobs.npy")
    else:
        path.unlink()


def test_the_manifest_records_each_shards_size_sha256_rows_and_ids(reference, tokenizer):
    m = manifest(reference)
    rows = rows_of(tokenizer)
    assert m["rows"] == len(rows) == 10 and m["shards"] == 3 and len(m["shard_files"]) == 3
    for i, entry in enumerate(m["shard_files"]):
        data = (reference / entry["file"]).read_bytes()
        assert entry["file"] == f"shard-{i:05d}.npz"
        assert entry["size"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
        first, last = i * SHARD_ROWS, min(len(rows), (i + 1) * SHARD_ROWS) - 1
        assert entry["rows"] == [first, last] and entry["ids"] == [rows[first].id, rows[last].id]
        with np.load(reference / entry["file"]) as z:
            assert len(z["keys"]) == last - first + 1
    assert m["bytes"] == sum(e["size"] for e in m["shard_files"])


@pytest.mark.parametrize("how", ["truncated", "missing"])
def test_a_truncated_or_missing_shard_is_named_when_the_cache_opens(cache, tokenizer, how):
    damage(cache / "shard-00001.npz", how)
    with pytest.raises(DamagedCacheError) as e:
        TeacherCache(cache)
    rows = rows_of(tokenizer)
    msg = str(e.value)
    assert "\n" not in msg and e.value.shards == [1]
    assert f"cache:{cache} is damaged: shard-00001.npz (rows 5-8 of 10, ids {rows[4].id!r} to {rows[7].id!r}) " \
           f"{'is truncated' if how == 'truncated' else 'is missing'}" in msg
    assert f"--out {cache} " in msg and "to rewrite only the damaged shard(s)" in msg


def test_flipped_bytes_are_named_when_the_shard_is_read(cache, tokenizer):
    """8 inverted bytes inside logprobs.npy keep the size (the cache opens) and the zip's keys readable; the first
    read of the shard's scores checks its SHA-256 (it was a raw `Bad CRC-32 for file 'logprobs.npy'`)."""
    damage(cache / "shard-00002.npz", "flipped")
    opened = TeacherCache(cache)
    rows = rows_of(tokenizer)
    opened.row(rows[0].input_ids, rows[0].loss_mask)   # shard 0 is fine
    with pytest.raises(DamagedCacheError, match=r"shard-00002\.npz \(rows 9-10 of 10, ids .*\) does not match its "
                                                r"SHA-256 in the manifest") as e:
        opened.row(rows[9].input_ids, rows[9].loss_mask)
    assert e.value.shards == [2] and "\n" not in str(e.value)


def test_manifest_mismatch_a_swapped_shard_or_a_changed_checksum_is_named(cache, tokenizer):
    m = manifest(cache)
    m["shard_files"][0]["sha256"] = "0" * 64   # the manifest no longer describes shard 0's bytes
    (cache / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DamagedCacheError, match=r"shard-00000\.npz \(rows 1-4 of 10.*\) does not match its SHA-256"):
        read_every_row(cache, tokenizer)
    shutil.copy2(cache / "shard-00001.npz", cache / "shard-00002.npz")   # another shard's bytes in place of one
    with pytest.raises(DamagedCacheError, match=r"shard-00002\.npz \(rows 9-10 of 10.*\) is \d+ bytes, the manifest "
                                                r"records \d+"):
        TeacherCache(cache)
    m["shard_files"] = m["shard_files"][:2]   # a shard list of another length than the shards
    (cache / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DamagedCacheError, match=r"manifest\.json is damaged: its shard_files holds 2 entries for 3 "
                                                r"shards.*rerun `lmdistill capture --teacher"):
        TeacherCache(cache)


def test_the_cli_says_it_in_one_line_without_a_traceback(cache, model_dirs, tmp_path, capsys):
    damage(cache / "shard-00002.npz", "flipped")
    rc = main(["train", "kd", *kd_settings(model_dirs, f"cache:{cache}", tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "BadZipFile" not in err and "CRC" not in err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "shard-00002.npz (rows 9-10 of 10" in lines[0], err


def repair_command(cache: Path, tokenizer) -> list[str]:
    """The command the error names, as words (without the leading ``lmdistill``)."""
    with pytest.raises(DamagedCacheError) as e:
        read_every_row(cache, tokenizer)
    command = str(e.value).split("rerun `")[1].split("`")[0]
    words = shlex.split(command)
    assert words[:2] == ["lmdistill", "capture"]
    return words[1:]


def kd_settings(model_dirs, teacher, out) -> list[str]:
    return [f"student={model_dirs['student']}", f"teacher={teacher}", f"output_dir={out}", "max_train_examples=16",
            "batch_size=4", "micro_batch_size=2", "valid_data=", "save_steps=1000", "eval_steps=1000",
            "progress=false", "max_length=96", "max_prompt_length=80", "template=alpaca", "device=cpu", "max_steps=3"]


def kd_weights(model_dirs, teacher, out) -> dict:
    return load_file(os.path.join(train(load_config("kd", kd_settings(model_dirs, teacher, out)))["final"],
                                  "model.safetensors"))


@pytest.mark.parametrize("how", ["truncated", "flipped", "missing"])
def test_rerunning_capture_rewrites_only_the_damaged_shard_and_training_equals_the_undamaged_cache(
        reference, cache, model_dirs, tokenizer, tmp_path, capsys, how):
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in cache.glob("shard-*.npz")}
    damage(cache / "shard-00001.npz", how)
    words = repair_command(cache, tokenizer)
    capsys.readouterr()
    assert main([*words, "--no-progress"]) == 0   # the command the error printed, as printed
    out = capsys.readouterr().out
    assert f"shard-00001.npz (rows 5-8 of 10, " in out and ": rewritten" in out
    assert "rewrote 1 damaged shard(s): shard-00001.npz" in out and "2 of 3 shards kept" in out
    for name in ("shard-00000.npz", "shard-00002.npz"):   # untouched: same mtime, same bytes
        p = cache / name
        assert (p.stat().st_mtime_ns, p.read_bytes()) == before[name]
    with np.load(reference / "shard-00001.npz") as want, np.load(cache / "shard-00001.npz") as got:
        for k in want.files:
            assert np.array_equal(want[k], got[k]), k
    m = manifest(cache)
    assert m["complete"] and m["shards_rewritten"] == ["shard-00001.npz"] and m["shards_reused"] == 2
    read_every_row(cache, tokenizer)   # every shard verifies
    repaired = kd_weights(model_dirs, f"cache:{cache}", tmp_path / "repaired")
    undamaged = kd_weights(model_dirs, f"cache:{reference}", tmp_path / "undamaged")
    student = load_file(os.path.join(model_dirs["student"], "model.safetensors"))
    assert any(not torch.equal(repaired[k], student[k]) for k in student)   # it trained
    assert all(torch.equal(repaired[k], undamaged[k]) for k in undamaged)


def test_the_manifest_is_written_after_each_shard(model_dirs, tmp_path, monkeypatch):
    """Killed before the third shard: the manifest lists the two shards on disk, with their checksums."""
    real = capture_mod.write_shard
    calls = {"n": 0}

    def dies_on_third(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(capture_mod, "write_shard", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        capture_mod.capture(capture_mod.CaptureSettings(
            model_dirs["teacher"], "dolly:train", str(tmp_path / "c"), top_k=16, limit=16, template="alpaca",
            max_length=96, max_prompt_length=80, shard_rows=SHARD_ROWS, progress=False))
    m = manifest(tmp_path / "c")
    assert not m["complete"] and m["shards_done"] == 2 and m["shard_files"][2] is None
    for entry in m["shard_files"][:2]:
        data = (tmp_path / "c" / entry["file"]).read_bytes()
        assert entry["size"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()


def test_a_damaged_shard_list_is_rebuilt_from_the_shards_without_recomputing(cache, model_dirs, capsys):
    m = manifest(cache)
    m["shard_files"] = {"not": "a list"}
    (cache / "manifest.json").write_text(json.dumps(m))
    before = {p.name: p.stat().st_mtime_ns for p in cache.glob("shard-*.npz")}
    assert main(capture_args(model_dirs["teacher"], cache)) == 0
    assert "its shard list is damaged; every shard is checked against its rows" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("shard-*.npz")} == before
    assert manifest(cache)["shards_reused"] == 3 and TeacherCache(cache).manifest["shard_files"] == \
        manifest(cache)["shard_files"]


def test_a_cache_without_checksums_is_read_with_a_warning_and_rerunning_capture_adds_them(cache, model_dirs,
                                                                                          tokenizer, capsys):
    """Caches captured before shard checksums (no ``shard_files``) are accepted: a warning says damage is found
    only when a shard cannot be decoded, and such a shard is still named in one line; rerunning the capture adds
    the checksums without recomputing a shard."""
    m = manifest(cache)
    entries = m.pop("shard_files")
    (cache / "manifest.json").write_text(json.dumps(m))
    with pytest.warns(UserWarning, match="has no shard checksums"):
        read_every_row(cache, tokenizer)
    before = {p.name: p.stat().st_mtime_ns for p in cache.glob("shard-*.npz")}
    assert main(capture_args(model_dirs["teacher"], cache)) == 0
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("shard-*.npz")} == before
    added = manifest(cache)
    assert added["shards_reused"] == 3
    assert [{k: e[k] for k in ("file", "size", "sha256", "rows")} for e in added["shard_files"]] == \
        [{k: e[k] for k in ("file", "size", "sha256", "rows")} for e in entries]
    (cache / "manifest.json").write_text(json.dumps(m))   # without checksums again, and a shard damaged
    damage(cache / "shard-00002.npz", "flipped")
    undecodable = (r"shard-00002\.npz \(rows 9-10 of 10\) cannot be decoded \((zipfile\.BadZipFile: Bad CRC-32 for "
                   r"file 'logprobs\.npy'|zlib\.error: Error -3 while decompressing data)")
    with pytest.warns(UserWarning), pytest.raises(DamagedCacheError, match=undecodable):
        read_every_row(cache, tokenizer)
