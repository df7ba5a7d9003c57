"""Heads timed round by round in ONE process: paired time ratios that a drifting machine cannot bias.

    python benchmarks/bench_logprobs_paired.py --impls ours-3gemm,cce --n 4096 --v 32768,152064 --rounds 10
    python benchmarks/bench_logprobs_paired.py --dry-run --out /tmp/x                 # tiny, seconds (tests)

Why: ``bench_logprobs.py`` runs each (impl, case) in its own fresh process, one after the other; that is
what its memory column needs (a clean peak-RSS counter per impl), but its time ratios compare processes
minutes apart. On the 2-core boxes this project runs on, a machine's speed drifts over minutes (measured
on an Intel Xeon box, 2026-12-05: the same kernel took 4.7 s standing alone and 5.9-6.3 s a few minutes
into a sweep; in two order-swapped sweeps of ours-3gemm and CCE, whichever ran first was 15-20 % faster).
A ratio of two such rows is then partly a ratio of two moments.

Here every case is one process holding all the impls. After their warm-up (two calls each, compiling what
they compile), each round times one forward + backward of every impl, the order reversed every other round
(A B, B A, A B, ...), so a drift over the run hits all impls alike and a slow moment costs one round's pair,
not one impl's whole row (an even number of rounds, so each order weighs alike). Reported per impl: the
median time over rounds; per impl against ``--ref``: the median of the per-round ratios with a distribution-
free interval for it (order statistics, coverage >= 95 % stated), and how many rounds it was the faster;
``--pairs A/B,...`` adds other ratios from the same rounds (e.g. ``ours/gemm4``, the head against its own
GEMM floor, in the run that compares ours-3gemm with CCE). An impl whose fp64 check fails (``err`` above
``CHECK_TOL``) is reported WRONG, not ranked. Memory is not measured here (one process holds every impl's
allocations): take it from ``bench_logprobs.py``. What is timed (the loss, the impls) is exactly
``bench_logprobs.py``'s; each impl's numbers are checked against the fp64 reference first.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_logprobs as single  # the impls, inputs, step and checks are the same

ROOT = single.ROOT
DRY = {"n": [96], "v": [512], "hidden": 32, "rounds": 2, "check": (48, 256, 32)}
CHECK_TOL = 1e-4  # max |logp - fp64| and max relative gradient error a timed impl must meet


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Distribution-free interval for the median: order statistics ``(x_(k), x_(n+1-k))``, with its coverage.

    ``k`` is the largest with ``P(Binomial(n, 1/2) < k) <= (1 - level) / 2``; the coverage returned is the
    exact ``1 - 2 P(Binomial(n, 1/2) < k)`` (at n = 10: [x_(2), x_(9)], 97.9 %). Below n = 6 no pair of
    order statistics reaches 95 %: the range is returned with its (lower) coverage. A bootstrap of the
    median from ~10 values would be too narrow (it takes only a few distinct values).
    """
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan"), 0.0
    cdf = [sum(math.comb(n, j) for j in range(i + 1)) / 2**n for i in range(n)]  # P(B <= i)
    k = 1
    while k < n and cdf[k] <= (1 - level) / 2:  # P(B < k + 1) = cdf[k]
        k += 1
    coverage = 1 - 2 * (cdf[k - 1] if k >= 1 else 0.0)
    return xs[k - 1], xs[n - k], coverage


def ratio_stats(times: list[float], ref_times: list[float]) -> dict:
    """Per-round ratios ``times / ref_times``: their median, its interval and coverage, rounds won."""
    ratios = [a / b for a, b in zip(times, ref_times, strict=True)]
    lo, hi, coverage = median_interval(ratios)
    return {
        "ratio": round(statistics.median(ratios), 3), "ratio_lo": round(lo, 3), "ratio_hi": round(hi, 3),
        "coverage": round(coverage, 3), "faster_rounds": sum(r < 1.0 for r in ratios), "rounds": len(ratios),
    }  # fmt: skip


def paired_summary(times: dict[str, list[float]], ref: str) -> dict[str, dict]:
    """Per impl: median time; against ``ref``: per-round ratios' median, its interval, rounds won.

    The rounds alternate the order (A B, B A, ...); with an even count both orders weigh alike, so an
    effect of running second cancels in the median (odd counts are refused by the driver).
    """
    out = {}
    for impl, ts in times.items():
        row = {"median_s": round(statistics.median(ts), 3), "min_s": round(min(ts), 3), "rounds": len(ts)}
        if impl != ref and ref in times:
            row.update(ratio_stats(ts, times[ref]))
        out[impl] = row
    return out


