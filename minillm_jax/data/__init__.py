"""Data: instruction records from local files, the paper's prompt template and tokenisation rule, and
deterministic, resumable batching."""

from minillm_jax.data.instructions import (
    FieldMap,
    InstructionData,
    RecordError,
    format_prompt,
    read_records,
    tokenize_pair,
)

__all__ = ["FieldMap", "InstructionData", "RecordError", "format_prompt", "read_records", "tokenize_pair"]
