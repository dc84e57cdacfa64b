"""Fuzz the server's request decoding: protobuf bytes -> GenerateRequest -> sampling, instruction and image checks.

    python scripts/fuzz_requests.py --examples 100000 [--seed 0]

Every input must either be refused with a clear error (protobuf DecodeError, or ValueError: the server's
INVALID_ARGUMENT) or decode into valid parameters and an RGB image within the limits. Any other exception, or an
image over the limits, is a failure (exit status 1, with the input). Inputs: random bytes, and well-formed
requests whose fields are drawn at random (unicode instructions, any floats and integers) around images that are
valid, truncated, bit-flipped, or whose headers claim huge dimensions.
"""
from __future__ import annotations

import argparse
import io
import struct
import sys
import time
import zlib

from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from PIL import Image

from cit_backbone.images import decode_image
from cit_proto import cit_pb2
from cit_server.config import ServerConfig
from cit_server.service import to_sampling

LIMITS = ServerConfig(registry=".", max_image_bytes=256 * 1024, max_image_pixels=1024 * 1024)


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
    images(), st.text(max_size=64) | st.text(min_size=2001, max_size=2100), optional(st.text(max_size=70)),
    optional(st.integers(0, 2**32 - 1)), optional(st.floats(width=32)), optional(st.floats(width=32)),
    optional(st.integers(0, 2**32 - 1)), optional(st.integers(0, 2**64 - 1)),  # the proto's uint32/uint64 ranges
    st.lists(st.text(max_size=80), max_size=10),
)


def check(raw: bytes) -> str:
    """Decode one request as the server does; returns how it ended. Raises on anything the server must not do."""
    try:
        request = cit_pb2.GenerateRequest.FromString(raw)
    except DecodeError:
        return "undecodable"
    try:
        to_sampling(request.sampling, LIMITS.default_max_new_tokens)
        instruction = request.instruction
        if not instruction.strip() or len(instruction) > LIMITS.max_instruction_chars:
            return "bad instruction"
        image = decode_image(request.image, LIMITS.max_image_bytes, LIMITS.max_image_pixels)
    except ValueError:
        return "refused"
    if image.mode != "RGB" or image.width * image.height > LIMITS.max_image_pixels:
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
