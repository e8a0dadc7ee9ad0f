"""Multi-process training: process bootstrap (env), dp x sp layout, and the sequence-parallel exchanges.

- `sequence`: the SP group and how a sequence is sliced across it;
- `affine_exchange`: carry exchange of the affine PSMs (one all-gather of slice summaries);
- `tree_exchange`: the Blelloch tree across ranks for non-associative aggregators;
- `context_parallel`: K/V all-gather attention for the transformer baseline.
"""
