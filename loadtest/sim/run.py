"""Run the policies on one trace (in parallel processes) and put the figures in a table."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

from loadtest.sim.baselines import run_belady, run_random, run_ray
from loadtest.sim.config import SimConfig
from loadtest.sim.mesh import run_mesh
from loadtest.sim.tally import PolicyResult, Tally
from loadtest.sim.trace import Trace, make_trace
from modelmesh.placement.copies import CopyModelView, copy_targets

__all__ = ["POLICIES", "SimReport", "check_targets", "format_table", "run_policy", "simulate"]

Runner = Callable[[SimConfig, Trace, list[int], int, Tally], PolicyResult]


def _mesh_model_use(cfg: SimConfig, trace: Trace, sizes: list[int], capacity: int, tally: Tally) -> PolicyResult:
    return run_mesh(cfg, trace, sizes, capacity, tally, eviction="model", name="mesh, model-level use")


def _mesh_minute_use(cfg: SimConfig, trace: Trace, sizes: list[int], capacity: int, tally: Tally) -> PolicyResult:
    return run_mesh(cfg, trace, sizes, capacity, tally, eviction="minute", name="mesh, minute's use only")


def _mesh_copy_use(cfg: SimConfig, trace: Trace, sizes: list[int], capacity: int, tally: Tally) -> PolicyResult:
    return run_mesh(cfg, trace, sizes, capacity, tally, eviction="copy", name="mesh, copy's own use")


def _mesh_lru(cfg: SimConfig, trace: Trace, sizes: list[int], capacity: int, tally: Tally) -> PolicyResult:
    return run_mesh(cfg, trace, sizes, capacity, tally, eviction="lru", name="mesh, plain LRU")


# slowest first, so that with two processes the mesh runs beside the others
POLICIES: dict[str, Runner] = {
    "mesh": run_mesh,
    "mesh-minute": _mesh_minute_use,
    "mesh-model": _mesh_model_use,
    "mesh-copy": _mesh_copy_use,
    "mesh-lru": _mesh_lru,
    "ray": run_ray,
    "random": run_random,
    "belady": run_belady,
}
DEFAULT_POLICIES = ("mesh", "mesh-model", "ray", "random", "belady")


@dataclass(frozen=True, slots=True)
class SimReport:
    config: SimConfig
    requests: int
    capacity_bytes: int
    copies_target: int
    results: tuple[PolicyResult, ...]
    wall_s: float


def copies_target(cfg: SimConfig, rpm: float) -> int:
    """The copies the copy rules want for a model at ``rpm`` in a full cluster (the real rules)."""
    decision = copy_targets(CopyModelView("watched", 1, rpm), now_ms=0, threshold_rpm=cfg.threshold_rpm,
                            cluster_fullness=1.0, cluster_size=cfg.pods)
    return decision.target_copies


def run_policy(cfg: SimConfig, policy: str) -> PolicyResult:
    """One policy on the configuration's trace (rebuilt from the seed: the same in every process)."""
    trace = make_trace(cfg)
    sizes_np = cfg.model_sizes()
    capacity = cfg.pod_capacity(sizes_np)
    tally = Tally(cfg.pods, cfg.measure_from_ms, int(trace.times_ms[-1]) if len(trace) else 0,
                  trace.watched_from_ms, copies_target(cfg, trace.watched_rpm))
    return POLICIES[policy](cfg, trace, sizes_np.tolist(), capacity, tally)


def simulate(cfg: SimConfig, policies: Sequence[str] = DEFAULT_POLICIES, jobs: int = 2) -> SimReport:
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; choose from {', '.join(POLICIES)}")
    started = time.perf_counter()
    ordered = [p for p in POLICIES if p in policies]
    if jobs <= 1:
        results = [run_policy(cfg, p) for p in ordered]
    else:
        with ProcessPoolExecutor(max_workers=min(jobs, len(ordered))) as pool:
            results = list(pool.map(run_policy, [cfg] * len(ordered), ordered))
    trace = make_trace(cfg)
    sizes = cfg.model_sizes()
    return SimReport(cfg, len(trace), cfg.pod_capacity(sizes), copies_target(cfg, trace.watched_rpm),
                     tuple(results), time.perf_counter() - started)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def format_table(report: SimReport) -> str:
    """A Markdown table, one row per policy."""
    bound = next((r.hit_ratio for r in report.results if r.policy.startswith("belady")), None)
    rows = [
        "| policy | hit ratio | of Belady | loads/min | imbalance (max/mean) | hot model's copies after | refused | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report.results:
        of_bound = _pct(r.hit_ratio / bound) if bound else "-"
        imbalance = f"{r.imbalance:.2f}" if r.imbalance is not None else "-"
        if r.policy.startswith("belady"):
            copies = "-"
        elif r.copies_s is None:
            copies = f"never ({r.copies_target})"
        else:
            copies = f"{r.copies_s:.1f} s ({r.copies_target})"
        rows.append(f"| {r.policy} | {_pct(r.hit_ratio)} | {of_bound} | {r.loads_per_min:,.0f} | {imbalance} "
                    f"| {copies} | {r.refused} | {r.wall_s:.1f} |")
    return "\n".join(rows)


def check_targets(report: SimReport) -> list[str]:
    """The issue's targets for the mesh policy, each with its figure: met or not."""
    by = {r.policy: r for r in report.results}
    ray, bound = by.get("ray-style"), by.get("belady (bound)")
    lines = []
    for mesh in (r for r in report.results if r.policy.startswith("mesh")):
        if bound:
            ratio = mesh.hit_ratio / bound.hit_ratio
            lines.append(f"{mesh.policy}: hit ratio >= 95% of Belady: {_pct(ratio)} -> {_met(ratio >= 0.95)}")
        if mesh.imbalance is not None:
            lines.append(f"{mesh.policy}: imbalance <= 1.2: {mesh.imbalance:.2f} -> {_met(mesh.imbalance <= 1.2)}")
        if ray and mesh.imbalance is not None and ray.imbalance is not None:
            better = mesh.hit_ratio > ray.hit_ratio and mesh.imbalance < ray.imbalance
            lines.append(f"{mesh.policy}: better than ray-style on both: hit {_pct(mesh.hit_ratio)} vs "
                         f"{_pct(ray.hit_ratio)}, imbalance {mesh.imbalance:.2f} vs {ray.imbalance:.2f} -> {_met(better)}")
    lines.append(f"whole run: {report.wall_s:.0f} s -> {_met(report.wall_s < 300)} (< 300 s)")
    return lines


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def report_json(report: SimReport) -> dict[str, object]:
    return {
        "config": asdict(report.config),
        "requests": report.requests,
        "capacity_bytes": report.capacity_bytes,
        "copies_target": report.copies_target,
        "results": [asdict(r) for r in report.results],
        "wall_s": report.wall_s,
        "targets": check_targets(report),
    }
