"""A set of E two-layer MLP experts stored stacked, computed with one grouped matmul per layer.

Weights are `[E, D, H]` / `[E, H, D]` (input-major, so `x @ w` needs no transpose) with
biases `[E, H]` / `[E, D]`. Legend in vitmoe.moe.routers.base.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..runtime import allocator_decided, before_large_cpu_tensors
from ..validation import Fields
from .routers.options import Options
from .kernel_table import measured_choice, shape_key
from .parallel import ExpertParallel, gather_experts

EXPERT_INITS = ("shared", "independent")
DISPATCH_PATHS = ("auto", "grouped", "padded")


@dataclass
class ExpertOptions(Options):
    expert_init: str = "shared"
    """"shared": every expert starts as a copy of one draw (what makes averaging experts meaningful,
    AdaMix); "independent": one draw per expert."""
    dispatch: str = "auto"
    """Expert computation: "grouped" (torch._grouped_mm), "padded" (batched matmul over
    capacity-padded queues) or "auto" (what `vitmoe bench` measured fastest for this device, dtype
    and shape, else grouped where the device and dtype support it; vitmoe.moe.kernel_table)."""

    def check(self, f: Fields, experts: Sequence[int]) -> None:
        super().check(f, experts)
        f.choice("expert_init", EXPERT_INITS)
        f.choice("dispatch", DISPATCH_PATHS)


def grouped_mm_supported(x: Tensor) -> bool:
    """Whether `torch._grouped_mm` runs this dtype on this device.

    On CUDA it needs bf16 and a Hopper-class GPU; the CPU build runs fp32/bf16/fp16 (not fp64:
    the padded path serves float64, which the reference tests use). Its 16-byte row-stride rule
    (widths divisible by 8 in bf16) is met inside GroupedExperts by zero-padding the widths.
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False  # the op's shape function (meta kernel) under torch.compile accepts bf16 only
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return False


