"""`lmscore eval`: lm-evaluation-harness with the `lmscore` model, against lm-eval's own HFLM.

Both run the local tasks in tests/lm_eval_tasks (multiple choice and rolling
perplexity) on the same tiny weights: the server through gRPC, HFLM through
transformers in this process. Every request's log-likelihood must agree
within 1e-3 nats, the greedy flags and the metrics too.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import LMSCORE, ServerProcess
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


@pytest.fixture(scope="module")
def lmscore_run(tiny_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory):
    output = tmp_path_factory.mktemp("lmscore-eval")
    run = subprocess.run(
        [
            LMSCORE,
            "eval",
            "--model",
            "lmscore",
            "--model_args",
            f"server={tiny_server.address},concurrency=2",
            "--tasks",
            f"{MC_TASK},{ROLLING_TASK}",
            "--include_path",
            TASK_DIR,
            "--batch_size",
            "8",
            "--output_path",
            str(output),
            "--log_samples",
        ],
        cwd=REPO,
        env={**os.environ, **OFFLINE},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "lmscore_license_mc" in run.stdout  # lm-eval's results table
    return read_run(output)


@pytest.fixture(scope="module")
def hflm_run(tiny_hf_dir: Path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    previous = os.getcwd()
    os.environ.update(OFFLINE)
    os.chdir(REPO)  # the task files name their data relative to the repository root
    try:
        evaluated = simple_evaluate(
            model="hf",
            model_args=f"pretrained={tiny_hf_dir},dtype=float32,max_length={MAX_CONTEXT - 1}",
            tasks=[MC_TASK, ROLLING_TASK],
            task_manager=TaskManager(include_path=str(REPO / TASK_DIR)),
            batch_size=8,
            device="cpu",
            log_samples=True,
        )
    finally:
        os.chdir(previous)
    return evaluated["results"], evaluated["samples"]


def test_multiple_choice_equals_hflm(lmscore_run, hflm_run) -> None:
    (our_results, our_samples), (their_results, their_samples) = lmscore_run, hflm_run
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


def test_rolling_perplexity_equals_hflm(lmscore_run, hflm_run) -> None:
    (our_results, our_samples), (their_results, their_samples) = lmscore_run, hflm_run
    ours = samples_by_doc(our_samples[ROLLING_TASK])
    theirs = samples_by_doc(their_samples[ROLLING_TASK])
    assert ours.keys() == theirs.keys() and len(ours) == 6
    for doc_id, [[logprob]] in theirs.items():
        [[our_logprob]] = ours[doc_id]
        assert float(our_logprob) == pytest.approx(float(logprob), abs=TOLERANCE)
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert our_results[ROLLING_TASK][metric] == pytest.approx(
            their_results[ROLLING_TASK][metric], rel=1e-4
        )


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
    options = ScoreOptions(add_bos=False, truncate_prompt_left=True)
    with ScoringClient(tiny_server.address) as client:
        direct = client.score([Item(context, answers)], options)
        [empty] = client.score([Item([1], ["Everyone is permitted"])], options)
    expected = [(r.conditional_logprob, r.greedy) for r in direct]
    expected += [(empty.conditional_logprob, empty.greedy), expected[1]]
    # Equal up to float32 noise of different batch shapes (the server pads differently).
    assert [g for _, g in got] == [g for _, g in expected]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in expected], abs=1e-5)
