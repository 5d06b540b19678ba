"""Model definitions (single-device code; sequence parallelism is declared, applied by :mod:`.sp`).

Dependencies point one way: ``engine -> models -> parallel -> attention``; nothing here knows
of Ray or of how processes were launched.
"""
