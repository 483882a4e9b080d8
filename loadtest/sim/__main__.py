"""``python -m loadtest.sim``: replay one trace against the mesh policy and the baselines."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from loadtest.sim.config import SimConfig
from loadtest.sim.run import DEFAULT_POLICIES, POLICIES, check_targets, format_table, report_json, simulate
from loadtest.sim.trace import TRACE_KINDS

_HELP = {
    "pods": "mesh pods (Ray replicas)",
    "models": "registered models",
    "memory_share": "pod memory in all, as a share of all models' bytes (0.10: memory for 10%%)",
    "size_median": "median model size in bytes (lognormal)",
    "size_sigma": "sigma of the log of model sizes",
    "rate": "requests per second, whole cluster",
    "duration_s": "simulated seconds",
    "warmup_s": "seconds before measuring",
    "trace": "popularity over time: " + ", ".join(TRACE_KINDS),
    "zipf_s": "Zipf exponent of model popularity",
    "shift_every_s": "shift trace: seconds between moves of the hot set",
    "shift_models": "shift trace: how many ranks the popularity moves each time",
    "burst_at_s": "burst trace: when the cold model's burst starts",
    "burst_x": "burst trace: the burst in multiples of the scale-up threshold",
    "service_ms": "how long a request occupies its pod",
    "threshold_rpm": "MM_SCALEUP_RPM_THRESHOLD: requests per minute per copy before more copies",
    "publish_ms": "how often pods republish their records",
    "copy_load": "in-flight counts routing among copies sees: local (what mesh.py knows) or global",
    "churn_guard_timeout_ms": "apply the churn guard with this load timeout (0: off)",
    "ray_max_ongoing": "Ray-style baseline: requests in flight at which a replica counts as busy",
    "seed": "seed of the trace, sizes and every random choice",
}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest.sim",
        description="Placement simulator: simulated pods and time, the real modelmesh.placement code, "
                    "and baselines (Ray Serve-style, random, Belady) on the same trace.",
    )
    defaults = SimConfig()
    for f in fields(SimConfig):
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        kind = type(default)
        kwargs: dict[str, object] = {"default": default, "type": kind, "help": f"{_HELP[f.name]} ({default})"}
        if f.name == "trace":
            kwargs["choices"] = TRACE_KINDS
        elif f.name == "copy_load":
            kwargs["choices"] = ("local", "global")
        ap.add_argument(flag, **kwargs)  # type: ignore[arg-type]
    ap.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                    help=f"comma-separated, from {', '.join(POLICIES)} ({','.join(DEFAULT_POLICIES)})")
    ap.add_argument("--jobs", type=int, default=2, help="processes running policies side by side (2)")
    ap.add_argument("--json", metavar="FILE", help="also write the configuration and figures as JSON")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cfg = SimConfig(**{f.name: getattr(args, f.name) for f in fields(SimConfig)})
    if cfg.warmup_s >= cfg.duration_s:
        print("error: --warmup-s must be shorter than --duration-s", file=sys.stderr)
        return 2
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    try:
        report = simulate(cfg, policies, jobs=args.jobs)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{cfg.pods} pods x {cfg.models:,} models, memory for {cfg.memory_share:.0%} "
          f"({report.capacity_bytes / 1e6:.1f} MB a pod), {cfg.trace} trace, Zipf s={cfg.zipf_s}, "
          f"{cfg.rate:,.0f} req/s for {cfg.duration_s:.0f} s ({report.requests:,} requests, "
          f"measured after {cfg.warmup_s:.0f} s), threshold {cfg.threshold_rpm:.0f} rpm")
    print()
    print(format_table(report))
    print()
    for line in check_targets(report):
        print(line)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report_json(report), out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
