"""Exporters that write real data sets as cit tasks (see cit_registry.taskdata for the format)."""
from __future__ import annotations

import gzip
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cit_registry.taskdata import Sample


def load_images(samples: list[Sample]) -> list[Image.Image]:
    out = []
    for s in samples:
        with Image.open(s.image) as img:
            out.append(img.convert("RGB"))
    return out


# ---------------------------------------------------------------- exporters of real data sets

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
WORDS = ["apple", "river", "stone", "cloud", "tiger", "bread", "chair", "light", "green", "music",
         "ocean", "paper", "house", "plant", "smile", "train", "water", "zebra", "honey", "lemon"]

Example = tuple[Image.Image, str, str]  # image, instruction, output
Labelled = tuple[Image.Image, str]       # image, output: an exporter's rows before an instruction is chosen


@dataclass(frozen=True)
class Templates:
    """A task's instruction wordings: training rows use `train` only; test rows are written once with a training
    wording and once with a held-out one, so answers under wording the adapter never saw are measured."""

    train: tuple[str, ...]
    held_out: tuple[str, ...]


# Eight or more wordings per task, five trained on, the rest held out. Held-out ones were chosen to differ from the
# training ones in form (an order, a statement, other words for the thing asked), not only in a word or two.
TEMPLATES = {
    "fashion-mnist": Templates(
        ("What item of clothing is shown in the image?", "Which garment is this?",
         "Name the piece of clothing in this picture.", "What kind of clothing or footwear does the photo show?",
         "Identify the fashion item in the image."),
        ("Tell me what type of apparel appears here.", "Classify this clothing image.",
         "What would you call the article of clothing pictured?")),
    "digits": Templates(
        ("Which digit is written in the image? Answer with a word.", "What number is shown here? Spell it out.",
         "Read the handwritten digit and write it as a word.", "What digit do you see? Give it as a word.",
         "Name the number in this picture, in words."),
        ("Which numeral has been drawn? Reply in words.", "Tell me the digit in the image, spelled out.",
         "What single number is handwritten here? Write the word for it.")),
    "easyvqa-shape": Templates(
        ("What shape is in the image?", "Which shape does the picture contain?", "Name the geometric figure shown.",
         "What is the form of the object in the image?", "Is it a circle, a rectangle or a triangle?"),
        ("Tell me which shape you see.", "Identify the figure drawn here.", "What shape is present?")),
    "easyvqa-color": Templates(
        ("What color is the shape?", "What is the color of the shape?", "Which colour is the object in the image?",
         "Name the colour of the figure.", "What color has the shape been painted?"),
        ("Tell me the shape's colour.", "Which color do you see on the shape?", "What hue is the object?")),
    "words": Templates(
        ("What word is written in the image?", "Read the text in this picture.", "What does the image say?",
         "Transcribe the word shown.", "Which word appears in the image?"),
        ("Tell me the word printed here.", "What text can you see in the picture?",
         "Spell out the word in this image.")),
    # New questions over the images above (the routing suite's "same images, new question" tasks)
    "fashion-footwear": Templates(
        ("Is this item worn on the feet? Answer yes or no.", "Does the picture show footwear?",
         "Is this a kind of shoe? Say yes or no.", "Would you wear this on your feet?",
         "Is the item in the image footwear, yes or no?"),
        ("Tell me whether this goes on someone's feet.", "Is what you see here a shoe, a sandal or a boot?",
         "Footwear or not? Reply yes or no.")),
    "digits-parity": Templates(
        ("Is the digit even or odd?", "Is the number in the image odd or even?",
         "Say whether the handwritten digit is even or odd.", "Even or odd: which is this number?",
         "Is the digit shown an even number or an odd one?"),
        ("Tell me if this number is divisible by two: even or odd?", "What is the parity of the digit drawn here?",
         "Would you call this digit odd, or even?")),
    "words-first-letter": Templates(
        ("What is the first letter of the word?", "Which letter does the word in the image start with?",
         "Name the initial letter of the written word.", "What letter begins the word shown?",
         "Give the first letter of the word in the picture."),
        ("Tell me the letter the text opens with.", "Which character comes first in this word?",
         "What is the word's opening letter?")),
}
# Paraphrases written apart from TEMPLATES (they were looked at while the routing rule was chosen, so they are no
# longer a clean hold-out: kept to show the spread of wordings beyond the exported ones).
PARAPHRASES = {
    "fashion-mnist": ["what's this piece of clothing?", "Which type of garment or shoe is pictured?", "clothing item?",
                      "Look at the picture: what are you wearing if you wear this?", "Name this article of apparel.",
                      "Please identify the clothing category of this image"],
    "digits": ["Which number from 0 to 9 is this? Write it as a word.", "digit? answer in letters",
               "What is the handwritten number? Use words, not numerals.", "Say which digit this is, spelled out.",
               "Write out in words the digit that appears.", "what number did someone write here (in words)"],
    "words": ["What is written here?", "read the word", "Which word is printed in this picture?",
              "Please transcribe the text in the image.", "OCR this image.", "What does the text in the image read?"],
    "easyvqa-shape": ["what shape?", "Which geometric shape is drawn?", "Is this a triangle, circle or rectangle?",
                      "What's the shape of the object?", "Name the shape in the picture.", "What figure is shown?"],
    "easyvqa-color": ["what colour?", "Which colour is the shape painted?", "What's the colour of the object?",
                      "Name the color of the shape in the image.", "What color is the figure?",
                      "Tell me the object's color."],
}
# The same questions over new images (the routing suite's "same question, new images" tasks)
TEMPLATES["printed-digits"] = TEMPLATES["digits"]
TEMPLATES["words-large"] = TEMPLATES["words"]
TEMPLATES["drawn-shapes"] = TEMPLATES["easyvqa-shape"]


