#!/usr/bin/env bash
# ci-minutes: 8
# Ray environment workers: tests/test_ray_envs.py with a real local Ray (num_cpus=2).
# Ray is an optional extra ('unipost[ray]', ~240 MB installed, ~1.5 min to install here), too heavy for
# the dev extra, so the default suite skips those tests. This job installs ray into its own target
# directory ($UNIPOST_RAY_SITE, default /tmp/unipost-ray-site, first on PYTHONPATH), never into .venv: only ray and those of
# its dependencies that .venv lacks, without re-resolving what .venv already has.
set -uo pipefail
cd "$(dirname "$0")/../.."
. .venv/bin/activate
target="${UNIPOST_RAY_SITE:-${TMPDIR:-/tmp}/unipost-ray-site}"
if ! python -c "import ray" 2>/dev/null; then
  missing=$(python - <<'PY'
import importlib.util
deps = {"msgpack": "msgpack", "requests": "requests", "urllib3": "urllib3",
        "charset_normalizer": "charset-normalizer", "idna": "idna", "certifi": "certifi",
        "click": "click", "filelock": "filelock", "jsonschema": "jsonschema",
        "google.protobuf": "protobuf", "yaml": "pyyaml", "packaging": "packaging"}
def present(module):
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False
print(" ".join(pip for module, pip in deps.items() if not present(module)))
PY
)
  # shellcheck disable=SC2086
  if ! python -m pip install -q --no-deps --target "$target" "ray==2.60.0" $missing; then
    echo "SKIP 30-ray: ray cannot be installed on this machine"
    exit 0
  fi
  export PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}"
fi
python -c "import ray; print('ray', ray.__version__)" || { echo "SKIP 30-ray: ray does not import"; exit 0; }
exec python -m pytest -q -p no:cacheprovider -m slow tests/test_ray_envs.py
