"""Membership store (see ``base`` for the interface)."""
from .base import ChangeEntry, GroupUpdate, Store, SyncState, open_store, utcnow

__all__ = ["ChangeEntry", "GroupUpdate", "Store", "SyncState", "open_store", "utcnow"]
