"""Named mutants: each removes one guarantee's guard, defined by the behaviour it removes (a patch on the running
code, not a text edit), so that a refactor keeps it meaningful. `tests` are the tests that must then fail.

A mutant whose target no longer exists raises at apply time: scripts/mutation_check.py reports it as broken, never
as killed."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    removes: str               # the guarantee it takes away
    tests: tuple[str, ...]     # pytest node ids (or files) that must fail with it applied; the quickest to fail
                               # first (the run stops at the first failure)
    patch: Callable[[], None]
    slow: bool = False         # its tests take minutes (a real vLLM worker, add-task runs): not in CI's quick run


MUTANTS: dict[str, Mutant] = {}


def mutant(name: str, *tests: str, slow: bool = False):
    def register(patch: Callable[[], None]) -> Callable[[], None]:
        MUTANTS[name] = Mutant(name, " ".join((patch.__doc__ or "").split()), tests, patch, slow)
        return patch
    return register


def apply(name: str) -> None:
    MUTANTS[name].patch()


def apply_from_environment() -> None:
    """Apply $CIT_MUTANT and note in $CIT_MUTANT_STATUS whether it applied: a mutant that fails to apply is
    reported broken by the mutation check, never killed."""
    import os

    try:
        apply(os.environ["CIT_MUTANT"])
        status = "applied"
    except Exception as exc:  # noqa: BLE001 - reported by the mutation check as a broken mutant
        status = f"broken: {type(exc).__name__}: {exc}"
    with open(os.environ["CIT_MUTANT_STATUS"], "a") as f:
        f.write(status.replace("\n", " ") + "\n")


def _replace(owner, attribute: str, value) -> None:
    if not hasattr(owner, attribute):
        raise AttributeError(f"mutant target {owner.__name__}.{attribute} no longer exists")
    setattr(owner, attribute, value)


# -- 1. one request never fails another
ISOLATION = "tests/test_isolation.py"


@mutant("greedy-below-1e-5", f"{ISOLATION}::test_a_temperature_that_overflows_is_greedy_and_harms_nobody",
        "tests/test_fuzz.py")
def _greedy():
    """A temperature below 1e-5 is sampled (logits / temperature overflows) instead of decoded greedily."""
    from cit_backbone.sampling import Sampling

    _replace(Sampling, "greedy", property(lambda self: self.temperature == 0.0))


@mutant("row-sampling-fails-alone", f"{ISOLATION}::test_a_row_whose_sampling_fails_fails_alone")
def _sampling():
    """A row whose sampling raises takes the whole sampling call (all rows of that join or step) down with it."""
    from cit_backbone.decode_batch import DecodeBatch
    from cit_backbone.sampling import sample_token

    def sample_all(self, logits, rows):
        for i, row in enumerate(rows):
            row.token = sample_token(logits[i], row.sampling, row.generator)
            self.lm.advance(row.state, row.token, row.sampling)
    _replace(DecodeBatch, "_sample", sample_all)


@mutant("failed-row-leaves-the-batch", f"{ISOLATION}::test_a_row_whose_sampling_fails_fails_alone")
def _failed_row_stays():
    """A row whose sampling failed stays in the running batch (with no next token) instead of leaving it."""
    from cit_backbone.sampling import RowState

    _replace(RowState, "fail", lambda self, error: setattr(self, "error", error))


@mutant("vllm-row-error-stays-with-its-row", "tests/test_vllm.py", slow=True)
def _vllm_row_error():
    """One vLLM row's worker error is raised out of the batch's step, failing every running row."""
    from cit_server.vllm_engine import VllmBatch

    step = VllmBatch.step

    def step_raising(self, wait_s=0.05):
        rows = list(self._rows)
        step(self, wait_s)
        for row in rows:
            if row.state.error is not None:
                raise row.state.error
    _replace(VllmBatch, "step", step_raising)


# -- 2. limits in the units that cost memory and time
@mutant("prompt-limit-in-tokens", f"{ISOLATION}::test_prompt_limits_are_counted_in_tokens")
def _prompt_tokens():
    """Only the instruction's characters are limited, not the prompt's tokens."""
    from cit_server.validation import RequestLimits

    def characters_only(self, instruction):
        if not instruction.strip() or len(instruction) > self.config.max_instruction_chars:
            raise ValueError("instruction is empty or too long")
        return instruction
    _replace(RequestLimits, "instruction", characters_only)


@mutant("prefix-cache-bytes", f"{ISOLATION}::test_the_prefix_cache_stays_inside_its_byte_bound")
def _prefix_bytes():
    """The prefix cache keeps every prefix, whatever its keys and values weigh."""
    from cit_backbone.language_model import LanguageModel

    prefix = LanguageModel.prefix

    def unbounded(self, ids, lora):
        bound, self.prefix_cache_bytes = self.prefix_cache_bytes, 1 << 62
        try:
            return prefix(self, ids, lora)
        finally:
            self.prefix_cache_bytes = bound
    _replace(LanguageModel, "prefix", unbounded)


# -- 3. overload is refused, health stays reachable
BURST = "tests/test_server_security.py::test_a_burst_beyond_admission_is_refused_at_once_while_health_answers"


@mutant("admission-bound", BURST)
def _admission():
    """Requests beyond --max-requests are let in (and wait) instead of being refused at once."""
    from contextlib import nullcontext

    from cit_server.scheduler import Admission

    _replace(Admission, "slot", lambda self: nullcontext())


@mutant("waiting-holds-no-thread-of-the-loop", BURST)
def _blocking_wait():
    """A request waiting for its tokens blocks the front (as a thread per RPC from a bounded pool would), so
    health checks queue behind generations."""
    from cit_server.engine import Engine

    async def blocking(self, request):
        return self.generate(request)
    _replace(Engine, "agenerate", blocking)


# -- 4. (server side) pinning, batch size, what the server tells callers
@mutant("pin-newest-version-only",
        "tests/test_adapter_cache.py::test_pinning_keeps_only_the_newest_version_so_retrains_while_serving_never_fill_the_cache")
def _pin_all_versions():
    """Every version of a pinned task stays resident, so retrains while serving fill the cache."""
    from cit_server.adapter_cache import AdapterStore

    _replace(AdapterStore, "_is_pinned", lambda self, adapter: adapter.task_id in self.pinned)


ADMIN = "tests/test_server_security.py::test_admin_rpcs_take_only_the_admin_token_which_also_opens_the_others"


@mutant("list-tasks-counts-centroids", ADMIN)
def _centroids():
    """ListTasks reports a task's data sets as its centroids."""
    from cit_registry.store import TaskVersion

    _replace(TaskVersion, "centroids", lambda self: len(self.card.datasets))


