"""The SQL schema of captures, as typed SQLAlchemy models.

One row per capture request (``captures``) and one per pod it covers (``capture_targets``): a label
selector can match several pods, each captured by the agent on its own node and uploaded as its own object.
The schema is written for both SQLite (the embedded default) and PostgreSQL, so it avoids native enums and
stores timestamps as timezone-aware UTC on both. The migrations under ``migrations/`` create exactly this
schema; a test compares the two.
"""

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.ext.orderinglist import ordering_list
from sqlalchemy.orm import DeclarativeBase, Mapped, MappedColumn, mapped_column, relationship

__all__ = [
    "TERMINAL_STATES",
    "AuditRow",
    "Base",
    "CaptureRow",
    "CaptureState",
    "EventRow",
    "TargetRow",
    "UTCDateTime",
    "utcnow",
]

# Deterministic constraint names, so migrations can name (and later alter or drop) what the models create.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class CaptureState(enum.StrEnum):
    """Where a capture (or one of its targets) is in its life; the stored string is the member's value."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    UPLOADING = "UPLOADING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


TERMINAL_STATES = frozenset({CaptureState.COMPLETED, CaptureState.FAILED, CaptureState.CANCELLED})


def utcnow() -> datetime:
    """The current time as an aware UTC datetime, the only kind the models accept."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A ``DateTime(timezone=True)`` that always hands back aware UTC datetimes.

    SQLite has no timezone-aware type: SQLAlchemy stores the wall-clock digits and drops the offset, so
    values are normalised to UTC on the way in and tagged UTC on the way out. PostgreSQL returns them in the
    session's time zone, so those are converted too. Naive datetimes are refused: their meaning depends on
    the host.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: podcap stores timezone-aware UTC timestamps only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base of every podcap table; its ``metadata`` is what the migrations are checked against."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _state_column() -> MappedColumn[Any]:
    # A string plus a CHECK constraint rather than a native enum: SQLite has none, and adding a state to a
    # PostgreSQL enum cannot run inside a transaction. The width leaves room for longer state names.
    state_type = Enum(
        CaptureState,
        name="state",
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )
    return mapped_column(state_type, default=CaptureState.PENDING)


def _text(type_: Any = Text) -> MappedColumn[Any]:
    """A non-null text column that defaults to the empty string, in Python and in the DDL alike."""
    return mapped_column(type_, default="", server_default=text("''"))


def _count() -> MappedColumn[Any]:
    """A non-null counter or limit that defaults to 0 (0 meaning "none" for limits)."""
    return mapped_column(BigInteger, default=0, server_default=text("0"))


