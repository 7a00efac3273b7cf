"""The evaluation jobs run on a lent GPU (or on CPU): each a ``python -m vtprune.eval.jobs.<name>`` command that
writes JSON results. Jobs that spread work over processes do it through ``fanout``."""
