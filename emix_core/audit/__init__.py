"""The audit trail: the hash-chained log (:mod:`.chain`) and its standard shapes
(:mod:`.export`)."""