def _aligned(width: int, x: Tensor) -> int:
    """`width` rounded up to a 16-byte multiple in x's dtype."""
    per = 16 // x.element_size()
    return -(-width // per) * per


def _bucket(rows: Tensor) -> Tensor:
    """Each of `rows` (int64) rounded up to one of 8 sizes per power of two (at most 12.5 % more;
    multiples of 8 up to 16): few distinct matmul shapes, whatever the routing."""
    bits = torch.frexp(rows.double()).exponent.long()  # rows < 2**bits, the bit length
    step = torch.where(rows <= 16, 8, torch.ones_like(rows) << (bits - 4).clamp_min(0))
    return (rows + step - 1) // step * step


def _cast_pad(t: Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    """`t` in `dtype`, zero-padded at the end of each dim to `shape`, in one copy."""
    if tuple(t.shape) == shape:
        return t.to(dtype)
    out = t.new_zeros(shape, dtype=dtype)
    out[tuple(slice(0, n) for n in t.shape)] = t  # differentiable (CopySlices): the grad is sliced back
    return out


class GroupedExperts(nn.Module):
    def __init__(
        self,
        num_experts: int,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
        init: str = "shared",
        dispatch_path: str = "auto",
    ):
        super().__init__()
        if init not in EXPERT_INITS:
            raise ValueError(f"expert_init must be one of {EXPERT_INITS}, got {init!r}")
        if dispatch_path not in DISPATCH_PATHS:
            raise ValueError(f"dispatch must be one of {DISPATCH_PATHS}, got {dispatch_path!r}")
        E, D, H, O = num_experts, in_features, hidden_features, out_features or in_features
        self.num_experts, self.init, self.dispatch_path = E, init, dispatch_path
        if torch.get_default_device().type == "cpu":
            before_large_cpu_tensors(E * max(D * H, H * O) * torch.finfo(torch.get_default_dtype()).bits // 8)
        self.w1 = nn.Parameter(torch.empty(E, D, H))
        self.b1 = nn.Parameter(torch.empty(E, H))
        self.w2 = nn.Parameter(torch.empty(E, H, O))
        self.b2 = nn.Parameter(torch.empty(E, O))
        self.act = act_layer()
        self.drop = nn.Dropout(drop)
        self._merged_cache: tuple[tuple, tuple[Tensor, ...]] | None = None
        self.ep: ExpertParallel | None = None
        """Set when the experts are split over ranks (vitmoe.training.expert_parallel.shard_experts):
        then the parameters hold this rank's slice of them."""
        self.bucket_rows: bool | None = None
        """Grouped path: round each expert's row count up to a few sizes per octave (True), never
        (False), or where it pays (None: CPU bf16/fp16, see `_bucket_rows`)."""
        self.last_shape_key: str | None = None
        """The kernel-table key of the last "auto" forward (vitmoe.moe.kernel_table; `vitmoe bench`)."""
        self.static_shapes: bool | None = None
        """Grouped path: keep shapes independent of routing (no host read of the kept count).
        None: only off the CPU, where reading a device count would stall the stream."""
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # ViT's Linear init (truncated normal 0.02, zero bias). "shared" draws one expert and
        # copies it, so averaging the experts later starts from a meaningful point (AdaMix).
        for w in (self.w1, self.w2):
            if self.init == "shared":
                w.copy_(nn.init.trunc_normal_(torch.empty_like(w[0]), std=0.02).expand_as(w))
            else:
                nn.init.trunc_normal_(w, std=0.02)
        self.b1.zero_()
        self.b2.zero_()

    @property
    def sharded(self) -> bool:
        return self.ep is not None and self.ep.size > 1

    def _compute_dtype(self, x: Tensor) -> torch.dtype:
        """The experts' matmul dtype: autocast's when it is on (`_grouped_mm` and `bmm` on stacked
        weights are not on autocast's cast lists, so without this an fp32 input would run the
        experts in fp32 while the dense layers run in bf16), else the input's."""
        if x.is_floating_point() and x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    def _before_step(self, x: Tensor) -> None:
        # For layers built off the CPU and moved there; a flag read once decided.
        if not allocator_decided() and x.device.type == "cpu" and self.training and self.w1.requires_grad:
            before_large_cpu_tensors(max(self.w1.nbytes, self.w2.nbytes))

    # --- routed computation -------------------------------------------------------------
    def forward(self, x_SD: Tensor, counts_E: Tensor, expert_S: Tensor, capacity: int | None = None) -> Tensor:
        """Rows sorted by expert -> each row through its expert: [S, O].

        counts_E: rows of each expert, in order; rows past `counts_E.sum()` are padding whose
        output is unspecified (callers zero them through their gate). `capacity`, when known,
        bounds every count and fixes the padded path's shape without a host sync.
        """
        self._before_step(x_SD)
        x_SD = x_SD.to(self._compute_dtype(x_SD))
        if self._uses_grouped(x_SD):
            return self._grouped(x_SD, counts_E, expert_S)
        return self._padded(x_SD, counts_E, expert_S, capacity)

    def _uses_grouped(self, x_SD: Tensor) -> bool:
        """The path of `dispatch`: "auto" takes the machine's measured choice (kernel_table, keyed by
        shapes only: no host sync), else grouped where it runs. Not under torch.compile (reading the
        table would break the graph) and not when the experts are split over ranks (each rank's
        share and rows follow the routing; `vitmoe bench` measures whole layers): grouped there."""
        if self.dispatch_path != "auto":
            return self.dispatch_path == "grouped"
        if not grouped_mm_supported(x_SD):
            return False
        if self.sharded or torch.compiler.is_compiling():
            return True
        (E, D, H), rows = self.w1.shape, max(1, x_SD.shape[0] // self.w1.shape[0])
        self.last_shape_key = shape_key(x_SD.device.type, x_SD.dtype, D, H, E, rows)
        return measured_choice(self.last_shape_key) != "padded"

    def _grouped(self, x_SD: Tensor, counts_E: Tensor, expert_S: Tensor) -> Tensor:
        S = x_SD.shape[0]
        static = self.static_shapes if self.static_shapes is not None else x_SD.device.type != "cpu"
        if not static:
            # On the host the count is free to read: run only the real rows.
            n = int(counts_E.sum())
            x_SD, expert_S, lengths_E = x_SD[:n], expert_S[:n], counts_E
        else:
            # On a GPU reading it would stall the stream: padding rows join the last group,
            # keeping shapes static; they are computed and zeroed by their gate.
            n = S
            lengths_E = counts_E.clone()
            lengths_E[-1] += S - counts_E.sum()
        offs_E = torch.cumsum(lengths_E, 0).to(torch.int32)
        # _grouped_mm wants every row stride a multiple of 16 bytes (d 300 in bf16 is 600 bytes).
        # The input only needs a wider row stride (a view of a padded copy, cheap); the weights'
        # output widths are zero-padded, fused with the dtype cast they need anyway. Zero
        # columns add nothing (GELU(0) = 0) and their gradient is sliced away.
        dt, (E, D, H), O = x_SD.dtype, self.w1.shape, self.w2.shape[-1]
        Dp, Hp, Op = (_aligned(w, x_SD) for w in (D, H, O))
        w1, w2 = _cast_pad(self.w1, dt, (E, D, Hp)), _cast_pad(self.w2, dt, (E, Hp, Op))
        b1, b2 = _cast_pad(self.b1, dt, (E, Hp)), _cast_pad(self.b2, dt, (E, Op))
        dest_S = None
        if not static and self._bucket_rows(x_SD):
            # Each group's rows rounded up to a coarse size (zero rows, discarded after): oneDNN
            # builds and JIT-compiles a bf16 matmul per distinct shape and caches 1024 of them;
            # per-expert row counts change every step, so unrounded every step builds anew
            # (2.1 against 1.25 ms a matmul at 800 rows, BENCHMARKS.md s.0).
            lengths_E = _bucket(counts_E)
            pad_start_E = torch.cumsum(lengths_E, 0) - lengths_E
            start_E = torch.cumsum(counts_E, 0) - counts_E
            dest_S = pad_start_E.index_select(0, expert_S) + torch.arange(n, device=x_SD.device) - start_E.index_select(0, expert_S)
            P = int(lengths_E.sum())
            x_SD = x_SD.new_zeros(P, Dp).index_copy(0, dest_S, F.pad(x_SD, (0, Dp - D)) if Dp != D else x_SD)[:, :D]
            expert_S = torch.repeat_interleave(torch.arange(E, device=x_SD.device), lengths_E, output_size=P)
            offs_E = torch.cumsum(lengths_E, 0).to(torch.int32)
        elif Dp != D:
            x_SD = F.pad(x_SD, (0, Dp - D))[:, :D]
        # index_select, not advanced indexing: its backward is index_add_, many times faster on
        # CPU than the accumulating index_put that `b[expert_S]` back-propagates through.
        h_SH = torch._grouped_mm(x_SD, w1, offs=offs_E) + b1.index_select(0, expert_S)
        h_SH = self.drop(self.act(h_SH))
        y_SO = torch._grouped_mm(h_SH, w2, offs=offs_E) + b2.index_select(0, expert_S)
        if dest_S is not None:
            y_SO = y_SO.index_select(0, dest_S)
        if Op != O:
            y_SO = y_SO[:, :O]
        return y_SO if n == S else torch.cat([y_SO, y_SO.new_zeros(S - n, y_SO.shape[-1])])

    def _bucket_rows(self, x_SD: Tensor) -> bool:
        """Round the groups' row counts (`_bucket`): where the counts are free to read (the CPU)
        and the matmuls go through oneDNN (bf16/fp16; fp32 uses a BLAS that builds nothing per
        shape, and rounding would only add rows)."""
        if self.bucket_rows is not None:
            return self.bucket_rows
        return x_SD.device.type == "cpu" and x_SD.dtype in (torch.bfloat16, torch.float16)

    def _padded(self, x_SD: Tensor, counts_E: Tensor, expert_S: Tensor, capacity: int | None) -> Tensor:
        E, S = self.w1.shape[0], x_SD.shape[0]
        # Dropless needs the largest queue as the padded length: a host sync, the price of
        # this fallback path (the grouped path has none).
        C = capacity if capacity is not None else max(int(counts_E.max()), 1)
        if capacity is None and self._bucket_rows(x_SD):
            C = int(_bucket(torch.tensor(C)))  # the largest queue changes every step: few bmm shapes
        start_E = torch.cumsum(counts_E, 0) - counts_E
        row_S = torch.arange(S, device=x_SD.device)
        pos_S = row_S - start_E[expert_S]
        # Slot e*C + pos for real rows; padding rows land in one spare slot, discarded.
        real_S = (row_S < counts_E.sum()) & (pos_S < C)
        slot_S = torch.where(real_S, expert_S * C + pos_S, torch.full_like(pos_S, E * C))
        buf = x_SD.new_zeros(E * C + 1, x_SD.shape[-1]).index_copy_(0, slot_S, x_SD)
        x_ECD = buf[: E * C].view(E, C, -1)
        w1, w2 = self.w1.to(x_SD.dtype), self.w2.to(x_SD.dtype)
        h_ECH = torch.baddbmm(self.b1.to(x_SD.dtype).unsqueeze(1), x_ECD, w1)
        h_ECH = self.drop(self.act(h_ECH))
        y_ECO = torch.baddbmm(self.b2.to(x_SD.dtype).unsqueeze(1), h_ECH, w2)
        y_rows = torch.cat([y_ECO.reshape(E * C, -1), y_ECO.new_zeros(1, y_ECO.shape[-1])])
        return y_rows.index_select(0, slot_S)

    def forward_single(self, x_TD: Tensor, expert: Tensor) -> Tensor:
        """Every token through one expert chosen on the device (0-d index): dense cost."""
        self._before_step(x_TD)
        w1 = self.w1.index_select(0, expert.view(1))[0]
        w2 = self.w2.index_select(0, expert.view(1))[0]
        b1 = self.b1.index_select(0, expert.view(1))[0]
        b2 = self.b2.index_select(0, expert.view(1))[0]
        return self._dense(x_TD, w1, b1, w2, b2)

    def all_weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(w1, b1, w2, b2) of every expert; gathered from the EP group when sharded (no grad)."""
        params = (self.w1, self.b1, self.w2, self.b2)
        if not self.sharded:
            return params
        return tuple(gather_experts(p.detach(), self.ep) for p in params)  # type: ignore[return-value]

    def forward_all(self, x_TD: Tensor) -> Tensor:
        """Every token through every expert: [E, T, O] (ensemble evaluation)."""
        w1, b1, w2, b2 = (p.to(x_TD.dtype) for p in self.all_weights())
        h_ETH = torch.baddbmm(b1.unsqueeze(1), x_TD.expand(w1.shape[0], -1, -1), w1)
        h_ETH = self.drop(self.act(h_ETH))
        return torch.baddbmm(b2.unsqueeze(1), h_ETH, w2)

    def _dense(self, x_TD: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
        # F.linear wants [out, in]; a transposed view costs nothing.
        h = self.drop(self.act(F.linear(x_TD, w1.t(), b1)))
        return F.linear(h, w2.t(), b2)

    # --- merging ------------------------------------------------------------------------
    def merged_weights(self, weights_E: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(w1 [D, H], b1 [H], w2 [H, O], b2 [O]): the weighted average of the experts.

        Uniform weights by default. Linear layers average exactly only when the same
        average is applied to both layers of every expert (that is what "merging" means:
        AdaMix's weight averaging), not to their outputs.
        """
        params = self.all_weights()
        if weights_E is None:
            return tuple(p.mean(0) for p in params)  # type: ignore[return-value]
        w = (weights_E / weights_E.sum()).to(self.w1.dtype)
        return tuple(torch.tensordot(w, p, dims=1) for p in params)  # type: ignore[return-value]

    def forward_merged(self, x_TD: Tensor) -> Tensor:
        """Inference through the uniformly merged expert, cached until the weights change."""
        params = (self.w1, self.b1, self.w2, self.b2)
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            merged = self.merged_weights()
        else:
            # Optimizer steps and load_state_dict bump the version counter in place.
            key = tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in params)
            if self._merged_cache is None or self._merged_cache[0] != key:
                with torch.no_grad():
                    self._merged_cache = (key, self.merged_weights())
            merged = self._merged_cache[1]
        return self._dense(x_TD, *(m.to(x_TD.dtype) for m in merged))

    def extra_repr(self) -> str:
        E, D, H = self.w1.shape
        return f"experts={E}, in={D}, hidden={H}, out={self.w2.shape[-1]}, init={self.init}"
