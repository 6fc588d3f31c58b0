"""The snapshots container: model-ready arrays of N labelled (or unlabelled) snapshots."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.features import Features

SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclasses.dataclass
class Snapshots:
    """Model-ready arrays for N snapshots; every array has N rows."""

    events: np.ndarray  # int32 [N, L]; 0 pads, 1..5 = EVENT_TYPES (pre-padded: latest last)
    categories: np.ndarray  # int32 [N, L]; 0 pads, 1..hash_buckets
    numeric: np.ndarray  # float32 [N, L, 3]; NUMERIC_FEATURES
    static: np.ndarray  # float32 [N, S]; AGGREGATE_FEATURES (a model reads a prefix)
    decay: np.ndarray  # float32 [N]; 1 = interest fades
    interest: np.ndarray  # float32 [N]; log1p(I(T + H))
    interest_now: np.ndarray  # float32 [N]; I(T)
    action: np.ndarray  # int32 [N]; logged action index, -1 = no intervention
    activation: np.ndarray  # float32 [N]; re-engaged within the response window
    propensity: np.ndarray  # float32 [N]; logging probability of the action (1 if none)
    intervention: np.ndarray  # int64 [N]; row of the matched intervention in its frame, -1
    user_id: np.ndarray  # object [N]
    merchant_id: np.ndarray  # object [N]
    cutoff: np.ndarray  # datetime64[ns] [N]
    split: np.ndarray  # int8 [N]; index into SPLITS
    fading_category: np.ndarray  # object [N]; category whose interest fell most

    def __len__(self) -> int:
        return len(self.decay)

    def subset(self, rows: np.ndarray) -> Snapshots:
        """Rows by boolean mask or index array."""
        return Snapshots(**{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)})

    def split_part(self, name: str) -> Snapshots:
        """The rows in split ``name`` (one of ``SPLITS``)."""
        return self.subset(self.split == SPLITS.index(name))

    def merchant(self, merchant_id: str) -> Snapshots:
        """The rows of merchant ``merchant_id``."""
        return self.subset(self.merchant_id == merchant_id)

    @property
    def activation_mask(self) -> np.ndarray:
        """float32 [N]: 1 where an intervention was logged (``action >= 0``), else 0."""
        return (self.action >= 0).astype(np.float32)

    def inputs(self) -> dict[str, np.ndarray]:
        """Keras model inputs by name."""
        return {
            "events": self.events,
            "categories": self.categories,
            "numeric": self.numeric,
            "static": self.static,
        }

    @classmethod
    def unlabelled(cls, feats: Features, user_id: np.ndarray, merchant_id: np.ndarray,
                   cutoff: np.datetime64) -> Snapshots:
        """Snapshots of ``feats`` to score: labels zero, no action, in the test split.

        ``user_id`` and ``merchant_id`` name the rows of ``feats``; ``cutoff`` is naive UTC.
        """
        n = len(feats.users)
        return cls(
            events=feats.events, categories=feats.categories, numeric=feats.numeric,
            static=feats.static.astype(np.float32), decay=np.zeros(n, np.float32),
            interest=np.zeros(n, np.float32), interest_now=feats.interest_now.astype(np.float32),
            action=np.full(n, -1, np.int32), activation=np.zeros(n, np.float32),
            propensity=np.ones(n, np.float32), intervention=np.full(n, -1, np.int64),
            user_id=user_id, merchant_id=merchant_id,
            cutoff=np.full(n, cutoff, dtype="datetime64[ns]"),
            split=np.full(n, SPLITS.index("test"), np.int8),
            fading_category=feats.fading_category,
        )

    @classmethod
    def concat(cls, parts: Sequence[Snapshots]) -> Snapshots:
        """The rows of ``parts`` one after another, in order."""
        return cls(**{
            f.name: np.concatenate([getattr(p, f.name) for p in parts])
            for f in dataclasses.fields(cls)
        })

    def save(self, path: str | Path) -> None:
        """Write a compressed ``.npz`` (the suffix is added when missing)."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        np.savez_compressed(path, **{
            f.name: getattr(self, f.name).astype(str)
            if getattr(self, f.name).dtype == object else getattr(self, f.name)
            for f in dataclasses.fields(self)
        })

    @classmethod
    def load(cls, path: str | Path) -> Snapshots:
        """Read a file written by :meth:`save` (``.npz`` is added when ``path`` lacks it and
        does not exist); the ID and category columns come back as object arrays."""
        path = Path(path)
        if path.suffix != ".npz" and not path.exists():
            path = path.with_name(path.name + ".npz")
        with np.load(path, allow_pickle=False) as data:
            arrays = {f.name: data[f.name] for f in dataclasses.fields(cls)}
        for name in ("user_id", "merchant_id", "fading_category"):
            arrays[name] = arrays[name].astype(object)
        return cls(**arrays)