@mutant("data-paths-for-admins-only", ADMIN)
def _paths():
    """GetTask shows every caller the trainer's data paths."""
    from cit_server import service

    _replace(service, "public_card", lambda card: card)


@mutant("metrics-on-loopback", BURST)
def _metrics_host():
    """The unauthenticated metrics listen wherever gRPC does."""
    from cit_server.config import ServerConfig

    init = ServerConfig.__post_init__

    def follow_host(self):
        object.__setattr__(self, "metrics_host", self.host)
        init(self)
    _replace(ServerConfig, "__post_init__", follow_host)


# -- 7. images from phones
IMAGES = "tests/test_backbone.py::test_phone_photos_are_decoded_upright_and_multi_frame_files_give_their_first_frame"


@mutant("exif-orientation", IMAGES)
def _exif():
    """EXIF orientation is ignored: phone photos arrive on their side."""
    from PIL import ImageOps

    _replace(ImageOps, "exif_transpose", lambda image, **kwargs: image)


@mutant("mpo-accepted", IMAGES)
def _mpo():
    """MPO (phone cameras' JPEGs) is refused."""
    from cit_backbone import images

    _replace(images, "ACCEPTED_FORMATS", ("PNG", "JPEG"))


@mutant("frame-count-capped", IMAGES)
def _frames():
    """Any number of frames is accepted."""
    from cit_backbone import images

    _replace(images, "MAX_FRAMES", 1 << 30)


# -- 6. the vLLM worker's lifecycle
LIFECYCLE = "tests/test_worker_lifecycle.py"


@mutant("worker-start-deadline", f"{LIFECYCLE}::test_a_silent_worker_misses_its_start_deadline_and_is_stopped")
def _start_deadline():
    """The start deadline is checked only when the worker prints a line: a silent worker blocks the start."""
    import re

    from cit_server.vllm_engine import WorkerError, WorkerProcess

    def wait_for_a_line(self, timeout):
        for line in iter(self.proc.stdout.readline, b""):
            match = re.search(rb"cit-vllm-worker listening on (\S+)", line)
            if match:
                return match.group(1).decode()
        raise WorkerError("the vLLM worker exited while starting")
    _replace(WorkerProcess, "_wait_for_port", wait_for_a_line)


