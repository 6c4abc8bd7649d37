"""PNG plots for `codecllm bench --plot DIR` (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def write_plots(directory: str | Path, baseline, results, hit_rates, memory) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, ax, title: str, name: str) -> None:
        ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        fig.tight_layout()
        written.append(directory / name)
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = ["baseline"] + [r.label for r in results]
    values = [baseline.tokens_per_second] + [r.tokens_per_second for r in results]
    ax.bar(labels, values, color=["#555"] + ["#2a7"] * len(results))
    ax.set_ylabel("tokens / s")
    save(fig, ax, "Generation speed by weight-cache policy", "speed_by_policy.png")

    if hit_rates:
        fig, ax = plt.subplots(figsize=(7, 4))
        for kind, marker in (("lru", "o"), ("pin", "s")):
            rows = [r for r in hit_rates if r["policy"].startswith(kind)]
            sizes = [int(r["policy"].split(":")[1]) for r in rows]
            ax.plot(sizes, [r["measured"] for r in rows], marker=marker, label=f"{kind} measured")
            ax.plot(sizes, [r["theory"] for r in rows], linestyle="--", label=f"{kind} theory")
        ax.set_xlabel("cache size K (layers)")
        ax.set_ylabel("hit rate")
        save(fig, ax, "Hit rate on a cyclic layer scan", "hit_rate.png")

    if memory:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["blocks"] for r in memory], [r["weights_held"] / 2**20 for r in memory], marker="o",
                label="weights held")
        ax.plot([r["blocks"] for r in memory], [r["peak"] / 2**20 for r in memory], marker="s", label="peak")
        ax.set_xlabel("compressed blocks")
        ax.set_ylabel("MiB")
        save(fig, ax, "Memory vs number of compressed blocks", "memory_vs_layers.png")
    return written
