"""Everything durable: database models and sessions, the instance store, state changes.

Nothing outside this package writes to the database or the store.
"""
