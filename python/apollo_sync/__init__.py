"""apollo_sync: keep a model's safetensors files equal to its live weights,
writing only the blocks that changed.

>>> import apollo_sync
>>> result = apollo_sync.sync("/models/Qwen3-8B", tensors=model.state_dict())  # doctest: +SKIP
>>> result.total_changed, result.bytes_written_device  # doctest: +SKIP
"""

import logging

from apollo_sync._core import __version__
from apollo_sync.errors import (
    ApolloSyncError,
    GroupError,
    HandlesError,
    HeaderError,
    JournalError,
    LayoutError,
    LockedError,
    ModelDirError,
    PlanError,
    ProducerGoneError,
    RefusedError,
    RollbackError,
    ShardChangedError,
    SyncIOError,
    TornSyncError,
    UnsafeHandlesError,
    UnsafeShardError,
)
from apollo_sync.group import Group
from apollo_sync.handles import Handles, default_handles_path, export_handles, load_handles
from apollo_sync.hf_views import HFViews, hf_views
from apollo_sync.journal import (
    Generation,
    History,
    Recovered,
    history,
    prune,
    reading,
    recover,
    rollback,
)
from apollo_sync.layouts import EXPERT_RULES, MERGED_RULES, PREFIX_RULES, map_tensors
from apollo_sync.live import LiveTensor, from_torch
from apollo_sync.model_dir import DiskTensor, ModelDir
from apollo_sync.reshard import reshard
from apollo_sync.status import Status, status
from apollo_sync.steps import StepCounter
from apollo_sync.sync import FileResult, SyncResult, checkpoint_sync, plan, sync
from apollo_sync.watch import WatchSummary, watch

# A library logs and lets the application decide where records go (the CLI
# configures a handler: apollo_sync.logconfig).
logging.getLogger("apollo_sync").addHandler(logging.NullHandler())

__all__ = [
    "EXPERT_RULES",
    "MERGED_RULES",
    "PREFIX_RULES",
    "ApolloSyncError",
    "DiskTensor",
    "FileResult",
    "Generation",
    "Group",
    "GroupError",
    "HFViews",
    "Handles",
    "HandlesError",
    "HeaderError",
    "History",
    "JournalError",
    "LayoutError",
    "LiveTensor",
    "LockedError",
    "ModelDir",
    "ModelDirError",
    "PlanError",
    "ProducerGoneError",
    "Recovered",
    "RefusedError",
    "RollbackError",
    "ShardChangedError",
    "Status",
    "StepCounter",
    "SyncIOError",
    "SyncResult",
    "TornSyncError",
    "UnsafeHandlesError",
    "UnsafeShardError",
    "WatchSummary",
    "__version__",
    "checkpoint_sync",
    "default_handles_path",
    "export_handles",
    "from_torch",
    "hf_views",
    "history",
    "load_handles",
    "map_tensors",
    "plan",
    "prune",
    "reading",
    "recover",
    "reshard",
    "rollback",
    "status",
    "sync",
    "watch",
]
