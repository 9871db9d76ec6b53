"""FiftyOne Brain signals on the pipeline's own embeddings: a field per sample, a saved view each.

    uniqueness, representativeness   float fields (Brain)
    near-duplicates                  tag `near-duplicate`, fields near_duplicate_of/_distance
    leakage across splits            tag `near-leak`, field leaks_with (the other split's sample_id)
    mistakenness (after training)    see tasks.review

Brain runs are stored under fixed keys and replaced on every run, so re-syncing a version
never accumulates runs. All functions take a connected `fo` and a dataset from
tasks.curate_fiftyone; nothing here imports FiftyOne at module level.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

TAG_NEAR_DUPLICATE = "near-duplicate"
TAG_NEAR_LEAK = "near-leak"
SIGNAL_TAGS = {TAG_NEAR_DUPLICATE, TAG_NEAR_LEAK}
BRAIN_KEYS = ("pixelops_near_duplicates", "pixelops_leaks")
MIN_FOR_CLUSTERS = 100  # Brain's representativeness clusters into 20 groups: below this it is noise
SIGNAL_COLUMNS = ("sample_id", "uniqueness", "representativeness", "near_duplicate_of",
                  "near_duplicate_distance", "leaks_with")


def _aligned(dataset, sample_ids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Rows of `vectors` in the dataset's sample order (Brain pairs embeddings by position)."""
    index = {sid: i for i, sid in enumerate(sample_ids.tolist())}
    order = dataset.values("sample_id")
    missing = [s for s in order if s not in index]
    if missing:
        raise ValueError(f"no embedding for {len(missing)} samples, e.g. {missing[:3]}")
    return vectors[[index[s] for s in order]]


def _replace_runs(dataset) -> None:
    for key in BRAIN_KEYS:
        if dataset.has_brain_run(key):
            dataset.delete_brain_run(key)


def compute(fo, dataset, sample_ids: np.ndarray, vectors: np.ndarray, *, threshold: float,
            split_field: str = "split") -> pd.DataFrame:
    """Run Brain on `dataset` with precomputed `vectors`; write fields and managed tags.

    Returns: one row per sample (SIGNAL_COLUMNS): near_duplicate_of is the sample_id of the
    group's first member (None for that member and for singletons); leaks_with the sample_id
    of a near-duplicate in another split (None when it leaks nowhere).
    """
    import fiftyone.brain as fob

    x = _aligned(dataset, sample_ids, vectors)
    _replace_runs(dataset)
    fob.compute_uniqueness(dataset, embeddings=x, progress=False)
    if len(x) >= MIN_FOR_CLUSTERS:
        fob.compute_representativeness(dataset, embeddings=x, progress=False)
    elif "representativeness" not in dataset.get_field_schema():
        dataset.add_sample_field("representativeness", fo.FloatField)  # null: too few samples to cluster
    index = fob.compute_near_duplicates(dataset, threshold=threshold, embeddings=x, progress=False)
    leaks = fob.compute_leaky_splits(dataset, splits=split_field, threshold=threshold, similarity_index=index,
                                     progress=False)
    leaks.find_leaks(threshold)

    ids, sids, splits = dataset.values(["id", "sample_id", split_field])
    sid_of, split_of = dict(zip(ids, sids)), dict(zip(ids, splits))
    dup_of, dup_dist, leaks_with = {}, {}, {}
    for key, neighbors in index.neighbors_map.items():
        for other, dist in neighbors:
            dup_of[other], dup_dist[other] = sid_of[key], float(dist)
            if split_of[key] != split_of[other]:
                leaks_with.setdefault(other, sid_of[key])
                leaks_with.setdefault(key, sid_of[other])
    in_group = set(dup_of) | set(index.neighbors_map)
    leak_ids = set(leaks.leak_ids)
    _write(dataset, ids, in_group, leak_ids, dup_of, dup_dist, leaks_with)

    uniq, rep = dataset.values(["uniqueness", "representativeness"])
    return pd.DataFrame({
        "sample_id": sids,
        "uniqueness": uniq,
        "representativeness": rep,
        "near_duplicate_of": [dup_of.get(i) for i in ids],
        "near_duplicate_distance": [dup_dist.get(i) for i in ids],
        "leaks_with": [leaks_with.get(i) if i in leak_ids else None for i in ids],
    })


def _write(dataset, ids, in_group, leak_ids, dup_of, dup_dist, leaks_with) -> None:
    import fiftyone as fo

    schema = dataset.get_field_schema()
    for field, kind in (("near_duplicate_of", fo.StringField), ("near_duplicate_distance", fo.FloatField),
                        ("leaks_with", fo.StringField)):
        if field not in schema:  # declared: all-None values give FiftyOne no type to infer
            dataset.add_sample_field(field, kind)
    tags = dataset.values("tags")
    new_tags = {}
    for i, have in zip(ids, tags):
        want = [t for t in have or [] if t not in SIGNAL_TAGS]
        want += [TAG_NEAR_DUPLICATE] if i in in_group else []
        want += [TAG_NEAR_LEAK] if i in leak_ids else []
        if want != have:
            new_tags[i] = want
    if new_tags:
        dataset.set_values("tags", new_tags, key_field="id", progress=False)
    dataset.set_values("near_duplicate_of", [dup_of.get(i) for i in ids], progress=False)
    dataset.set_values("near_duplicate_distance", [dup_dist.get(i) for i in ids], progress=False)
    dataset.set_values("leaks_with", [leaks_with.get(i) if i in leak_ids else None for i in ids],
                       progress=False)


def save_views(fo, dataset) -> list[str]:
    """The signal views, saved on the dataset so the App lists them without code."""
    from fiftyone import ViewField as F

    views = {
        "near-duplicates": dataset.match_tags(TAG_NEAR_DUPLICATE).sort_by("near_duplicate_of"),
        "leaky": dataset.match_tags(["leak", TAG_NEAR_LEAK]),
        "least-unique": dataset.sort_by("uniqueness").limit(1000),
        "most-representative": dataset.match(F("representativeness") > 0).sort_by(
            "representativeness", reverse=True).limit(1000),
    }
    for name, view in views.items():
        dataset.save_view(name, view, overwrite=True)
    return list(views)