@mutant("server-stops-its-worker", f"{LIFECYCLE}::test_a_server_that_cannot_bind_stops_the_worker_it_started")
def _worker_left():
    """A server that fails after starting its worker (e.g. its port is taken) leaves the worker running."""
    from cit_server.vllm_engine import WorkerSupervisor

    def close_but_the_worker(self):
        self._closing.set()  # stop supervising, and forget the worker instead of stopping it
    _replace(WorkerSupervisor, "close", close_but_the_worker)


@mutant("worker-watches-its-parent", f"{LIFECYCLE}::test_a_worker_outlives_no_killed_server")
def _no_parent_watch():
    """A worker whose server was killed (SIGKILL) keeps running."""
    import asyncio

    from cit_server import vllm_worker

    async def forever(parent):
        await asyncio.Event().wait()
    _replace(vllm_worker, "_until_orphaned", forever)


VLLM = "tests/test_vllm.py"
RESTART = f"{LIFECYCLE}::test_a_dead_worker_is_restarted_off_the_scheduler_while_health_says_not_serving"


@mutant("health-follows-the-worker", RESTART)
def _ready():
    """Health says SERVING while the vLLM worker is down and being restarted."""
    from cit_server.engine import Engine

    _replace(Engine, "ready", lambda self: self.scheduler.alive())


@mutant("worker-restart-off-the-scheduler", RESTART)
def _restart_blocks():
    """The scheduler thread waits for a restarting vLLM worker, so requests meanwhile wait instead of being told
    to retry."""
    import time

    from cit_server.engine import Engine

    follow = Engine._follow_worker

    def wait_for_the_worker(self):
        while self.supervisor is not None and not self.ready() and not self.supervisor._closing.is_set():
            time.sleep(0.1)
        follow(self)
    _replace(Engine, "_follow_worker", wait_for_the_worker)


# -- 4. the registry cannot be poisoned, and what it says is true
HARD = "tests/test_registry_hardening.py"


@mutant("bundle-limits", f"{HARD}::test_a_sparse_member_is_refused_before_anything_is_allocated",
        f"{HARD}::test_bundles_beyond_the_size_and_count_limits_are_refused")
def _bundle_limits():
    """Bundle members are extracted whatever their count, size or sparseness."""
    from cit_registry import store

    _replace(store, "_refuse_oversized", lambda bundle, members: None)


@mutant("bundle-names-stay-inside", f"{HARD}::test_a_listed_file_whose_name_leaves_the_bundle_is_refused")
def _escape():
    """A file name listed in bundle.json may leave the directory it is extracted into."""
    from cit_registry import store

    _replace(store, "_stays_inside", lambda rel: True)


@mutant("card-schema", f"{HARD}::test_an_imported_card_must_match_the_card_schema",
        f"{HARD}::test_a_damaged_card_on_disk_leaves_its_task_out_and_verify_says_so")
def _schema():
    """Cards are trusted as they are read: no schema check on import or read."""
    from types import SimpleNamespace

    from cit_registry import store

    _replace(store, "_CARD_VALIDATOR", SimpleNamespace(iter_errors=lambda raw: iter(())))


@mutant("bundle-manifest-agrees", f"{HARD}::test_a_bundle_resigned_after_tampering_disagrees_with_its_manifest")
def _bundle_manifest():
    """An imported bundle's files are not checked against the version's own manifest."""
    from cit_registry import store

    original = store.Registry.import_bundle

    def without_manifest(self, bundle, task_id=None):
        problems = store._manifest_problems
        store._manifest_problems = lambda path: iter(())
        try:
            return original(self, bundle, task_id)
        finally:
            store._manifest_problems = problems
    _replace(store.Registry, "import_bundle", without_manifest)


@mutant("backbone-fit", f"{HARD}::test_a_bundle_from_another_backbone_is_refused_before_it_commits")
def _fit():
    """Keys and adapters of any width commit (and stop a server from starting later)."""
    from cit_registry import store

    _replace(store, "_fit_problems", lambda record, shapes: [])


@mutant("index-labelled-before-keys", f"{HARD}::test_the_index_is_labelled_with_what_was_read_before_its_keys")
def _fingerprint_after():
    """The index's fingerprint is read after its keys: a commit in between leaves an index that looks fresh."""
    import numpy as np

    from cit_registry.router import Router

    def build(cls, registry):
        vectors, rows = [], []
        for task in registry.serving():
            v = task.key().routing_vectors
            vectors.append(v)
            rows += [(task.task_id, task.version)] * len(v)
        stacked = np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32)
        return cls(stacked, rows, registry.fingerprint(), generation=registry.generation())
    _replace(Router, "build", classmethod(build))


