"""`tokenfuse bench --task vlm --model FOLDER --data FILE.jsonl` on a tiny random model folder of every
supported family, saved with its own processor (a tokenizer built here, the family's image processor,
a chat template) and read back by AutoProcessor, on images of several sizes made here: the rows and
columns of the packaged bench, the operators a family refuses left out with their reason, and the
errors that come before any work.

The Qwen-VL and LLaVA-OneVision processors hold a video processor, which needs torchvision: those
families run in .venv-timm (`make test`), and are skipped where torchvision is missing."""

from __future__ import annotations

import importlib.util
import json
import re

import numpy as np
import pytest
import transformers as tf
from PIL import Image
from test_anyres import IMAGE as ANYRES_IMAGE
from test_anyres import PINPOINTS, VIDEO, tiny_anyres
from test_llava import IMAGE as LLAVA_IMAGE
from test_llava import tiny_llava
from test_qwen_vl import END, START, tiny_qwen
from test_qwen_vl import IMAGE as QWEN_IMAGE
from tokenizers import Tokenizer, models, pre_tokenizers

from tokenfuse.cli import main
from tokenfuse.eval.bench_vlm import same

TORCHVISION = importlib.util.find_spec("torchvision") is not None
WORDS = [
    "what",
    "is",
    "shown",
    "in",
    "this",
    "picture",
    "colour",
    "shape",
    "red",
    "green",
    "blue",
    "square",
    "circle",
    "bar",
    "a",
    "the",
]
SIZES = [(30, 50), (60, 20), (40, 40), (36, 36), (20, 60)]  # (height, width) of the images
QUESTIONS = ["what is shown", "what colour is this", "what shape is in the picture"]
ANSWERS = ["a red square", "blue", "circle"]
LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "IMAGE {% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
QWEN_TEMPLATE = LLAVA_TEMPLATE.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>")
#: family -> operators left out on it, each with words its note must hold
REFUSED = {
    "llava": {},
    "llava-next": {"pool": "base view plus unpadded crops", "resize": "fixed patch grid"},
    "llava-onevision": {"pool": "base view plus unpadded crops", "resize": "fixed patch grid"},
    "qwen2-vl": {"resize": "resize"},
    "qwen2.5-vl": {"resize": "resize"},
    "qwen3-vl": {"resize": "resize"},
}
NEEDS_TORCHVISION = ("llava-onevision", "qwen2-vl", "qwen2.5-vl", "qwen3-vl")