def _fashion(split: str, n: int, rng: random.Random) -> Iterator[Labelled]:
    prefix = "train" if split == "train" else "t10k"
    img_file, lab_file = FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz", FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not img_file.exists():
        raise FileNotFoundError(f"{img_file} is missing: apt-get install dataset-fashion-mnist")
    images = np.frombuffer(gzip.open(img_file).read(), np.uint8, offset=16).reshape(-1, 28, 28)
    labels = np.frombuffer(gzip.open(lab_file).read(), np.uint8, offset=8)
    for i in rng.sample(range(len(labels)), n):
        yield Image.fromarray(images[i]), FASHION_CLASSES[labels[i]]


FOOTWEAR = {"sandal", "sneaker", "ankle boot"}


def _fashion_footwear(split: str, n: int, rng: random.Random) -> Iterator[Labelled]:
    for img, garment in _fashion(split, n, rng):
        yield img, "yes" if garment in FOOTWEAR else "no"


def _digits(split: str, n: int, rng: random.Random) -> Iterator[Labelled]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = list(range(len(digits.target)))
    random.Random(0).shuffle(order)  # one fixed split of the 1,797 digits: 1,297 train, 500 test
    pool = order[:1297] if split == "train" else order[1297:]
    for i in rng.sample(pool, min(n, len(pool))):
        pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
        yield Image.fromarray(pixels), DIGIT_WORDS[digits.target[i]]


def _digits_parity(split: str, n: int, rng: random.Random) -> Iterator[Labelled]:
    for img, word in _digits(split, n, rng):
        yield img, "even" if DIGIT_WORDS.index(word) % 2 == 0 else "odd"


