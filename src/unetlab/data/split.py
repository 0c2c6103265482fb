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


def _name_matcher(pattern: str):
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except re.error as exc:
            raise UnetlabError(f"bad regular expression in val pattern {pattern!r}: {exc}") from None
        return lambda name: rx.search(name) is not None
    return lambda name: fnmatch.fnmatchcase(name, pattern)


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
    groups = _groups_of(samples)

    if cfg.split_file:
        saved = load_split(cfg.split_file)
        val_names = set(saved.get("val", []))
        train_names = set(saved.get("train", []))
        known = {s.name for s in samples}
        missing = sorted((val_names | train_names) - known)
        if missing:
            log.warning("%s: %d samples of the saved split are not in the data (e.g. %s)",
                        cfg.split_file, len(missing), missing[0])
        test_names = set(saved.get("test", []))
        val = [s for s in samples if s.name in val_names]
        train = [s for s in samples if s.name not in val_names and s.name not in test_names]
        new = [s.name for s in train if s.name not in train_names and s.name not in test_names]
        if new:
            log.warning("%s: %d samples not in the saved split go to training (e.g. %s)",
                        cfg.split_file, len(new), new[0])
        _check(train, val, f"split_file {cfg.split_file}", allow_empty_val=not val_names)  # a run without val
        return train, val

    if cfg.fold:
        k, n = parse_fold(cfg.fold)
        if len(groups) < n:
            raise UnetlabError(
                f"fold {cfg.fold}: only {len(groups)} groups for {n} folds", info.root,
                "use fewer folds or finer groups",
            )
        vg = set(fold_groups(groups, k, n, seed))
        train, val = _by_groups(samples, vg)
        _check(train, val, f"fold {cfg.fold}")
        return train, val

    if cfg.val_groups:
        vg: set[str] = set()
        for pat in cfg.val_groups:
            hits = {g for g in groups if g == pat or fnmatch.fnmatchcase(g, pat)}
            if not hits:
                raise UnetlabError(
                    f"val_groups pattern {pat!r} matches no group", info.root,
                    f"groups are e.g. {', '.join(groups[:3])}",
                )
            vg |= hits
        train, val = _by_groups(samples, vg)
        _check(train, val, f"val_groups {cfg.val_groups}")
        return train, val

    if cfg.val:
        match = _name_matcher(cfg.val)
        vg = {s.group for s in samples if match(s.name)}
        if not vg:
            raise UnetlabError(
                f"val pattern {cfg.val!r} matches no sample name", info.root,
                f"names are e.g. {', '.join(s.name for s in samples[:3])}",
            )
        train, val = _by_groups(samples, vg)
        _check(train, val, f"val {cfg.val!r}")
        return train, val

    frac = float(cfg.val_fraction or 0.0)
    if not 0.0 <= frac < 1.0:
        raise UnetlabError(f"val_fraction must be in [0, 1), got {frac}")
    if frac == 0.0:
        return samples, []
    if len(groups) < 2:
        raise UnetlabError(
            f"cannot split by group: all {len(samples)} samples are in one group", info.root,
            "set val_fraction 0, or give a validation folder/pattern",
        )
    order = sorted(groups)
    perm = np.random.default_rng(seed).permutation(len(order))
    n_val = int(round(frac * len(order)))
    n_val = min(max(n_val, 1), len(order) - 1)
    vg = {order[i] for i in perm[:n_val]}
    train, val = _by_groups(samples, vg)
    _check(train, val, f"val_fraction {frac}")
    return train, val


def hold_out_test(samples: list[Sample], cfg: DataConfig, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Split off the test samples (``cfg.test_groups``, ``cfg.test`` or ``cfg.test_fraction`` of the groups,
    seeded) before train/validation: returns (rest, test). With a ``split_file`` its "test" list is used."""
    groups = _groups_of(samples)
    if cfg.split_file:
        names = set(load_split(cfg.split_file).get("test", []))
        return [s for s in samples if s.name not in names], [s for s in samples if s.name in names]
    tg: set[str] = set()
    if cfg.test_groups:
        for pat in cfg.test_groups:
            hits = {g for g in groups if g == pat or fnmatch.fnmatchcase(g, pat)}
            if not hits:
                raise UnetlabError(f"test_groups pattern {pat!r} matches no group",
                                   hint=f"groups are e.g. {', '.join(groups[:3])}")
            tg |= hits
    elif cfg.test:
        match = _name_matcher(cfg.test)
        tg = {s.group for s in samples if match(s.name)}
        if not tg:
            raise UnetlabError(f"test pattern {cfg.test!r} matches no sample name",
                               hint=f"names are e.g. {', '.join(s.name for s in samples[:3])}")
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
