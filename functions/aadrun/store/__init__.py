"""Membership store (see ``base`` for the interface)."""
from .base import ChangeEntry, GroupUpdate, IamWrite, Store, SyncConflict, SyncState, open_store, utcnow

__all__ = ["ChangeEntry", "GroupUpdate", "IamWrite", "Store", "SyncConflict", "SyncState", "open_store", "utcnow"]
