"""Wire models of the upstream `/v3/async` API: the submit request, its answer, the task result and the
flat error body. The worker builds requests with them and the mock validates with them, so the two cannot
drift. Every rule comes from the reference page of the submit endpoint or from API_NOTES."""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
)

from contracts.images import check_image_field

MODEL_NAME = "seedance-v1.5-pro-i2v"
SUBMIT_PATH = f"/v3/async/{MODEL_NAME}"
TASK_RESULT_PATH = "/v3/async/task-result"

EXPIRES_MIN = 3600
EXPIRES_MAX = 259200
EXPIRES_DEFAULT = 172800

ServiceTier = Literal["default", "flex"]
Ratio = Literal["16:9", "4:3", "1:1", "3:4", "9:16", "21:9", "adaptive"]
Resolution = Literal["480p", "720p", "1080p"]
ImageField = Annotated[str, AfterValidator(check_image_field)]

# Output frame size per resolution for 16:9 (API_NOTES: 720p is 1280x720, 480p is 864x496); used for cost.
FRAME_PIXELS: dict[str, int] = {"480p": 864 * 496, "720p": 1280 * 720, "1080p": 1920 * 1080}


def _strict_int(value: object) -> object:
    # A Literal accepts 24.0 for 24; the API's types are strict, so only a JSON integer is one.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("must be an integer")  # noqa: TRY004 - pydantic reports ValueErrors as field errors
    return value


class SubmitRequest(BaseModel):
    """Body of `POST /v3/async/seedance-v1.5-pro-i2v`.

    `extra="forbid"`: a misspelt field (`resolutoin`) is a mistake the caller wants to hear about, not a
    default silently applied to a paid request. Types are strict: `"5"` is not a duration.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: ImageField = Field(description="First frame: http(s) URL or data:image/<fmt>;base64,<data>.")
    prompt: str = Field(min_length=1, description="What the video shows; under 500 characters recommended.")
    last_image: ImageField | None = Field(default=None, description="Optional last frame, same rules.")
    fps: Annotated[Literal[24], BeforeValidator(_strict_int)] = Field(default=24, description="Only 24.")
    seed: StrictInt | None = Field(default=None, ge=-1, le=4294967295, description="-1 means random.")
    ratio: Ratio = "adaptive"
    duration: StrictInt = Field(default=5, ge=4, le=12, description="Seconds of video; billed by it.")
    resolution: Resolution = "720p"
    watermark: StrictBool = False
    camera_fixed: StrictBool = False
    generate_audio: StrictBool = True
    service_tier: ServiceTier = "default"
    execution_expires_after: StrictInt = Field(
        default=EXPIRES_DEFAULT,
        ge=EXPIRES_MIN,
        le=EXPIRES_MAX,
        description="Seconds from task creation after which the API terminates the task as expired.",
    )

    def tokens(self) -> int:
        """Tokens the API bills for this request if it succeeds (API_NOTES: w x h x (24 x d + 1) / 1024)."""
        return FRAME_PIXELS[self.resolution] * (24 * self.duration + 1) // 1024

    def wire(self) -> dict[str, Any]:
        """The JSON body to send: every field the caller set or that has a default, `seed` only when set."""
        return self.model_dump(mode="json", exclude_none=True)


# The cheapest request there is (480p, 4 s): a token budget below this admits no job at all.
MIN_TOKENS = FRAME_PIXELS["480p"] * (24 * 4 + 1) // 1024
# The dearest (1080p, 12 s).
MAX_TOKENS = FRAME_PIXELS["1080p"] * (24 * 12 + 1) // 1024


class SubmitResponse(BaseModel):
    """Answer of a successful submit. `extra="ignore"`: the gateway may add fields."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    task_id: str = Field(min_length=1)


class TaskStatus(enum.StrEnum):
    """`task.status` values of the gateway; anything else reads as UNKNOWN."""

    QUEUED = "TASK_STATUS_QUEUED"
    PROCESSING = "TASK_STATUS_PROCESSING"
    SUCCEED = "TASK_STATUS_SUCCEED"
    FAILED = "TASK_STATUS_FAILED"
    UNKNOWN = "TASK_STATUS_UNKNOWN"

    @property
    def finished(self) -> bool:
        return self in (TaskStatus.SUCCEED, TaskStatus.FAILED)


def _known_status(value: object) -> object:
    if isinstance(value, str) and value not in TaskStatus._value2member_map_:
        return TaskStatus.UNKNOWN
    return value


def _int_or_numeric_string(value: object) -> object:
    # Documented examples send "3600", one SDK sends 3600; both mean seconds.
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value


class TaskInfo(BaseModel):
    """The `task` object of a task result. `extra="ignore"` throughout the result: read what we need."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    task_id: str
    status: Annotated[TaskStatus, BeforeValidator(_known_status)]
    reason: str = ""
    task_type: str = ""
    eta: Annotated[int, BeforeValidator(_int_or_numeric_string)] = 0
    progress_percent: Annotated[int, BeforeValidator(_int_or_numeric_string)] = 0


class Video(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    video_url: str
    video_url_ttl: Annotated[int, BeforeValidator(_int_or_numeric_string)] = 3600
    video_type: str = "mp4"


class DebugInfo(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    submit_time_ms: Annotated[int, BeforeValidator(_int_or_numeric_string)] | None = None
    execute_time_ms: Annotated[int, BeforeValidator(_int_or_numeric_string)] | None = None
    complete_time_ms: Annotated[int, BeforeValidator(_int_or_numeric_string)] | None = None


class Extra(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    seed: str | None = None
    debug_info: DebugInfo | None = None


class TaskResult(BaseModel):
    """Answer of `GET /v3/async/task-result?task_id=...`."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    task: TaskInfo
    videos: list[Video] = Field(default_factory=list)
    images: list[Any] = Field(default_factory=list)
    audios: list[Any] = Field(default_factory=list)
    extra: Extra = Field(default_factory=Extra)


class ErrorReason(enum.StrEnum):
    """`reason` tokens of the flat error body, with the HTTP status each comes with."""

    INVALID_REQUEST_BODY = "INVALID_REQUEST_BODY"  # 400
    FAILED_TO_AUTH = "FAILED_TO_AUTH"  # 401
    INVALID_API_KEY = "INVALID_API_KEY"  # 403
    NOT_ENOUGH_BALANCE = "NOT_ENOUGH_BALANCE"  # 403
    ACCESS_DENY = "ACCESS_DENY"  # 403
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"  # 404
    TASK_NOT_FOUND = "TASK_NOT_FOUND"  # 404 (wording assumed: the docs only say "task not found")
    RATE_LIMIT_EXCEEDED = "RATE_LIMIT_EXCEEDED"  # 429
    TOKEN_LIMIT_EXCEEDED = "TOKEN_LIMIT_EXCEEDED"  # noqa: S105 - 429, an error token, not a secret
    SERVICE_NOT_AVAILABLE = "SERVICE_NOT_AVAILABLE"  # 503


class ErrorBody(BaseModel):
    """The flat error body every v3 endpoint answers with. `reason` stays a plain string so an unknown
    token from the gateway still parses; `extra="ignore"` for the same reason."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    code: int
    reason: str
    message: str = ""
    metadata: dict[str, Any] = Field(default_factory=dict)
