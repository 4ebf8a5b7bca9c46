"""The ablation runner's report: ``results.json``, the ``results.md`` table with the paper's two claims read off
it, and ``ablations.png`` (``scripts/run_ablations.py`` calls :func:`write_report` after every variant)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

import numpy as np


def _f(x, fmt="{:.3f}"):
    return "–" if x is None or (isinstance(x, float) and not np.isfinite(x)) else fmt.format(x)


def write_report(out: Path, results: dict) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2))
    done = [r for r in results["variants"] if r.get("status") == "ok"]
    tags = sorted({t for r in done for t in r["tags"]})
    lines = [f"# Ablations on the toy world ({results['date']})", "",
             f"Budget: {results['budget']}. Eval: {results['eval_prompts']} prompts x "
             f"{results['samples_per_prompt']} samples; diversity: {results['div_prompts']} prompts x "
             f"{results['div_seeds']} seeds (mean pairwise RMS pixel distance, [0,1] px; feature distance "
             f"in per-channel stds / sqrt(2), ~1 for unrelated images). Diversity px of the CLIP variants includes "
             f"the diffusion decoder's own noise; diversity feat is the generator alone. Train min: wall time "
             f"of the training process, start-up included. Threads: {results['threads']}.", "",
             "| variant | target | objective | steps | s/step | train min | " + " | ".join(tags) +
             (" | " if tags else "") + "overall | diversity px | diversity feat | sample s/img |",
             "|---|---|---|---|---|---|" + "---|" * len(tags) + "---|---|---|---|"]
    for r in results["variants"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['name']} | {r.get('target', '')} | {r.get('objective', '')} | "
                         f"{r.get('status')}: {r.get('message', '')} |")
            continue
        lines.append(f"| {r['name']} | {r['target']} | {r['objective']} | {r['steps']} | "
                     f"{_f(r.get('s_per_step'), '{:.2f}')} | {_f(r['train_min'], '{:.1f}')} | " +
                     "".join(f"{_f(r['tags'].get(t), '{:.2f}')} | " for t in tags) +
                     f"{_f(r['score'])} | {_f(r['diversity_pixel'])} | {_f(r['diversity_feature_rel'])} | "
                     f"{_f(r['sample_s_per_img'], '{:.2f}')} |")
    lines += claims(done)
    if results["prereqs"]:
        lines += ["", "Prerequisites (shared, trained once, not part of the budgets):", "",
                  "| prerequisite | time s | cached | notes |", "|---|---|---|---|"]
        for k, p in results["prereqs"].items():
            note = (f"held-out recon MSE {p['recon_mse_heldout_01']:.4f} ([0,1] px), {p['steps']} steps"
                    if p.get("kind") == "vae" else f"{p.get('steps')} steps, final loss {_f(p.get('final_loss'))}")
            if p.get("kind") == "clip":
                note += f"; zero-shot shape {p['zero_shot']['shape']:.2f}, colour {p['zero_shot']['colour']:.2f}"
            lines.append(f"| {k} | {p['train_s']:.0f} | {p.get('cached', False)} | {note} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(out / "ablations.png", done, tags)


def claims(done: List[dict]) -> List[str]:
    """The paper's two claims, read off this table (single runs: no error bars)."""
    by = {r["name"]: r for r in done}
    out = []
    if "clip_flow" in by and len(by) > 1:
        others = [r for n, r in by.items() if n != "clip_flow"]
        best = max(others, key=lambda r: r["score"])
        verdict = "yes" if by["clip_flow"]["score"] > best["score"] else "tie" \
            if by["clip_flow"]["score"] == best["score"] else "no"
        out.append(f"* CLIP + flow scores best: **{verdict}** (clip_flow {by['clip_flow']['score']:.3f}, "
                   f"best other {best['name']} {best['score']:.3f})")
    if "clip_flow" in by and "clip_mse" in by:
        f, m = by["clip_flow"], by["clip_mse"]
        yes_f = "yes" if f["diversity_feature_rel"] > m["diversity_feature_rel"] else "no"
        yes_p = "yes" if f["diversity_pixel"] > m["diversity_pixel"] else "no"
        out.append(f"* flow more diverse than MSE: features **{yes_f}** "
                   f"({f['diversity_feature_rel']:.3f} vs {m['diversity_feature_rel']:.3f}), pixels **{yes_p}** "
                   f"({f['diversity_pixel']:.3f} vs {m['diversity_pixel']:.3f})")
    head = "Claims (one run per variant, no error bars; one image moves a tag by 1 / (its prompts x samples)):"
    return ["", head, ""] + out if out else []


def plot(path: Path, done: List[dict], tags: List[str]) -> None:
    import matplotlib  # optional plotting dependency: only needed once a report is written

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["name"] for r in done]
    x = np.arange(len(done))
    a1.bar(x, [r["score"] for r in done], color="lightsteelblue", label="overall")
    for j, t in enumerate(tags):
        a1.scatter(x + (j - (len(tags) - 1) / 2) * 0.15, [r["tags"].get(t, np.nan) for r in done], s=14, label=t)
    a1.set_xticks(x, names, rotation=20)
    a1.set_ylabel("toy score")
    a1.set_ylim(0, 1)
    a1.set_title("score (bars: overall, dots: per tag)")
    if done:
        a1.legend(fontsize=7)
    for r in done:
        a2.scatter(r["diversity_pixel"], r["score"], s=40)
        a2.annotate(r["name"], (r["diversity_pixel"], r["score"]), fontsize=8, xytext=(3, 3),
                    textcoords="offset points")
    a2.set_xlabel("diversity: mean pairwise RMS pixel distance, same prompt")
    a2.set_ylabel("overall score")
    a2.set_title("score vs diversity")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
