"""experiments/bench/hlo_roofline.py on a hand-written optimized module: FLOPs of GEMM custom
calls and fused dots, loop trip counts, in-place updates and dynamic slices at slice size."""
from experiments.bench import hlo_roofline

HLO = '''HloModule jit_step, entry_computation_layout={()->f32[]}

%fused_dot (p0: bf16[64,128], p1: bf16[128,32]) -> f32[64,32] {
  %p0 = bf16[64,128]{1,0} parameter(0)
  %p1 = bf16[128,32]{1,0} parameter(1)
  ROOT %dot.1 = f32[64,32]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_dus (q0: bf16[10,64,128], q1: bf16[1,64,128], q2: s32[]) -> bf16[10,64,128] {
  %q0 = bf16[10,64,128]{2,1,0} parameter(0)
  %q1 = bf16[1,64,128]{2,1,0} parameter(1)
  %q2 = s32[] parameter(2)
  %c0 = s32[] constant(0)
  ROOT %dus = bf16[10,64,128]{2,1,0} dynamic-update-slice(%q0, %q1, %q2, %c0, %c0)
}

%fused_ds (r0: bf16[10,64,128], r1: s32[]) -> bf16[1,64,128] {
  %r0 = bf16[10,64,128]{2,1,0} parameter(0)
  %r1 = s32[] parameter(1)
  %c1 = s32[] constant(0)
  %ds = bf16[1,64,128]{2,1,0} dynamic-slice(%r0, %r1, %c1, %c1), dynamic_slice_sizes={1,64,128}
  ROOT %neg = bf16[1,64,128]{2,1,0} negate(%ds)
}

%body (state: (s32[], bf16[10,64,128], bf16[1,64,128])) -> (s32[], bf16[10,64,128], bf16[1,64,128]) {
  %state = (s32[], bf16[10,64,128]{2,1,0}, bf16[1,64,128]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %buf = bf16[10,64,128]{2,1,0} get-tuple-element(%state), index=1
  %upd = bf16[1,64,128]{2,1,0} get-tuple-element(%state), index=2
  %write = bf16[10,64,128]{2,1,0} fusion(%buf, %upd, %i), kind=kLoop, calls=%fused_dus
  %read = bf16[1,64,128]{2,1,0} fusion(%write, %i), kind=kLoop, calls=%fused_ds
  ROOT %out = (s32[], bf16[10,64,128]{2,1,0}, bf16[1,64,128]{2,1,0}) tuple(%i, %write, %read)
}

ENTRY %main (a: bf16[64,128], b: bf16[128,256], w: bf16[128,32], init: (s32[], bf16[10,64,128], bf16[1,64,128])) -> f32[] {
  %a = bf16[64,128]{1,0} parameter(0)
  %b = bf16[128,256]{1,0} parameter(1)
  %w = bf16[128,32]{1,0} parameter(2)
  %init = (s32[], bf16[10,64,128]{2,1,0}, bf16[1,64,128]{2,1,0}) parameter(3)
  %gemm = (bf16[64,256]{1,0}, s8[0]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}
  %fd = f32[64,32]{1,0} fusion(%a, %w), kind=kCustom, calls=%fused_dot
  %loop = (s32[], bf16[10,64,128]{2,1,0}, bf16[1,64,128]{2,1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"7"}}
  ROOT %r = f32[] constant(0)
}
'''


def test_estimate_counts_flops_trips_and_slices():
  ops = {o.name: o for o in hlo_roofline.estimate(HLO, bandwidth=1e12, peak_flops=1e14,
                                                   launch_s=0.0)}
  assert set(ops) == {"gemm", "fd", "write", "read"}     # parameters, tuples, constants: free
  assert ops["gemm"].kind == "cc:__cublas$gemm"
  assert ops["gemm"].flops == 2 * 64 * 256 * 128
  assert ops["fd"].flops == 2 * 64 * 32 * 128
  slice_bytes, index_bytes = 64 * 128 * 2, 4
  # the in-place write reads its update and writes it, not the [10, 64, 128] buffer
  assert ops["write"].times == 7
  assert ops["write"].bytes == 2 * slice_bytes + index_bytes
  # a buffer read only through a dynamic slice costs the slice, plus the result
  assert ops["read"].times == 7 and ops["read"].bytes == 2 * slice_bytes + index_bytes
  gemm = ops["gemm"]
  assert gemm.seconds == max(gemm.bytes / 1e12, gemm.flops / 1e14)
  table = hlo_roofline.format_estimate(list(ops.values()))
  assert "| cc:__cublas$gemm |" in table and "launches" in table


