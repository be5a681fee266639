"""`lmscore eval`: lm-evaluation-harness with the `lmscore` model, against lm-eval's own HFLM.

Both run the local tasks in tests/lm_eval_tasks (multiple choice and rolling
perplexity) on the same weights, the tiny model's (whose tokenizer adds BOS) and the
default model's: the server through gRPC, HFLM through transformers in this process.
Every request's log-likelihood must agree within 1e-3 nats, the greedy flags and the
metrics too.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import LMSCORE, ServerProcess, running_server
from tiny_model import MAX_CONTEXT

REPO = Path(__file__).resolve().parents[1]
TASK_DIR = "tests/lm_eval_tasks"
MC_TASK, ROLLING_TASK = "lmscore_license_mc", "lmscore_license_text"
TOLERANCE = 1e-3
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def samples_by_doc(samples: list[dict]) -> dict[int, list]:
    return {sample["doc_id"]: sample["resps"] for sample in samples}


def read_run(output: Path) -> tuple[dict, dict[str, list[dict]]]:
    [results_file] = output.rglob("results_*.json")
    samples = {
        task: [
            json.loads(line) for f in output.rglob(f"samples_{task}_*.jsonl") for line in f.open()
        ]
        for task in (MC_TASK, ROLLING_TASK)
    }
    return json.loads(results_file.read_text())["results"], samples


def run_lm_eval_cli(
    command: list[str],
    model: str,
    model_args: list[str],
    output: Path,
    batch_size: int,
    timeout: float,
) -> subprocess.CompletedProcess[str]:
    """lm-eval's CLI (`lm_eval`, or `lmscore eval`) with `model` on the local tasks,
    offline, its samples logged to `output`; asserts it ran to its results table."""
    run = subprocess.run(
        [
            *command,
            "--model",
            model,
            "--model_args",
            ",".join(model_args),
            "--tasks",
            f"{MC_TASK},{ROLLING_TASK}",
            "--include_path",
            TASK_DIR,
            "--batch_size",
            str(batch_size),
            "--output_path",
            str(output),
            "--log_samples",
        ],
        cwd=REPO,
        env={**os.environ, **OFFLINE},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert MC_TASK in run.stdout  # lm-eval's results table
    return run


def run_lmscore_eval(address: str, output: Path, *model_args: str) -> tuple[dict, dict]:
    args = [f"server={address}", "concurrency=2", *model_args]
    run_lm_eval_cli([LMSCORE, "eval"], "lmscore", args, output, batch_size=8, timeout=600)
    return read_run(output)


def run_hflm(model_args: str) -> tuple[dict, dict]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    previous = os.getcwd()
    os.environ.update(OFFLINE)
    os.chdir(REPO)  # the task files name their data relative to the repository root
    try:
        evaluated = simple_evaluate(
            model="hf",
            model_args=model_args,
            tasks=[MC_TASK, ROLLING_TASK],
            task_manager=TaskManager(include_path=str(REPO / TASK_DIR)),
            batch_size=8,
            device="cpu",
            log_samples=True,
        )
    finally:
        os.chdir(previous)
    return evaluated["results"], evaluated["samples"]


@pytest.fixture(scope="module")
def lmscore_run(tiny_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory):
    return run_lmscore_eval(tiny_server.address, tmp_path_factory.mktemp("lmscore-eval"))


@pytest.fixture(scope="module")
def hflm_run(tiny_hf_dir: Path):
    return run_hflm(f"pretrained={tiny_hf_dir},dtype=float32,max_length={MAX_CONTEXT - 1}")


def assert_multiple_choice_equal(ours_run: tuple, theirs_run: tuple) -> None:
    (our_results, our_samples), (their_results, their_samples) = ours_run, theirs_run
    ours, theirs = samples_by_doc(our_samples[MC_TASK]), samples_by_doc(their_samples[MC_TASK])
    assert ours.keys() == theirs.keys() and len(ours) == 16
    for doc_id, choices in theirs.items():
        assert len(ours[doc_id]) == len(choices) == 4
        for [[our_logprob, our_greedy]], [[logprob, greedy]] in zip(
            ours[doc_id], choices, strict=True
        ):
            assert float(our_logprob) == pytest.approx(float(logprob), abs=TOLERANCE)
            assert str(our_greedy) == str(greedy)  # the sample log writes them as text
    for metric in ("acc,none", "acc_norm,none"):
        assert our_results[MC_TASK][metric] == their_results[MC_TASK][metric]


def assert_rolling_equal(ours_run: tuple, theirs_run: tuple) -> None:
    (our_results, our_samples), (their_results, their_samples) = ours_run, theirs_run
    ours = samples_by_doc(our_samples[ROLLING_TASK])
    theirs = samples_by_doc(their_samples[ROLLING_TASK])
    assert ours.keys() == theirs.keys() and len(ours) == 6
    for doc_id, [[logprob]] in theirs.items():
        [[our_logprob]] = ours[doc_id]
        # HFLM's float32 log_softmax sums a 49152-word vocabulary in one accumulator and
        # comes out slightly high on every token (export/head.py): 1.1e-3 nats over a
        # 467-nat text of the default model. Long texts get 1e-5 of their total.
        tolerance = max(TOLERANCE, 1e-5 * abs(float(logprob)))
        assert float(our_logprob) == pytest.approx(float(logprob), abs=tolerance)
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert our_results[ROLLING_TASK][metric] == pytest.approx(
            their_results[ROLLING_TASK][metric], rel=1e-4
        )


def test_multiple_choice_equals_hflm(lmscore_run, hflm_run) -> None:
    assert_multiple_choice_equal(lmscore_run, hflm_run)


def test_rolling_perplexity_equals_hflm(lmscore_run, hflm_run) -> None:
    assert_rolling_equal(lmscore_run, hflm_run)


@pytest.mark.e2e
def test_default_model_equals_hflm_on_real_weights(exported_default: Path, tmp_path: Path) -> None:
    """HFLM on the same weights with the exported (faithful) tokenizer: its default BOS rule
    (SmolLM2's GGUF adds none) is the adapter's (it was off by up to 8.6 nats per request
    while the two disagreed on BOS)."""
    from lmscore.export.source import default_gguf_path

    gguf = default_gguf_path()
    with running_server("default") as server:
        ours = run_lmscore_eval(server.address, tmp_path, "max_length=2048")
    theirs = run_hflm(
        f"pretrained={gguf.parent},gguf_file={gguf.name},tokenizer={exported_default},"
        "dtype=float32,max_length=2048"
    )
    assert_multiple_choice_equal(ours, theirs)
    assert_rolling_equal(ours, theirs)


def test_generation_is_refused_clearly(tiny_server: ServerProcess) -> None:
    from lmscore.client.lmeval import LmscoreLM

    model = LmscoreLM(server=tiny_server.address)
    assert model.max_length == MAX_CONTEXT - 1
    with pytest.raises(NotImplementedError, match="does not generate"):
        model.generate_until([])
    with pytest.raises(ValueError, match="max_length must be <= 95"):
        LmscoreLM(server=tiny_server.address, max_length=MAX_CONTEXT)


def test_adapter_splits_batches_and_keeps_request_order(tiny_server: ServerProcess) -> None:
    """More answers per context than batch_size, an empty context, a repeated request: each
    answer equals a direct Score call with lm-eval's conventions, in the order asked."""
    from types import SimpleNamespace

    from lmscore.client import Item, ScoreOptions, ScoringClient
    from lmscore.client.lmeval import LmscoreLM

    context = "This License applies to any program"
    answers = [" or other work", " and", " which", " that", " or"]
    pairs = [(context, a) for a in answers] + [("", "Everyone is permitted"), (context, " and")]
    model = LmscoreLM(server=tiny_server.address, batch_size=2, concurrency=3)
    got = model.loglikelihood([SimpleNamespace(args=p) for p in pairs], disable_tqdm=True)
    # The tiny tokenizer adds BOS: a context gets it (the server's default, HFLM's too);
    # the empty context is the BOS token itself, nothing added.
    with ScoringClient(tiny_server.address) as client:
        assert client.model_info().bos_by_default
        direct = client.score([Item(context, answers)], ScoreOptions(truncate_prompt_left=True))
        assert all(r.bos_added for r in direct)
        [empty] = client.score(
            [Item([1], ["Everyone is permitted"])],
            ScoreOptions(add_bos=False, truncate_prompt_left=True),
        )
    expected = [(r.conditional_logprob, r.greedy) for r in direct]
    expected += [(empty.conditional_logprob, empty.greedy), expected[1]]
    # Equal up to float32 noise of different batch shapes (the server pads differently).
    assert [g for _, g in got] == [g for _, g in expected]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in expected], abs=1e-5)


def test_adapter_reads_add_bos_token_as_hflm_and_rejects_unknown_args(
    tiny_server: ServerProcess,
) -> None:
    from types import SimpleNamespace

    from lmscore.client import Item, ScoreOptions, ScoringClient
    from lmscore.client.lmeval import LmscoreLM

    pair = ("This License applies to any program", " or other work")
    with ScoringClient(tiny_server.address) as client:
        by_bos = {
            add_bos: client.score([Item(*pair[:1], [pair[1]])], ScoreOptions(add_bos=add_bos))[0]
            for add_bos in (True, False)
        }
    assert by_bos[True].conditional_logprob != pytest.approx(by_bos[False].conditional_logprob)
    for value, add_bos in (("False", False), ("true", True), (None, True)):
        model = LmscoreLM(server=tiny_server.address, add_bos_token=value)
        [(logprob, _)] = model.loglikelihood([SimpleNamespace(args=pair)], disable_tqdm=True)
        assert logprob == pytest.approx(by_bos[add_bos].conditional_logprob, abs=1e-5)
    with pytest.raises(ValueError, match="unknown pretrained"):
        LmscoreLM(server=tiny_server.address, pretrained="gpt2")
