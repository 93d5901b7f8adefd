from typing import Any

def merge_rows(
    src: Any,
    src_offset: int,
    src_dtype: int,
    a: Any,
    a_offset: int,
    b: Any,
    rows: int,
    cols: int,
    rank: int,
    out: Any,
    out_offset: int,
    out_dtype: int,
) -> tuple[float, float, float, int]: ...
def set_simd(name: str) -> str: ...
