import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    ENCODING_FP32: _ClassVar[Encoding]
    ENCODING_FP16: _ClassVar[Encoding]
    ENCODING_BF16: _ClassVar[Encoding]
    ENCODING_INT8: _ClassVar[Encoding]
    ENCODING_RING32: _ClassVar[Encoding]
    ENCODING_RING64: _ClassVar[Encoding]

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    PHASE_TRAIN: _ClassVar[Phase]
    PHASE_ADVERTISE_KEYS: _ClassVar[Phase]
    PHASE_SHARE_KEYS: _ClassVar[Phase]
    PHASE_MASKED_INPUT: _ClassVar[Phase]
    PHASE_UNMASK: _ClassVar[Phase]
ENCODING_UNSPECIFIED: Encoding
ENCODING_FP32: Encoding
ENCODING_FP16: Encoding
ENCODING_BF16: Encoding
ENCODING_INT8: Encoding
ENCODING_RING32: Encoding
ENCODING_RING64: Encoding
PHASE_UNSPECIFIED: Phase
PHASE_TRAIN: Phase
PHASE_ADVERTISE_KEYS: Phase
PHASE_SHARE_KEYS: Phase
PHASE_MASKED_INPUT: Phase
PHASE_UNMASK: Phase

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype", "offset", "nbytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    offset: int
    nbytes: int
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("tensors", "encoding", "total_bytes", "digest")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    encoding: Encoding
    total_bytes: int
    digest: str
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., total_bytes: _Optional[int] = ..., digest: _Optional[str] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class TrainingConfig(_message.Message):
    __slots__ = ("model", "local_epochs", "batch_size", "learning_rate", "weight_decay", "mask_ratio", "update_encoding", "max_samples", "proximal_mu", "dp_clip")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    MASK_RATIO_FIELD_NUMBER: _ClassVar[int]
    UPDATE_ENCODING_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PROXIMAL_MU_FIELD_NUMBER: _ClassVar[int]
    DP_CLIP_FIELD_NUMBER: _ClassVar[int]
    model: str
    local_epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    mask_ratio: float
    update_encoding: Encoding
    max_samples: int
    proximal_mu: float
    dp_clip: float
    def __init__(self, model: _Optional[str] = ..., local_epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., weight_decay: _Optional[float] = ..., mask_ratio: _Optional[float] = ..., update_encoding: _Optional[_Union[Encoding, str]] = ..., max_samples: _Optional[int] = ..., proximal_mu: _Optional[float] = ..., dp_clip: _Optional[float] = ...) -> None: ...

class RoundTask(_message.Message):
    __slots__ = ("round", "attempt", "model_version", "phase", "config", "deadline", "selected_clients", "secagg", "roster", "inbound_shares", "unmask")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    SELECTED_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    SECAGG_FIELD_NUMBER: _ClassVar[int]
    ROSTER_FIELD_NUMBER: _ClassVar[int]
    INBOUND_SHARES_FIELD_NUMBER: _ClassVar[int]
    UNMASK_FIELD_NUMBER: _ClassVar[int]
    round: int
    attempt: int
    model_version: int
    phase: Phase
    config: TrainingConfig
    deadline: _timestamp_pb2.Timestamp
    selected_clients: int
    secagg: SecAggParams
    roster: Roster
    inbound_shares: InboundShares
    unmask: UnmaskRequest
    def __init__(self, round: _Optional[int] = ..., attempt: _Optional[int] = ..., model_version: _Optional[int] = ..., phase: _Optional[_Union[Phase, str]] = ..., config: _Optional[_Union[TrainingConfig, _Mapping]] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., selected_clients: _Optional[int] = ..., secagg: _Optional[_Union[SecAggParams, _Mapping]] = ..., roster: _Optional[_Union[Roster, _Mapping]] = ..., inbound_shares: _Optional[_Union[InboundShares, _Mapping]] = ..., unmask: _Optional[_Union[UnmaskRequest, _Mapping]] = ...) -> None: ...

class SecAggParams(_message.Message):
    __slots__ = ("ring_bits", "frac_bits", "clip", "weight_cap", "threshold", "neighbours", "dp_noise_multiplier", "dp_clip", "dp_min_sites")
    RING_BITS_FIELD_NUMBER: _ClassVar[int]
    FRAC_BITS_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_CAP_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    DP_NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    DP_CLIP_FIELD_NUMBER: _ClassVar[int]
    DP_MIN_SITES_FIELD_NUMBER: _ClassVar[int]
    ring_bits: int
    frac_bits: int
    clip: float
    weight_cap: int
    threshold: int
    neighbours: int
    dp_noise_multiplier: float
    dp_clip: float
    dp_min_sites: int
    def __init__(self, ring_bits: _Optional[int] = ..., frac_bits: _Optional[int] = ..., clip: _Optional[float] = ..., weight_cap: _Optional[int] = ..., threshold: _Optional[int] = ..., neighbours: _Optional[int] = ..., dp_noise_multiplier: _Optional[float] = ..., dp_clip: _Optional[float] = ..., dp_min_sites: _Optional[int] = ...) -> None: ...

