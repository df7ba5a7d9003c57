"""SWE-Gym / SWE-bench (Verified) task instances from a local JSONL in the public dataset format.

One JSON object per line with the fields of the Hugging Face datasets ``SWE-Gym/SWE-Gym`` and
``princeton-nlp/SWE-bench_Verified``: ``instance_id, repo, base_commit, problem_statement, patch,
test_patch, FAIL_TO_PASS, PASS_TO_PASS, version, environment_setup_commit, hints_text, created_at``.
``FAIL_TO_PASS`` / ``PASS_TO_PASS`` are JSON-encoded lists of test names in those datasets (plain lists
are accepted too). Unknown extra fields are kept in ``extra``. Nothing is downloaded: export the split
you need once (``datasets.load_dataset(...).to_json(path)``) and point ``env.tasks_path`` at it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

REQUIRED_FIELDS = (
    "instance_id",
    "repo",
    "base_commit",
    "problem_statement",
    "patch",
    "test_patch",
    "FAIL_TO_PASS",
    "PASS_TO_PASS",
)
OPTIONAL_FIELDS = ("version", "environment_setup_commit", "hints_text", "created_at")
ImageScheme = Literal["swebench", "swegym"]
# Docker image names per instance (tags may not contain "__"): SWE-bench's harness publishes
# swebench/sweb.eval.x86_64.<id with __ -> _1776_>; SWE-Gym's images (used by OpenHands for the
# paper's training set) are xingyaoww/sweb.eval.x86_64.<id with __ -> _s_>.
IMAGE_SCHEMES: dict[str, tuple[str, str]] = {
    "swebench": ("docker.io/swebench/sweb.eval.x86_64.", "_1776_"),
    "swegym": ("docker.io/xingyaoww/sweb.eval.x86_64.", "_s_"),
}


class InstanceFormatError(ValueError):
    """A line of the instances file is not a SWE-bench-format instance; the message names the line."""


@dataclass(frozen=True)
class SWEInstance:
    """One SWE-bench-format task: a repository at a commit, an issue, and the tests that decide it."""

    instance_id: str
    repo: str
    base_commit: str
    problem_statement: str
    patch: str  # the reference fix (never shown to the agent)
    test_patch: str  # tests added by the fix (applied only by the evaluation harness)
    FAIL_TO_PASS: tuple[str, ...]
    PASS_TO_PASS: tuple[str, ...]
    version: str = ""
    environment_setup_commit: str = ""
    hints_text: str = ""
    created_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def task_id(self) -> str:
        return self.instance_id

    def image_name(self, scheme: ImageScheme = "swebench") -> str:
        return image_name(self.instance_id, scheme)

    def to_record(self) -> dict[str, Any]:
        """The public format again (test lists JSON-encoded, as in the Hugging Face datasets)."""
        record = {name: getattr(self, name) for name in REQUIRED_FIELDS + OPTIONAL_FIELDS}
        record["FAIL_TO_PASS"] = json.dumps(list(self.FAIL_TO_PASS))
        record["PASS_TO_PASS"] = json.dumps(list(self.PASS_TO_PASS))
        return {**self.extra, **record}


def image_name(instance_id: str, scheme: ImageScheme = "swebench") -> str:
    """The per-instance evaluation image, e.g. ``django__django-11099`` ->
    ``docker.io/swebench/sweb.eval.x86_64.django_1776_django-11099:latest``."""
    if scheme not in IMAGE_SCHEMES:
        raise ValueError(f"unknown image scheme {scheme!r}; choose one of {sorted(IMAGE_SCHEMES)}")
    prefix, separator = IMAGE_SCHEMES[scheme]
    return f"{prefix}{instance_id.replace('__', separator)}:latest".lower()


def _test_list(value: Any, name: str, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError as exc:
            raise InstanceFormatError(f"{where}: {name} is not a JSON list of test names ({exc})") from exc
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise InstanceFormatError(f"{where}: {name} must be a list of test names, got {type(value).__name__}")
    return tuple(value)


def parse_instance(record: Any, where: str = "instance") -> SWEInstance:
    if not isinstance(record, dict):
        raise InstanceFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [f for f in REQUIRED_FIELDS if f not in record]
    if missing:
        raise InstanceFormatError(
            f"{where}: missing field(s) {missing}; SWE-bench-format instances need {list(REQUIRED_FIELDS)}"
        )
    for name in (*REQUIRED_FIELDS, *OPTIONAL_FIELDS):
        if name in ("FAIL_TO_PASS", "PASS_TO_PASS"):
            continue
        value = record.get(name, "")
        if value is not None and not isinstance(value, str):
            raise InstanceFormatError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    if "/" not in record["repo"]:
        raise InstanceFormatError(f"{where}: repo must be 'owner/name', got {record['repo']!r}")
    known = set(REQUIRED_FIELDS) | set(OPTIONAL_FIELDS)
    return SWEInstance(
        instance_id=record["instance_id"],
        repo=record["repo"],
        base_commit=record["base_commit"],
        problem_statement=record["problem_statement"],
        patch=record["patch"],
        test_patch=record["test_patch"],
        FAIL_TO_PASS=_test_list(record["FAIL_TO_PASS"], "FAIL_TO_PASS", where),
        PASS_TO_PASS=_test_list(record["PASS_TO_PASS"], "PASS_TO_PASS", where),
        **{name: record.get(name) or "" for name in OPTIONAL_FIELDS},
        extra={k: v for k, v in record.items() if k not in known},
    )


def load_instances(path: str | Path) -> list[SWEInstance]:
    """All instances of a JSONL file (blank lines skipped); duplicate ids are an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SWE instances file {path} does not exist (env.tasks_path)")
    instances: list[SWEInstance] = []
    seen: set[str] = set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InstanceFormatError(f"{where}: not valid JSON ({exc})") from exc
        instance = parse_instance(record, where)
        if instance.instance_id in seen:
            raise InstanceFormatError(f"{where}: duplicate instance_id {instance.instance_id!r}")
        seen.add(instance.instance_id)
        instances.append(instance)
    if not instances:
        raise InstanceFormatError(f"{path} holds no instances")
    return instances