def tokenizer(specials: dict[str, int], size: int) -> tf.PreTrainedTokenizerFast:
    """A word-level tokenizer of `size` ids whose special tokens sit at the ids the tiny model's
    config expects (pad 0, bos 1, eos 2, unk 3, the words from 4)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {w: i for i, w in enumerate(WORDS, 4)}
    vocab |= specials | {"assistant:": len(vocab), "user:": len(vocab) + 1}
    vocab |= {f"<unused{i}>": i for i in set(range(size)) - set(vocab.values())}
    assert sorted(vocab.values()) == list(range(size))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = tf.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    out.add_special_tokens({"additional_special_tokens": list(specials)})
    return out


def llava_like(family: str):
    """(model, processor) of a LLaVA family: CLIP (SigLIP for OneVision) at 28 px in patches of 7."""
    tokens = tokenizer({"<image>": LLAVA_IMAGE if family == "llava" else ANYRES_IMAGE} | (
        {"<video>": VIDEO} if family != "llava" else {}), 65 if family == "llava" else 66)  # fmt: skip
    template = LLAVA_TEMPLATE.replace("IMAGE", "<image>")
    square = dict(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    clip = dict(patch_size=7, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    if family == "llava":
        images = tf.CLIPImageProcessor(**square)
        return tiny_llava(tower="clip"), tf.LlavaProcessor(images, tokens, chat_template=template, **clip)
    if family == "llava-next":
        images = tf.LlavaNextImageProcessor(**square, image_grid_pinpoints=PINPOINTS)
        processor = tf.LlavaNextProcessor(images, tokens, chat_template=template, **clip)
        return tiny_anyres("next"), processor
    images = tf.LlavaOnevisionImageProcessor(size={"height": 28, "width": 28}, image_grid_pinpoints=PINPOINTS)
    processor = tf.LlavaOnevisionProcessor(
        images, tokens, tf.LlavaOnevisionVideoProcessor(), chat_template=template, num_image_tokens=16,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_2",
    )  # fmt: skip
    return tiny_anyres("onevision"), processor


def qwen(family: str):
    """(model, processor) of a Qwen-VL family: patches of 4 px merged 2 x 2, at most 64 x 64 px."""
    specials = {"<|image_pad|>": QWEN_IMAGE, "<|vision_start|>": START, "<|vision_end|>": END}
    tokens = tokenizer(specials | {"<|video_pad|>": 63}, 64)
    images = tf.Qwen2VLImageProcessor(
        patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16, max_pixels=64 * 64
    )
    processor, video = {
        "qwen2-vl": (tf.Qwen2VLProcessor, tf.Qwen2VLVideoProcessor),
        "qwen2.5-vl": (tf.Qwen2_5_VLProcessor, tf.Qwen2VLVideoProcessor),
        "qwen3-vl": (tf.Qwen3VLProcessor, tf.Qwen3VLVideoProcessor),
    }[family]
    return tiny_qwen(family), processor(images, tokens, video(), chat_template=QWEN_TEMPLATE)


def write_data(folder, n: int = 5) -> str:
    """n images of different sizes and colours, and a JSONL file asking about each (relative paths)."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"image{i}.png")
        row = {"image": f"image{i}.png", "question": QUESTIONS[i % 3], "answer": ANSWERS[i % 3]}
        lines.append(json.dumps(row))
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(REFUSED))
def test_bench_runs_a_model_folder_of_each_family_on_the_users_data(family, tmp_path, capsys):
    if family in NEEDS_TORCHVISION and not TORCHVISION:
        pytest.skip(f"the {family} processor's video part needs torchvision (run in .venv-timm)")
    model, processor = llava_like(family) if family.startswith("llava") else qwen(family)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    data = write_data(tmp_path)
    out = tmp_path / "results.json"
    argv = [*bench(str(folder), data), "--method", "random,pool,resize", "--keep", "0.25"]
    argv += ["--batch-size", "2", "--repeats", "1", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "answer %" in printed.out and "tokenfuse bench --task vlm:" in printed.out
    results = json.loads(out.read_text())
    rows = {r["method"]: r for r in results["rows"]}
    refused = REFUSED[family]
    assert list(rows) == [m for m in ("full", "random", "pool", "resize") if m not in refused]
    for method, reason in refused.items():
        (note,) = [n for n in results["notes"] if n.startswith(f"{method} left out on {folder}")]
        assert reason in note
    full = rows["full"]
    assert full["agreement"] == 100.0 and full["kl"] == pytest.approx(0, abs=1e-6) and full["visual"] == 1.0
    for r in rows.values():
        assert r["images"] == 5 and r["model"] == str(folder)
        assert 0 <= r["answer_acc"] <= 100 and r["speedup"] > 0 and r["generation_speedup"] > 0
        assert r["kl"] >= 0 and 0 < r["flops"] <= 1 and r["scoring"] is not None
    for method in set(rows) - {"full"}:  # a quarter of the visual tokens (AnyRes: newlines on top)
        assert 0.2 < rows[method]["visual"] < (0.6 if family.startswith("llava-") else 0.35)
        assert rows[method]["flops"] < 1
    if family == "llava":  # 16 tokens per image -> 4; resize also shrinks the tower's work
        assert rows["random"]["visual"] == rows["pool"]["visual"] == pytest.approx(0.25)
        assert rows["resize"]["flops"] < rows["pool"]["flops"]
    assert results["meta"]["arguments"]["data"] == data


def bench(model: str, data: str) -> list[str]:
    return ["bench", "--task", "vlm", "--model", model, "--data", data, "--no-progress"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            '{"image": "image0.png", "question": "what"}',
            r"line 2 has no 'answer'.*image, question and answer",
        ),
        ('{"image": "image0.png", "question": " ", "answer": "x"}', r"line 2 has no 'question'"),
        ('{"image": "image0.png", "question": "what", answer: 1}', r"line 2 is not JSON.*one object"),
        ('["image0.png", "what", "red"]', r"line 2 is a JSON list, not an object"),
        ('{"image": "gone.png", "question": "what", "answer": "x"}', r"line 2: image gone.png not found"),
    ],
)
def test_a_bad_line_is_named_before_the_model_is_looked_at(line, message, tmp_path, capsys):
    """The model does not exist: the data's error comes first."""
    data = write_data(tmp_path, n=1)
    with open(data, "a") as f:
        f.write(line + "\n")
    assert main(bench(str(tmp_path / "no-model"), data)) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{data} " in err or f"{data}:" in err
    assert re.search(message, err), err


def test_an_unsupported_family_gets_the_dispatchers_message_before_its_weights(tmp_path, capsys):
    """Only the config is in the folder: the family is told from it."""
    text = dict(
        vocab_size=66, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    vision = dict(image_size=28, patch_size=7, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    config = tf.LlavaNextVideoConfig(text_config=tf.LlamaConfig(**text).to_dict(), vision_config=vision)
    config.save_pretrained(tmp_path / "model")
    assert main(bench(str(tmp_path / "model"), write_data(tmp_path, n=1))) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "LLaVA-NeXT-Video model" in err and "does not support yet" in err and "qwen2.5-vl" in err


def test_a_text_model_folder_is_not_taken_for_a_vlm(tmp_path, capsys):
    config = tf.BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    config.save_pretrained(tmp_path / "model")
    assert main(bench(str(tmp_path / "model"), write_data(tmp_path, n=1))) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "is a 'bert' model, not a vision-language model" in err and "llava-onevision" in err


def test_model_and_data_go_together(tmp_path, capsys):
    assert main(["bench", "--task", "vlm", "--data", write_data(tmp_path, n=1)]) == 2
    assert "--model and --data go together" in capsys.readouterr().err


def test_a_reply_gives_the_answer_whatever_its_case_spaces_and_final_full_stop():
    assert same(" A red  square.", "a red square") and same("Blue", "blue")
    assert not same("a red", "a red square") and not same("blue.", "blue!")
