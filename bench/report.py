"""The benchmark's report: ratios against the targets, a table, JSON and a PNG plot."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    value: float | None
    target: str
    met: bool | None  # None: not measured in this run
    unit: str = ""

    def row(self) -> str:
        value = "-" if self.value is None else f"{self.value:.3g}{self.unit}"
        if self.value is not None and abs(self.value) < 1e-3:
            value = f"{self.value:.1e}{self.unit}"
        status = {True: "met", False: "MISSED", None: "not measured"}[self.met]
        return f"| {self.name} | {value} | {self.target} | {status} |"


# The HTTP port's batch paths (results["http"]["batch"]): what each sends, as the report
# names it.
HTTP_BATCH = {
    "http_json": "HTTP /lmscore.v1.Scorer/Score (JSON)",
    "http_completions": "HTTP /v1/completions (echo, logprobs 1, max_tokens 0)",
    "http_completions_lm_eval": "HTTP /v1/completions as lm-eval sends it (max_tokens 1)",
}
# Beside them: the work echo with logprobs 1 asks for, through gRPC.
GRPC_DETAILS = "gRPC, token details with top_k 1"
# The short pair's HTTP paths (results["http"]["short_pair"]).
HTTP_PAIR = {
    "json": "HTTP /lmscore.v1.Scorer/Score (JSON)",
    "completions": "HTTP /v1/completions (text, echo, logprobs 1)",
}


def http_checks(http: dict[str, Any]) -> list[Check]:
    """The HTTP port against gRPC on the same server: issue 22's targets."""
    pair, ratios = http["short_pair"], http["batch_ratio_to_grpc"]
    out = [
        Check(
            f"short pair: p50 {name} overhead over gRPC",
            pair[f"{key}_overhead_p50_ms"],
            "<= 3 ms",
            pair[f"{key}_overhead_p50_ms"] <= 3,
            " ms",
        )
        for key, name in HTTP_PAIR.items()
    ]
    out += [
        Check(f"{name} / gRPC, batch scoring", ratios[key], ">= 0.9", ratios[key] >= 0.9, "x")
        for key, name in HTTP_BATCH.items()
    ]
    lm_eval = http.get("lm_eval", {})
    measured = "ratio" in lm_eval
    out.append(
        Check(
            "lm-eval multiple choice wall time: local-completions (HTTP) / lmscore eval (gRPC)",
            lm_eval["ratio"] if measured else None,
            "reported, same acc",
            len(set(lm_eval["acc"].values())) == 1 if measured else None,
            "x",
        )
    )
    return out


