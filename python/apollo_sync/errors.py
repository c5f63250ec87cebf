"""The exception hierarchy: everything apollo_sync raises derives from ApolloSyncError.

The classes for failures the Rust core finds (bad headers, I/O, a shard that
changed under us, an inconsistent request, a damaged log or state file, a rollback
it cannot do) are defined there, and Python raises some of them too; the ones only
Python finds are defined here. All pickle by their dotted path.
"""

from __future__ import annotations

from apollo_sync._core import (
    ApolloSyncError,
    HeaderError,
    JournalError,
    PlanError,
    RollbackError,
    ShardChangedError,
    SyncIOError,
)

__all__ = [
    "ApolloSyncError",
    "GroupError",
    "HandlesError",
    "HeaderError",
    "JournalError",
    "LayoutError",
    "LockedError",
    "ModelDirError",
    "PlanError",
    "ProducerGoneError",
    "RefusedError",
    "RollbackError",
    "ShardChangedError",
    "SyncIOError",
    "TornSyncError",
    "UnsafeHandlesError",
    "UnsafeShardError",
]


class ModelDirError(ApolloSyncError):
    """The model directory is not a usable safetensors checkpoint (no shards,
    a shard the index names is missing, an index that disagrees with the headers)."""


class LayoutError(ApolloSyncError):
    """Live tensors do not map onto the tensors on disk: an unmatched name, a shape
    or dtype that differs, merged rows that do not add up."""


class RefusedError(LayoutError):
    """The live weights cannot be written back byte for byte (quantized or repacked
    weights, tensor parallelism, LoRA, reordered experts): refused before writing."""


class HandlesError(ApolloSyncError):
    """A handles file that cannot be used (missing, malformed, wrong format)."""


class UnsafeHandlesError(HandlesError):
    """A handles file refused for safety: owned or writable by another user, a
    symlink, or a pickle that references anything but the allowed rebuild functions."""


class ProducerGoneError(HandlesError):
    """The process that exported the handles has exited or restarted."""


class UnsafeShardError(ModelDirError):
    """A shard that must not be written in place: a symlink (into a Hugging Face
    cache, say) or a file with other hard links, whose other copies would change
    too; or a shard this user cannot write."""


class LockedError(ApolloSyncError):
    """Another apollo-sync holds the model directory's lock past the timeout."""


class TornSyncError(ApolloSyncError):
    """The producer stepped while the sync read its tensors, every time it was
    tried: the generation was not committed and the files were put back."""


class GroupError(ApolloSyncError):
    """The hosts of a group could not commit a generation together (a host failed
    or refused, a peer died or timed out, the group was set up inconsistently),
    or a single-host command was used on a directory a group writes."""
