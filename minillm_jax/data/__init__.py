"""Data: instruction records from local files or hub datasets (instruction/input/output fields or chat
messages), the paper's prompt template and tokenisation rule, deterministic resumable batches of whole
examples or prompts, and packed plain text for the pre-training term."""

from minillm_jax.data.hub import load_records
from minillm_jax.data.instructions import (
    FieldMap,
    InstructionData,
    RecordError,
    format_prompt,
    read_records,
    response_text,
    tokenize_pair,
)
from minillm_jax.data.pretrain import PackedText

__all__ = ["FieldMap", "InstructionData", "PackedText", "RecordError", "format_prompt", "load_records",
           "read_records", "response_text", "tokenize_pair"]