@mutant("index-pair-checked", f"{HARD}::test_a_torn_index_is_rebuilt_and_verify_reports_it")
def _torn():
    """A keys file that does not belong to index.json is read without a check of its count and width."""
    import json

    import faiss

    from cit_registry import router

    def read_unchecked(registry):
        meta = json.loads((registry.root / "index" / "index.json").read_text())
        index = faiss.read_index(str(registry.root / "index" / meta["keys"])) if meta["keys"] else None
        return meta, index
    _replace(router, "read_index", read_unchecked)


@mutant("verify-compares-index-keys", f"{HARD}::test_a_torn_index_is_rebuilt_and_verify_reports_it")
def _keys_unchecked():
    """verify never reads the keys in the index file."""
    import numpy as np

    from cit_registry import router

    _replace(router, "_keys_of", lambda index: np.zeros(1))


@mutant("index-written-under-the-lock", f"{HARD}::test_a_reader_never_writes_the_index_while_a_writer_holds_the_lock")
def _lockless_index():
    """A reader (the server) writes the routing index without the registry's write lock."""
    from contextlib import contextmanager

    from cit_registry.store import Registry

    @contextmanager
    def always(self):
        yield True
    _replace(Registry, "writing_if_free", always)


@mutant("verify-missing-manifest",
        f"{HARD}::test_verify_reports_a_missing_manifest_and_export_refuses_a_damaged_version")
def _no_manifest():
    """A version without a manifest passes verify unchecked."""
    from cit_registry.store import MANIFEST, Registry

    check = Registry._verify_version

    def skip_unlisted(self, task_id, v, record):
        problems = list(check(self, task_id, v, record))
        return iter([p for p in problems if MANIFEST not in p])
    _replace(Registry, "_verify_version", skip_unlisted)


@mutant("export-refuses-damaged",
        f"{HARD}::test_verify_reports_a_missing_manifest_and_export_refuses_a_damaged_version")
def _export_damaged():
    """export re-hashes whatever is on disk, damaged files included."""
    from cit_registry.store import Registry

    check = Registry._verify_version
    export = Registry.export_bundle

    def export_anything(self, task_id, out, version=None):
        Registry._verify_version = lambda *args: iter(())
        try:
            return export(self, task_id, out, version)
        finally:
            Registry._verify_version = check
    _replace(Registry, "export_bundle", export_anything)


@mutant("generation-counter", f"{HARD}::test_every_commit_bumps_the_generation")
def _generation():
    """Commits leave the generation counter alone: change detection must walk every task directory."""
    from cit_registry.store import Registry

    _replace(Registry, "_bump_generation", lambda self: None)


@mutant("task-id-fullmatch", f"{HARD}::test_task_ids_with_a_trailing_newline_are_refused")
def _task_id_dollar():
    """Task ids are matched with ^...$, which lets a trailing newline in."""
    import re

    from cit_registry import store

    def old_rule(task_id):
        if not re.match(r"^[a-z0-9][a-z0-9_.-]{0,63}$", task_id) or ".." in task_id:
            raise ValueError(f"invalid task id {task_id!r}")
        return task_id
    _replace(store, "validate_task_id", old_rule)


@mutant("remeasured-from-the-registry",
        "tests/test_add_task.py::test_eproj_leaves_every_other_task_adapter_bit_identical")
def _snapshots():
    """add-task re-measures earlier data sets from files named in their cards, not from the snapshots the registry
    keeps: once those files are gone, forgetting goes unmeasured."""
    from cit_trainer import add_task

    _replace(add_task, "snapshot_dir", lambda eval_dir, name: eval_dir / "__no_such_snapshot__")


@mutant("registry-refuses-an-unmigrated-format",
        "tests/test_registry_format.py::test_an_unmigrated_registry_is_refused_with_the_command_that_upgrades_it")
def _format():
    """A registry of an older format is opened as if it were current."""
    import json

    from cit_registry.store import FORMAT_VERSION, Registry

    def open_anything(cls, root, create=False):
        meta = json.loads((root / "registry.json").read_text())
        meta["format"] = FORMAT_VERSION
        return cls(root)
    _replace(Registry, "open", classmethod(open_anything))