def checks(results: dict[str, Any]) -> list[Check]:
    ort = results["ort"]["batch"]["rate_median"]
    grpc = results.get("grpc", {})
    grpc_rate = grpc.get("batch", {}).get("rate_median")
    torch_rate = results.get("pytorch", {}).get("batch", {}).get("rate_median")
    quantized = results.get("quantized")
    out = [
        Check(
            "gRPC / in-process ORT, batch scoring",
            grpc_rate / ort if grpc_rate else None,
            ">= 0.95",
            grpc_rate / ort >= 0.95 if grpc_rate else None,
            "x",
        ),
        Check(
            "gRPC / PyTorch eager, batch scoring",
            grpc_rate / torch_rate if grpc_rate and torch_rate else None,
            ">= 1.35",
            grpc_rate / torch_rate >= 1.35 if grpc_rate and torch_rate else None,
            "x",
        ),
        Check(
            "multiple choice: naive two-pass / prefix reuse",
            results["ort"]["choice_speedup"],
            ">= 6",
            results["ort"]["choice_speedup"] >= 6,
            "x",
        ),
        Check(
            "multiple choice: max |delta conditional| vs naive",
            results["ort"]["choice_max_abs_diff"],
            "<= 1e-4",
            results["ort"]["choice_max_abs_diff"] <= 1e-4,
            " nats",
        ),
        Check(
            "few-shot, one question per request: prefix cache off / on",
            results["ort"]["few_shot"]["speedup"],
            ">= 3",
            results["ort"]["few_shot"]["speedup"] >= 3,
            "x",
        ),
        Check(
            "few-shot: max |delta conditional| cache on vs off",
            results["ort"]["few_shot"]["max_abs_diff"],
            "<= 1e-4",
            results["ort"]["few_shot"]["max_abs_diff"] <= 1e-4,
            " nats",
        ),
    ]
    if quantized:
        out += [
            Check(
                "quantized / fp32 ORT, batch scoring",
                quantized["speedup"],
                ">= 1.5",
                quantized["speedup"] >= 1.5,
                "x",
            ),
            Check(
                "quantized mean |delta log p| per token (held-out)",
                quantized["deviation"]["mean_abs_nats"],
                "<= 0.1",
                quantized["deviation"]["mean_abs_nats"] <= 0.1,
                " nats",
            ),
        ]
    else:
        out.append(Check("quantized / fp32 ORT", None, ">= 1.5 at <= 0.1 nats", None))
    if grpc:
        paired = grpc.get("short_pair_paired")
        overhead = (
            paired["overhead_p50_ms"]
            if paired
            else grpc["short_pair_p50_ms"] - results["ort"]["short_pair_p50_ms"]
        )
        model_mb = results["model_file_bytes"] / 2**20
        rss_mb = grpc["rss_bytes"] / 2**20
        low_mb = grpc["low_memory"]["rss_bytes"] / 2**20 if "low_memory" in grpc else None
        out += [
            Check("short pair: p50 gRPC overhead", overhead, "<= 3 ms", overhead <= 3, " ms"),
            Check(
                "server cold start to SERVING",
                grpc["cold_start_s"],
                "<= 5 s",
                grpc["cold_start_s"] <= 5,
                " s",
            ),
            Check(
                "server RSS, --low-memory",
                low_mb,
                f"<= {1.5 * model_mb + 300:.0f} MB",
                None if low_mb is None else low_mb <= 1.5 * model_mb + 300,
                " MB",
            ),
            Check(
                "server RSS, default (pre-packed weights)",
                rss_mb,
                f"<= {2.5 * model_mb + 300:.0f} MB",
                rss_mb <= 2.5 * model_mb + 300,
                " MB",
            ),
            Check(
                "concurrent clients: cross-request batching / none",
                grpc["concurrency_speedup"],
                "reported",
                None if grpc["concurrency_speedup"] is None else True,
                "x",
            ),
        ]
    if "overload" in grpc:
        out.append(overload_check(grpc["overload"]))
    if "after_idle" in grpc:
        out += after_idle_checks(grpc["after_idle"])
    if "http" in results:
        out += http_checks(results["http"])
    if "research" in results:
        out += research_checks(results["research"])
    return out


def research_checks(research: dict[str, Any]) -> list[Check]:
    """Issue 24's targets (lmscore.bench.research_costs): entropy's share of batch
    throughput, and K labels in one pass against one prompt's pass."""
    cost, labels = research["entropy"]["cost"], research["labels"]
    return [
        Check("entropy on vs off: batch throughput lost", 100 * cost, "<= 5 %", cost <= 0.05, " %"),
        Check(
            f"{labels['labels']} candidate labels / one prompt's pass",
            labels["labels_ratio"],
            "<= 1.2",
            labels["labels_ratio"] <= 1.2,
            "x",
        ),
    ]


def research_rows(research: dict[str, Any]) -> list[str]:
    """The workload table's rows of lmscore.bench.research_costs."""
    entropy, labels = research["entropy"], research["labels"]
    k, prompt = labels["labels"], labels["prompt_tokens"]
    return [
        f"| batch with token details, entropy on / off (tokens/s, in-process) | "
        f"{entropy['entropy_on_rate_median']:.0f} / {entropy['entropy_off_rate_median']:.0f} |",
        f"| {prompt}-token prompt: one pass / {k} labels in it / {k} one-token completions (ms) | "
        f"{labels['one_pass_s'] * 1000:.0f} / {labels['labels_s'] * 1000:.0f} / "
        f"{labels['completions_s'] * 1000:.0f} |",
        f"| labels vs completions, max abs difference (nats) | "
        f"{labels['max_abs_diff_labels_vs_completions']:.1e} |",
    ]


