"""The comparison's report in ``out_dir``: results.json (the format a re-run resumes from), results.csv,
results.md (the table, the recipe and the claims), claims.csv and the plots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from visionmix.bench.plots import write_plots
from visionmix.bench.presets import PAPER_CLAIMS, Claim
from visionmix.bench.profile import to_csv
from visionmix.bench.results import RunOutcome, claim_rows
from visionmix.bench.stats import ON_PAR_MARGIN
from visionmix.files import atomic_write, atomic_write_json
from visionmix.tables import si_format

FORMAT = "visionmix-compare/1"  # results.json says this: the directory is a comparison, resumed when re-run


def _fmt(value: float | None, std: float | None = None, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _interval(row: Mapping[str, Any]) -> str:
    """``+1.23 [-0.50, +2.96]`` (a mean without interval: just the mean; no mean: ``-``)."""
    if row["delta"] is None:
        return "-"
    if row["ci_low"] is None:
        return f"{row['delta']:+.2f}"
    return f"{row['delta']:+.2f} [{row['ci_low']:+.2f}, {row['ci_high']:+.2f}]"


def claims_markdown(claims: Sequence[dict[str, Any]]) -> str:
    """The claims section of results.md: one row per claim (see :func:`claim_rows`)."""
    lines = [
        "## Claims",
        "",
        "Δ = top-1 of A - top-1 of B in points, mean over the seeds both finished with its 95% paired t interval. "
        "\"better\" holds if the interval lies above 0; \"on par\" holds if it lies within "
        f"±{ON_PAR_MARGIN:g} point and does not hold if it lies wholly outside; \"not worse\" holds if it lies "
        f"above -{ON_PAR_MARGIN:g} and does not hold if it lies below. Otherwise the claim is not shown at this scale. "
        "MACs are of the deployed models.",
        "",
        "| paper | claim | A vs B | Δ top-1 (95% CI) | seeds | MACs A | MACs B | verdict |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for c in claims:
        cells = [c["paper"], f"{c['claim']} ({c['kind']})", f"{c['model_a']} vs {c['model_b']}", _interval(c),
                 str(c["pairs"]), si_format(c["macs_a"]), si_format(c["macs_b"]), c["verdict"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_table(rows: Sequence[dict[str, Any]], meta: Mapping[str, Any]) -> str:
    """The comparison as a markdown document: a header saying what was run, then one row per model."""
    recipe = ", ".join(f"{k}={v}" for k, v in meta["recipe"].items()) or "engine defaults"
    batch = meta["bench_batch_size"]
    lines = [
        f"# visionmix compare: {meta['data']}",
        "",
        f"Recipe: {recipe}; seeds: {meta['seeds']} (accuracy mean ± std over seeds). "
        f"Params, MACs and speed are for the deployed form (`visionmix.reparameterize`) at one image; "
        f"img/s at batch {batch}, {meta['environment']['threads']} threads, torch {meta['environment']['torch']}.",
    ]
    if meta.get("launcher"):
        env = meta["environment"]
        commit = f" (commit {env['git_commit'][:10]}{', with changes' if env.get('git_dirty') else ''})" \
            if env.get("git_commit") else ""
        lines += ["", f"Trained by the {meta['launcher']} launcher, {meta['threads_per_run']} thread(s) per run, "
                      f"{meta['procs_per_run']} process(es) per run, on {env.get('cpu_model')} "
                      f"({env.get('cpu_capability')} kernels), visionmix {env.get('visionmix')}{commit}, torch "
                      f"{env['torch']}: weights reproduce bit for bit on the same CPU kind with the same threads."]
    if meta.get("command"):
        lines += ["", f"Produced by `{meta['command']}`."]
    if meta.get("note"):
        lines += ["", f"Note: {meta['note']}"]
    baseline = meta.get("baseline")
    lines += ["", f"Δ top-1: the model's top-1 minus {baseline}'s, mean over the seeds both finished, with its 95% "
                  "paired t interval; the verdict is \"no difference shown\" when the interval contains 0.",
              "", f"| model | top-1 (%) | Δ top-1 vs {baseline} (95% CI) | verdict | top-5 (%) | params | MACs "
                  f"| img/s (b{batch}) | latency b1 (ms) | train time (s) | status |",
              "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        status = r["status"] if not r["error"] else f"{r['status']}: {r['error']}"
        cells = [r["model"], _fmt(r["top1"], r["top1_std"]), _interval(r), r["verdict"], _fmt(r["top5"], r["top5_std"]),
                 si_format(r["params"]),
                 si_format(r["macs"]), _fmt(r["throughput"], digits=0), _fmt(r["latency_ms"]),
                 _fmt(r["train_time_s"], digits=0), status.replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | Path, rows: Sequence[dict[str, Any]], outcomes: Sequence[RunOutcome],
                 meta: Mapping[str, Any], claims: Sequence[Claim] = PAPER_CLAIMS) -> None:
    """Write results.json/.csv/.md, the PNG plots and (when a claim applies) claims.csv into ``out_dir``.
    ``rows`` carry the paired differences (:func:`with_differences`) to ``meta["baseline"]``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [{"model": o.model, "seed": o.seed, "error": o.error, "log": o.log, "time": o.time, "summary": o.summary}
            for o in outcomes]
    tested = claim_rows(rows, outcomes, claims)
    atomic_write_json(out_dir / "results.json", {"format": FORMAT, "meta": meta, "models": list(rows),
                                                 "claims": tested, "runs": runs}, indent=2)
    atomic_write(out_dir / "results.csv", to_csv(rows))
    markdown = markdown_table(rows, meta)
    if tested:
        atomic_write(out_dir / "claims.csv", to_csv(tested))
        markdown += "\n" + claims_markdown(tested)
    atomic_write(out_dir / "results.md", markdown)
    write_plots(out_dir, rows, outcomes, meta["baseline"], meta["bench_batch_size"])