def heldout_bucket(instance_id: str, salt: str = "unipost-heldout") -> float:
    """A stable number in [0, 1) per instance id (sha256, not Python's randomised ``hash``)."""
    digest = hashlib.sha256(f"{salt}/{instance_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_instances(
    instances: list[SWEInstance],
    split: Literal["train", "heldout", "all"],
    *,
    heldout_fraction: float = 0.1,
    split_file: str | Path | None = None,
    salt: str = "unipost-heldout",
) -> list[SWEInstance]:
    """The instances of one split, in file order.

    With ``split_file`` (JSON ``{"train": [ids], "heldout": [ids]}``) the file decides and every id in
    it must exist; otherwise an instance is held out iff ``heldout_bucket(id) < heldout_fraction``, so
    the split never changes when instances are added to or removed from the file.
    """
    if split == "all":
        return list(instances)
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    if split_file is not None:
        chosen = json.loads(Path(split_file).read_text())
        if not isinstance(chosen, dict) or split not in chosen:
            raise InstanceFormatError(f"{split_file}: expected a JSON object with a {split!r} list of ids")
        ids = list(chosen[split])
        by_id = {i.instance_id: i for i in instances}
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            raise InstanceFormatError(f"{split_file}: {len(unknown)} unknown instance ids: {unknown[:3]}")
        wanted = set(ids)
        return [i for i in instances if i.instance_id in wanted]
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
    held = [i for i in instances if heldout_bucket(i.instance_id, salt) < heldout_fraction]
    if split == "heldout":
        return held
    held_ids = {i.instance_id for i in held}
    return [i for i in instances if i.instance_id not in held_ids]