def research_table(research: dict[str, Any]) -> str:
    """`lmscore bench --research` alone: its rows and targets."""
    lines = [f"{research['model']}, research outputs", "", "| workload | result |", "|---|---|"]
    lines += research_rows(research)
    lines += ["", "| target | measured | wanted | status |", "|---|---|---|---|"]
    lines += [c.row() for c in research_checks(research)]
    return "\n".join(lines)


def overload_check(overload: dict[str, Any]) -> Check:
    """Goodput under overload (issue 23): the answered rate with 5x as many clients as the
    server admits at once, over the rate at capacity (lmscore.bench.overload)."""
    at, over = overload["at_capacity"], overload["overloaded"]
    ratio = overload["goodput_ratio"]
    label = (
        f"answered/s, {over['clients']} clients / {at['clients']} "
        f"({over['answered_per_s']:.0f} / {at['answered_per_s']:.0f})"
    )
    return Check(label, ratio, ">= 0.8", ratio >= 0.8, "x")


def _after_idle_gaps(row: dict[str, Any]) -> list[str]:
    return [key.removeprefix("after_") for key in row if key.startswith("after_")]


def after_idle_checks(after_idle: dict[str, Any]) -> list[Check]:
    """Requests after idle as fast as back to back (issue 23): back-to-back time over the
    after-idle one, for the batch and the short pair, after each gap; of the calls no
    other process on the machine disturbed (lmscore.bench.after_idle), the server's own
    figure. The full run's table gives all calls' figure beside it."""
    checks = []
    for name, row in after_idle.items():
        for gap in _after_idle_gaps(row):
            after = row[f"after_{gap}"]
            ratio = after["undisturbed_ratio"]
            label = (
                f"{name.replace('_', ' ')} after {gap} idle: back to back / after idle "
                f"(undisturbed calls; all calls {after['ratio']:.2f}x)"
            )
            checks.append(
                Check(label, ratio, ">= 0.95", None if ratio is None else ratio >= 0.95, "x")
            )
    return checks


def _after_idle_cell(timed: dict[str, Any], ratio_key: str = "") -> str:
    """Median ms of all calls and of the undisturbed ones, with the back-to-back ratios."""
    cell = f"{timed['median_s'] * 1000:.1f}"
    if ratio_key:
        cell += f" ({timed[ratio_key]:.2f}x)"
    undisturbed = timed["undisturbed_median_s"]
    if undisturbed is None:
        return cell + f"; undisturbed: none of {timed['calls']}"
    cell += f"; undisturbed {undisturbed * 1000:.1f}"
    if ratio_key and timed[f"undisturbed_{ratio_key}"] is not None:
        cell += f" ({timed[f'undisturbed_{ratio_key}']:.2f}x)"
    return cell + f", {timed['undisturbed_calls']}/{timed['calls']}"


def after_idle_table(results: dict[str, Any]) -> str:
    """`lmscore bench --after-idle`: each process's rows, milliseconds and back-to-back
    ratios, of all calls and of those no other process disturbed."""
    lines = [
        f"CPU: {results['cpu']}",
        "",
        "Median ms (back to back / after idle); undisturbed: the calls during which the "
        f"machine's other processes ran under {results['disturbed_share']:.0%} of the call's "
        "time on a CPU.",
        "",
        "| process | workload | back to back | after 3 s idle | after 15 s idle |",
        "|---|---|---|---|---|",
    ]
    for process, rows in results.items():
        if not isinstance(rows, dict):
            continue  # the CPU, the threshold
        for name, row in rows.items():
            if not isinstance(row, dict):
                continue
            cells = [
                _after_idle_cell(row[f"after_{gap}"], "ratio") for gap in _after_idle_gaps(row)
            ]
            lines.append(
                f"| {process} | {name.replace('_', ' ')} | {_after_idle_cell(row['back_to_back'])} "
                f"| {' | '.join(cells)} |"
            )
        if "rss_held_bytes" in rows:
            lines.append(
                f"| {process} | RSS 1.5 s after | {rows['rss_held_bytes'] / 2**20:.0f} MB | | |"
            )
    return "\n".join(lines)