KERNELS = '''HloModule jit_moe, entry_computation_layout={()->f32[]}

%fused_fill () -> (bf16[4,64,128], bf16[4,64,128]) {
  %z = bf16[] constant(0)
  %b = bf16[4,64,128]{2,1,0} broadcast(%z), dimensions={}
  %c = bf16[4,64,128]{2,1,0} copy(%b)
  ROOT %t = (bf16[4,64,128]{2,1,0}, bf16[4,64,128]{2,1,0}) tuple(%b, %c)
}

%fused_neg (p0: bf16[4,64,128]) -> bf16[4,64,128] {
  %p0 = bf16[4,64,128]{2,1,0} parameter(0)
  ROOT %n = bf16[4,64,128]{2,1,0} negate(%p0)
}

ENTRY %main (v: s32[12,4], x: bf16[256,64], w: bf16[8,128,64], dy: bf16[256,128]) -> f32[] {
  %v = s32[12,4]{1,0} parameter(0)
  %x = bf16[256,64]{1,0} parameter(1)
  %w = bf16[8,128,64]{2,1,0} parameter(2)
  %dy = bf16[256,128]{1,0} parameter(3)
  %gmm = bf16[256,128]{1,0} custom-call(%v, %x, %w), custom_call_target="mosaic_gpu_v2"
  %tgmm = f32[8,64,128]{2,1,0} custom-call(%v, %x, %dy), custom_call_target="mosaic_gpu_v2"
  %other = bf16[256,64]{1,0} custom-call(%x), custom_call_target="mosaic_gpu_v2"
  %fill = (bf16[4,64,128]{2,1,0}, bf16[4,64,128]{2,1,0}) fusion(), kind=kLoop, calls=%fused_fill
  %zero = bf16[4,64,128]{2,1,0} get-tuple-element(%fill), index=0
  %neg = bf16[4,64,128]{2,1,0} fusion(%zero), kind=kLoop, calls=%fused_neg
  ROOT %r = f32[] constant(0)
}
'''


def test_grouped_matmul_kernels_count_flops_and_fills_are_named():
  ops = {o.name: o for o in hlo_roofline.estimate(KERNELS, bandwidth=1e12, peak_flops=1e14,
                                                   launch_s=0.0)}
  # gmm with the rhs stored [g, n, k] (the d lhs product's layout): 2 m k n
  assert ops["gmm"].flops == 2 * 256 * 64 * 128
  assert ops["tgmm"].flops == 2 * 256 * 64 * 128           # [m, k] x [m, n] -> [g, k, n]
  assert ops["other"].flops == 0                           # not a grouped matmul's signature
  assert ops["fill"].kind == "fill" and ops["fill"].bytes == 2 * 4 * 64 * 128 * 2
  assert ops["neg"].kind == "fusion:kLoop"                 # reads a parameter: not a fill
  assert "| fill |" in hlo_roofline.format_estimate(list(ops.values()))


LT = '''HloModule jit_lt, entry_computation_layout={()->f32[]}

ENTRY %main (a: bf16[64,4,32], b: bf16[4,32,256]) -> f32[] {
  %a = bf16[64,4,32]{2,1,0} parameter(0)
  %b = bf16[4,32,256]{2,1,0} parameter(1)
  %lt = (bf16[64,256]{1,0}, s8[1024]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1","2"],"rhs_contracting_dimensions":["0","1"]}}}
  ROOT %r = f32[] constant(0)
}
'''


def test_cublaslt_matmul_counts_every_contracted_dimension():
  (lt,) = hlo_roofline.estimate(LT)
  assert lt.kind == "cc:__cublas$lt$matmul"
  assert lt.flops == 2 * 64 * 256 * (4 * 32)
