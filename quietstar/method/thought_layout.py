"""The bookkeeping of a thought-mode forward: how its queries are laid out, and its keys.

``ThoughtLayout`` tells ``quietstar.method.attention.thought_attention`` which passes a call holds (and,
with position selection, which positions its thought rows belong to) and builds the masks;
``PassKeys`` keeps one attention layer's keys and values of a rollout, one block per pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class PassKeys:
    """One attention layer's keys and values of a rollout, one [B, Hkv, L, D] block per pass.

    The text's block is kept contiguous (the fused kernels want it so). The thought passes' blocks
    are kept for autograd and also copied, once each, into a growing [B, Hkv, L, capacity, D]
    buffer outside autograd, so the own-thought products read them batched without re-stacking
    P blocks per call (O(P^2) copies over a rollout). Slots are written once and never change.
    """

    def __init__(self):
        self.passes = 0
        self.text_key = self.text_value = None
        self.own_keys: list[torch.Tensor] = []
        self.own_values: list[torch.Tensor] = []
        self._buffers = None  # (keys, values), each [B, Hkv, L, capacity, D]

    def add(self, key_blocks, value_blocks) -> None:
        key_blocks, value_blocks = list(key_blocks), list(value_blocks)
        if self.passes == 0:
            self.text_key, self.text_value = key_blocks.pop(0).contiguous(), value_blocks.pop(0).contiguous()
            self.passes = 1
        if not key_blocks:
            return
        n = len(self.own_keys)
        need = n + len(key_blocks)
        if self._buffers is None or self._buffers[0].shape[3] < need:
            shape = list(key_blocks[0].shape)
            shape.insert(3, max(need, 2 * n, 4))
            with torch.no_grad():
                grown = tuple(torch.empty(shape, dtype=b.dtype, device=b.device)
                              for b in (key_blocks[0], value_blocks[0]))
                if n:
                    for new, old in zip(grown, self._buffers):
                        new[:, :, :, :n] = old[:, :, :, :n]
            self._buffers = grown
        with torch.no_grad():
            for i, (k, v) in enumerate(zip(key_blocks, value_blocks)):
                self._buffers[0][:, :, :, n + i] = k
                self._buffers[1][:, :, :, n + i] = v
        self.own_keys += key_blocks
        self.own_values += value_blocks
        self.passes += len(key_blocks)

    @classmethod
    def of_text(cls, key: torch.Tensor, value: torch.Tensor) -> "PassKeys":
        """A store holding a text pass's keys and values [B, Hkv, L, D] (pass 0) already."""
        store = cls()
        store.add([key], [value])
        return store

    def own_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The thought passes' keys and values so far, [B, Hkv, L, P, D] each (no autograd)."""
        n = len(self.own_keys)
        return self._buffers[0][:, :, :, :n], self._buffers[1][:, :, :, :n]


