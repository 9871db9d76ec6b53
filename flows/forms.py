"""Typed flow parameters from params.yaml's own models, so the Prefect UI renders a form.

A deployment's parameters are params.yaml sections (`train: TrainParams`, `ingest: IngestParams`,
...), their defaults the file's values when the deployment was served. What a run changes is
written into params.yaml before any stage runs, so dvc.lock records what produced the
outputs and `dvc repro` afterwards agrees, exactly like `pixelops run -S key=value`.

"What a run changes" is the difference between the run's values and the form's defaults, not
params.yaml: a form served an hour ago must not revert an edit made to params.yaml since. The
run's values count only where they were given (pydantic's fields-set), so an API call with
`{"train": {"epochs": 3}}` changes one key and leaves the rest of the section to params.yaml.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from tasks.params import Params, load_params, section_dict

# A flow parameter cannot be called `validate` (pydantic's own name): params.yaml's `validate:`
# section is the `validation` parameter. Every other parameter has its section's name.
PARAMETER = {"validate": "validation"}


def parameter_name(section: str) -> str:
    return PARAMETER.get(section, section)


def form_defaults(params: Params, sections: tuple[str, ...]) -> dict:
    """Deployment parameter defaults, by parameter name: each section as JSON, from params.yaml."""
    return {parameter_name(name): section_dict(params, name) for name in sections}


def _flatten(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict) and value:
        out: dict[str, object] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
        return out
    return {prefix: value}


def _given(model: BaseModel) -> dict:
    """The fields a caller set, nested models included (JSON values)."""
    return model.model_dump(mode="json", exclude_unset=True, by_alias=True)


def changes(given: dict[str, BaseModel | None], defaults: dict[str, dict]) -> list[str]:
    """`section.key=value` overrides for every given value that differs from the form default.

    `given` is by section, `defaults` by parameter name (what a deployment stores).
    """
    out = []
    for section, model in given.items():
        if model is None:
            continue
        base = _flatten(defaults.get(parameter_name(section)) or {})
        for key, value in _flatten(_given(model)).items():
            if key not in base or base[key] != value:
                out.append(f"{section}.{key}={json.dumps(value)}")  # JSON is valid YAML flow syntax
    return out


def _deployment_defaults() -> dict | None:
    """The deployment's stored parameters (the form's defaults); None outside a deployment run.

    Read from the deployment itself: prefect.runtime.deployment.parameters is the flow run's
    parameters, i.e. the values after the user's edits.
    """
    from prefect.client.orchestration import get_client
    from prefect.runtime import deployment

    if not deployment.id:
        return None
    with get_client(sync_client=True) as client:
        return client.read_deployment(deployment.id).parameters


def apply_form(root: str, given: dict[str, BaseModel | None], say=print) -> list[str]:
    """Write the run's changes into `root`/params.yaml (validated, comments kept); returns them.

    Call with the project's DVC writer lock held: a waiting run must not edit params.yaml
    under a running one.
    """
    from pixelops.params_file import set_params_file

    path = Path(root) / "params.yaml"
    defaults = _deployment_defaults()
    if defaults is None:  # called directly: compare with the file itself
        defaults = form_defaults(load_params(path), tuple(given))
    overrides = changes(given, defaults)
    if overrides:
        set_params_file(overrides, path, create=True)
        say(f"params.yaml updated from the run's parameters: {', '.join(overrides)}")
    return overrides
