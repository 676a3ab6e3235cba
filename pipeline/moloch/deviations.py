"""Every known difference from the authors' v1 run, as data (``data/deviations.csv``).

One row per topic: what v1 did (with the authors' file and line), what the
package does, the profile fields that decide it, the values that reproduce v1
(``faithful``, JSON; empty where v1 is unknowable or the row only documents),
the expected effect on the numbers, and whether the smoke profile deviates
further and why. Every field of the profile schema is named by some row, so a
new setting cannot be added without saying what v1 did (a test checks it), and
the simulation chapter renders the table for the run's own profile.

    >>> from moloch.deviations import for_profile
    >>> for_profile(load_profile("paper"))      # one row per topic, with this run's values
"""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pandas as pd
from pydantic import BaseModel

from .config import Profile
from .errors import DataError
from .paths import DATA_DIR

DEVIATIONS_FILE = DATA_DIR / "deviations.csv"
COLUMNS = ("id", "kind", "topic", "v1", "package", "fields", "faithful", "effect", "smoke")
KINDS = ("switch", "fixed", "unknowable", "setting", "operational")


def schema_fields(model: type[BaseModel] = Profile, prefix: str = "") -> list[str]:
    """Every leaf field of the profile schema as a dotted path (``players.top_p``)."""
    paths = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        inner = (annotation, *typing.get_args(annotation))
        sub = next((t for t in inner if isinstance(t, type) and issubclass(t, BaseModel)), None)
        paths += schema_fields(sub, f"{prefix}{name}.") if sub else [f"{prefix}{name}"]
    return paths


def load(path: Path = DEVIATIONS_FILE) -> pd.DataFrame:
    """The registry, checked: known columns and kinds, readable faithful values."""
    if not path.is_file():
        raise DataError(f"deviations registry {path} is missing: restore it from git")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if tuple(table.columns) != COLUMNS:
        raise DataError(f"{path}: columns are {list(table.columns)}, expected {list(COLUMNS)}")
    bad = sorted(set(table["kind"]) - set(KINDS))
    if bad:
        raise DataError(f"{path}: unknown kind(s) {bad}; use one of {KINDS}")
    try:
        table["faithful"] = [json.loads(v) if v else {} for v in table["faithful"]]
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: a faithful value is not JSON ({err})") from None
    table["fields"] = [[f for f in v.split(";") if f] for v in table["fields"]]
    return table


def value(profile: Profile, path: str) -> object:
    """A profile's value of a field path; for ``players.*`` the list over its players."""
    data = profile.model_dump(mode="json")
    head, _, rest = path.partition(".")
    found = data[head]
    if isinstance(found, list):
        return [_dig(item, rest) for item in found]
    return _dig(found, rest) if rest else found


def _dig(data, rest: str):
    for part in rest.split(".") if rest else []:
        if data is None:  # an unset sub-section (engine: None): its fields are unset too
            return None
        data = data[part]
    return data


def shown(value: object) -> str:
    """A setting as the report prints it: ``unset`` for None, lists joined."""
    if value is None:
        return "unset"
    if isinstance(value, list):
        return ", ".join(shown(v) for v in value)
    return str(value)


def unfaithful(profile: Profile, row) -> list[str]:
    """The fields of a row whose value in ``profile`` is not v1's (``field: ours, v1 theirs``)."""
    out = []
    for path, wanted in row["faithful"].items():
        ours = value(profile, path)
        values = ours if path.startswith("players.") else [ours]
        if any(v != wanted for v in values):
            out.append(f"{path}: {shown(ours)}, v1 {shown(wanted)}")
    return out


def for_profile(profile: Profile, path: Path = DEVIATIONS_FILE) -> pd.DataFrame:
    """The registry for one profile: each row with its values there and whether they are v1's."""
    table = load(path)
    rows = []
    for _, row in table.iterrows():
        off = unfaithful(profile, row)
        if row["kind"] == "switch":
            status = "differs: " + "; ".join(off) if off else "as v1"
        else:
            status = {"fixed": "differs (no switch)", "unknowable": "v1 unknown"}.get(
                row["kind"], "-"
            )
        values = {f: value(profile, f) for f in row["fields"]}
        rows.append({**row.to_dict(), "this_run": values, "status": status})
    return pd.DataFrame(rows)
