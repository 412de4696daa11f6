"""Speculative decoding (draft model proposes, target model verifies).

Stub package: nothing here yet.  The implementation arrives with the speculative decoding
issue; it will drive two ``transformer`` models through their ``kv_cache`` caches
(``crop`` is the rollback it needs, already available on every cache).
"""
