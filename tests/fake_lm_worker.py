"""A stand-in LM worker for lifecycle tests: cit's own worker server (cit_server.vllm_worker.serve, parent watch
included) over an engine that never decodes, instead of vLLM, which takes a minute to start. Started as
`python fake_lm_worker.py PIDFILE -- <the worker's arguments>`: it writes its pid first. With FAKE_NO_PARENT_WATCH=1
it ignores --parent-pid, so that only its server can stop it; FAKE_START_S=N makes its start take N seconds more
(as vLLM's does)."""
import asyncio
import os
import sys
import time

from cit_server import vllm_worker


class NoEngine:
    async def generate(self, *args, **kwargs):  # lifecycle tests never generate
        raise NotImplementedError
        yield

    def shutdown(self) -> None:
        pass


if __name__ == "__main__":
    split = sys.argv.index("--")
    with open(sys.argv[1], "w") as f:
        f.write(str(os.getpid()))
    args, _ = vllm_worker.arguments().parse_known_args(sys.argv[split + 1:])
    if os.environ.get("FAKE_NO_PARENT_WATCH") == "1":
        args.parent_pid = 0
    time.sleep(float(os.environ.get("FAKE_START_S", "0")))
    asyncio.run(vllm_worker.serve(args, NoEngine(), hidden_size=576))
