"""The convergence experiment for the paper's theorem, on the toy problem of toy.py.

Theorem (method.md, "Theory"): the bilevel algorithm converges to a stationary point of F, and the bound on
(1/T) sum_t ||grad F(phi_t)||^2 improves with the number of outer iterations T and with the reward factor beta.

What runs: the bilevel algorithm itself. Each outer step draws fresh samples from pi_ref for every inner step
(n per prompt, as the core's sample bank does), builds the toy DomainTasks of every domain, and calls the core
`bilevel.meta_gradient` (the method's default hypergradient: `one-step` for K = 1, `truncated` for K > 1, or
`hypergrad=`) to get a stochastic hypergradient; Adam (or SGD) on phi takes the step.

What is measured: the *exact* hypergradient grad F(phi_t) at every outer iterate, where
F(phi) = mean_d E_samples[L_out^d(theta_K(phi))] (+ lambda_bt BT) is the expectation over every sample tuple of
every inner step (toy.exact_meta_objective, enumerated and differentiated with autograd). We report
||grad F(phi_t)||^2, its running average (1/T) sum_{t<T} ||grad F(phi_t)||^2 against T (the theorem's quantity),
the same divided by ||grad F(phi_0)||^2 (the gradient's overall scale grows with beta, so raw values across beta
compare scales as much as convergence), the norm of the stochastic estimate, F itself, and the pair accuracy of the
learned reward against the human pairs.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from oodpl.errors import atomic_write_json


DEFAULTS = dict(betas=(0.05, 0.1, 0.5, 1.0), inner_steps=(1, 3), outer_iters=200, seeds=3)
QUICK = dict(betas=(0.1, 1.0), inner_steps=(1, 2), outer_iters=20, seeds=1)


def _run_one(job: dict) -> dict:
    """One run of the bilevel algorithm on the toy problem for one (beta, K, seed)."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
    from oodpl.core.bilevel import meta_gradient
    from oodpl.core.objectives import pair_accuracy
    from oodpl.toy.problem import core_configs, exact_hypergradient, make_problem

    beta, K, seed = job["beta"], job["inner_steps"], job["seed"]
    problem = make_problem(job["problem_seed"], **job["problem"])
    D = problem.features.shape[-1]
    g = torch.Generator().manual_seed(1000 + seed)
    phi0 = job["init_scale"] * torch.randn(D, generator=g, dtype=torch.float64)
    rm = problem.rm(phi0)
    meta, rloo = core_configs(K, job["inner_lr"], beta, job["num_samples"], job["importance_clip"],
                              job["hypergrad"], job["lambda_bt"])
    if job["optimizer"] == "adam":
        opt = torch.optim.Adam(rm.parameters(), lr=job["outer_lr"])
    else:
        opt = torch.optim.SGD(rm.parameters(), lr=job["outer_lr"])
    exact = dict(inner_steps=K, n=job["num_samples"], inner_lr=job["inner_lr"], beta=beta,
                 clip=job["importance_clip"], lambda_bt=job["lambda_bt"])
    gn2, sgn2, obj, outer = [], [], [], []
    for _ in range(job["outer_iters"]):
        grad_F, F_val = exact_hypergradient(problem, rm.phi.detach(), **exact)
        gn2.append(float(grad_F.pow(2).sum()))
        obj.append(F_val)
        tasks = problem.tasks(rm, K, job["num_samples"], g)
        opt.zero_grad()
        stats = meta_gradient(problem.policy, rm, tasks, meta, rloo)
        sgn2.append(float(rm.phi.grad.pow(2).sum()))
        outer.append(stats["outer_loss"])
        opt.step()
    grad_F, F_val = exact_hypergradient(problem, rm.phi.detach(), **exact)
    with torch.no_grad():
        r = rm.rewards_table()
        pairs = [p for d in problem.pairs for p in d]
        acc = pair_accuracy(r[[p[0] for p in pairs], [p[1] for p in pairs]],
                            r[[p[0] for p in pairs], [p[2] for p in pairs]])
    running = (np.cumsum(gn2) / np.arange(1, len(gn2) + 1)).tolist()
    return {"beta": beta, "inner_steps": K, "seed": seed, "hypergrad": meta.hypergrad if meta.hypergrad != "auto"
            else ("one-step" if K == 1 else "truncated"),
            "grad_norm_sq": gn2, "running_avg": running, "stochastic_grad_norm_sq": sgn2, "objective": obj,
            "sampled_outer_loss": outer, "final_grad_norm_sq": float(grad_F.pow(2).sum()), "final_objective": F_val,
            "final_phi": rm.phi.detach().tolist(), "final_pair_accuracy": acc}


