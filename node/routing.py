"""Routing: which series go to which pipelines, with which priority, results sent where.

`route` is a pure function of a series' attributes (those of its first instance plus where it
came from) and the declarative rules of `routing` in config.yaml. Every decision carries the
rule that made it and a trace of why, for the database and `pacsnode rules test`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import pydicom

from node.config import DEFAULT_PRIORITY, ROUTING_PEER_KEYS, Condition, RoutingConfig, RoutingRule

# Attributes every series records, whatever the rules say (shown by `pacsnode studies`).
BASE_KEYS = ("SOPClassUID", "Modality", "BodyPartExamined", "ViewPosition", "ImageType")

AttrValue = str | list[str] | None


@dataclass(frozen=True)
class SeriesAttributes:
    """What routing may look at; `other` holds any further keyword and the peer keys."""

    sop_class_uid: str
    modality: str | None
    body_part: str | None
    view_position: str | None
    other: Mapping[str, AttrValue] = field(default_factory=dict)

    def value(self, key: str) -> AttrValue:
        named = {"SOPClassUID": self.sop_class_uid, "Modality": self.modality,
                 "BodyPartExamined": self.body_part, "ViewPosition": self.view_position}
        if key in named:
            return named[key] or None
        return self.other.get(key)

    @classmethod
    def from_record(cls, record: Mapping[str, AttrValue]) -> SeriesAttributes:
        """From the JSON stored on a series (see `routing_record`)."""
        def text(key: str) -> str | None:
            v = record.get(key)
            return v if isinstance(v, str) else None

        return cls(text("SOPClassUID") or "", text("Modality"), text("BodyPartExamined"),
                   text("ViewPosition"), {k: v for k, v in record.items()})


@dataclass(frozen=True)
class Decision:
    pipelines: tuple[str, ...]
    reason: str  # why processed or why skipped, for the database and `pacsnode studies`
    rule: str | None = None  # the rule(s) that decided, comma separated in mode "all"
    priority: int = DEFAULT_PRIORITY
    destinations: tuple[str, ...] | None = None  # None: every configured destination
    objects: tuple[str, ...] | None = None  # result objects the rules ask for; None: no limit
    trace: tuple[str, ...] = ()  # one line per rule tried: matched or the first failed condition

    @property
    def skipped(self) -> bool:
        return not self.pipelines


def rule_keys(cfg: RoutingConfig) -> set[str]:
    """Every DICOM keyword the rules look at (peer keys excluded)."""
    keys = set(BASE_KEYS)
    for rule in cfg.rules:
        keys.update(k for k in rule.match if k not in ROUTING_PEER_KEYS)
    return keys


def _as_text(value: object) -> AttrValue:
    if value is None or value == "":
        return None
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        items = [str(v).strip() for v in value]
        return items or None
    text = str(value).strip()
    return text or None


def routing_record(ds: pydicom.Dataset, keys: Iterable[str], calling_ae: str | None,
                   called_ae: str | None, address: str | None) -> dict[str, AttrValue]:
    """The routing-relevant attributes of one instance as JSON-able values (no patient identity)."""
    record: dict[str, AttrValue] = {}
    for key in sorted(keys):
        value = _as_text(ds.get(key))
        if value is not None:
            record[key] = value
    for key, value in zip(ROUTING_PEER_KEYS, (calling_ae, called_ae, address), strict=True):
        if value:
            record[key] = value.strip()
    return record


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _same(a: str, b: str | float) -> bool:
    if isinstance(b, str):
        return a.strip().casefold() == b.strip().casefold()
    n = _number(a)
    return n is not None and n == b


def holds(cond: Condition, value: AttrValue) -> bool:
    """Whether one condition holds for one attribute value (all its operators must)."""
    if cond.absent is not None and (value is None) != cond.absent:
        return False
    if cond.present is not None and (value is not None) != cond.present:
        return False
    if cond.not_ is not None and holds(cond.not_, value):
        return False
    tests = (cond.equals, cond.in_, cond.regex, cond.min, cond.max)
    if all(t is None for t in tests):
        return True
    if value is None:
        return False
    values = value if isinstance(value, list) else [value]
    if cond.equals is not None and not any(_same(v, cond.equals) for v in values):
        return False
    if cond.in_ is not None and not any(_same(v, c) for v in values for c in cond.in_):
        return False
    if cond.regex is not None:
        joined = "\\".join(values)
        if not any(re.search(cond.regex, v) for v in [*values, joined]):
            return False
    if cond.min is not None or cond.max is not None:
        numbers = [n for n in map(_number, values) if n is not None]
        lo = float("-inf") if cond.min is None else cond.min
        hi = float("inf") if cond.max is None else cond.max
        if not any(lo <= n <= hi for n in numbers):
            return False
    return True


def _describe(cond: Condition) -> str:
    return ", ".join(f"{k}: {v!r}" for k, v in cond.model_dump(by_alias=True, exclude_none=True).items())


def _show(value: AttrValue) -> str:
    if value is None:
        return "absent"
    return "\\".join(value) if isinstance(value, list) else value


def _first_failure(rule: RoutingRule, attrs: SeriesAttributes) -> str | None:
    for key, cond in rule.match.items():
        value = attrs.value(key)
        if not holds(cond, value):
            return f"{key} is {_show(value)!r}, wanted {{{_describe(cond)}}}"
    return None


def _reason(rule: RoutingRule, attrs: SeriesAttributes) -> str:
    if rule.reason is None:
        return f"rule {rule.name}"
    return re.sub(r"\{(\w+)\}", lambda m: _show(attrs.value(m.group(1))), rule.reason)


def _pipelines(rule: RoutingRule, enabled: tuple[str, ...]) -> tuple[str, ...]:
    # A rule naming a pipeline that is disabled right now just does not run it.
    return tuple(p for p in (rule.pipelines or enabled) if p in enabled)


def route(attrs: SeriesAttributes, cfg: RoutingConfig, pipelines: tuple[str, ...]) -> Decision:
    """Apply the rules in order: mode "first" stops at the first match; mode "all" applies every
    match, where any matching skip rule wins (a skip is a statement that the series must not
    be processed) and process rules add up (pipelines, destinations; highest priority)."""
    if not pipelines:
        return Decision((), "no pipeline is enabled")
    trace: list[str] = []
    matched: list[RoutingRule] = []
    for rule in cfg.rules:
        failure = _first_failure(rule, attrs)
        if failure is not None:
            trace.append(f"{rule.name}: no match ({failure})")
            continue
        trace.append(f"{rule.name}: match -> {rule.action} ({_reason(rule, attrs)})")
        matched.append(rule)
        if cfg.mode == "first":
            break
    if not matched:
        return Decision((), "no routing rule matches", trace=tuple(trace))
    skips = [r for r in matched if r.action == "skip"]
    if skips:
        return Decision((), _reason(skips[0], attrs), skips[0].name, skips[0].priority, trace=tuple(trace))
    chosen: list[str] = []
    for rule in matched:
        chosen += [p for p in _pipelines(rule, pipelines) if p not in chosen]
    destinations = merge_choices(r.destinations for r in matched)
    objects = merge_choices(r.objects for r in matched)
    names = ", ".join(r.name for r in matched)
    if not chosen:
        return Decision((), f"rule {names}: none of its pipelines is enabled", names, trace=tuple(trace))
    return Decision(
        tuple(chosen), "; ".join(_reason(r, attrs) for r in matched), names,
        max(r.priority for r in matched), None if destinations is None else tuple(destinations),
        None if objects is None else tuple(objects), tuple(trace),
    )


def merge_choices(choices: Iterable[Sequence[str] | None]) -> list[str] | None:
    """Union of destination (or object) lists in first-seen order; None ("all") absorbs all."""
    merged: list[str] = []
    for choice in choices:
        if choice is None:
            return None
        merged += [d for d in choice if d not in merged]
    return merged


def decision_for(ds: pydicom.Dataset, cfg: RoutingConfig, pipelines: tuple[str, ...],
                 calling_ae: str | None = None, called_ae: str | None = None,
                 address: str | None = None) -> Decision:
    """Route one dataset as if it were the first instance of its series (`pacsnode rules test`)."""
    record = routing_record(ds, rule_keys(cfg), calling_ae, called_ae, address)
    return route(SeriesAttributes.from_record(record), cfg, pipelines)

