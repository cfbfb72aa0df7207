"""Server-side Flower plumbing every strategy shares: which clients take part (:mod:`.sampling`), what
became of their replies (:mod:`.replies`), and the bytes that travelled (:mod:`.traffic`).

Sits above :mod:`fedlora.core` and :mod:`fedlora.privacy`, below ``strategies``.
"""