class AdvertiseKeys(_message.Message):
    __slots__ = ("round", "attempt", "mask_public", "share_public", "certificate_chain", "signature")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    SHARE_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_CHAIN_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    round: int
    attempt: int
    mask_public: bytes
    share_public: bytes
    certificate_chain: bytes
    signature: bytes
    def __init__(self, round: _Optional[int] = ..., attempt: _Optional[int] = ..., mask_public: _Optional[bytes] = ..., share_public: _Optional[bytes] = ..., certificate_chain: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class PeerKeys(_message.Message):
    __slots__ = ("index", "client_id", "keys")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    index: int
    client_id: str
    keys: AdvertiseKeys
    def __init__(self, index: _Optional[int] = ..., client_id: _Optional[str] = ..., keys: _Optional[_Union[AdvertiseKeys, _Mapping]] = ...) -> None: ...

class Roster(_message.Message):
    __slots__ = ("index", "threshold", "peers")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    index: int
    threshold: int
    peers: _containers.RepeatedCompositeFieldContainer[PeerKeys]
    def __init__(self, index: _Optional[int] = ..., threshold: _Optional[int] = ..., peers: _Optional[_Iterable[_Union[PeerKeys, _Mapping]]] = ...) -> None: ...

class SealedShare(_message.Message):
    __slots__ = ("sender", "receiver", "ciphertext")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    sender: int
    receiver: int
    ciphertext: bytes
    def __init__(self, sender: _Optional[int] = ..., receiver: _Optional[int] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class ShareKeys(_message.Message):
    __slots__ = ("round", "attempt", "shares", "seed_commitment")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    SEED_COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    round: int
    attempt: int
    shares: _containers.RepeatedCompositeFieldContainer[SealedShare]
    seed_commitment: bytes
    def __init__(self, round: _Optional[int] = ..., attempt: _Optional[int] = ..., shares: _Optional[_Iterable[_Union[SealedShare, _Mapping]]] = ..., seed_commitment: _Optional[bytes] = ...) -> None: ...

class InboundShares(_message.Message):
    __slots__ = ("shares",)
    SHARES_FIELD_NUMBER: _ClassVar[int]
    shares: _containers.RepeatedCompositeFieldContainer[SealedShare]
    def __init__(self, shares: _Optional[_Iterable[_Union[SealedShare, _Mapping]]] = ...) -> None: ...

class UnmaskRequest(_message.Message):
    __slots__ = ("survivors", "dropped")
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    survivors: _containers.RepeatedScalarFieldContainer[int]
    dropped: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, survivors: _Optional[_Iterable[int]] = ..., dropped: _Optional[_Iterable[int]] = ...) -> None: ...

class RevealedShare(_message.Message):
    __slots__ = ("owner", "share")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    owner: int
    share: bytes
    def __init__(self, owner: _Optional[int] = ..., share: _Optional[bytes] = ...) -> None: ...

class UnmaskShares(_message.Message):
    __slots__ = ("round", "attempt", "seed_shares", "key_shares")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SEED_SHARES_FIELD_NUMBER: _ClassVar[int]
    KEY_SHARES_FIELD_NUMBER: _ClassVar[int]
    round: int
    attempt: int
    seed_shares: _containers.RepeatedCompositeFieldContainer[RevealedShare]
    key_shares: _containers.RepeatedCompositeFieldContainer[RevealedShare]
    def __init__(self, round: _Optional[int] = ..., attempt: _Optional[int] = ..., seed_shares: _Optional[_Iterable[_Union[RevealedShare, _Mapping]]] = ..., key_shares: _Optional[_Iterable[_Union[RevealedShare, _Mapping]]] = ...) -> None: ...

class SecAggAbort(_message.Message):
    __slots__ = ("round", "attempt", "reason")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    round: int
    attempt: int
    reason: str
    def __init__(self, round: _Optional[int] = ..., attempt: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ModelPublished(_message.Message):
    __slots__ = ("version", "round", "manifest")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    version: int
    round: int
    manifest: Manifest
    def __init__(self, version: _Optional[int] = ..., round: _Optional[int] = ..., manifest: _Optional[_Union[Manifest, _Mapping]] = ...) -> None: ...

class RoundClosed(_message.Message):
    __slots__ = ("round", "attempt", "success", "version", "train_loss", "val_loss", "reason")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    round: int
    attempt: int
    success: bool
    version: int
    train_loss: float
    val_loss: float
    reason: str
    def __init__(self, round: _Optional[int] = ..., attempt: _Optional[int] = ..., success: _Optional[bool] = ..., version: _Optional[int] = ..., train_loss: _Optional[float] = ..., val_loss: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class RunFinished(_message.Message):
    __slots__ = ("final_version", "rounds", "reason", "model")
    FINAL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    final_version: int
    rounds: int
    reason: str
    model: str
    def __init__(self, final_version: _Optional[int] = ..., rounds: _Optional[int] = ..., reason: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("time",)
    TIME_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("agent_version", "available_samples")
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    agent_version: str
    available_samples: int
    def __init__(self, agent_version: _Optional[str] = ..., available_samples: _Optional[int] = ...) -> None: ...

class RoundEvent(_message.Message):
    __slots__ = ("seq", "task", "model_published", "round_closed", "run_finished", "heartbeat")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    MODEL_PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    ROUND_CLOSED_FIELD_NUMBER: _ClassVar[int]
    RUN_FINISHED_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    seq: int
    task: RoundTask
    model_published: ModelPublished
    round_closed: RoundClosed
    run_finished: RunFinished
    heartbeat: Heartbeat
    def __init__(self, seq: _Optional[int] = ..., task: _Optional[_Union[RoundTask, _Mapping]] = ..., model_published: _Optional[_Union[ModelPublished, _Mapping]] = ..., round_closed: _Optional[_Union[RoundClosed, _Mapping]] = ..., run_finished: _Optional[_Union[RunFinished, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ...) -> None: ...

class FetchModelRequest(_message.Message):
    __slots__ = ("version", "latest", "encoding", "chunk_size", "offset")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    version: int
    latest: bool
    encoding: Encoding
    chunk_size: int
    offset: int
    def __init__(self, version: _Optional[int] = ..., latest: _Optional[bool] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., chunk_size: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class ModelHeader(_message.Message):
    __slots__ = ("version", "round", "model", "manifest")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    version: int
    round: int
    model: str
    manifest: Manifest
    def __init__(self, version: _Optional[int] = ..., round: _Optional[int] = ..., model: _Optional[str] = ..., manifest: _Optional[_Union[Manifest, _Mapping]] = ...) -> None: ...

class ModelChunk(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ModelHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[ModelHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("round", "base_version", "num_samples", "manifest", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    round: int
    base_version: int
    num_samples: int
    manifest: Manifest
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, round: _Optional[int] = ..., base_version: _Optional[int] = ..., num_samples: _Optional[int] = ..., manifest: _Optional[_Union[Manifest, _Mapping]] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class TrainingProgress(_message.Message):
    __slots__ = ("round", "attempt", "step", "total")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    round: int
    attempt: int
    step: int
    total: int
    def __init__(self, round: _Optional[int] = ..., attempt: _Optional[int] = ..., step: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class UpdateTrailer(_message.Message):
    __slots__ = ("digest",)
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: str
    def __init__(self, digest: _Optional[str] = ...) -> None: ...

class UpdateMessage(_message.Message):
    __slots__ = ("header", "chunk", "trailer", "advertise_keys", "share_keys", "unmask_shares", "secagg_abort", "progress")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    ADVERTISE_KEYS_FIELD_NUMBER: _ClassVar[int]
    SHARE_KEYS_FIELD_NUMBER: _ClassVar[int]
    UNMASK_SHARES_FIELD_NUMBER: _ClassVar[int]
    SECAGG_ABORT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    chunk: Chunk
    trailer: UpdateTrailer
    advertise_keys: AdvertiseKeys
    share_keys: ShareKeys
    unmask_shares: UnmaskShares
    secagg_abort: SecAggAbort
    progress: TrainingProgress
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., trailer: _Optional[_Union[UpdateTrailer, _Mapping]] = ..., advertise_keys: _Optional[_Union[AdvertiseKeys, _Mapping]] = ..., share_keys: _Optional[_Union[ShareKeys, _Mapping]] = ..., unmask_shares: _Optional[_Union[UnmaskShares, _Mapping]] = ..., secagg_abort: _Optional[_Union[SecAggAbort, _Mapping]] = ..., progress: _Optional[_Union[TrainingProgress, _Mapping]] = ...) -> None: ...

class UpdateReceipt(_message.Message):
    __slots__ = ("round", "bytes_received", "digest", "updates_received")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    UPDATES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    round: int
    bytes_received: int
    digest: str
    updates_received: int
    def __init__(self, round: _Optional[int] = ..., bytes_received: _Optional[int] = ..., digest: _Optional[str] = ..., updates_received: _Optional[int] = ...) -> None: ...