def worker(spec: dict) -> dict:
    import torch

    from unipost.machine import QuietMonitor

    torch.set_num_threads(spec["threads"] or os.cpu_count() or 1)
    device, n, v, h = spec["device"], spec["n"], spec["v"], spec["hidden"]
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[spec["dtype"]]
    fns, checks = {}, {}
    for impl in spec["impls"]:
        fn, _variant = single._impl(impl, device)
        fns[impl] = fn
        if impl not in single.FLOORS:
            checks[impl] = [float(x) for x in single._check(fn, *spec["check"], dtype, device)]
    inputs = single._inputs(n, v, h, dtype, device)
    for fn in fns.values():  # warm-up at the measured shape: compiles happen here, not in a round
        for _ in range(2):
            single._step(fn, *inputs, device)
    times: dict[str, list[float]] = {impl: [] for impl in fns}
    order = list(fns)
    with QuietMonitor() as quiet:
        for r in range(spec["rounds"]):
            for impl in order if r % 2 == 0 else order[::-1]:
                times[impl].append(sum(single._step(fns[impl], *inputs, device)))
    quiet.warn_if_busy(f"paired N={n} V={v}")
    return {"times": times, "checks": checks, **quiet.record()}


def run_case(spec: dict, timeout: int) -> dict:
    return single.run_case(spec, timeout, script=__file__)


def render(cases: list[dict], header: list[str], ref: str) -> str:
    lines = [*header, ""]
    lines.append(
        f"| dtype | N | V | impl | median s | min s | **/ {ref} (median of rounds)** | interval (coverage) "
        "| faster rounds | err logp | err grad | load before/after | others cores | busy |"
    )
    lines.append("|---|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---|---:|---|")
    for c in cases:
        head = f"| {c['dtype']} | {c['N']} | {c['V']}"
        if c["status"] != "ok":
            lines.append(f"{head} | - | {c['status']} | | | | | | | | | |")
            continue
        for impl, s in c["summary"].items():
            ratio = f"**{s['ratio']:.3f}**" if "ratio" in s else "1 (ref)"
            interval = (
                f"[{s['ratio_lo']:.3f}, {s['ratio_hi']:.3f}] ({s['coverage']:.1%})" if "ratio" in s else "-"
            )
            won = f"{s['faster_rounds']}/{s['rounds']}" if "ratio" in s else "-"
            err, gerr = c["checks"].get(impl, [None, None])
            if s.get("wrong"):
                ratio, interval, won = "WRONG (fp64 check failed)", "-", "-"
            lines.append(
                f"{head} | {impl} | {s['median_s']:.3f} | {s['min_s']:.3f} | {ratio} | {interval} | {won} | "
                f"{single._f(err, '.1e')} | {single._f(gerr, '.1e')} | "
                f"{c['load1_before']}/{c['load1_after']} | {c['others_cores']} | "
                f"{'BUSY' if c['busy'] else 'no'} |"
            )
    pairs = [(c, name, s) for c in cases for name, s in c.get("pairs", {}).items()]
    if pairs:
        lines += ["", "Other pairs, from the same rounds (`--pairs`):", ""]
        lines.append(
            "| dtype | N | V | pair | **ratio (median of rounds)** | interval (coverage) | faster rounds |"
        )
        lines.append("|---|---:|---:|---|---:|---|---:|")
        for c, name, s in pairs:
            lines.append(
                f"| {c['dtype']} | {c['N']} | {c['V']} | {name} | **{s['ratio']:.3f}** | "
                f"[{s['ratio_lo']:.3f}, {s['ratio_hi']:.3f}] ({s['coverage']:.1%}) | "
                f"{s['faster_rounds']}/{s['rounds']} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--impls", default="ours-3gemm,cce", help=f"comma list from {single.IMPLS}")
    p.add_argument("--ref", default=None, help="the impl ratios are taken against (default: cce if listed)")
    p.add_argument(
        "--pairs", default="", help="more ratios A/B from the same rounds, comma list (e.g. ours/gemm4)"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", default="fp32", help="fp32 or bf16 (comma list)")
    p.add_argument("--n", default="4096", help="token rows, comma list")
    p.add_argument("--v", default="32768", help="vocabulary sizes, comma list")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--rounds", type=int, default=10, help="timed rounds, even (each runs every impl once)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all CPUs)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per case process")
    p.add_argument(
        "--mem-limit-gib", type=float, default=None, help="skip naive/CCE above (default 85%% free)"
    )
    p.add_argument("--out", default=str(single.RESULTS))
    p.add_argument("--name", default="logprobs-paired")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, 2 rounds: seconds (tests, CI)")
    args = p.parse_args(argv)
    args.impls = single._csv_list(args.impls)
    bad = [i for i in args.impls if i not in single.IMPLS]
    if bad or len(args.impls) < 2:
        p.error(f"--impls needs two or more of {single.IMPLS}; unknown: {bad}")
    if args.rounds < 2 or args.rounds % 2:
        p.error(f"--rounds must be even and >= 2 (both orders alike), got {args.rounds}")
    args.ref = args.ref or ("cce" if "cce" in args.impls else args.impls[0])
    if args.ref not in args.impls:
        p.error(f"--ref {args.ref} is not among --impls {args.impls}")
    args.pairs = [tuple(x.split("/", 1)) for x in single._csv_list(args.pairs)]
    bad_pairs = [f"{'/'.join(x)}" for x in args.pairs if len(x) != 2 or not set(x) <= set(args.impls)]
    if bad_pairs:
        p.error(f"--pairs must be A/B with both in --impls {args.impls}; got {bad_pairs}")
    args.dtype, args.n, args.v = (
        single._csv_list(args.dtype), single._csv_list(args.n, int), single._csv_list(args.v, int)
    )  # fmt: skip
    args.check, args.max_logits = (256, 2048, 64), {}
    if args.dry_run:
        args.n, args.v, args.hidden, args.rounds = DRY["n"], DRY["v"], DRY["hidden"], DRY["rounds"]
        args.check = DRY["check"]
        if args.name == "logprobs-paired":
            args.name = "logprobs-paired-dry-run"
    if args.mem_limit_gib is None:
        args.mem_limit_gib = 0.85 * single._mem_available_gib()
    return args


