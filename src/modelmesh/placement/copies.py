"""How many copies of a model to keep, which copies to remove, and where to add new ones.

ModelMesh's copy rules (``MODELMESH-NOTES.md``, "Copies"), kept where they are good and simplified
where they are baroque. All of it is pure: snapshots and the time in, a decision with a reason out.

**Rate tracking** (:class:`RateWindow`). Each copy counts its requests in 10-second periods and
keeps the last six complete ones (a minute). Its rate for the copy rules is the *larger* of the
last complete period and the mean of the kept ones, both in requests per minute: up fast (a burst
shows at full strength at the end of its first complete period), down slow (a quiet period does not
hide a minute of traffic). A model's rate is the sum over its copies. Eviction uses the plain count
of the last minute instead (:meth:`RateWindow.minute_rpm`), where one request is one, not six.

**How many copies** (:func:`copy_targets`), run every period for each model in use:

1. **Load on every pod** (``all_pods``): as many copies as eligible pods.
2. **Minimum copies** (``min_copies``): at least that many, at most the eligible pods.
3. **Regular use**: a model with a copy, used in the last two minutes and also 7 to 40 minutes
   ago (:class:`UseHistory`), keeps a second copy for resilience, unless the cluster is more than
   90% full.
4. **Scale-up**: when the copies carry more than the copy limit each on average, the model
   gets ``ceil(total rpm / limit)`` copies, at most a third of the eligible pods (but two
   may always be had, so small clusters can scale up too). All missing copies are added in one step, so a model at 4x the threshold has its four
   copies at the end of its first complete period of that traffic: within two periods of the
   burst's start, wherever in a period it started. The copy limit (:func:`copy_limit_rpm`) is
   ``threshold_rpm``, or a tenth of the mean pod's published rate when that is lower: a copy
   that is a large part of its pod's work makes that pod the busiest wherever it lands, while
   many small copies let request routing (``placement.load.choose_copy``) even the pods out. At
   100 pods x 100,000 models (Zipf 1.0, 100 req/s a pod, the top model 8x a pod's rate) models
   between 1,200 and 2,000 rpm kept one copy each under the threshold alone, and pods that drew
   two or three of them served 1.4-1.5x the mean.
   4b. **Relief**: a model carrying at least a tenth of the limit per copy, on a pod whose published
   rate is over 1.05x the mean pod's and at least 100 rpm above it, gets one more copy (within
   the third of the cluster), and is not scaled down while a holder is busier than the mean.
5. **Scale-down**, one copy per model per run, only when all of these hold: the cluster is at
   least 95% full (space is needed; otherwise a spare copy costs nothing and adds resilience), the
   copies left would each carry less than 2/3 of the copy limit (so the removal cannot trigger
   rule 4 again), the copies have not changed for :data:`COOL_DOWN_MS`, and rules 1-3 do not
   need the copy. Never below one copy: removing the last copy is eviction's business.

The target never exceeds the eligible pods. Simplified from ModelMesh: no separate "two to one
after hours unused" rule (rule 5 and eviction cover it), and one step per model per run instead of
"at most 5% of a pod per run".

**Which copies go** (:func:`choose_copies_to_remove`): copies on pods that lack the model's pin
labels first, then the least busy (lowest rate: its traffic is the cheapest to move), never the last
copy, never below the minimum, never the last copy on a pinned pod.

**Where new copies go** (:func:`choose_new_copy_pods`): the least busy eligible pods
(``placement.load.filter_by_load`` over all of them: within 1.1x of the quietest for a model in
use), then ``placement.load.choose_load_target`` among those, once per copy, the current holders
and the pods already chosen excluded, each choice counted as a pending load and its share of the
traffic for the next, so the copies of one model, and of several models scaled up in the same
round, spread over the quiet pods.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Final

from modelmesh.placement.load import allowed_rate_ratio, choose_load_target, filter_by_load, project_pending
from modelmesh.placement.view import ClusterView, ModelView, PendingLoad

__all__ = [
    "COOL_DOWN_MS",
    "COPY_POD_SHARE",
    "RATE_PERIODS",
    "RATE_PERIOD_MS",
    "REGULAR_PRIOR_MAX_MIN",
    "REGULAR_PRIOR_MIN_MIN",
    "REGULAR_RECENT_MIN",
    "RELIEF_MIN_EXCESS_RPM",
    "RELIEF_MIN_SHARE",
    "RELIEF_POD_RATIO",
    "SCALE_DOWN_FULLNESS",
    "SCALE_DOWN_SHARE",
    "SCALE_UP_CLUSTER_SHARE",
    "SECOND_COPY_MAX_FULLNESS",
    "CopyDecision",
    "CopyModelView",
    "CopyPlacement",
    "HeldCopy",
    "RateWindow",
    "RemovalDecision",
    "UseHistory",
    "choose_copies_to_remove",
    "choose_new_copy_pods",
    "copy_limit_rpm",
    "copy_targets",
    "project_traffic",
]

# rate tracking: six 10-second periods make the one-minute window
RATE_PERIOD_MS: Final = 10_000
RATE_PERIODS: Final = 6
_PERIODS_PER_MINUTE: Final = 60_000 / RATE_PERIOD_MS
# regular use: used within the last 2 minutes, and also between 7 and 40 minutes ago
REGULAR_RECENT_MIN: Final = 1
REGULAR_PRIOR_MIN_MIN: Final = 7
REGULAR_PRIOR_MAX_MIN: Final = 40
SECOND_COPY_MAX_FULLNESS: Final = 0.90
# scale-up: at most this share of the eligible pods
SCALE_UP_CLUSTER_SHARE: Final = 3
# a copy carries at most this share of the mean pod's published request rate (when the caller
# knows it); see copy_limit_rpm
COPY_POD_SHARE: Final = 0.1
COPY_LIMIT_FLOOR_RPM: Final = 100.0
# relief: a model with at least this share of the copy limit per copy, on a pod whose published
# rate is above this multiple of the mean pod's, gets one more copy
RELIEF_POD_RATIO: Final = 1.05
RELIEF_MIN_SHARE: Final = 0.1
# ... and only when that pod is this far above the mean too: a pod at 12 rpm beside a mean of 6 is
# not a hot spot (records move by 100 rpm before they are republished: below that, noise)
RELIEF_MIN_EXCESS_RPM: Final = 100.0
# scale-down: only this full, only below this share of the threshold per remaining copy
SCALE_DOWN_FULLNESS: Final = 0.95
SCALE_DOWN_SHARE: Final = 2 / 3
# scale-down: copies unchanged for this long
COOL_DOWN_MS: Final = 3 * 60_000

_MINUTE_MS: Final = 60_000
_HISTORY_MINUTES: Final = 64
_HISTORY_MASK: Final = (1 << _HISTORY_MINUTES) - 1


# --- rate tracking ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RateWindow:
    """One copy's requests in 10-second periods: the period being counted and the last six done.

    Immutable: :meth:`add` and :meth:`advanced` return a new window. ``period`` is
    ``now_ms // RATE_PERIOD_MS`` of the period being counted (-1 before the first request).
    """

    period: int = -1
    count: int = 0
    # complete periods, oldest first, at most RATE_PERIODS
    done: tuple[int, ...] = ()

    def advanced(self, now_ms: int) -> RateWindow:
        """The window at ``now_ms``: periods that ended since are closed (empty ones as zeros)."""
        period = now_ms // RATE_PERIOD_MS
        if self.period < 0:
            return RateWindow(period, 0, ())
        if period <= self.period:
            return self
        empty = min(period - self.period - 1, RATE_PERIODS)
        done = (*self.done, self.count, *([0] * empty))
        return RateWindow(period, 0, done[-RATE_PERIODS:])

    def add(self, now_ms: int, n: int = 1) -> RateWindow:
        """``n`` requests at ``now_ms`` (not earlier than the last ones)."""
        w = self.advanced(now_ms)
        return RateWindow(w.period, w.count + n, w.done)

    def rpm(self, now_ms: int) -> float:
        """Requests per minute at ``now_ms``: the larger of the last complete period and the mean of
        the complete periods kept, both scaled to a minute; 0 before the first period completes."""
        done = self.advanced(now_ms).done
        if not done:
            return 0.0
        return max(done[-1], sum(done) / len(done)) * _PERIODS_PER_MINUTE

    def minute_rpm(self, now_ms: int) -> float:
        """Requests in the last six complete periods (a minute; fewer periods count as zeros): how
        much a copy is used, for eviction. Unlike :meth:`rpm` a single request is 1 rpm, not 6."""
        return float(sum(self.advanced(now_ms).done))

    def recent_uses(self, now_ms: int) -> float:
        """Requests in the last six complete periods and the one being counted: what a pod writes
        into the model's record when it removes the copy (``eviction.carried_use`` reads it back)."""
        w = self.advanced(now_ms)
        return float(sum(w.done) + w.count)

    def idle(self, now_ms: int) -> bool:
        """Nothing counted in the whole window: the caller may drop it."""
        w = self.advanced(now_ms)
        return w.count == 0 and not any(w.done)