def http_rows(http: dict[str, Any]) -> list[str]:
    """The workload table's rows of the HTTP port: short pair latencies, lm-eval's time."""
    pair = http["short_pair"]
    lines = [
        f"| short pair, one server, the paths in turn: p50 / p99 gRPC (ms) | "
        f"{pair['grpc_p50_ms']:.1f} / {pair['grpc_p99_ms']:.1f} |"
    ]
    lines += [
        f"| short pair, same rounds: p50 / p99 {name}, median overhead over gRPC (ms) | "
        f"{pair[f'{key}_p50_ms']:.1f} / {pair[f'{key}_p99_ms']:.1f}, "
        f"{pair[f'{key}_overhead_p50_ms']:.2f} |"
        for key, name in HTTP_PAIR.items()
    ]
    lm_eval = http.get("lm_eval")
    if lm_eval is None:
        return lines
    label = "| lm-eval lmscore_license_mc wall time, local-completions (HTTP) / lmscore eval (gRPC)"
    if "skipped" in lm_eval:
        return [*lines, f"{label} | skipped: {lm_eval['skipped']} |"]
    acc = lm_eval["acc"]
    return [
        *lines,
        f"{label}, best of {lm_eval['rounds']} (s) | {lm_eval['local_completions_s']:.1f} / "
        f"{lm_eval['lmscore_eval_s']:.1f} (acc {acc['local_completions']:.3f} / "
        f"{acc['lmscore_eval']:.3f}) |",
    ]