def _summarise(runs: list[dict], betas, inner_steps) -> tuple[list[dict], dict]:
    summary = []
    for K in inner_steps:
        for beta in betas:
            rs = [r for r in runs if r["beta"] == beta and r["inner_steps"] == K]
            ra = np.array([r["running_avg"] for r in rs])  # [seeds, T]
            g0 = np.array([r["grad_norm_sq"][0] for r in rs])
            rel = ra / g0[:, None]
            summary.append({
                "beta": beta, "inner_steps": K, "seeds": len(rs),
                "running_avg_mean": ra.mean(0).tolist(), "running_avg_std": ra.std(0).tolist(),
                "relative_running_avg_mean": rel.mean(0).tolist(),
                "initial_grad_norm_sq": float(g0.mean()),
                "final_running_avg": float(ra[:, -1].mean()), "final_running_avg_std": float(ra[:, -1].std()),
                "final_relative_running_avg": float(rel[:, -1].mean()),
                "final_grad_norm_sq": float(np.mean([r["final_grad_norm_sq"] for r in rs])),
                "objective_initial": float(np.mean([r["objective"][0] for r in rs])),
                "objective_final": float(np.mean([r["final_objective"] for r in rs])),
                "pair_accuracy_final": float(np.mean([r["final_pair_accuracy"] for r in rs])),
            })
    trends: dict = {"running_avg_decreases_in_T": {}, "final_running_avg_by_beta": {},
                    "final_relative_running_avg_by_beta": {}, "larger_beta_lowers_running_avg": {},
                    "larger_beta_lowers_relative_running_avg": {}}
    for s in summary:
        ra = s["running_avg_mean"]
        key = f"beta={s['beta']},K={s['inner_steps']}"
        half = ra[max(0, len(ra) // 2 - 1)]
        trends["running_avg_decreases_in_T"][key] = bool(ra[-1] < ra[0] and ra[-1] <= half)
    for K in inner_steps:
        rows = [s for s in summary if s["inner_steps"] == K]
        raw = [s["final_running_avg"] for s in rows]
        rel = [s["final_relative_running_avg"] for s in rows]
        trends["final_running_avg_by_beta"][f"K={K}"] = dict(zip(map(str, betas), raw))
        trends["final_relative_running_avg_by_beta"][f"K={K}"] = dict(zip(map(str, betas), rel))
        trends["larger_beta_lowers_running_avg"][f"K={K}"] = bool(all(a > b for a, b in zip(raw, raw[1:])))
        trends["larger_beta_lowers_relative_running_avg"][f"K={K}"] = bool(all(a > b for a, b in zip(rel, rel[1:])))
    return summary, trends


def _plot(summary: list[dict], betas, inner_steps, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(inner_steps), figsize=(5 * len(inner_steps), 7.5), squeeze=False)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(betas)))
    for j, K in enumerate(inner_steps):
        for c, beta in zip(colors, betas):
            s = next(s for s in summary if s["beta"] == beta and s["inner_steps"] == K)
            T = np.arange(1, len(s["running_avg_mean"]) + 1)
            m, sd = np.array(s["running_avg_mean"]), np.array(s["running_avg_std"])
            axes[0, j].plot(T, m, color=c, label=f"beta={beta}")
            axes[0, j].fill_between(T, np.maximum(m - sd, m * 1e-3), m + sd, color=c, alpha=0.2)
            axes[1, j].plot(T, s["relative_running_avg_mean"], color=c, label=f"beta={beta}")
        axes[0, j].set_title(f"K = {K}")
        axes[0, j].set_ylabel("(1/T) sum_t ||grad F(phi_t)||^2")
        axes[1, j].set_ylabel("same / ||grad F(phi_0)||^2")
        for i in range(2):
            axes[i, j].set_xscale("log")
            axes[i, j].set_yscale("log")
            axes[i, j].set_xlabel("outer iterations T")
            axes[i, j].grid(True, which="both", alpha=0.3)
            axes[i, j].legend(fontsize=8)
    fig.suptitle("Toy bilevel problem: running average of the squared exact hypergradient norm")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)


