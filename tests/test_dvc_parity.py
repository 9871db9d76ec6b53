"""dvc.yaml, params.yaml, the stage registry and tasks/ agree: three doors, one room."""

from __future__ import annotations

import re

import yaml

from pixelops.stages import STAGES
from tasks.params import load_raw
from tests.conftest import ROOT


def _dvc():
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_stages_match_registry_and_modules():
    stages = _dvc()
    assert tuple(stages) == STAGES
    for name, stage in stages.items():
        assert stage["cmd"] == f"python -m tasks.{name}"
        assert f"tasks/{name}.py" in stage["deps"], f"{name}: its own source must be a dep"
        assert "tasks/params.py" in stage["deps"], f"{name}: tasks/params.py must be a dep"
        assert (ROOT / "tasks" / f"{name}.py").is_file()


def test_every_dep_file_exists_and_params_sections_exist():
    raw = load_raw(ROOT / "params.yaml")
    for name, stage in _dvc().items():
        for dep in stage["deps"]:
            if dep.startswith("tasks/"):
                assert (ROOT / dep).is_file(), f"{name}: dep {dep} missing"
        for key in stage.get("params", []):
            node = raw
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{name}: params key {key} not in params.yaml"
                node = node[part]
        if name in raw:
            assert name in stage["params"], f"{name}: must depend on its own params section"


def test_paths_are_templated_from_params():
    text = (ROOT / "dvc.yaml").read_text()
    assert "data/" not in re.sub(r"\$\{paths\.data\}/", "", text.split("stages:", 1)[1]).replace("tasks/", "")
    for name, stage in _dvc().items():
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", [])]
        assert any(o.endswith(f"/{name}") for o in outs), f"{name}: outputs go under <data|reports>/{name}"
