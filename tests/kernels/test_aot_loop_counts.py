"""The loop counter behind the "insns/loop step" column of bench/results/aot.md, on hand-written
SASS and PTX listings whose loops and instruction counts are known: only the innermost loops
that hold a matmul count, closed by a conditional backward branch in SASS (an unconditional one
jumps back from an out-of-line block, such as an mbarrier wait's retry); labels, comments and
blank lines are not instructions."""
from bench.aot_report import _ptx_loops, analyse, sass_loops

# Triton's layout, "<control codes>\t<instruction>;". Loops, by hand:
#   .L_x_1 .. "@P2 BRA" holds an HGMMA but also the loop .L_x_2: not innermost
#   .L_x_2 .. "@P1 BRA": HGMMA, IADD3, ISETP, BRA = 4 instructions
#   .L_x_3 .. "@P3 BRA": no matmul
#   .L_x_4 .. "@P5 BRA": HGMMA, FSEL, HGMMA, WARPSYNC, BRA = 5 (the blank line and label .L_x_6 inside
#            do not count)
#   .L_x_5 .. "BRA": unconditional (a retry), not a loop
TRITON_SASS = """\
	.text.attn_fwd:
-:-:-:-:2	MOV R1, c[0x0][0x28];
-:-:-:-:1	ISETP.GE.AND P0, PT, R0, 0x1, PT;
-:-:-:-:1	@!P0 BRA `(.L_x_9);
.L_x_1:
-:-:-:-:1	IADD3 R2, R2, 0x1, RZ;
.L_x_2:
-:-:-:-:1	HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24;
-:-:-:-:1	IADD3 R3, R3, 0x1, RZ;
-:-:-:-:1	ISETP.NE.AND P1, PT, R3, R4, PT;
-:-:-:-:1	@P1 BRA `(.L_x_2);
-:-:-:-:1	ISETP.NE.AND P2, PT, R2, R5, PT;
-:-:-:-:1	@P2 BRA `(.L_x_1);
.L_x_3:
-:-:-:-:1	FADD R6, R6, R7;
-:-:-:-:1	@P3 BRA `(.L_x_3);
.L_x_4:
-:-:-:-:1	HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24;

.L_x_6:
-:-:-:-:1	FSEL R8, R8, -INF , P4;
-:-:-:-:1	HGMMA.64x64x16.F32.BF16 R56, R88, gdesc[UR12], R56;
-:-:-:-:1	WARPSYNC.ALL;
-:-:-:-:1	@P5 BRA `(.L_x_4);
.L_x_5:
-:-:-:-:1	SYNCS.PHASECHK.TRANS64.TRYWAIT P6, [R9+URZ], R10;
-:-:-:-:1	HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24;
-:-:-:-:1	BRA `(.L_x_5);
.L_x_9:
-:-:-:-:1	EXIT;
"""

# cuobjdump's own layout: one loop .L_x_0 .. "@P0 BRA" of HGMMA, IADD3, ISETP, NOP, BRA = 5; the
# comment line inside does not count
CUOBJDUMP_SASS = """\
        /*0000*/                   LDC R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0020*/                   IADD3 R3, R3, 0x1, RZ ;
                                   /* the loop's counter */
        /*0030*/                   ISETP.NE.AND P0, PT, R3, R4, PT ;
        /*0040*/                   NOP ;
        /*0050*/              @P0  BRA `(.L_x_0) ;
        /*0060*/                   EXIT ;
"""

# PTX: every backward branch closes a loop (bra.uni too). By hand:
#   $L__BB0_2 .. "@%p1 bra": wgmma.mma_async, add, setp, bra = 4 (the comment does not count)
#   $L__BB0_1 .. "@%p2 bra": holds $L__BB0_2: not innermost
#   $L__BB0_3 .. "bra.uni": fence, mma_async, commit, wait, bra = 5
#   $L__BB0_4 .. "@%p3 bra": no matmul
PTX = """\
.visible .entry attn_fwd(
	.param .u64 attn_fwd_param_0
)
{
	mov.u32 	%r1, 0;
$L__BB0_1:
	add.s32 	%r2, %r2, 1;
$L__BB0_2:
	wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%f1, %f2}, %rd1, %rd2, 1, 1, 1, 0, 1;
	// the key block's counter
	add.s32 	%r3, %r3, 1;
	setp.ne.s32 	%p1, %r3, %r4;
	@%p1 bra 	$L__BB0_2;
	setp.ne.s32 	%p2, %r2, %r5;
	@%p2 bra 	$L__BB0_1;
$L__BB0_3:
	wgmma.fence.sync.aligned;
	wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f3, %f4}, %rd3, %rd4, 1, 1, 1, 0, 1;
	wgmma.commit_group.sync.aligned;
	wgmma.wait_group.sync.aligned 	0;
	bra.uni 	$L__BB0_3;
$L__BB0_4:
	add.f32 	%f5, %f5, %f6;
	@%p3 bra 	$L__BB0_4;
	ret;
}
"""


def test_sass_innermost_matmul_loops_in_triton_layout_are_4_and_5_instructions():
    assert sass_loops(TRITON_SASS) == [4, 5]
    assert sass_loops(TRITON_SASS, matmul="FADD") == [2]  # the loop without HGMMA, counted when asked for


def test_sass_loop_in_cuobjdump_layout_is_5_instructions():
    assert sass_loops(CUOBJDUMP_SASS) == [5]


def test_ptx_innermost_matmul_loops_are_4_and_5_instructions():
    assert _ptx_loops(PTX) == [4, 5]


def test_the_report_counts_sass_when_there_is_sass_else_ptx():
    fields = dict(registers=128, spill_bytes=0, shared=65536)
    with_sass = analyse({**fields, "ptx": PTX, "sass": TRITON_SASS})
    assert (with_sass["loops"], with_sass["counted_in"], with_sass["wgmma"], with_sass["tma"]) == ([4, 5], "SASS",
                                                                                                  True, False)
    ptx_only = analyse({**fields, "ptx": PTX, "sass": None})
    assert (ptx_only["loops"], ptx_only["counted_in"]) == ([4, 5], "PTX")