# -- 5. durability that survives power loss
@mutant("directory-entries-fsynced", "tests/test_registry.py::test_every_crash_state_of_a_commit_is_the_registry_before_or_after_it")
def _dir_fsync():
    """A file replaced atomically is fsynced, but not the directory that holds its new entry."""
    import os
    import uuid
    from contextlib import contextmanager

    from cit_registry import store

    @contextmanager
    def atomic_path(path):
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        try:
            yield tmp
            store._fsync(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    _replace(store, "atomic_path", atomic_path)


@mutant("damaged-task-left-out",
        f"{HARD}::test_a_card_or_key_damaged_on_disk_in_any_way_leaves_only_its_own_task_out")
def _damaged_breaks_all():
    """One task whose card cannot be read (not UTF-8, a bad task id) breaks the listing for every task."""
    from cit_registry.store import Registry

    _replace(Registry, "serving", lambda self: [self.get(t) for t in self.task_ids()])


@mutant("write-lock-across-threads", f"{HARD}::test_threads_of_one_process_take_turns_at_the_write_lock")
def _threads_share_the_flock():
    """Threads of one process share the registry's flock: the watcher and a reload write the index at once."""
    import contextlib

    from cit_registry import store

    class Shared(contextlib.nullcontext):
        def acquire(self, blocking=True):
            return True

        def release(self):
            pass
    _replace(store, "threading", type("threading", (), {"RLock": Shared}))


# -- issue 13: routing that knows what it does not know
RULE = "tests/test_registry.py"


def _loosen_floors(image: bool):
    """Every candidate's image (or instruction) floor lowered below any cosine: that gate never closes."""
    import dataclasses

    from cit_registry.router import Router

    search = Router._search

    def loosened(self, queries, k):
        field = "image_floor" if image else "instruction_floor"
        return [[(dataclasses.replace(c, **{field: -3.0}), key) for c, key in found]
                for found in search(self, queries, k)]
    _replace(Router, "_search", loosened)


@mutant("route-image-floor", f"{RULE}::test_an_image_below_every_floor_falls_back_even_with_a_tasks_own_wording")
def _image_floor():
    """A request whose image is unlike every image of a task still routes to it when the instruction matches."""
    _loosen_floors(image=True)


@mutant("route-instruction-floor", f"{RULE}::test_a_new_question_over_familiar_images_falls_back")
def _instruction_floor():
    """A question no task was trained on routes to the task whose images it shows."""
    _loosen_floors(image=False)


@mutant("route-background-questions",
        f"{RULE}::test_background_questions_count_against_a_task_only_outside_its_own_floor")
def _no_background():
    """The background questions (what no task asks) are not weighed: nothing but other tasks can be nearer."""
    import numpy as np

    from cit_registry.router import Router

    route = Router.route
    _replace(Router, "route", lambda self, queries, background, *a, **kw:
             route(self, queries, np.zeros((0, queries.shape[1] - self.image_dim), np.float32), *a, **kw))


@mutant("index-refresh-reads-changed-keys-only",
        f"{RULE}::test_a_refreshed_router_reads_only_new_keys_and_equals_a_build")
def _refresh_rebuilds():
    """A registry change rebuilds the routing index from every task's key (a minute per commit at 100 k tasks)."""
    from cit_registry.router import Router

    _replace(Router, "refreshed", lambda self, registry, seen=None: Router.build(registry))


@mutant("reuse-needs-the-tasks-images",
        "tests/test_add_task.py::test_the_same_question_of_other_images_expands_however_similar")
def _similarity_alone():
    """add-task reuses on similarity alone: the same question asked of other images joins the old adapter."""
    from cit_trainer import add_task

    _replace(add_task, "image_share", lambda key, images: 1.0)


@mutant("route-same-question-elsewhere",
        f"{RULE}::test_tasks_asking_one_question_of_different_images_do_not_block_each_other")
def _same_question_counts():
    """Every other task's question counts against a task, its own question asked of other images too (the router
    before the suite found tasks sharing a question blocking each other)."""
    import numpy as np

    from cit_registry import router

    _replace(router, "asks", lambda task_question, questions, floor:
             np.zeros(len(questions), bool) if np.ndim(questions) == 2 else False)


@mutant("route-other-tasks-questions",
        f"{RULE}::test_an_instruction_nearer_another_tasks_question_is_not_this_tasks")
def _best_candidate_only():
    """Only the best-scoring candidate is weighed: another task's question the instruction is nearer never counts."""
    from cit_registry.router import Router

    search = Router._search
    _replace(Router, "_search", lambda self, queries, k: [found[:1] for found in search(self, queries, k)])


@mutant("reuse-replays-kept-samples",
        "tests/test_add_task.py::test_a_reused_adapter_trains_again_on_the_training_samples_its_registry_keeps")
def _no_replay():
    """A reused adapter trains on the new data alone: what it served before is not trained on again."""
    from cit_trainer import add_task

    _replace(add_task, "_replayed", lambda previous, name, limit, log: {})