def main(argv: list[str] | None = None) -> int:
    from unipost.machine import header_line, machine_state

    args = parse_args(argv)
    threads = args.threads or os.cpu_count()
    state = machine_state()
    state["threads"] = threads
    started = time.time()
    header = [
        f"token_logprobs fwd+bwd, impls {', '.join(args.impls)} in ONE process per case, {args.rounds} "
        f"rounds alternating order (ABBA); ratios against {args.ref} per round; device={args.device}, "
        f"H={args.hidden}, torch {__import__('torch').__version__}; started "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}",
        f"machine at start: {header_line(state)}",
    ]
    print("\n".join(header), flush=True)
    cases = []
    for dtype in args.dtype:
        for n in args.n:
            for v in args.v:
                case = {"dtype": dtype, "N": n, "V": v, "H": args.hidden, "device": args.device}
                skipped = [
                    f"{i}: {why}"
                    for i in args.impls
                    if (why := single._skip_reason(i, n, v, dtype, args.device, args))
                ]
                if skipped:
                    case["status"] = "; ".join(skipped)
                else:
                    spec = {**case, "n": n, "v": v, "hidden": args.hidden, "impls": args.impls}
                    spec.update(rounds=args.rounds, threads=threads, check=list(args.check))
                    case.update(run_case(spec, args.timeout))
                if case["status"] == "ok":
                    case["summary"] = paired_summary(case["times"], args.ref)
                    for impl, errs in case["checks"].items():
                        if max(errs) > CHECK_TOL:
                            case["summary"][impl]["wrong"] = True
                    times = case["times"]
                    case["pairs"] = {f"{a}/{b}": ratio_stats(times[a], times[b]) for a, b in args.pairs}
                cases.append(case)
                print(f"  {dtype} N={n} V={v}: {case['status']} {case.get('summary', '')}", flush=True)
    end = machine_state()
    header.append(
        f"machine at end: load average {end['load1']}/{end['load5']}/{end['load15']}; run took "
        f"{time.time() - started:.0f} s. Interval: order statistics of the per-round ratios "
        "(distribution-free, coverage stated)."
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / f"{args.name}.md", out / f"{args.name}.json"
    md.write_text(render(cases, header, args.ref))
    js.write_text(json.dumps({"header": header, "ref": args.ref, "cases": cases}, indent=1) + "\n")
    print(md.read_text())
    print(f"wrote {md}, {js}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    else:
        sys.exit(main())