def _printed_digits(split: str, n: int, rng: random.Random) -> Iterator[Labelled]:
    # Digits typed, not handwritten: light ink on dark (as scikit-learn's digits are), in Pillow's font at random
    # sizes, offsets and slants; train and test draw from disjoint seeds (the caller's).
    for _ in range(n):
        digit = rng.randrange(10)
        img = Image.new("L", (40, 40), rng.randint(0, 60))
        font = ImageFont.load_default(size=rng.randint(18, 30))
        ImageDraw.Draw(img).text((rng.randint(4, 16), rng.randint(-4, 6)), str(digit), fill=rng.randint(180, 255),
                                 font=font)
        yield img.rotate(rng.uniform(-15, 15), fillcolor=img.getpixel((0, 0))), DIGIT_WORDS[digit]


def _easyvqa(kind: str) -> Callable[[str, int, random.Random], Iterator[Labelled]]:
    answers = {"shape": {"circle", "rectangle", "triangle"},
               "color": {"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"}}[kind]

    def export(split: str, n: int, rng: random.Random) -> Iterator[Labelled]:
        import easy_vqa

        questions, outs, ids = easy_vqa.get_train_questions() if split == "train" else easy_vqa.get_test_questions()
        paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
        label = {i: a for a, i in zip(outs, ids) if a in answers}  # one shape, one colour per image
        for i in rng.sample(sorted(label), min(n, len(label))):
            with Image.open(paths[i]) as img:
                yield img.convert("RGB"), label[i]

    return export


def _words(split: str, n: int, rng: random.Random) -> Iterator[Labelled]:
    # Train and test draw different fonts sizes, offsets and colours from disjoint seeds: reading, not recall.
    for _ in range(n):
        word = rng.choice(WORDS)
        img = Image.new("RGB", (96, 48), tuple(rng.randint(200, 255) for _ in range(3)))
        font = ImageFont.load_default(size=rng.randint(16, 22))
        ink = tuple(rng.randint(0, 80) for _ in range(3))
        ImageDraw.Draw(img).text((rng.randint(2, 20), rng.randint(4, 18)), word, fill=ink, font=font)
        yield img, word


def _words_first_letter(split: str, n: int, rng: random.Random) -> Iterator[Labelled]:
    # "a" is an article to the answer judge (it would be dropped): words starting with it are left out
    words = (row for row in _words(split, 10 * n, rng) if row[1][0] != "a")
    for _, (img, word) in zip(range(n), words):
        yield img, word[0]


