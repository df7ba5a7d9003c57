"""SWE-Gym / SWE-bench instances: loader, split selection, image names, harness predictions, Docker boundary.

No Docker engine and no ``swebench`` here: the tests go up to that boundary and check the error names
what is missing. The fixture is project-made (tests/fixtures/swe/README.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unipost._optional import OptionalDependencyError, available
from unipost.envs.swe import (
    DockerSWEEnv,
    DockerUnavailableError,
    InstanceFormatError,
    evaluate_predictions,
    harness_command,
    heldout_bucket,
    image_name,
    load_instances,
    split_instances,
    write_dataset,
    write_predictions,
)

FIXTURE = Path(__file__).parent / "fixtures" / "swe" / "instances.jsonl"


@pytest.fixture(scope="module")
def instances():
    return load_instances(FIXTURE)


def test_loader_parses_the_public_format(instances):
    assert [i.instance_id for i in instances] == [
        "unipost-fixtures__tinycalc-1",
        "unipost-fixtures__tinycalc-2",
        "unipost-fixtures__strkit-7",
    ]
    first = instances[0]
    assert first.repo == "unipost-fixtures/tinycalc" and len(first.base_commit) == 40
    assert first.FAIL_TO_PASS == ("tests/test_stats.py::test_mean_empty",)  # JSON-encoded in the file
    assert first.PASS_TO_PASS == ("tests/test_stats.py::test_mean",)
    assert first.version == "0.1" and first.patch.startswith("diff --git a/tinycalc/stats.py")
    assert first.extra["unipost_note"].startswith("Made by the unipost project")
    # to_record gives the public format back, byte for byte on the fields it read
    line = json.loads(FIXTURE.read_text().splitlines()[0])
    assert first.to_record() == line


def test_loader_errors_name_the_line_and_the_problem(tmp_path):
    good = json.loads(FIXTURE.read_text().splitlines()[0])
    cases = {
        "not json": "not valid JSON",
        json.dumps({k: v for k, v in good.items() if k != "patch"}): "missing field(s) ['patch']",
        json.dumps({**good, "FAIL_TO_PASS": "[1, 2]"}): "FAIL_TO_PASS must be a list of test names",
        json.dumps({**good, "repo": "norepo"}): "repo must be 'owner/name'",
        json.dumps({**good, "base_commit": 7}): "field 'base_commit' must be a string",
    }
    for line, message in cases.items():
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(good) + "\n\n" + line + "\n")
        with pytest.raises(InstanceFormatError, match=r"bad\.jsonl:3") as info:
            load_instances(path)
        assert message in str(info.value)
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(InstanceFormatError, match="duplicate instance_id"):
        load_instances(path)
    with pytest.raises(FileNotFoundError, match=r"env\.tasks_path"):
        load_instances(tmp_path / "missing.jsonl")


def test_plain_list_test_fields_are_accepted(tmp_path):
    record = json.loads(FIXTURE.read_text().splitlines()[1])
    record["FAIL_TO_PASS"] = ["a::b"]
    (tmp_path / "x.jsonl").write_text(json.dumps(record) + "\n")
    assert load_instances(tmp_path / "x.jsonl")[0].FAIL_TO_PASS == ("a::b",)


def test_heldout_split_is_a_stable_hash_partition(instances):
    ids = [f"owner__repo-{n}" for n in range(400)]
    buckets = [heldout_bucket(i) for i in ids]
    assert all(0 <= b < 1 for b in buckets) and buckets == [heldout_bucket(i) for i in ids]
    share = sum(b < 0.25 for b in buckets) / len(ids)
    assert 0.18 < share < 0.32  # ~uniform: 400 draws, tolerance ~3 sigma
    train = split_instances(instances, "train", heldout_fraction=0.5)
    held = split_instances(instances, "heldout", heldout_fraction=0.5)
    assert sorted(i.instance_id for i in train + held) == sorted(i.instance_id for i in instances)
    assert not {i.instance_id for i in train} & {i.instance_id for i in held}
    # adding or dropping other instances never moves one across the split
    assert split_instances(instances[:2], "heldout", heldout_fraction=0.5) == [
        i for i in held if i in instances[:2]
    ]
    assert split_instances(instances, "heldout", heldout_fraction=0.0) == []
    assert split_instances(instances, "all") == instances


def test_split_file_decides_and_is_checked(instances, tmp_path):
    f = tmp_path / "split.json"
    f.write_text(json.dumps({"train": ["unipost-fixtures__strkit-7"], "heldout": []}))
    assert [i.instance_id for i in split_instances(instances, "train", split_file=f)] == [
        "unipost-fixtures__strkit-7"
    ]
    f.write_text(json.dumps({"train": ["nope__nope-1"]}))
    with pytest.raises(InstanceFormatError, match="unknown instance ids"):
        split_instances(instances, "train", split_file=f)
    with pytest.raises(ValueError, match="split must be"):
        split_instances(instances, "test")  # type: ignore[arg-type]


def test_image_names_follow_the_swebench_and_swegym_schemes(instances):
    assert (
        image_name("django__django-11099")
        == "docker.io/swebench/sweb.eval.x86_64.django_1776_django-11099:latest"
    )
    assert (
        image_name("getmoto__moto-5406", "swegym")
        == "docker.io/xingyaoww/sweb.eval.x86_64.getmoto_s_moto-5406:latest"
    )
    assert image_name("Project-MONAI__MONAI-6975", "swegym").endswith("project-monai_s_monai-6975:latest")
    assert instances[0].image_name() == (
        "docker.io/swebench/sweb.eval.x86_64.unipost-fixtures_1776_tinycalc-1:latest"
    )
    with pytest.raises(ValueError, match="unknown image scheme"):
        image_name("a__b-1", "nope")  # type: ignore[arg-type]


def test_predictions_and_dataset_files_are_in_the_harness_format(instances, tmp_path):
    patches = {i.instance_id: i.patch for i in instances[:2]}
    path = write_predictions(patches, tmp_path / "preds.jsonl", model_name_or_path="org/student")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [
        {"instance_id": k, "model_name_or_path": "org/student", "model_patch": v} for k, v in patches.items()
    ]
    dataset = write_dataset(instances, tmp_path / "data.jsonl")
    assert load_instances(dataset) == instances
    argv = harness_command(dataset, path, "run1", instance_ids=list(patches), max_workers=2, python="py")
    assert argv[:3] == ["py", "-m", "swebench.harness.run_evaluation"]
    assert argv[argv.index("--dataset_name") + 1] == str(dataset)  # a local .jsonl, as the harness accepts
    assert argv[argv.index("--predictions_path") + 1] == str(path)
    assert argv[argv.index("--instance_ids") + 1 :] == list(patches)
    with pytest.raises(TypeError, match="unified diff"):
        write_predictions({"a": None}, tmp_path / "bad.jsonl")  # type: ignore[dict-item]


def _boundary_error():
    return DockerUnavailableError if available("docker") else OptionalDependencyError


def test_docker_env_and_harness_stop_at_the_docker_boundary_with_a_clear_error(instances, tmp_path):
    env = DockerSWEEnv(instances[0], image_scheme="swegym")
    assert env.image == "docker.io/xingyaoww/sweb.eval.x86_64.unipost-fixtures_s_tinycalc-1:latest"
    assert [t["function"]["name"] for t in env.tools] == ["terminal", "file_editor", "think", "finish"]
    expected = _boundary_error()
    with pytest.raises(expected) as info:
        env.reset()
    text = str(info.value)
    assert ("Docker engine" in text) if expected is DockerUnavailableError else ("'docker'" in text)
    env.close()
    with pytest.raises(expected):
        evaluate_predictions(instances[:1], {instances[0].instance_id: instances[0].patch}, tmp_path)
    with pytest.raises(TypeError, match="SWEInstance"):
        DockerSWEEnv("django__django-1")  # type: ignore[arg-type]