def run_theory(output_dir: str | os.PathLike, betas=DEFAULTS["betas"], inner_steps=DEFAULTS["inner_steps"],
               outer_iters: int = DEFAULTS["outer_iters"], seeds: int = DEFAULTS["seeds"], *,
               outer_lr: float = 0.05, optimizer: str = "adam", inner_lr: float = 1.0, num_samples: int = 2,
               importance_clip: float | None = 5.0, hypergrad: str = "auto", lambda_bt: float = 0.0,
               init_scale: float = 0.1, problem_seed: int = 0, num_domains: int = 2, prompts_per_domain: int = 3,
               num_responses: int = 3, num_features: int = 3, misspecification: float = 0.5,
               workers: int | None = None) -> dict:
    """Run the experiment for every (beta, K, seed); write results.json and theory.png into output_dir."""
    if optimizer not in ("adam", "sgd"):
        raise ValueError("optimizer must be 'adam' or 'sgd'")
    betas, inner_steps = tuple(float(b) for b in betas), tuple(int(k) for k in inner_steps)
    t0 = time.time()
    common = dict(outer_iters=outer_iters, outer_lr=outer_lr, optimizer=optimizer, inner_lr=inner_lr,
                  num_samples=num_samples, importance_clip=importance_clip, hypergrad=hypergrad,
                  lambda_bt=lambda_bt, init_scale=init_scale, problem_seed=problem_seed,
                  problem=dict(num_domains=num_domains, prompts_per_domain=prompts_per_domain,
                               num_responses=num_responses, num_features=num_features,
                               misspecification=misspecification))
    jobs = [dict(common, beta=b, inner_steps=K, seed=s) for K in inner_steps for b in betas for s in range(seeds)]
    workers = workers if workers is not None else min(2, os.cpu_count() or 1, len(jobs))
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
            runs = list(ex.map(_run_one, jobs))
    else:
        runs = [_run_one(j) for j in jobs]
    summary, trends = _summarise(runs, betas, inner_steps)
    from oodpl.toy.problem import make_problem

    prob = make_problem(problem_seed, **common["problem"])
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "experiment": "theory",
        "description": ("Bilevel meta-training of a linear RM on the tabular toy problem (toy.py). Each outer step: "
                        "fresh pi_ref samples for every inner step, the core bilevel.meta_gradient (stochastic "
                        "hypergradient), one optimizer step on phi. Measured at every iterate: the exact "
                        "hypergradient grad F(phi_t) of F(phi) = mean_d E_samples[L_out^d(theta_K(phi))] + "
                        "lambda_bt BT, by enumerating every sample tuple (toy.exact_meta_objective)."),
        "config": dict(common, betas=list(betas), inner_steps=list(inner_steps), seeds=seeds,
                       pairs_per_domain=len(prob.pairs[0]),
                       cpu_workers=workers),
        "summary": summary,
        "trends": trends,
        "runs": runs,
        "elapsed_s": round(time.time() - t0, 2),
    }
    _plot(summary, betas, inner_steps, out / "theory.png")
    atomic_write_json(out / "results.json", result)
    return result


def main(output: str, quick: bool = False) -> dict:
    """`oodpl theory --output DIR [--quick]`: run the experiment, return a short summary (also in results.json)."""
    res = run_theory(output, **(QUICK if quick else DEFAULTS))
    return {"output": str(output), "results": str(Path(output) / "results.json"),
            "plot": str(Path(output) / "theory.png"), "elapsed_s": res["elapsed_s"], "trends": res["trends"],
            "final_running_avg": {f"beta={s['beta']},K={s['inner_steps']}": s["final_running_avg"]
                                  for s in res["summary"]}}


if __name__ == "__main__":  # pragma: no cover
    import sys

    print(json.dumps(main(sys.argv[1] if len(sys.argv) > 1 else "theory_out", quick="--quick" in sys.argv),
                     indent=2))