def _words_large(split: str, n: int, rng: random.Random) -> Iterator[Labelled]:
    # The same words in capitals, large, light on dark, on a wide canvas, sometimes with a rule under them.
    for _ in range(n):
        word = rng.choice(WORDS)
        img = Image.new("RGB", (192, 64), tuple(rng.randint(0, 70) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        font = ImageFont.load_default(size=rng.randint(26, 34))
        ink = tuple(rng.randint(170, 255) for _ in range(3))
        x, y = rng.randint(2, 60), rng.randint(0, 16)
        draw.text((x, y), word.upper(), fill=ink, font=font)
        if rng.random() < 0.5:
            draw.line((x, y + 42, x + 100, y + 42), fill=ink, width=2)
        yield img, word


def _drawn_shapes(split: str, n: int, rng: random.Random) -> Iterator[Labelled]:
    # Outlines drawn with Pillow on a noisy grey ground: easy-VQA's question, unlike its flat filled shapes.
    for _ in range(n):
        shape = rng.choice(["circle", "rectangle", "triangle"])
        ground = np.random.default_rng(rng.getrandbits(32)).integers(90, 170, (64, 64, 3), dtype=np.uint8)
        img = Image.fromarray(ground)
        size = rng.randint(18, 44)
        x, y = rng.randint(2, 62 - size), rng.randint(2, 62 - size)
        ink, width = tuple(rng.choice([rng.randint(0, 60), rng.randint(200, 255)]) for _ in range(3)), rng.randint(2, 4)
        draw = ImageDraw.Draw(img)
        if shape == "circle":
            draw.ellipse((x, y, x + size, y + size), outline=ink, width=width)
        elif shape == "rectangle":
            draw.rectangle((x, y, x + size, y + rng.randint(size // 2, size)), outline=ink, width=width)
        else:
            draw.polygon([(x + size // 2, y), (x, y + size), (x + size, y + size)], outline=ink, width=width)
        yield img, shape


EXPORTERS: dict[str, Callable[[str, int, random.Random], Iterator[Labelled]]] = {
    "fashion-mnist": _fashion,
    "digits": _digits,
    "easyvqa-shape": _easyvqa("shape"),
    "easyvqa-color": _easyvqa("color"),
    "words": _words,
    "fashion-footwear": _fashion_footwear,
    "digits-parity": _digits_parity,
    "words-first-letter": _words_first_letter,
    "printed-digits": _printed_digits,
    "words-large": _words_large,
    "drawn-shapes": _drawn_shapes,
}


def export_task(name: str, out_dir: Path, n_train: int, n_test: int, seed: int = 0) -> tuple[Path, dict[str, int]]:
    """Write <out_dir>/<name>/{train,test}.jsonl and images/; deterministic for a given seed.

    Each training row asks with one of the task's training wordings; each test image is written twice, with a
    training wording and with a held-out one (rows marked "template"), one after the other, so that any prefix
    of the test file holds both kinds for the same images. Returns the rows written per split (fewer than asked
    where the source has fewer images)."""
    if name not in EXPORTERS:
        raise ValueError(f"unknown data set {name!r}; choose from {', '.join(EXPORTERS)}")
    templates = TEMPLATES[name]
    task_dir = Path(out_dir) / name
    (task_dir / "images").mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n, split_seed in (("train", n_train, seed), ("test", n_test, seed + 10_000)):
        rng, wording = random.Random(split_seed), random.Random(split_seed + 1)
        lines = []
        for k, (img, output) in enumerate(EXPORTERS[name](split, n, rng)):
            rel = f"images/{split}-{k:05d}.png"
            img.save(task_dir / rel)
            kinds = [("train", templates.train)] + ([("held-out", templates.held_out)] if split == "test" else [])
            for kind, choices in kinds:
                lines.append(json.dumps({"image": rel, "instruction": wording.choice(choices), "output": output,
                                         "template": kind}))
        (task_dir / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        written[split] = len(lines)
    return task_dir, written


MIXTURES = ("caption", "instruct")


def base_mixture(n: int, seed: int = 0, mixture: str = "caption") -> list[Example]:
    """A starting connector's training data, from easy-VQA training images.

    "caption": plain captions ("a blue circle") under one instruction, "Describe the image." It plays BLIP-2's
    caption pre-training in the paper: the LM learns to see, but is taught no task's instruction.
    "instruct": half captions, half easy-VQA's yes/no questions ("is there not a red shape?"), a multi-task
    instruction mixture playing InstructBLIP's part. Neither holds a benchmark task: those ask for a shape or a
    colour, never yes/no.
    """
    import easy_vqa

    if mixture not in MIXTURES:
        raise ValueError(f"unknown mixture {mixture!r}; choose from {', '.join(MIXTURES)}")
    questions, outs, ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    shape, color, yes_no = {}, {}, []
    for q, a, i in zip(questions, outs, ids):
        if a in {"circle", "rectangle", "triangle"}:
            shape[i] = a
        elif q == "what color is the shape?":
            color[i] = a
        elif a in {"yes", "no"}:
            yes_no.append((i, q[0].upper() + q[1:], a))
    rng = random.Random(seed)
    both = sorted(set(shape) & set(color))
    captions = min(n, len(both)) if mixture == "caption" else min(n - n // 2, len(both))
    rows = [(i, "Describe the image.", f"a {color[i]} {shape[i]}") for i in rng.sample(both, captions)]
    if mixture == "instruct":
        rows += rng.sample(yes_no, n // 2)
    out = []
    for i, instruction, answer in rows:
        with Image.open(paths[i]) as img:
            out.append((img.convert("RGB"), instruction, answer))
    return out