def table(results: dict[str, Any]) -> str:
    machine = results["machine"]
    load = [f"{machine[key][0]:.1f}" for key in ("load_average_at_start", "load_average_at_end")]
    lines = [f"{results['model']} on {machine['cpu']}; load average {' -> '.join(load)}", ""]
    sections = [
        ("PyTorch eager", results.get("pytorch")),
        ("ONNX Runtime in-process", results["ort"]),
        ("gRPC end to end", results.get("grpc")),
        ("ONNX Runtime quantized", results.get("quantized")),
    ]
    rates = [
        (name, section["batch"]) for name, section in sections if section and "batch" in section
    ]
    http = results.get("http", {})
    if "batch" in http:
        rates.append((GRPC_DETAILS, http["batch"]["grpc_token_details"]))
        rates += [(name, http["batch"][key]) for key, name in HTTP_BATCH.items()]
    lines.append("| path | batch tokens/s (median) | min s | max s |")
    lines.append("|---|---|---|---|")
    for name, b in rates:
        lines.append(f"| {name} | {b['rate_median']:.0f} | {b['min_s']:.3f} | {b['max_s']:.3f} |")
    ort = results["ort"]
    lines += [
        "",
        "| workload | value |",
        "|---|---|",
        f"| multiple choice, naive two-pass (s) | {ort['choice_naive']['median_s']:.3f} |",
        f"| multiple choice, prefix reuse (s) | {ort['choice_prefix_reuse']['median_s']:.3f} |",
        f"| few-shot, 64 requests, prefix cache off (s) | "
        f"{ort['few_shot']['seconds_cache_off']:.2f} |",
        f"| few-shot, 64 requests, prefix cache on (s) | "
        f"{ort['few_shot']['seconds_cache_on']:.2f} |",
        f"| short pair p50 / p99 in-process (ms) | {ort['short_pair_p50_ms']:.1f} / "
        f"{ort['short_pair_p99_ms']:.1f} |",
    ]
    grpc = results.get("grpc")
    if grpc:
        lines += [
            f"| short pair p50 / p99 gRPC (ms) | {grpc['short_pair_p50_ms']:.1f} / "
            f"{grpc['short_pair_p99_ms']:.1f} |",
            *(
                [
                    f"| short pair alternating with in-process after a pause: p50 in-process / "
                    f"gRPC, median overhead (ms) | {paired['in_process_p50_ms']:.1f} / "
                    f"{paired['grpc_p50_ms']:.1f}, {paired['overhead_p50_ms']:.2f} |"
                ]
                if (paired := grpc.get("short_pair_paired"))
                else []
            ),
            f"| {grpc['concurrent_batched']['clients']} clients, cross-request batching "
            "(pairs/s) | "
            f"{grpc['concurrent_batched']['pairs_per_s']:.1f} |",
            f"| {grpc['concurrent_batched']['clients']} clients, no cross-request batching "
            "(pairs/s) | "
            f"{grpc['concurrent_unbatched']['pairs_per_s']:.1f} |",
            f"| server cold start to SERVING, first start / optimized graph cached (s) | "
            f"{grpc['cold_start_s']:.2f} / {grpc['cold_start_cached_graph_s']:.2f} |",
            f"| server RSS after the runs: idle past --memory-hold / held 1.5 s after / peak "
            f"(MB) | {grpc['rss_bytes'] / 2**20:.0f} / "
            f"{grpc.get('rss_held_bytes', grpc['rss_bytes']) / 2**20:.0f} / "
            f"{grpc['peak_rss_bytes'] / 2**20:.0f} |",
        ]
        low = grpc.get("low_memory")
        if low:
            lines += [
                f"| gRPC batch, `--low-memory` (tokens/s) | {low['batch']['rate_median']:.0f} |",
                f"| server RSS after the runs / peak, `--low-memory` (MB) | "
                f"{low['rss_bytes'] / 2**20:.0f} / {low['peak_rss_bytes'] / 2**20:.0f} |",
            ]
    if http:
        lines += http_rows(http)
    torch_pair = results.get("pytorch", {}).get("short_pair_p50_ms")
    if torch_pair is not None:
        lines.append(f"| short pair p50 PyTorch eager, one pass (ms) | {torch_pair:.1f} |")
    if "research" in results:
        lines += research_rows(results["research"])
    quantized = results.get("quantized")
    if quantized:
        d = quantized["deviation"]
        lines.append(
            f"| quantized deviation, mean / max per token (nats, {d['tokens']} held-out tokens) | "
            f"{d['mean_abs_nats']:.4f} / {d['max_abs_nats']:.3f} |"
        )
    lines += ["", "| target | measured | wanted | status |", "|---|---|---|---|"]
    lines += [c.row() for c in checks(results)]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (rates, choice, concurrent) = plt.subplots(1, 3, figsize=(14, 4.2))
    names, values = [], []
    for name, key in [
        ("PyTorch\neager", "pytorch"),
        ("ORT\nin-process", "ort"),
        ("gRPC\nend to end", "grpc"),
        ("ORT\nquantized", "quantized"),
    ]:
        section = results.get(key)
        if section and "batch" in section:
            names.append(name)
            values.append(section["batch"]["rate_median"])
    for name, key in [("HTTP\nJSON", "http_json"), ("HTTP\ncompletions", "http_completions")]:
        if "batch" in results.get("http", {}):
            names.append(name)
            values.append(results["http"]["batch"][key]["rate_median"])
    rates.bar(names, values, color="#4477aa")
    rates.set_title("batch scoring, 8 x 128 tokens")
    rates.set_ylabel("tokens scored / s (median)")
    ort = results["ort"]
    choice.bar(
        ["naive\ntwo-pass", "prefix\nreuse"],
        [ort["choice_naive"]["median_s"], ort["choice_prefix_reuse"]["median_s"]],
        color=["#bb5566", "#228833"],
    )
    choice.set_title(f"multiple choice: {ort['choice_speedup']:.1f}x faster")
    choice.set_ylabel("seconds per 256-token prompt + 8 x 16")
    grpc = results.get("grpc")
    if grpc:
        concurrent.bar(
            ["without\nbatching", "cross-request\nbatching"],
            [
                grpc["concurrent_unbatched"]["pairs_per_s"],
                grpc["concurrent_batched"]["pairs_per_s"],
            ],
            color=["#bb5566", "#228833"],
        )
        concurrent.set_title(f"16 concurrent clients: {grpc['concurrency_speedup']:.2f}x")
        concurrent.set_ylabel("pairs / s")
    figure.suptitle(f"lmscore bench: {results['model']}, {results['machine']['cpus']} CPUs")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write(results: dict[str, Any], output_dir: Path) -> tuple[Path, Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / "bench.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    png_path = output_dir / "bench.png"
    plot(results, png_path)
    return json_path, png_path
