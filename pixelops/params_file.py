"""Edit params.yaml in place, keeping its comments: the `-S key=value` of `pixelops run/ingest`."""

from __future__ import annotations

import os
from pathlib import Path

PARAMS = Path("params.yaml")


def set_params_file(overrides: list[str], path: Path | str = PARAMS, *, create: bool = False) -> None:
    """Write overrides into params.yaml atomically; refuse (changing nothing) any that do not validate.

    `create` adds keys the file leaves to the defaults (a Prefect form sets any field).
    """
    from ruamel.yaml import YAML

    from tasks.params import apply_overrides, from_dict, load_raw, parse_override

    path = Path(path)
    from_dict(apply_overrides(load_raw(path), overrides, create=create), origin=f"{path} with -S")  # raises first
    # ruamel's round-trip loader builds only plain mappings, lists and scalars (no arbitrary
    # objects, unlike PyYAML's yaml.load), and keeps comments and key order on dump.
    rt = YAML(typ="rt")
    doc = rt.load(path.read_text())
    for text in overrides:
        keys, value = parse_override(text)
        node = doc
        for k in keys[:-1]:
            if node.get(k) is None:  # only reached with `create`: validation above passed
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    tmp = path.with_suffix(".yaml.tmp")
    with tmp.open("w") as f:
        rt.dump(doc, f)
    os.replace(tmp, path)
