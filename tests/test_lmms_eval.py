"""`lmms-eval --model tokenfuse` (tokenfuse.eval.lmms) on a tiny random model folder of every supported
family, through lmms-eval's own evaluation (`simple_evaluate`) of a local task: a YAML file, a JSONL
dataset and images the test makes, read offline. Runs where lmms-eval is installed (.venv-lmms,
`make test`); skipped elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

lmms_eval = pytest.importorskip("lmms_eval")

from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.evaluator import simple_evaluate  # noqa: E402
from lmms_eval.models import get_model  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402
from PIL import Image  # noqa: E402
from test_bench_vlm_data import REFUSED, llava_like, qwen, write_data  # noqa: E402

from tokenfuse import patch_of  # noqa: E402
from tokenfuse.eval.lmms import TokenFuse  # noqa: E402

TASK = "tokenfuse_local"
VISUAL = """from pathlib import Path

from PIL import Image


def doc_to_visual(doc):
    return [Image.open(Path(__file__).parent / doc["image"]).convert("RGB")]
"""


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Nothing is downloaded: the hub and datasets are offline, the datasets cache is the test's."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "datasets"))


def model_folder(family: str, tmp_path) -> str:
    model, processor = llava_like(family) if family.startswith("llava") else qwen(family)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def write_task(tmp_path) -> str:
    """A task folder: five questions about five images (write_data), answered by exact match."""
    data = write_data(tmp_path)
    (tmp_path / "tokenfuse_local_visual.py").write_text(VISUAL)
    (tmp_path / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: generate_until\n"
        "doc_to_visual: !function tokenfuse_local_visual.doc_to_visual\n"
        "doc_to_text: question\ndoc_to_target: answer\n"
        "generation_kwargs:\n  max_new_tokens: 4\n  temperature: 0\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return str(tmp_path)


def evaluate(folder: str, tasks: str, batch_size: int = 2, **args) -> tuple[float, list[str]]:
    """lmms-eval's evaluation of the local task: its exact-match score and each document's reply."""
    model_args = ",".join(f"{k}={v}" for k, v in {"pretrained": folder, **args}.items())
    out = simple_evaluate(
        model="tokenfuse",
        model_args=model_args,
        tasks=[TASK],
        batch_size=batch_size,
        task_manager=TaskManager(include_path=tasks),
        log_samples=True,
    )
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    return out["results"][TASK]["exact_match,none"], [s["resps"][0][0] for s in samples]


@pytest.mark.slow
@pytest.mark.parametrize("family", list(REFUSED))
def test_lmms_eval_runs_a_reduced_model_of_each_family_on_a_local_task(family, tmp_path):
    folder, tasks = model_folder(family, tmp_path), write_task(tmp_path)
    score, replies = evaluate(folder, tasks, method="divprune", keep=0.25)
    assert 0 <= score <= 1 and len(replies) == 5
    _, full = evaluate(folder, tasks, method="full")
    _, same = evaluate(folder, tasks, method="divprune", keep=1.0)
    assert same == full and any(r.strip() for r in full)


@pytest.mark.slow
def test_a_batch_answers_as_its_rows_alone_and_greedy_replies_score_as_greedy(tmp_path):
    """Generation and loglikelihood, called as lmms-eval calls them: batched rows give what they
    give alone; a greedy reply's tokens are each the most likely, a changed reply's are not."""
    folder = model_folder("qwen2-vl", tmp_path)
    rows = [json.loads(line) for line in Path(write_data(tmp_path)).read_text().splitlines()]
    docs = [{**row, "picture": Image.open(tmp_path / row["image"]).convert("RGB")} for row in rows]
    batched, alone = (
        TokenFuse(folder, method="divprune", keep=0.25, batch_size=b, dtype="float32") for b in (2, 1)
    )

    def requests(kind: str, second) -> list[Instance]:
        return [
            Instance(
                kind,
                (doc["question"], second(i), lambda d: [d["picture"]], i, TASK, "test"),
                idx=0,
                metadata={"task": TASK, "doc_id": i, "repeats": 1},
            )
            for i, doc in enumerate(docs)
        ]

    for lm in (batched, alone):
        lm.task_dict = {TASK: {"test": docs}}
    settings = {"max_new_tokens": 3, "temperature": 0, "until": ["\n"]}
    replies = batched.generate_until(requests("generate_until", lambda i: dict(settings)))
    assert replies == alone.generate_until(requests("generate_until", lambda i: dict(settings)))
    assert patch_of(batched.model) is not None and len(set(replies)) > 1
    first = batched.generate_until(requests("generate_until", lambda i: {"max_new_tokens": 1}))
    kept = [i for i, word in enumerate(first) if word]  # a special token is skipped in decoding
    docs[:] = [docs[i] for i in kept]
    first = [first[i] for i in kept]
    assert len(first) >= 2
    scores = batched.loglikelihood(requests("loglikelihood", lambda i: " " + first[i]))
    again = alone.loglikelihood(requests("loglikelihood", lambda i: " " + first[i]))
    assert [s for s, _ in scores] == pytest.approx([s for s, _ in again], abs=1e-4)
    assert all(greedy and logp < 0 for logp, greedy in scores + again)
    changed = batched.loglikelihood(requests("loglikelihood", lambda i: " " + first[i] + " zebra"))
    assert not any(greedy for _, greedy in changed)


def test_the_entry_point_registers_the_model_with_lmms_eval():
    assert get_model("tokenfuse") is TokenFuse


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"method": "nope", "keep": 0.25}, "unknown visual-token operator 'nope'; choose one of"),
        ({"method": "divprune", "keep": 1.5}, "keep must be a number in (0, 1]"),
        ({"method": "divprune", "keep": 0.25, "size": 3}, "divprune has no option 'size'"),
        ({}, "give method= in --model_args"),
        ({"method": "full", "keep": 0.5}, "method=full runs the unreduced model"),
        ({"method": "divprune", "batch_size": "auto"}, "batch_size must be a positive whole number"),
        ({"method": "divprune", "dtype": "int8"}, "give bfloat16, float16, float32 or auto"),
    ],
)
def test_bad_model_args_are_refused_before_the_model_is_looked_at(args, message, tmp_path):
    """The folder does not exist: the argument's error comes first."""
    with pytest.raises((ValueError, TypeError)) as error:
        TokenFuse(str(tmp_path / "no-model"), **args)
    assert message in str(error.value)


def test_an_operator_the_family_refuses_is_refused_with_its_reason_before_any_request(tmp_path):
    with pytest.raises(ValueError, match="base view plus unpadded crops"):
        TokenFuse(model_folder("llava-next", tmp_path), method="pool", keep=0.25)
