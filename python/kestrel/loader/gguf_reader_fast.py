"""`gguf.GGUFReader` with a faster metadata parse (the same fields, parts and tensors).

The package's reader slices its `np.memmap` once or more per value, and a memmap slice runs
Python-level `__getitem__` / `__array_finalize__` hooks: a file with a 150k-token vocabulary
(3M slices) took ~25 s to open on a loaded 2-core VM, more than reading its weights. This
subclass slices a plain ndarray view of the same mapping (C only), and reads arrays of strings
and of numbers in one tight loop per array instead of one recursive call per element. The
result is the same ReaderField / ReaderTensor structure (checked field by field against
GGUFReader in tests/gguf/test_gguf_reader_fast.py). Files of the other byte order take the
package's own code paths.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType


class FastGGUFReader(GGUFReader):
    """Drop-in GGUFReader (same constructor, attributes and results)."""

    def _plain(self) -> np.ndarray:
        plain = self.__dict__.get("_plain_data")
        if plain is None or plain.size != self.data.size:
            plain = self._plain_data = self.data.view(np.ndarray)  # the same memory
        return plain

    def _get(
        self, offset: int, dtype: Any, count: int = 1, override_order: str | None = None
    ) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = int(count)
        arr = self._plain()[offset : offset + dtype.itemsize * count].view(dtype)[:count]
        order = self.byte_order if override_order is None else override_order
        return arr.view(arr.dtype.newbyteorder(order))

    def _get_field_parts(
        self, orig_offs: int, raw_type: int
    ) -> tuple[int, list[np.ndarray], list[int], list[GGUFValueType]]:
        if raw_type != GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        count, item_type = int(alen[0]), int(raw_itype[0])
        offs = orig_offs + 12
        parts: list[np.ndarray] = [raw_itype, alen]
        types = [GGUFValueType.ARRAY]
        if item_type == GGUFValueType.STRING:
            plain = self._plain()
            for _ in range(count):
                slen = plain[offs : offs + 8].view(np.uint64)
                end = offs + 8 + int(slen[0])
                parts.append(slen)
                parts.append(plain[offs + 8 : end])
                offs = end
            data_idxs = list(range(3, 2 + 2 * count + 1, 2))
        elif item_type in self.gguf_scalar_to_np:
            values = self._get(offs, self.gguf_scalar_to_np[GGUFValueType(item_type)], count)
            parts += list(values.reshape(count, 1))  # one part per element, as GGUFReader
            offs += int(values.nbytes)
            data_idxs = list(range(2, 2 + count))
        else:  # arrays of arrays: the package's recursive path
            return super()._get_field_parts(orig_offs, raw_type)
        if count:
            types.append(GGUFValueType(item_type))
        return offs - orig_offs, parts, data_idxs, types
