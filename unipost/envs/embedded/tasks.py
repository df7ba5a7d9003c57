"""Procedurally generated bug-fixing tasks: a tiny Python package with ONE seeded, realistic bug.

Why procedural: the paper's SWE-Gym world needs Docker images per repository; this world runs anywhere
in milliseconds yet keeps the structure that makes long-horizon agents fail (localise across files,
follow helper calls, edit exactly, verify, submit). Task ``i`` of split ``s`` at difficulty ``d`` is a
pure function of ``(s, i, d)``: no global random state, no clock, no hash randomisation.

A package is a chain of list transforms spread over modules: the public function named in the issue
(``api``) calls a helper, which calls a helper in a later module, ... ``depth`` hops down the chain sits
the bug (one mutation from a family: wrong comparison, off-by-one, wrong operator / constant, swapped
arguments, wrong variable returned). Distractor functions and distractor public functions surround it.
Modules only import from later modules, so there are never import cycles.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from typing import Any, Literal

Split = Literal["train", "heldout"]
SPLIT_SEED_OFFSET: dict[str, int] = {"train": 0, "heldout": 1_000_000_000}
MAX_INDEX = 1_000_000_000  # seeds of the two splits never overlap

MUTATION_FAMILIES = (
    "wrong_comparison",
    "off_by_one",
    "wrong_operator",
    "wrong_constant",
    "swapped_arguments",
    "wrong_variable",
)


@dataclass(frozen=True)
class Difficulty:
    """Knobs that set the expert's horizon: ~6 turns at depth 0, ~24 at depth 9."""

    n_files: int = 3  # modules in the package (the first holds the public API)
    n_distractors: int = 2  # distractor functions per module
    depth: int = 1  # hops from the public function named in the issue to the buggy helper
    name: str = "custom"

    def __post_init__(self) -> None:
        if self.n_files < 1 or self.n_distractors < 0 or self.depth < 0:
            raise ValueError(f"Invalid difficulty {self}: need n_files >= 1, n_distractors >= 0, depth >= 0.")

    @property
    def key(self) -> str:
        return f"f{self.n_files}-x{self.n_distractors}-d{self.depth}"


DIFFICULTIES: dict[str, Difficulty] = {
    "easy": Difficulty(2, 1, 0, "easy"),
    "medium": Difficulty(3, 2, 1, "medium"),
    "hard": Difficulty(4, 2, 3, "hard"),
    "expert": Difficulty(6, 2, 5, "expert"),
    "marathon": Difficulty(10, 1, 9, "marathon"),
}


def get_difficulty(difficulty: str | Difficulty) -> Difficulty:
    if isinstance(difficulty, Difficulty):
        return difficulty
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"Unknown difficulty {difficulty!r}; choose one of {sorted(DIFFICULTIES)}.")
    return DIFFICULTIES[difficulty]


@dataclass(frozen=True)
class Bug:
    path: str  # file holding the bug, relative to the workspace root
    function: str
    family: str
    buggy: str  # the mutated code fragment
    fixed: str  # the original fragment
    explanation: str  # one sentence, used by the scripted expert


