"""Train/validation splits that always keep a group (a position, an experiment, an image id) on one side.

Order of precedence in :func:`split_samples`: ``split_file`` (reuse a saved ``split.json``), ``fold`` ("K/N"
k-fold over groups), ``val_groups`` (group names or globs), ``val`` (glob or ``re:<regex>`` on sample names; the
groups of matching samples go to validation), and finally a seeded random ``val_fraction`` of the groups.
A test split is held out first (:func:`hold_out_test`): it takes no part in training, checkpoint choice or tuning.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DataConfig
from ..errors import UnetlabError
from ..files import write_text
from .sample import DatasetInfo, Sample

log = logging.getLogger(__name__)


def _groups_of(samples: list[Sample]) -> list[str]:
    return list(dict.fromkeys(s.group for s in samples))


def _by_groups(samples: list[Sample], val_groups: set[str]) -> tuple[list[Sample], list[Sample]]:
    train = [s for s in samples if s.group not in val_groups]
    val = [s for s in samples if s.group in val_groups]
    return train, val


def name_matcher(pattern: str, flag: str):
    """A test ``name -> bool`` for a glob or ``re:<regex>``; a bad regex is one error naming ``flag``."""
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except re.error as exc:
            raise UnetlabError(f"{flag} {pattern!r} is not a valid regular expression ({exc})",
                               hint="after 're:' give a Python regex, e.g. 're:^pos0[1-3]'") from None
        return lambda name: rx.search(name) is not None
    return lambda name: fnmatch.fnmatchcase(name, pattern)


def _match_groups(patterns: list[str], groups: list[str], flag: str, root: Path | None = None) -> set[str]:
    """The groups named by ``patterns`` (names or globs); a pattern that matches none is an error."""
    out: set[str] = set()
    for pat in patterns:
        hits = {g for g in groups if g == pat or fnmatch.fnmatchcase(g, pat)}
        if not hits:
            nested = [g for g in groups if g.endswith("/" + pat)]  # time-lapse groups are <exp>/PosNNN
            hint = f"groups are e.g. {', '.join(groups[:3])}" + (
                f"; '*/{pat}' names {pat} of every experiment ({', '.join(nested[:3])})" if nested else "")
            raise UnetlabError(f"{flag} pattern {pat!r} matches no group", root, hint)
        out |= hits
    return out


def _match_names(pattern: str, samples: list[Sample], flag: str, root: Path | None = None) -> set[str]:
    """The groups of the samples whose names ``pattern`` matches; none is an error."""
    match = name_matcher(pattern, flag)
    out = {s.group for s in samples if match(s.name)}
    if not out:
        raise UnetlabError(f"{flag} pattern {pattern!r} matches no sample name", root,
                           f"names are e.g. {', '.join(s.name for s in samples[:3])}")
    return out


def parse_fold(fold: str) -> tuple[int, int]:
    """Parse "K/N" (K 1-based) into (K, N); raises a one-line error on anything else."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(fold))
    if not m:
        raise UnetlabError(f"bad fold {fold!r}; expected 'K/N', e.g. '1/5'")
    k, n = int(m.group(1)), int(m.group(2))
    if n < 2 or not 1 <= k <= n:
        raise UnetlabError(f"bad fold {fold!r}; need N >= 2 and 1 <= K <= N")
    return k, n


def fold_groups(groups: list[str], k: int, n: int, seed: int = 0) -> list[str]:
    """The validation groups of fold ``k`` of ``n``: groups shuffled by ``seed`` and dealt round-robin."""
    order = sorted(groups)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(order))
    return [order[i] for j, i in enumerate(perm) if j % n == k - 1]


def _check(train: list[Sample], val: list[Sample], how: str, allow_empty_val: bool = False) -> None:
    if not train:
        raise UnetlabError(f"the split ({how}) leaves no training samples", hint="put fewer groups in validation")
    if not val and not allow_empty_val:
        raise UnetlabError(f"the split ({how}) leaves no validation samples")