@dataclass(frozen=True, slots=True)
class UseHistory:
    """Which of the last 64 minutes saw a use of a model: bit ``i`` of ``bits`` is the minute ``i``
    minutes before ``minute`` (``now_ms // 60_000`` of the latest record)."""

    minute: int = 0
    bits: int = 0

    def _bits_at(self, minute: int) -> int:
        shift = minute - self.minute
        if shift <= 0:
            return self.bits
        if shift >= _HISTORY_MINUTES:
            return 0
        return (self.bits << shift) & _HISTORY_MASK

    def record(self, now_ms: int) -> UseHistory:
        """The history with a use at ``now_ms``."""
        used = now_ms // _MINUTE_MS
        minute = max(used, self.minute)
        bits = self._bits_at(minute)
        if minute - used < _HISTORY_MINUTES:
            bits |= 1 << (minute - used)
        return UseHistory(minute, bits)

    def used_between(self, now_ms: int, newest_min: int, oldest_min: int) -> bool:
        """Whether the model was used in a minute between ``newest_min`` and ``oldest_min`` minutes
        before the minute of ``now_ms`` (both included; 0 is the current minute)."""
        if oldest_min < newest_min or newest_min >= _HISTORY_MINUTES:
            return False
        bits = self._bits_at(now_ms // _MINUTE_MS)
        span = ((1 << (oldest_min - newest_min + 1)) - 1) << newest_min
        return bool(bits & span)

    def regular(self, now_ms: int) -> bool:
        """Used in the last two minutes and also 7 to 40 minutes ago (rule 3)."""
        return self.used_between(now_ms, 0, REGULAR_RECENT_MIN) and self.used_between(
            now_ms, REGULAR_PRIOR_MIN_MIN, REGULAR_PRIOR_MAX_MIN
        )


# --- how many copies ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CopyModelView:
    """One model as the copy rules see it."""

    model_id: str
    # copies loaded or loading now
    copies: int
    # all copies together: the sum of their RateWindow.rpm
    total_rpm: float = 0.0
    history: UseHistory = UseHistory()
    # set at registration: keep at least this many copies; or one on every eligible pod
    min_copies: int = 0
    all_pods: bool = False
    # when a copy was last added or removed by these rules (0: never)
    copies_changed_ms: int = 0


@dataclass(frozen=True, slots=True)
class CopyDecision:
    """How many copies the model should have (compare with ``CopyModelView.copies``), and why."""

    target_copies: int
    reason: str


def copy_targets(
    model: CopyModelView,
    *,
    now_ms: int,
    threshold_rpm: float,
    cluster_fullness: float,
    cluster_size: int,
    mean_pod_rpm: float = 0.0,
    busiest_holder_rpm: float = 0.0,
) -> CopyDecision:
    """The number of copies ``model`` should have now; the rules are in the module docstring.

    ``cluster_size`` counts the pods eligible for the model (its type's required labels and its
    pin labels); ``cluster_fullness`` is used / capacity over the cluster (0..1);
    ``threshold_rpm`` is ``MM_SCALEUP_RPM_THRESHOLD``. ``mean_pod_rpm`` is the mean request rate
    of the pods' records (0: unknown); a copy may carry at most :data:`COPY_POD_SHARE` of it
    (:func:`copy_limit_rpm`), so that no copy is a large part of any pod's work.
    ``busiest_holder_rpm`` is the highest published request rate among the pods holding the model
    (0: unknown): a model with real traffic on a pod well above the mean gets one more copy
    (rule 4b), and keeps it.
    """
    if threshold_rpm <= 0:
        raise ValueError(f"threshold_rpm must be positive, got {threshold_rpm}")
    threshold_rpm = copy_limit_rpm(threshold_rpm, mean_pod_rpm)
    have = model.copies
    if cluster_size <= 0:
        return CopyDecision(have, "no eligible pods")
    rpm = model.total_rpm
    target, why = have, f"{have} cop{'y' if have == 1 else 'ies'} at {rpm:.0f} rpm"

    if model.all_pods:
        floor, floor_why = cluster_size, "loaded on every pod"
    else:
        floor = min(model.min_copies, cluster_size)
        floor_why = f"minimum {model.min_copies} copies"
    if floor > target:
        target, why = floor, floor_why

    regular = have >= 1 and model.history.regular(now_ms)
    if regular and cluster_fullness <= SECOND_COPY_MAX_FULLNESS and target < 2:
        target, why = 2, "used regularly: a second copy for resilience"

    # a third of the cluster, but a hot model may always have a second copy: with ModelMesh's
    # plain third, clusters of under six pods could never scale a model up at all
    cap = min(cluster_size, max(2, cluster_size // SCALE_UP_CLUSTER_SHARE))
    if rpm > threshold_rpm * max(have, 1):
        wanted = min(math.ceil(rpm / threshold_rpm), cap)
        if wanted > target:
            capped = " (a third of the cluster)" if wanted == cap else ""
            target, why = wanted, f"{rpm:.0f} rpm over {have} copies, above {threshold_rpm:.0f} per copy{capped}"

    hot_holder = _hot_holder(mean_pod_rpm, busiest_holder_rpm)
    relieve = hot_holder and rpm >= RELIEF_MIN_SHARE * threshold_rpm * max(have, 1)
    if relieve and target <= have < cap:
        target, why = have + 1, (
            f"a holder at {busiest_holder_rpm:.0f} rpm, over {RELIEF_POD_RATIO:.2f}x the mean pod's "
            f"{mean_pod_rpm:.0f}: one more copy to share {rpm:.0f} rpm"
        )

    if target > cluster_size:
        target, why = cluster_size, f"{why}, limited to the {cluster_size} eligible pods"
    if target != have:
        return CopyDecision(target, why)

    keep = max(1, floor)
    if have > keep:
        left_rpm = rpm / (have - 1)
        bar = SCALE_DOWN_SHARE * threshold_rpm
        if cluster_fullness < SCALE_DOWN_FULLNESS:
            why += f"; spare copies kept, cluster {cluster_fullness:.0%} full"
        elif mean_pod_rpm > 0 and busiest_holder_rpm > mean_pod_rpm:
            # hysteresis: relief adds a copy above 1.05x the mean; it stays until under the mean
            why += "; a holder is busier than the mean pod"
        elif left_rpm >= bar:
            why += f"; {have - 1} copies would carry {left_rpm:.0f} rpm each, not under {bar:.0f}"
        elif now_ms - model.copies_changed_ms < COOL_DOWN_MS:
            why += "; copies changed less than the cool-down ago"
        else:
            return CopyDecision(
                have - 1,
                f"{rpm:.0f} rpm fits {have - 1} copies under {bar:.0f} each and the cluster is "
                f"{cluster_fullness:.0%} full: one copy fewer",
            )
    return CopyDecision(have, why)


def _hot_holder(mean_pod_rpm: float, busiest_holder_rpm: float) -> bool:
    """A holder busier than the mean pod by RELIEF_POD_RATIO and RELIEF_MIN_EXCESS_RPM (rule 4b)."""
    return mean_pod_rpm > 0 and busiest_holder_rpm > max(
        RELIEF_POD_RATIO * mean_pod_rpm, mean_pod_rpm + RELIEF_MIN_EXCESS_RPM)


def copy_limit_rpm(threshold_rpm: float, mean_pod_rpm: float = 0.0) -> float:
    """The rate one copy may carry before the model gets more copies: ``threshold_rpm``
    (``MM_SCALEUP_RPM_THRESHOLD``), or :data:`COPY_POD_SHARE` of the mean pod's published request
    rate when that is lower (``mean_pod_rpm`` > 0: the mean of the instance records'
    ``request_rate_rpm``, which count the requests entering a pod and those forwarded to it)."""
    if mean_pod_rpm > 0:
        # published rates move by 100 rpm before a record is republished: below that, noise
        return min(threshold_rpm, max(COPY_POD_SHARE * mean_pod_rpm, COPY_LIMIT_FLOOR_RPM))
    return threshold_rpm


# --- which copies go ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class HeldCopy:
    """One copy of a model, as removal sees it."""

    instance_id: str
    # this copy's requests per minute (its RateWindow)
    request_rate_rpm: float = 0.0
    in_flight: int = 0
    # the labels of the pod holding it
    labels: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class RemovalDecision:
    instance_ids: tuple[str, ...]
    reason: str


def choose_copies_to_remove(
    copies: Sequence[HeldCopy],
    count: int,
    *,
    min_copies: int = 1,
    pin_labels: frozenset[str] = frozenset(),
) -> RemovalDecision:
    """Up to ``count`` copies to remove: those on pods lacking ``pin_labels`` first, then the least
    busy (lowest rate, then fewest in flight, then instance id).

    Never the last copy, never below ``min_copies``, and never the last copy on a pod that has
    all of ``pin_labels`` while such a copy exists.
    """
    keep = max(1, min_copies)
    allowed = min(count, len(copies) - keep)
    if allowed <= 0:
        return RemovalDecision((), f"{len(copies)} copies, at least {keep} kept")

    def pinned(c: HeldCopy) -> bool:
        return pin_labels <= c.labels

    pinned_left = sum(1 for c in copies if pinned(c))
    order = sorted(copies, key=lambda c: (pinned(c), c.request_rate_rpm, c.in_flight, c.instance_id))
    chosen: list[str] = []
    for c in order:
        if len(chosen) == allowed:
            break
        if pin_labels and pinned(c):
            if pinned_left <= 1:
                continue
            pinned_left -= 1
        chosen.append(c.instance_id)
    if not chosen:
        return RemovalDecision((), "only the last copy on a pinned pod is removable")
    return RemovalDecision(
        tuple(chosen), f"remove {len(chosen)} least busy of {len(copies)} copies (keeping at least {keep})"
    )


# --- where new copies go ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CopyPlacement:
    """Pods for new copies, best first; fewer than asked (or none) when no more pods qualify.

    ``view`` is the input view with the new copies projected (pending load and traffic), for the
    caller's next placement before the pods republish.
    """

    instance_ids: tuple[str, ...]
    reason: str
    view: ClusterView


def choose_new_copy_pods(
    view: ClusterView,
    model: ModelView,
    count: int,
    *,
    now_ms: int,
    rng: random.Random,
    copy_rpm: float = 0.0,
    required_labels: frozenset[str] = frozenset(),
    exclude: Iterable[str] = (),
) -> CopyPlacement:
    """Pods for ``count`` new copies of ``model``, one ``choose_load_target`` call each.

    Only the least busy pods are offered to it: ``filter_by_load`` over all eligible pods (for a
    model in use, within 1.1x of the quietest), where ``choose_load_target`` alone would apply it
    only to its shortlist, which for full pods is chosen by LRU age, so that a round of scale-ups
    would pile the copies of every hot model onto the few pods with the oldest LRU entry.

    ``model.holders`` (its current copies) are excluded by ``choose_load_target`` itself; pods
    chosen here join them for the next pick and count as a pending load (size, model, loading slot)
    carrying ``copy_rpm`` more traffic, so the picks spread. Pods lacking ``required_labels`` (the
    model's pin labels), shutting down, or in ``exclude`` are never chosen. Pass a view with the
    caller's pending loads already projected.
    """
    excluded = set(exclude)
    excluded.update(i.instance_id for i in view.instances if not required_labels <= i.labels)
    idle_ms = now_ms - model.last_used_ms if model.last_used_ms > 0 else None
    ratio = allowed_rate_ratio(idle_ms)
    chosen: list[str] = []
    reasons: list[str] = []
    current = view
    size = model.predicted_size_bytes if model.predicted_size_bytes > 0 else view.default_model_size_bytes
    for _ in range(max(0, count)):
        holders = model.holders | frozenset(chosen)
        eligible = [i for i in current.instances
                    if i.instance_id not in holders and i.instance_id not in excluded and not i.shutting_down]
        quiet = {i.instance_id for i in filter_by_load(eligible, ratio)}
        busy = {i.instance_id for i in eligible if i.instance_id not in quiet}
        decision = choose_load_target(current, replace(model, holders=holders), now_ms=now_ms, rng=rng,
                                      exclude=excluded | busy)
        if decision.instance_id is None:
            reasons.append(f"no pod for copy {len(chosen) + 1}: {decision.reason}")
            break
        chosen.append(decision.instance_id)
        reasons.append(f"{decision.instance_id} ({len(quiet)} quiet pods): {decision.reason}")
        current = project_traffic(
            project_pending(current, {decision.instance_id: [PendingLoad(model.model_id, size, now_ms)]}),
            {decision.instance_id: copy_rpm},
        )
    return CopyPlacement(tuple(chosen), "; ".join(reasons) if reasons else "no copies asked", current)


def project_traffic(view: ClusterView, added_rpm: Mapping[str, float]) -> ClusterView:
    """``view`` with more requests per minute on some instances (instance id -> rpm).

    A new copy's traffic shows in its pod's published rate only slowly (the rate is a count over
    the last minute), so until then the caller adds what it expects: the copy's share of its
    model's rate, less the part the record already shows. Without this, the next round of
    scale-ups sees the same pods as quiet and stacks more hot copies on them.
    """
    if not any(rpm > 0 for rpm in added_rpm.values()):
        return view
    return replace(view, instances=tuple(
        replace(i, request_rate_rpm=i.request_rate_rpm + round(added_rpm[i.instance_id]))
        if added_rpm.get(i.instance_id, 0) > 0 else i
        for i in view.instances
    ))
