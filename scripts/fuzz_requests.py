"""Fuzz the server's request path up to the sampler: protobuf bytes -> GenerateRequest -> the server's own
sampling conversion and request checks (cit_server.validation.RequestLimits, with the LM's real tokenizer) -> the
real sampler on random logits with the accepted sampling parameters.

    python scripts/fuzz_requests.py --examples 100000 [--seed 0]

Every input must either be refused with a clear error (protobuf DecodeError, or ValueError: the server's
INVALID_ARGUMENT) or decode into valid parameters and an RGB image within the limits, whose sampling parameters
then sample a token from random logits without error. Any other exception, or an image over the limits, is a
failure (exit status 1, with the input). Inputs: random bytes, and well-formed requests whose fields are drawn at
random (unicode instructions, any floats and integers, temperatures near zero) around images that are valid,
truncated, bit-flipped, or whose headers claim huge dimensions.
"""
from __future__ import annotations

import argparse
import io
import struct
import sys
import time
import zlib

import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import AutoTokenizer

from cit_backbone.conversion import converted_lm_dir
from cit_backbone.language_model import prompt_length
from cit_backbone.sampling import sample_token
from cit_proto import cit_pb2
from cit_server.config import ServerConfig
from cit_server.service import to_sampling
from cit_server.validation import RequestLimits

CONFIG = ServerConfig(registry=".", max_image_bytes=256 * 1024, max_image_pixels=1024 * 1024)
_TOKENIZER = AutoTokenizer.from_pretrained(converted_lm_dir())
LIMITS = RequestLimits(CONFIG, lambda text: prompt_length(
    lambda t: _TOKENIZER(t, add_special_tokens=False)["input_ids"], text, visual_tokens=1))
VOCAB = len(_TOKENIZER)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels but holds almost no data: a decompression-bomb probe."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _encoded(fmt: str, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (30, 120, 200)).save(buf, format=fmt)
    return buf.getvalue()


SEEDS = [_encoded("PNG", (32, 24)), _encoded("JPEG", (40, 40)), _encoded("GIF", (8, 8)),
         _png_header(100_000, 100_000), _png_header(2048, 2048), b""]


@st.composite
def images(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 4))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "truncate", "insert"]))
        if action == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "truncate":
            del data[at:]
        else:
            data[at:at] = draw(st.binary(max_size=16))
    return bytes(data)


optional = lambda s: st.one_of(st.none(), s)  # noqa: E731
requests = st.builds(
    lambda image, instruction, task, m, t, p, k, seed, stop: cit_pb2.GenerateRequest(
        image=image, instruction=instruction, task_id=task,
        sampling=cit_pb2.SamplingParams(**{n: v for n, v in dict(max_new_tokens=m, temperature=t, top_p=p, top_k=k,
                                                                  seed=seed).items() if v is not None}, stop=stop),
    ).SerializeToString(),
    images(), st.text(max_size=64) | st.text(min_size=2001, max_size=2100) | st.text(min_size=400, max_size=800),
    optional(st.text(max_size=70)),
    # each field across its proto type's range, and within the range the server accepts (so that the sampler runs)
    optional(st.integers(0, 2**32 - 1) | st.integers(1, 512)),
    optional(st.floats(width=32) | st.floats(0, 5, width=32) | st.floats(0, 2.0 ** -14, width=32)),
    optional(st.floats(width=32) | st.floats(0, 1, width=32)),
    optional(st.integers(0, 2**32 - 1) | st.integers(0, 64)), optional(st.integers(0, 2**64 - 1)),  # uint32/64
    st.lists(st.text(max_size=80), max_size=10),
)


def check(raw: bytes) -> str:
    """Take one request along the server's path; returns how it ended. Raises on anything the server must not do."""
    try:
        request = cit_pb2.GenerateRequest.FromString(raw)
    except DecodeError:
        return "undecodable"
    try:
        sampling = to_sampling(request.sampling, CONFIG.default_max_new_tokens)
    except ValueError:
        return "refused sampling"
    # Sampling parameters the server accepts must sample, whatever the request's image: a good image with them
    # reaches the sampler.
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(len(raw))) * 20
    token = sample_token(logits, sampling, generator)
    if not 0 <= token < VOCAB:
        raise AssertionError(f"sampled token {token} with {sampling}")
    try:
        LIMITS.instruction(request.instruction)
    except ValueError:
        return "bad instruction"
    try:
        image = LIMITS.image(request.image)
    except ValueError:
        return "refused image"
    if image.mode != "RGB" or image.width * image.height > CONFIG.max_image_pixels:
        raise AssertionError(f"decoded an image outside the limits: {image.mode} {image.size}")
    return "accepted"


def run(examples: int, fixed_seed: int) -> dict[str, int]:
    outcomes: dict[str, int] = {}

    @seed(fixed_seed)  # the same inputs on every run
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(raw=st.binary(max_size=512) | requests)
    def fuzz(raw: bytes) -> None:
        outcome = check(raw)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    fuzz()
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.time()
    outcomes = run(args.examples, args.seed)
    total = sum(outcomes.values())
    print(f"{total} inputs tried (seed {args.seed}) in {time.time() - start:.0f} s, no unexpected error: "
          + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