@dataclass
class ThoughtLayout:
    """Tells the attention function how a thought-mode call is laid out.

    A call's queries (and its keys/values) are one block per entry of ``query_passes``:
    consecutive passes, 0 = the text. The text's block has L tokens; a thought pass's block has L
    too, or, with ``rows``, one token per selected position. With a ``key_store`` the blocks of earlier
    calls of the same rollout are kept there (per attention module, a list of key blocks and a list
    of value blocks indexed by pass), so a call may start at any pass; without one it starts at 0.
    """

    text_len: int
    query_passes: tuple[int, ...]
    text_key_valid: torch.Tensor  # [B, L] bool: False for padding
    text_positions: torch.Tensor  # [B, L] long: position id of each text token
    has_padding: bool = True      # False lets the text part use a plain causal kernel
    key_store: dict | None = None
    rows: torch.Tensor | None = None  # [B, S] long: text position of each thought-pass row; None: all L
    # A call holding every thought pass of selected rows scores their own part by the flash kernel
    # (memory linear in the passes; float32 rounding unlike the product path's): Rollout.score_rows.
    flash_own: bool = False
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # per call, all layers

    @property
    def query_rows(self) -> torch.Tensor | None:
        """[B, S] positions of this call's query rows, or None when they are all L positions
        (the text pass, or no selection). A call mixing both is split by ``thought_attention``."""
        return None if self.rows is None or self.query_passes[0] == 0 else self.rows

    @property
    def query_width(self) -> int:
        """Query rows per pass block: S with selected rows, else L."""
        rows = self.query_rows
        return self.text_len if rows is None else rows.shape[1]

    @property
    def needs_text_mask(self) -> bool:
        """The text part cannot use a plain causal kernel: padding, or selected rows."""
        return self.has_padding or self.query_rows is not None

    def pass_keys(self, module, key: torch.Tensor, value: torch.Tensor) -> "PassKeys":
        """Adds this call's key/value blocks to the module's ``PassKeys`` and returns it."""
        W, Qp = self.query_width, len(self.query_passes)
        if key.shape[2] != Qp * W:
            raise RuntimeError(f"thought layout mismatch: {key.shape[2]} keys for {W} rows and "
                               f"query passes {self.query_passes}")
        store = PassKeys() if self.key_store is None else self.key_store.setdefault(module, PassKeys())
        if self.query_passes != tuple(range(store.passes, store.passes + Qp)):
            raise RuntimeError(f"thought passes {self.query_passes} do not continue the "
                               f"{store.passes} passes already stored")
        store.add(key.split(W, 2), value.split(W, 2))
        return store

    def additive_text_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """[B, 1, Lq, L] additive mask of the text part (Lq = ``query_width``), for padded batches
        or selected rows, without a window. Made once per call: every layer reads the same."""
        if ("additive", dtype) not in self._cache:
            allowed = self.text_mask(None)[:, 0, 0, 0].unsqueeze(1)
            self._cache["additive", dtype] = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device
                                                         ).masked_fill(~allowed, float("-inf"))
        return self._cache["additive", dtype]

    def row_chunks(self, min_rows: int = 32, max_chunks: int = 8) -> tuple[tuple[int, int, int], ...] | None:
        """Selected rows lie in text order, so a block of them needs only the text keys up to its
        last position: (first row, end row, end key) per block, for the text part to skip the keys
        no row of a block sees (S x L -> about S x L / 2 scores). None without selected rows."""
        rows = self.query_rows
        if rows is None:
            return None
        if "chunks" not in self._cache:
            S = rows.shape[1]
            size = max(min_rows, -(-S // max_chunks))
            ends = rows.amax(0).cummax(0).values.add(1).tolist()  # [S]: keys the rows up to r need
            self._cache["chunks"] = tuple((r, min(r + size, S), ends[min(r + size, S) - 1])
                                          for r in range(0, S, size))
        return self._cache["chunks"]

    def text_mask(self, sliding_window: int | None) -> torch.Tensor:
        """Allowed text keys, [B, 1, 1, Qp or 1, Lq, L] bool (query row r, key j); Lq =
        ``query_width``, row r belonging to position i = r, or to ``query_rows[b, r]``."""
        L = self.text_len
        idx = torch.arange(L, device=self.text_key_valid.device)
        rows = self.query_rows
        if rows is None:
            causal = idx[None, :] <= idx[:, None]  # [L(query), L(key)]
            allowed = causal[None] & self.text_key_valid[:, None, :]  # [B, L, L]
            # A padded query with no valid key would give NaN; let it see itself (its output is unused).
            allowed = allowed | torch.eye(L, dtype=torch.bool, device=allowed.device)[None]
        else:  # row r of position i = rows[b, r] sees keys 0..i, and always its own (padding rows)
            allowed = (idx[None, None, :] <= rows[:, :, None]) & self.text_key_valid[:, None, :]
            allowed = allowed | (idx[None, None, :] == rows[:, :, None])  # [B, S, L]
        if sliding_window is None:
            return allowed[:, None, None, None]
        passes = torch.tensor(self.query_passes, device=allowed.device)
        pos = self.text_positions
        query_pos = pos if rows is None else pos.gather(1, rows)
        # Query of pass p at position i sits at position pos_i + p; key j at pos_j.
        distance = (query_pos[:, None, :, None] + passes[None, :, None, None]) - pos[:, None, None, :]
        return (allowed[:, None] & (distance < sliding_window))[:, None, None]

    def thought_mask(self, num_key_passes: int, sliding_window: int | None) -> torch.Tensor:
        """Allowed own-thought keys, [1, 1, 1, Qp, 1, P] bool: pass p sees passes 1..p."""
        q = torch.tensor(self.query_passes, device=self.text_key_valid.device)[:, None]
        k = torch.arange(1, num_key_passes + 1, device=q.device)[None, :]
        allowed = k <= q
        if sliding_window is not None:
            allowed = allowed & (q - k < sliding_window)
        return allowed[None, None, None, :, None, :]