@dataclass(frozen=True)
class Task:
    task_id: str
    split: str
    index: int
    difficulty: Difficulty
    package: str
    files: dict[str, str]  # relative path -> content, WITH the bug (the agent's starting workspace)
    fixed_files: dict[str, str]  # the same files after the reference fix
    hidden_tests: dict[str, str]  # relative path -> content; never placed in the agent's workspace
    issue: str
    bug: Bug
    chain: tuple[tuple[str, str], ...]  # (function, path) from the public function down to the bug
    reproduce: str  # a python snippet that shows the symptom
    bug_raises: bool  # the buggy call raises instead of returning a wrong value
    meta: dict[str, Any] = field(default_factory=dict)

    def content_key(self) -> str:
        """A digest of everything the agent sees; used to check that splits share no task."""
        import hashlib

        blob = "\n".join(f"{p}\n{c}" for p, c in sorted(self.files.items())) + self.issue
        return hashlib.sha256(blob.encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Transform templates. Each body maps ``xs`` (a list of ints) to a list of ints; a mutation replaces
# one fragment. ``{c}``/``{d}``/``{hi}``/``{pair}`` are filled per instance.
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Template:
    verbs: tuple[str, ...]
    doc: str
    body: str
    mutations: tuple[tuple[str, str, str, str], ...]  # (family, fragment, replacement, explanation)
    uses_pair: bool = False


_TEMPLATES: tuple[_Template, ...] = (
    _Template(
        ("cap", "clip", "limit"),
        "Cap every value at {c}.",
        "    out = []\n    for x in xs:\n        if x > {c}:\n            out.append({c})\n"
        "        else:\n            out.append(x)\n    return out\n",
        (
            ("wrong_comparison", "if x > {c}:", "if x < {c}:", "the comparison is reversed"),
            ("wrong_variable", "out.append({c})", "out.append(x)", "it appends the value instead of the cap"),
        ),
    ),
    _Template(
        ("accumulate", "cumulate", "tally"),
        "Running totals of the values.",
        "    out = []\n    total = 0\n    for x in xs:\n        total = total + x\n"
        "        out.append(total)\n    return out\n",
        (
            ("wrong_operator", "total = total + x", "total = total - x", "it subtracts instead of adding"),
            (
                "wrong_variable",
                "out.append(total)",
                "out.append(x)",
                "it appends x instead of the running total",
            ),
        ),
    ),
    _Template(
        ("scale", "rescale", "calibrate"),
        "Apply the linear calibration x * {c} + {d}.",
        "    return [x * {c} + {d} for x in xs]\n",
        (
            ("wrong_constant", "x * {c} + {d}", "x * {c} + {d1}", "the offset constant is wrong"),
            ("wrong_operator", "x * {c} + {d}", "x * {c} - {d}", "the offset is subtracted instead of added"),
        ),
    ),
    _Template(
        ("diff", "delta", "steps"),
        "Differences between consecutive values.",
        "    out = []\n    for i in range(1, len(xs)):\n"
        "        out.append(xs[i] - xs[i - 1])\n    return out\n",
        (
            ("off_by_one", "range(1, len(xs))", "range(2, len(xs))", "the loop skips the first difference"),
            ("swapped_arguments", "xs[i] - xs[i - 1]", "xs[i - 1] - xs[i]", "the operands are swapped"),
        ),
    ),
    _Template(
        ("dedupe", "distinct", "unique"),
        "Drop repeated values, keeping first occurrences in order.",
        "    result = []\n    seen = set()\n    for x in xs:\n        if x not in seen:\n"
        "            seen.add(x)\n            result.append(x)\n    return result\n",
        (
            (
                "wrong_variable",
                "    return result\n",
                "    return xs\n",
                "it returns the input instead of result",
            ),
        ),
    ),
    _Template(
        ("chunk", "batch", "window"),
        "Sums of consecutive chunks of {c} values.",
        "    out = []\n    for start in range(0, len(xs), {c}):\n"
        "        out.append(sum(xs[start:start + {c}]))\n    return out\n",
        (
            (
                "off_by_one",
                "xs[start:start + {c}]",
                "xs[start:start + {c} + 1]",
                "the slice takes one value too many",
            ),
            ("off_by_one", "range(0, len(xs), {c})", "range(1, len(xs), {c})", "the chunks start at index 1"),
        ),
    ),
    _Template(
        ("sift", "drop", "prune"),
        "Drop the multiples of {c}.",
        "    return [x for x in xs if x % {c} != 0]\n",
        (
            ("wrong_comparison", "x % {c} != 0", "x % {c} == 0", "the filter condition is inverted"),
            ("wrong_constant", "x % {c} != 0", "x % {c1} != 0", "it uses the wrong modulus"),
        ),
    ),
    _Template(
        ("quantize", "snap", "floor"),
        "Round each value down to a multiple of {c}.",
        "    return [{pair}(x, {c}) for x in xs]\n",
        (("swapped_arguments", "{pair}(x, {c})", "{pair}({c}, x)", "the arguments of {pair} are swapped"),),
        uses_pair=True,
    ),
    _Template(
        ("clamp", "bound", "restrict"),
        "Clamp values into [{c}, {hi}].",
        "    return [min(max(x, {c}), {hi}) for x in xs]\n",
        (
            (
                "swapped_arguments",
                "min(max(x, {c}), {hi})",
                "min(max(x, {hi}), {c})",
                "the bounds are swapped",
            ),
        ),
    ),
    _Template(
        ("top", "largest", "leading"),
        "The {c} largest values, largest first.",
        "    return sorted(xs, reverse=True)[:{c}]\n",
        (
            ("off_by_one", "[:{c}]", "[:{c} - 1]", "it keeps one value too few"),
            ("wrong_comparison", "reverse=True", "reverse=False", "it sorts ascending instead of descending"),
        ),
    ),
)

_PACKAGES = (
    "meterkit",
    "gradebook",
    "stockpile",
    "tidestat",
    "pixelops",
    "ledgerlite",
    "sensorhub",
    "queuekit",
)
_NOUNS = (
    "readings",
    "scores",
    "prices",
    "levels",
    "samples",
    "counts",
    "ticks",
    "weights",
    "points",
    "votes",
)
_API_VERBS = ("report", "summarize", "process", "prepare", "analyze", "export", "render", "collect")
_MODULES = (
    "core",
    "filters",
    "transforms",
    "metrics",
    "windows",
    "scaling",
    "pipeline",
    "stages",
    "ops",
    "helpers",
)
_API_MODULES = ("api", "service", "public")


@dataclass
class _Func:
    name: str
    module: int
    template: _Template | None  # None: the 2-argument pair helper
    params: dict[str, Any]
    callee: str | None = None
    mutation: tuple[str, str, str, str] | None = None

    def source(self, buggy: bool) -> str:
        p = self.params
        if self.template is None:
            return (
                f'def {self.name}(value, step):\n    """Round ``value`` down to a multiple of ``step``."""\n'
                f"    return value - value % step\n"
            )
        doc = self.template.doc.format(**p)
        body = self.template.body.format(**p)
        if buggy and self.mutation is not None:
            frag = self.mutation[1].format(**p)
            assert body.count(frag) == 1, (self.name, frag)
            body = body.replace(frag, self.mutation[2].format(**p))
        pre = f"    xs = {self.callee}(xs)\n" if self.callee else ""
        return f'def {self.name}(xs):\n    """{doc}"""\n{pre}{body}'


def task_seed(split: str, index: int) -> int:
    if split not in SPLIT_SEED_OFFSET:
        raise ValueError(f"Unknown split {split!r}; choose one of {sorted(SPLIT_SEED_OFFSET)}.")
    if not 0 <= index < MAX_INDEX:
        raise ValueError(f"Task index {index} out of range [0, {MAX_INDEX}).")
    return SPLIT_SEED_OFFSET[split] + index


def generate_task(split: str, index: int, difficulty: str | Difficulty = "medium") -> Task:
    """Task ``index`` of ``split``: a pure function of its arguments."""
    diff = get_difficulty(difficulty)
    seed = task_seed(split, index)
    for attempt in range(50):  # a draw whose bug is invisible on every input is redrawn
        rng = random.Random(f"unipost-embedded/{seed}/{diff.key}/{attempt}")
        task = _try_generate(rng, split, index, diff, attempt)
        if task is not None:
            return task
    raise RuntimeError(f"Could not generate a task with a visible bug for {split}/{index}/{diff.key}.")


def _try_generate(rng: random.Random, split: str, index: int, diff: Difficulty, attempt: int) -> Task | None:
    package = rng.choice(_PACKAGES)
    noun_pool = list(_NOUNS)
    rng.shuffle(noun_pool)
    n_mod = diff.n_files
    mod_names = [rng.choice(_API_MODULES), *rng.sample(_MODULES, n_mod - 1)] if n_mod > 1 else ["api"]
    used: set[str] = set()

    def fresh_name(template: _Template | None, api: bool = False) -> str:
        for _ in range(200):
            verb = (
                rng.choice(_API_VERBS) if api else rng.choice(template.verbs if template else ("quantize",))
            )
            name = f"{verb}_{rng.choice(noun_pool)}"
            if name not in used:
                used.add(name)
                return name
        raise RuntimeError("name pool exhausted")

    def instance(module: int, template: _Template | None = None, api: bool = False) -> _Func:
        template = template or rng.choice(_TEMPLATES)
        c = rng.randint(2, 5)
        params = {"c": c, "c1": c + 1, "d": rng.randint(1, 4), "hi": c + rng.randint(3, 8), "pair": ""}
        params["d1"] = params["d"] + 1
        return _Func(fresh_name(template, api), module, template, params)

    funcs: list[_Func] = []
    pair = _Func(fresh_name(None), n_mod - 1, None, {})

    # the chain: api (module 0) -> h1 -> ... -> h_depth (buggy) [-> one clean tail helper]
    chain: list[_Func] = [instance(0, api=True)]
    if diff.depth <= n_mod - 1:  # strictly deeper modules while there are enough of them
        hops = sorted(rng.sample(range(1, n_mod), diff.depth))
    else:
        hops = sorted(
            rng.choice(range(max(1, n_mod - 1), n_mod)) if n_mod > 1 else 0 for _ in range(diff.depth)
        )
        hops = sorted(list(range(1, n_mod)) + hops[: diff.depth - (n_mod - 1)])
    for module in hops:
        chain.append(instance(module))
    module = chain[-1].module
    buggy = chain[-1]
    if rng.random() < 0.4:  # the buggy function is not always a leaf
        chain.append(instance(rng.randint(module, n_mod - 1)))
    for a, b in itertools.pairwise(chain):
        a.callee = b.name
    family_choices = list(buggy.template.mutations)
    buggy.mutation = rng.choice(family_choices)
    funcs.extend(chain)

    # distractors: per module, some public ones in the API module calling later modules
    for m in range(n_mod):
        for _ in range(diff.n_distractors):
            f = instance(m, api=(m == 0))
            if m < n_mod - 1 and rng.random() < 0.5:
                g = instance(rng.randint(m + 1, n_mod - 1))
                f.callee = g.name
                funcs.append(g)
            funcs.append(f)
    needs_pair = any(f.template is not None and f.template.uses_pair for f in funcs)
    for f in funcs:  # the pair helper lives in the last module, which imports nothing: no cycles
        if f.template is not None and f.template.uses_pair:
            f.params["pair"] = pair.name
    if needs_pair:
        funcs.append(pair)

    by_name = {f.name: f for f in funcs}
    files: dict[str, str] = {}
    fixed_files: dict[str, str] = {}
    for m, mod in enumerate(mod_names):
        members = [f for f in funcs if f.module == m]
        rng.shuffle(members)
        path = f"{package}/{mod}.py"
        files[path] = _module_source(mod, members, by_name, mod_names, m, buggy=True)
        fixed_files[path] = _module_source(mod, members, by_name, mod_names, m, buggy=False)
    public = sorted({f.name for f in funcs if f.module == 0})
    init = f'"""{package}: small utilities for {noun_pool[0]}."""\n\n'
    init += "".join(f"from .{mod_names[0]} import {n}\n" for n in public)
    init += f"\n__all__ = {public!r}\n"
    files[f"{package}/__init__.py"] = init
    fixed_files[f"{package}/__init__.py"] = init

    # ground truth by executing our own generated (trusted) code in a flat namespace
    good = _flat_namespace(funcs, buggy=False)
    bad = _flat_namespace(funcs, buggy=True)
    api = chain[0].name
    failing, passing = [], []
    for _ in range(60):
        n = rng.randint(5, 9)
        xs = [rng.randint(1, 20) for _ in range(n)]
        xs.insert(rng.randint(0, n), rng.choice(xs))  # a repeat, so dedupe-like bugs can show
        want = good[api](list(xs))
        try:
            got: Any = bad[api](list(xs))
        except Exception as exc:  # the bug may raise (e.g. a swapped argument hitting zero)
            got = exc
        (failing if got != want else passing).append((xs, want, got))
        if len(failing) >= 3:
            break
    if not failing:
        return None
    distractor_api = sorted(n for n in public if n != api)
    extra = []
    for name in distractor_api[:3]:
        xs = [rng.randint(1, 20) for _ in range(6)]
        extra.append((name, xs, good[name](list(xs))))

    mod0 = mod_names[0]
    issue_xs, issue_want, issue_got = failing[0]
    call = f"{api}({issue_xs})"
    reproduce = f"from {package}.{mod0} import {api}\nprint({call})"
    bug_raises = isinstance(issue_got, Exception)
    symptom = (
        f"it raises `{type(issue_got).__name__}: {issue_got}`" if bug_raises else f"it prints `{issue_got}`"
    )
    issue = (
        f"`{package}.{mod0}.{api}` returns a wrong result.\n\n"
        f"When I run\n\n```python\n{reproduce}\n```\n\n{symptom}, but I expected `{issue_want}`.\n"
        f"Please fix the package so that `{api}` behaves correctly. The repository is at /testbed."
    )
    buggy_path = f"{package}/{mod_names[buggy.module]}.py"
    fam, frag, repl, why = buggy.mutation
    bug = Bug(
        path=buggy_path,
        function=buggy.name,
        family=fam,
        buggy=repl.format(**buggy.params),
        fixed=frag.format(**buggy.params),
        explanation=why.format(**buggy.params),
    )
    tests = _hidden_tests(package, mod0, api, failing + passing[:2], extra)
    chain_paths = tuple((f.name, f"{package}/{mod_names[f.module]}.py") for f in chain[: diff.depth + 1])
    return Task(
        task_id=f"{split}-{diff.key}-{index}",
        split=split,
        index=index,
        difficulty=diff,
        package=package,
        files=files,
        fixed_files=fixed_files,
        hidden_tests={"test_hidden.py": tests},
        issue=issue,
        bug=bug,
        chain=chain_paths,
        reproduce=reproduce,
        bug_raises=bug_raises,
        meta={"attempt": attempt, "family": fam, "api": api},
    )


def _module_source(
    mod: str, members: list[_Func], by_name: dict[str, _Func], names, m: int, buggy: bool
) -> str:
    imports: dict[int, set[str]] = {}
    for f in members:
        deps = [f.callee] if f.callee else []
        if f.template is not None and f.template.uses_pair:
            deps.append(f.params["pair"])
        for dep in deps:
            target = by_name[dep].module
            if target != m:
                imports.setdefault(target, set()).add(dep)
    head = f'"""{mod.capitalize()} functions."""\n'
    if imports:
        head += "\n" + "".join(
            f"from .{names[t]} import {', '.join(sorted(ns))}\n" for t, ns in sorted(imports.items())
        )
    return head + "".join("\n\n" + f.source(buggy) for f in members)


def _flat_namespace(funcs: list[_Func], buggy: bool) -> dict[str, Any]:
    ns: dict[str, Any] = {}
    exec("\n\n".join(f.source(buggy) for f in funcs), ns)
    return ns


def _hidden_tests(package: str, mod0: str, api: str, cases, extra) -> str:
    """Plain-assert test functions (pytest-compatible); the verifier's tiny runner calls them directly,
    which avoids importing unittest/pytest in every verification (most of a verification's cost)."""
    names = sorted({api} | {name for name, _, _ in extra})
    lines = [
        '"""Hidden tests: copied in only for verification, never visible to the agent."""',
        "",
        f"from {package}.{mod0} import {', '.join(names)}",
        "",
    ]
    tests = [(f"{api}_{i}", api, xs, want) for i, (xs, want, _got) in enumerate(cases)]
    tests += [(name, name, xs, want) for name, xs, want in extra]
    for test, fn, xs, want in tests:
        lines += [
            "",
            f"def test_{test}():",
            f"    got = {fn}({xs})",
            f'    assert got == {want}, f"returned {{got!r}}, expected {want}"',
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"
