"""The verification's two outputs: a readable markdown report (a table per level) and the metrics dict
written to metrics/verify.json (per level: status, reason, figures, tolerance)."""

from __future__ import annotations

import math
import platform
import time
from pathlib import Path

import torch

from gptcore.verify.common import FAIL, PASS, SKIPPED
from gptcore.verify.runner import Verification

KEYS = {
    "compile": "compile_gate",
    "L1": "L1_kernels",
    "L2": "L2_blocks",
    "L3": "L3_logits",
    "L4": "L4_decode",
    "L5": "L5_grads",
}
HEADLINES = {  # the figures the summary table shows per level
    "compile": ["jobs", "failed", "cached"],
    "L1": ["attention.fwd_err_max", "attention.grad_err_max", "layer_norm.fwd_err_max", "layer_norm.grad_err_max"],
    "L2": ["block_max_err", "block_mean_err", "stack_max_err", "stack_mean_err"],
    "L3": ["logits_max_abs_diff", "logits_mean_abs_diff", "kl_mean", "top1_agreement"],
    "L4": ["identical_prompts", "prompts", "tokens_per_prompt", "rounding_ties", "max_tie_gap", "first_divergence"],
    "L5": ["grad_rel_max", "grad_rel_median", "worst_parameter"],
}
DVC_METRICS = {  # level: {figure: its name in metrics/verify.json}
    "L3": {"kl_mean": "kl_mean", "top1_agreement": "top1"},
    "L5": {"grad_rel_max": "grad_rel_max"},
}
BADGE = {PASS: "pass", FAIL: "**FAIL**", SKIPPED: "skipped"}


def fmt(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(columns: list[str], rows: list[dict]) -> str:
    lines = ["| " + " | ".join(fmt(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [fmt(row.get(c, "")) for c in columns]
        cells = [f"**{c}**" if c.startswith("fail") else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def jsonable(value):
    """NaN and inf become null (JSON has neither); nested dicts and lists are converted throughout."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(x) for k, x in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(x) for x in value]
    return value


def shown_path(path: Path) -> str:
    """Relative to the working directory when inside it: the report reads the same on every machine."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def metrics(v: Verification) -> dict:
    out = {
        "status": v.status,
        "passed": v.count(PASS),
        "failed": v.count(FAIL),
        "skipped": v.count(SKIPPED),
        "candidate": v.candidate,
        "device": v.device,
        "model_dtype": v.model_dtype,
        "decode_dtype": v.decode_dtype,
        "source": shown_path(v.weights.source),
        "source_sha256": v.weights.source_sha256,
        "seconds": v.seconds,
    }
    for r in v.results:
        out[KEYS[r.name]] = {
            "status": r.status,
            "reason": r.reason,
            **r.figures,
            "tolerance": r.tolerance,
            "seconds": r.seconds,
        }
    return jsonable(out)


def headline_metrics(v: Verification) -> dict:
    """The numbers metrics/verify.json holds (DVC tabulates them): the counts, and the few figures of DVC_METRICS
    for the levels that ran, flat and short-named so `dvc exp show` fits a terminal. The whole record
    (`metrics`) is a plain output, reports/verify.json."""
    out = {"passed": v.count(PASS), "failed": v.count(FAIL), "skipped": v.count(SKIPPED)}
    for r in v.results:
        if r.status == SKIPPED:
            continue
        for figure, name in DVC_METRICS.get(r.name, {}).items():
            value = r.figures.get(figure)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[name] = value
    return jsonable(out)


def level_metrics(v: Verification) -> dict:
    """Per level that ran: `pass` (1 or 0) and the figures its summary shows, for MLflow to chart across runs
    (metrics/verify.json keeps only the headline)."""
    out = {}
    for r in v.results:
        if r.status == SKIPPED:
            continue
        figures = {
            k: r.figures[k]
            for k in HEADLINES[r.name]
            if isinstance(r.figures.get(k), (int, float)) and not isinstance(r.figures.get(k), bool)
        }
        out[KEYS[r.name]] = {"pass": int(r.status == PASS), **figures}
    return jsonable(out)


def render(v: Verification, title: str = "Verification report") -> str:
    w, c = v.weights, v.weights.config
    try:
        import importlib.metadata

        cutile_version = importlib.metadata.version("cuda-tile")
    except Exception:  # noqa: BLE001 - only for the header
        cutile_version = "not installed"
    status = {PASS: "PASS", FAIL: "FAIL", "incomplete": "INCOMPLETE (nothing failed, something was skipped)"}[v.status]
    out = [
        f"# {title}",
        "",
        f"**Status: {status}**: {v.count(PASS)} passed, {v.count(FAIL)} failed, {v.count(SKIPPED)} skipped "
        "(the compile gate and levels L1-L5).",
        "",
        "| | |",
        "|---|---|",
        f"| weights | `{shown_path(w.source)}` ({w.source_format}, sha256 `{w.source_sha256[:16]}`) |",
        f"| config | {', '.join(f'{k}={val}' for k, val in c.to_dict().items())} |",
        f"| candidate | {v.candidate} on {v.device} |",
        "| reference | gptcore.model.GPT (PyTorch: SDPA attention, F.layer_norm), the same weights |",
        f"| precision | L1: each kernel dtype against a float64 reference; L2, L3, L5: both models under "
        f"{v.model_dtype} autocast (fp32 weights), as in training; L4: both under {v.decode_dtype} autocast |",
        f"| software | torch {torch.__version__}, cuda.tile {cutile_version}, Python {platform.python_version()} |",
        f"| run | {time.strftime('%Y-%m-%d %H:%M:%S')}, {v.seconds:.1f} s |",
        "",
        "## Summary",
        "",
        "| level | status | figures | reason |",
        "|---|---|---|---|",
    ]
    for r in v.results:
        figures = ", ".join(f"{k} {fmt(r.figures[k])}" for k in HEADLINES[r.name] if k in r.figures)
        out.append(f"| {r.name}: {r.title} | {BADGE[r.status]} | {figures} | {fmt(r.reason)} |")
    checks = [{"check": ch.name, "status": ch.status, "detail": ch.detail} for ch in w.checks]
    out += ["", "## Checkpoint checks", "", table(["check", "status", "detail"], checks)]
    for r in v.results:
        out += [
            "",
            f"## {r.name}: {r.title}",
            "",
            f"Status: {BADGE[r.status]}" + (f": {r.reason}" if r.reason else "") + f" ({r.seconds:.1f} s)",
        ]
        if r.tolerance:
            out += ["", "Tolerance: " + ", ".join(f"{k} {fmt(val)}" for k, val in r.tolerance.items())]
        if r.figures:
            out += ["", "Figures: " + ", ".join(f"{k} {fmt(val)}" for k, val in r.figures.items())]
        out += [""] + r.notes if r.notes else []
        if r.rows:
            out += ["", table(r.columns, r.rows)]
    return "\n".join(out) + "\n"