def split_samples(info: DatasetInfo, cfg: DataConfig, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Split ``info.samples`` into (train, val) by group according to ``cfg``; seeded and reproducible."""
    samples = list(info.samples)
    if not samples:
        raise UnetlabError("no samples to split", info.root)
    if cfg.split_file:
        return _split_from_file(samples, cfg.split_file)
    groups = _groups_of(samples)
    if cfg.fold:
        vg, how = _fold_val_groups(groups, cfg.fold, seed, info.root), f"fold {cfg.fold}"
    elif cfg.val_groups:
        vg, how = _match_groups(cfg.val_groups, groups, "--val-groups", info.root), f"val_groups {cfg.val_groups}"
    elif cfg.val:
        vg, how = _match_names(cfg.val, samples, "--val", info.root), f"val {cfg.val!r}"
    else:
        frac = float(cfg.val_fraction or 0.0)
        if not 0.0 <= frac < 1.0:
            raise UnetlabError(f"val_fraction must be in [0, 1), got {frac}")
        if frac == 0.0:
            return samples, []
        vg, how = _fraction_val_groups(groups, frac, seed, info.root, len(samples)), f"val_fraction {frac}"
    train, val = _by_groups(samples, vg)
    _check(train, val, how)
    return train, val


def _split_from_file(samples: list[Sample], split_file: str | Path) -> tuple[list[Sample], list[Sample]]:
    """(train, val) as a saved ``split.json`` has them; its test samples are left out, new samples train."""
    saved = load_split(split_file)
    val_names = set(saved.get("val", []))
    train_names = set(saved.get("train", []))
    known = {s.name for s in samples}
    missing = sorted((val_names | train_names) - known)
    if missing:
        log.warning("%s: %d samples of the saved split are not in the data (e.g. %s)",
                    split_file, len(missing), missing[0])
    test_names = set(saved.get("test", []))
    val = [s for s in samples if s.name in val_names]
    train = [s for s in samples if s.name not in val_names and s.name not in test_names]
    new = [s.name for s in train if s.name not in train_names and s.name not in test_names]
    if new:
        log.warning("%s: %d samples not in the saved split go to training (e.g. %s)", split_file, len(new), new[0])
    _check(train, val, f"split_file {split_file}", allow_empty_val=not val_names)  # a run without val
    return train, val


def _fold_val_groups(groups: list[str], fold: str, seed: int, root: Path) -> set[str]:
    """The validation groups of k-fold ``fold`` ("K/N")."""
    k, n = parse_fold(fold)
    if len(groups) < n:
        raise UnetlabError(f"fold {fold}: only {len(groups)} groups for {n} folds", root,
                           "use fewer folds or finer groups")
    return set(fold_groups(groups, k, n, seed))


def _fraction_val_groups(groups: list[str], frac: float, seed: int, root: Path, n_samples: int) -> set[str]:
    """A seeded random ``frac`` of the groups (at least one, never all)."""
    if len(groups) < 2:
        raise UnetlabError(f"cannot split by group: all {n_samples} samples are in one group", root,
                           "use --val-fraction 0, or give validation images with --val PATTERN")
    order = sorted(groups)
    perm = np.random.default_rng(seed).permutation(len(order))
    n_val = min(max(int(round(frac * len(order))), 1), len(order) - 1)
    return {order[i] for i in perm[:n_val]}


def hold_out_test(samples: list[Sample], cfg: DataConfig, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Split off the test samples (``cfg.test_groups``, ``cfg.test`` or ``cfg.test_fraction`` of the groups,
    seeded) before train/validation: returns (rest, test). With a ``split_file`` its "test" list is used."""
    groups = _groups_of(samples)
    if cfg.split_file:
        names = set(load_split(cfg.split_file).get("test", []))
        return [s for s in samples if s.name not in names], [s for s in samples if s.name in names]
    tg: set[str] = set()
    if cfg.test_groups:
        tg = _match_groups(cfg.test_groups, groups, "--test-groups")
    elif cfg.test:
        tg = _match_names(cfg.test, samples, "--test")
    elif cfg.test_fraction:
        frac = float(cfg.test_fraction)
        if not 0.0 < frac < 1.0:
            raise UnetlabError(f"test_fraction must be in [0, 1), got {frac}")
        if len(groups) < 3:
            raise UnetlabError(f"cannot hold out a test split: only {len(groups)} group(s)",
                               hint="set test_fraction 0, or give a test pattern")
        order = sorted(groups)
        perm = np.random.default_rng([seed, 7]).permutation(len(order))  # not the validation draw
        n_test = min(max(int(round(frac * len(order))), 1), len(order) - 2)
        tg = {order[i] for i in perm[:n_test]}
    rest, test = _by_groups(samples, tg)
    if tg and not rest:
        raise UnetlabError("the test split leaves nothing to train on", hint="hold out fewer groups")
    return rest, test


def save_split(path: str | Path, train: list[Sample], val: list[Sample], test: list[Sample] | None = None) -> Path:
    """Write the split as JSON (sample names and groups of each side) atomically."""
    doc = {
        "train": [s.name for s in train],
        "val": [s.name for s in val],
        "train_groups": _groups_of(train),
        "val_groups": _groups_of(val),
    }
    if test:
        doc["test"] = [s.name for s in test]
        doc["test_groups"] = _groups_of(test)
    text = json.dumps(doc, indent=1)
    return write_text(path, text)


def load_split(path: str | Path) -> dict[str, Any]:
    """Read a ``split.json`` written by :func:`save_split` (keys train, val, train_groups, val_groups)."""
    path = Path(path)
    if path.is_dir():
        path = path / "split.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise UnetlabError("split file not found", path) from None
    except json.JSONDecodeError as exc:
        raise UnetlabError(f"split file is not valid JSON ({exc.msg})", path) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("train"), list) or not isinstance(doc.get("val"), list):
        raise UnetlabError("split file must hold 'train' and 'val' lists of sample names", path)
    return doc
