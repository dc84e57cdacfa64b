from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FallBack(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FALL_BACK_NONE: _ClassVar[FallBack]
    FALL_BACK_NO_TASKS: _ClassVar[FallBack]
    FALL_BACK_IMAGE_UNLIKE: _ClassVar[FallBack]
    FALL_BACK_INSTRUCTION_UNLIKE: _ClassVar[FallBack]
    FALL_BACK_NEARER_OTHER_QUESTION: _ClassVar[FallBack]

class Residency(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESIDENCY_UNSPECIFIED: _ClassVar[Residency]
    RESIDENCY_COLD: _ClassVar[Residency]
    RESIDENCY_RESIDENT: _ClassVar[Residency]
    RESIDENCY_PINNED: _ClassVar[Residency]

class TaskChange(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_CHANGE_UNSPECIFIED: _ClassVar[TaskChange]
    TASK_CHANGE_RETIRE: _ClassVar[TaskChange]
    TASK_CHANGE_RESTORE: _ClassVar[TaskChange]
    TASK_CHANGE_ROLLBACK: _ClassVar[TaskChange]
    TASK_CHANGE_PROMOTE: _ClassVar[TaskChange]
    TASK_CHANGE_REJECT: _ClassVar[TaskChange]
FALL_BACK_NONE: FallBack
FALL_BACK_NO_TASKS: FallBack
FALL_BACK_IMAGE_UNLIKE: FallBack
FALL_BACK_INSTRUCTION_UNLIKE: FallBack
FALL_BACK_NEARER_OTHER_QUESTION: FallBack
RESIDENCY_UNSPECIFIED: Residency
RESIDENCY_COLD: Residency
RESIDENCY_RESIDENT: Residency
RESIDENCY_PINNED: Residency
TASK_CHANGE_UNSPECIFIED: TaskChange
TASK_CHANGE_RETIRE: TaskChange
TASK_CHANGE_RESTORE: TaskChange
TASK_CHANGE_ROLLBACK: TaskChange
TASK_CHANGE_PROMOTE: TaskChange
TASK_CHANGE_REJECT: TaskChange

class SamplingParams(_message.Message):
    __slots__ = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("image", "instruction", "task_id", "sampling")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    instruction: str
    task_id: str
    sampling: SamplingParams
    def __init__(self, image: _Optional[bytes] = ..., instruction: _Optional[str] = ..., task_id: _Optional[str] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("task_id", "version", "score", "image_similarity", "instruction_similarity", "image_floor", "instruction_floor")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FLOOR_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FLOOR_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    version: int
    score: float
    image_similarity: float
    instruction_similarity: float
    image_floor: float
    instruction_floor: float
    def __init__(self, task_id: _Optional[str] = ..., version: _Optional[int] = ..., score: _Optional[float] = ..., image_similarity: _Optional[float] = ..., instruction_similarity: _Optional[float] = ..., image_floor: _Optional[float] = ..., instruction_floor: _Optional[float] = ...) -> None: ...

class RouteDecision(_message.Message):
    __slots__ = ("task_id", "version", "score", "fell_back", "forced", "candidates", "margin", "fell_back_because", "nearer")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    FELL_BACK_FIELD_NUMBER: _ClassVar[int]
    FORCED_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    FELL_BACK_BECAUSE_FIELD_NUMBER: _ClassVar[int]
    NEARER_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    version: int
    score: float
    fell_back: bool
    forced: bool
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    margin: float
    fell_back_because: FallBack
    nearer: str
    def __init__(self, task_id: _Optional[str] = ..., version: _Optional[int] = ..., score: _Optional[float] = ..., fell_back: _Optional[bool] = ..., forced: _Optional[bool] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., margin: _Optional[float] = ..., fell_back_because: _Optional[_Union[FallBack, str]] = ..., nearer: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "route", "finish_reason", "prompt_tokens", "completion_tokens")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    text: str
    route: RouteDecision
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, text: _Optional[str] = ..., route: _Optional[_Union[RouteDecision, _Mapping]] = ..., finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("delta", "route", "finish_reason", "prompt_tokens", "completion_tokens")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    delta: str
    route: RouteDecision
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, delta: _Optional[str] = ..., route: _Optional[_Union[RouteDecision, _Mapping]] = ..., finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class RouteRequest(_message.Message):
    __slots__ = ("image", "instruction", "top_k")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    instruction: str
    top_k: int
    def __init__(self, image: _Optional[bytes] = ..., instruction: _Optional[str] = ..., top_k: _Optional[int] = ...) -> None: ...

class RouteResponse(_message.Message):
    __slots__ = ("route",)
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    route: RouteDecision
    def __init__(self, route: _Optional[_Union[RouteDecision, _Mapping]] = ...) -> None: ...

class TaskSummary(_message.Message):
    __slots__ = ("task_id", "version", "adapter_kind", "decision", "created_at", "centroids", "residency")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_KIND_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CENTROIDS_FIELD_NUMBER: _ClassVar[int]
    RESIDENCY_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    version: int
    adapter_kind: str
    decision: str
    created_at: str
    centroids: int
    residency: Residency
    def __init__(self, task_id: _Optional[str] = ..., version: _Optional[int] = ..., adapter_kind: _Optional[str] = ..., decision: _Optional[str] = ..., created_at: _Optional[str] = ..., centroids: _Optional[int] = ..., residency: _Optional[_Union[Residency, str]] = ...) -> None: ...

class ListTasksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTasksResponse(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[TaskSummary]
    def __init__(self, tasks: _Optional[_Iterable[_Union[TaskSummary, _Mapping]]] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class GetTaskResponse(_message.Message):
    __slots__ = ("task", "card_json")
    TASK_FIELD_NUMBER: _ClassVar[int]
    CARD_JSON_FIELD_NUMBER: _ClassVar[int]
    task: TaskSummary
    card_json: str
    def __init__(self, task: _Optional[_Union[TaskSummary, _Mapping]] = ..., card_json: _Optional[str] = ...) -> None: ...

class ReloadRegistryRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadRegistryResponse(_message.Message):
    __slots__ = ("tasks", "changed")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    tasks: int
    changed: bool
    def __init__(self, tasks: _Optional[int] = ..., changed: _Optional[bool] = ...) -> None: ...

class ChangeTaskRequest(_message.Message):
    __slots__ = ("task_id", "change", "version")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    change: TaskChange
    version: int
    def __init__(self, task_id: _Optional[str] = ..., change: _Optional[_Union[TaskChange, str]] = ..., version: _Optional[int] = ...) -> None: ...

class ChangeTaskResponse(_message.Message):
    __slots__ = ("changed", "entry", "serving_version")
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    changed: bool
    entry: HistoryEntry
    serving_version: int
    def __init__(self, changed: _Optional[bool] = ..., entry: _Optional[_Union[HistoryEntry, _Mapping]] = ..., serving_version: _Optional[int] = ...) -> None: ...

class GetHistoryRequest(_message.Message):
    __slots__ = ("task_id", "limit")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    limit: int
    def __init__(self, task_id: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class HistoryEntry(_message.Message):
    __slots__ = ("at", "who", "action", "task_id", "version", "detail_json")
    AT_FIELD_NUMBER: _ClassVar[int]
    WHO_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DETAIL_JSON_FIELD_NUMBER: _ClassVar[int]
    at: str
    who: str
    action: str
    task_id: str
    version: int
    detail_json: str
    def __init__(self, at: _Optional[str] = ..., who: _Optional[str] = ..., action: _Optional[str] = ..., task_id: _Optional[str] = ..., version: _Optional[int] = ..., detail_json: _Optional[str] = ...) -> None: ...

class GetHistoryResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[HistoryEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[HistoryEntry, _Mapping]]] = ...) -> None: ...