class CaptureRow(Base):
    """One capture request, as created by ``CreateCapture``; the capture id is chosen by the caller."""

    __tablename__ = "captures"
    __table_args__ = (
        UniqueConstraint("requester", "request_id"),  # idempotent CreateCapture per caller
        # ListCaptures pages newest first on (created_at, id): each filter gets an index that starts with its
        # column and ends in the keyset, so a page is one backward range scan at any depth (migration 0003).
        Index(None, "created_at", "id"),  # no filter, or only a time range
        Index(None, "namespace", "created_at", "id"),
        Index(None, "state", "created_at", "id"),
        Index(None, "requester", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    request_id: Mapped[str | None] = mapped_column(String(128))
    requester: Mapped[str] = mapped_column(String(256))
    reason: Mapped[str] = _text()
    namespace: Mapped[str] = mapped_column(String(63))
    pod: Mapped[str] = _text(String(253))
    label_selector: Mapped[str] = _text()
    filter: Mapped[str] = _text()
    duration_ms: Mapped[int] = mapped_column(BigInteger)
    max_packets: Mapped[int] = _count()
    max_bytes: Mapped[int] = _count()
    snaplen: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    buffer_size: Mapped[int] = _count()  # bytes of kernel capture buffer asked for; 0 for the node's default
    pod_interface: Mapped[str] = _text(String(15))
    host_network: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    state: Mapped[CaptureState] = _state_column()
    error: Mapped[str] = _text()
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Who ended the capture early with StopCapture, and when they asked.
    stopped_by: Mapped[str] = _text(String(256))
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # JSON list of the ends of a `between` capture ({"namespace", "pod"} or {"namespace", "service"}); '' otherwise.
    between: Mapped[str] = _text()
    # JSON list (protobuf JSON of Verdict) of where each TCP attempt and DNS query died, once all targets are summarised.
    verdicts: Mapped[str] = _text()

    # ordering_list keeps TargetRow.index equal to the target's position, so callers just append.
    targets: Mapped[list["TargetRow"]] = relationship(
        order_by="TargetRow.index",
        collection_class=ordering_list("index"),
        cascade="all, delete-orphan",
        passive_deletes=True,
        lazy="selectin",
    )

    def __repr__(self) -> str:
        return f"<CaptureRow {self.id} {self.namespace}/{self.pod or self.label_selector} {self.state}>"


class TargetRow(Base):
    """One pod of a capture: where it was captured, what came of it, and where its pcap is stored."""

    __tablename__ = "capture_targets"
    __table_args__ = (
        # ListCaptures by pod: the semi-join finds a pod's captures here, or probes it per capture.
        Index(None, "pod", "capture_id"),
    )

    capture_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("captures.id", ondelete="CASCADE"), primary_key=True
    )
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    namespace: Mapped[str] = mapped_column(String(253))
    pod: Mapped[str] = mapped_column(String(253))
    node: Mapped[str] = mapped_column(String(253))
    pod_ip: Mapped[str] = mapped_column(String(64))
    pod_uid: Mapped[str] = _text(String(64))
    agent_address: Mapped[str] = _text(String(256))
    interface: Mapped[str] = _text(String(64))
    state: Mapped[CaptureState] = _state_column()
    packets: Mapped[int] = _count()
    packets_received: Mapped[int] = _count()
    kernel_drops: Mapped[int] = _count()
    # tcpdump's statistics were lost with a killed agent: kernel_drops is unknown, not 0.
    drops_unknown: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    bytes: Mapped[int] = _count()
    # Why the capture ended before its time on this pod (its agent killed or shut down), for a person.
    interruption: Mapped[str] = _text()
    object_key: Mapped[str] = _text()
    sha256: Mapped[str] = _text(String(64))
    error: Mapped[str] = _text()
    pod_context: Mapped[str] = _text()  # JSON of the pod's phase and containers, written by the controller
    # JSON (protobuf JSON of Resolution) of how the agent tied the pod to `interface`: strategy, netns, devices.
    resolution: Mapped[str] = _text()
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The controller replica following this target until the lease expires (several replicas share one DB).
    lease_owner: Mapped[str] = _text(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # JSON (protobuf JSON of NetworkContext): the digest of the network around the capture on this pod's node.
    context: Mapped[str] = _text()
    summary: Mapped[str] = _text()  # JSON (protobuf JSON of CaptureSummary) of what is inside the pcap
    # A terminal target is still followed while its agent makes the summary (the pcap is downloadable already).
    summary_pending: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # FAILED because its agent stayed unreachable, and still followed: an agent that comes back uploads the pcap.
    awaiting_agent: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    def __repr__(self) -> str:
        return f"<TargetRow {self.capture_id}[{self.index}] {self.namespace}/{self.pod} {self.state}>"


class EventRow(Base):
    """One state transition of a capture (target_index None) or of one of its targets, in the order written."""

    __tablename__ = "capture_events"
    __table_args__ = (Index(None, "capture_id", "id"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    capture_id: Mapped[str] = mapped_column(String(32), ForeignKey("captures.id", ondelete="CASCADE"))
    target_index: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[CaptureState] = _state_column()
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    detail: Mapped[str] = _text()


class AuditRow(Base):
    """One access decision on a capture: who asked to do what, from where, when, and whether it was allowed.

    Append-only: written before the action it allows, never updated or deleted (migration 0005 adds triggers
    that refuse UPDATE and DELETE on both backends). It names its capture by id only, without a foreign key,
    so the record outlives the capture (deletion, retention).
    """

    __tablename__ = "audit_events"
    __table_args__ = (Index(None, "at"), Index(None, "actor", "at"), Index(None, "capture_id"))

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    actor: Mapped[str] = mapped_column(String(256))
    action: Mapped[str] = mapped_column(String(16))
    namespace: Mapped[str] = _text(String(253))
    capture_id: Mapped[str] = _text(String(32))
    peer: Mapped[str] = _text(String(256))
    result: Mapped[str] = mapped_column(String(16))  # allowed, denied or unauthenticated
    detail: Mapped[str] = _text()

    def __repr__(self) -> str:
        return f"<AuditRow {self.id} {self.actor} {self.action} {self.namespace} {self.result}>"
