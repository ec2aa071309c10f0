//! The Hopper FP8 tiles (`fp8_gemm::TILES`) against an f64 host computation of the same
//! block-scaled e4m3 operands: gate_up (SwiGLU epilogue) and down (f32 and 16-bit outputs), two
//! experts in the contiguous layout with partial tiles, a partial column tile, poisoned outputs
//! and an all-zero activation block (scale 0). Skips with the reason without an sm_90a GPU.

use moe_core::compare::rel_l2;
use moe_core::quant::codec::{e4m3_to_f32, f32_to_e4m3};
use moe_cuda::device::CudaDevice;
use moe_cuda::fp8_gemm::{launch_tile, Fp8Gemm, TILES};
use moe_cuda::kernels::{ActKind, Elem, GemmMode, GemmParams, GemmTile};

fn device() -> Option<std::sync::Arc<CudaDevice>> {
    if let Err(why) = moe_cuda::probe_gpus() {
        eprintln!("skip: {why}");
        return None;
    }
    let dev = CudaDevice::get(0).ok()?;
    if dev.arch() != "sm_90a" {
        eprintln!("skip: the FP8 tile needs sm_90a, this GPU is {}", dev.arch());
        return None;
    }
    Some(dev)
}

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// e4m3 codes `[rows, k]` and per-(128 block, row) scales `[kb, rows]` of random values whose
/// magnitude varies by row and block; `zero` rows get an all-zero block 1 (scale 0).
fn quantize_rows(rows: usize, k: usize, seed: u64, zero: &[usize]) -> (Vec<u8>, Vec<f32>) {
    let kb = k.div_ceil(128);
    let mut rng = Lcg(seed);
    let mut q = vec![0u8; rows * k];
    let mut s = vec![0f32; kb * rows];
    for r in 0..rows {
        for b in 0..kb {
            let mag = 0.5 + (r * 7 + b * 3) as f32 % 5.0;
            let vals: Vec<f32> = (b * 128..((b + 1) * 128).min(k))
                .map(|_| if b == 1 && zero.contains(&r) { 0.0 } else { rng.next() * mag })
                .collect();
            let amax = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = amax / 448.0;
            s[b * rows + r] = scale;
            for (i, v) in vals.iter().enumerate() {
                q[r * k + b * 128 + i] = if scale > 0.0 { f32_to_e4m3(v / scale) } else { 0 };
            }
        }
    }
    (q, s)
}

fn deq(q: &[u8], s: &[f32], rows: usize, k: usize, r: usize, c: usize) -> f64 {
    e4m3_to_f32(q[r * k + c]) as f64 * s[(c / 128) * rows + r] as f64
}

#[test]
fn fp8_tiles_match_block_scaled_reference() {
    let Some(dev) = device() else { return };
    for tile in TILES {
        check_tile(&dev, tile);
    }
}

fn check_tile(dev: &CudaDevice, tile: GemmTile) {
    let (k, n) = (400usize, 256usize); // K: 3 full blocks and a partial one; N = intermediate
    let experts = 2usize;
    // Contiguous layout: expert 0 rows 0..200 (tiles 0, 1), expert 1 rows 256..356 (tile 2).
    let a_rows = 384usize;
    let tile_expert = [0i32, 0, 1];
    let tile_end = [200i32, 200, 356];
    let real = |r: usize| r < 200 || (256..356).contains(&r);
    let (qa, sa) = quantize_rows(a_rows, k, 1, &[3, 130, 300]);
    let (qw, sw_rows) = quantize_rows(experts * 2 * n, k, 2, &[]);
    // Weight scales are per 128 x 128 block: make every row of a block share its first row's.
    let kb = k.div_ceil(128);
    let mut sw = vec![0f32; experts * kb * 2 * n];
    let mut qw = qw;
    for e in 0..experts {
        for b in 0..kb {
            for r in 0..2 * n {
                let row = e * 2 * n + r;
                let blk = e * 2 * n + (r / 128) * 128;
                let want = sw_rows[b * experts * 2 * n + blk];
                // Requantize the row's block to the block's scale.
                for c in b * 128..((b + 1) * 128).min(k) {
                    let v = e4m3_to_f32(qw[row * k + c]) * sw_rows[b * experts * 2 * n + row];
                    qw[row * k + c] = f32_to_e4m3(v / want);
                }
                sw[e * kb * 2 * n + b * 2 * n + r] = want;
            }
        }
    }
    let up = |v: &[u8]| dev.upload(v).unwrap();
    let upf = |v: &[f32]| dev.upload(v).unwrap();
    let upi = |v: &[i32]| dev.upload(v).unwrap();
    let (a_d, sa_d, w_d, sw_d) = (up(&qa), upf(&sa), up(&qw), upf(&sw));
    let (te_d, tend_d) = (upi(&tile_expert), upi(&tile_end));
    let counter = dev.zeros::<u32>(1).unwrap();
    let act_d = dev.alloc::<u16>(a_rows * n).unwrap();
    dev.memset_ptr_value(dev.ptr(&act_d), 0xFF, a_rows * n * 2).unwrap();
    let base = GemmParams {
        tile_expert: dev.ptr(&te_d),
        tile_end: dev.ptr(&tend_d),
        mode: GemmMode::Contiguous as i32,
        act: ActKind::Swiglu as i32,
        ..Default::default()
    };
    let g = Fp8Gemm {
        gate_up: true,
        params: GemmParams { a: dev.ptr(&a_d), w: dev.ptr(&w_d), out: dev.ptr(&act_d), ..base },
        tiles: 3,
        n,
        k,
        a_rows,
        a_scales: dev.ptr(&sa_d),
        w_rows: experts * 2 * n,
        w_scales: dev.ptr(&sw_d),
        y16: false,
    };
    launch_tile(dev, Elem::Bf16, dev.ptr(&counter), &g, tile).unwrap();
    let act = dev.download(&act_d, a_rows * n).unwrap();
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for r in (0..a_rows).filter(|&r| real(r)) {
        let e = if r < 200 { 0 } else { 1 };
        for c in 0..n {
            let dot = |wr: usize| -> f64 {
                let row = e * 2 * n + wr;
                (0..k)
                    .map(|j| {
                        deq(&qa, &sa, a_rows, k, r, j)
                            * e4m3_to_f32(qw[row * k + j]) as f64
                            * sw[e * kb * 2 * n + (j / 128) * 2 * n + wr] as f64
                    })
                    .sum()
            };
            let (gt, u) = (dot(c), dot(n + c));
            want.push((gt / (1.0 + (-gt).exp()) * u) as f32);
            got.push(half::bf16::from_bits(act[r * n + c]).to_f32());
        }
    }
    let err = rel_l2(&got, &want);
    eprintln!("{tile:?} gate_up rel err {err:.2e}");
    assert!(err < 1e-2, "{tile:?} gate_up rel err {err:e}");

    // down: A = the first `n` columns of the same rows requantized as [a_rows, n]; W [2, h, n].
    // h = 384: 3 column tiles of 128, which f8t128x2 refuses (odd), or for the 256-column tiles
    // one whole tile and a partial one (f8t256x2: a pair whose second CTA's tile is partial);
    // 512: 4 or 2 (2-CTA clusters sharing A, as the gate_up above with its 4 column blocks of
    // 64 gate + 64 up rows, or 2 of 128 + 128).
    for h in [384usize, 512] {
        check_down(dev, tile, &base, a_rows, n, h, &real);
    }
}

fn check_down(
    dev: &CudaDevice,
    tile: GemmTile,
    base: &GemmParams,
    a_rows: usize,
    n: usize,
    h: usize,
    real: &dyn Fn(usize) -> bool,
) {
    let experts = 2usize;
    let up = |v: &[u8]| dev.upload(v).unwrap();
    let upf = |v: &[f32]| dev.upload(v).unwrap();
    let counter = dev.zeros::<u32>(1).unwrap();
    let base = *base;
    let (qa2, sa2) = quantize_rows(a_rows, n, 3, &[5]);
    let (qw2, sw2_rows) = quantize_rows(experts * h, n, 4, &[]);
    let kb2 = n.div_ceil(128);
    // Block scales per 128 rows: reuse the per-row scale of the block's first row and
    // requantize (as above).
    let mut qw2 = qw2;
    let mut sw2 = vec![0f32; experts * kb2 * h];
    for e in 0..experts {
        for b in 0..kb2 {
            for r in 0..h {
                let row = e * h + r;
                let want_s = sw2_rows[b * experts * h + e * h + (r / 128) * 128];
                for c in b * 128..((b + 1) * 128).min(n) {
                    let v = e4m3_to_f32(qw2[row * n + c]) * sw2_rows[b * experts * h + row];
                    qw2[row * n + c] = f32_to_e4m3(v / want_s);
                }
                sw2[e * kb2 * h + b * h + r] = want_s;
            }
        }
    }
    let (a2_d, sa2_d, w2_d, sw2_d) = (up(&qa2), upf(&sa2), up(&qw2), upf(&sw2));
    for y16 in [false, true] {
        let bytes = a_rows * h * if y16 { 2 } else { 4 };
        let y_d = dev.alloc::<u8>(bytes).unwrap();
        dev.memset_ptr_value(dev.ptr(&y_d), 0xFF, bytes).unwrap();
        let g = Fp8Gemm {
            gate_up: false,
            params: GemmParams { a: dev.ptr(&a2_d), w: dev.ptr(&w2_d), out: dev.ptr(&y_d), ..base },
            tiles: 3,
            n: h,
            k: n,
            a_rows,
            a_scales: dev.ptr(&sa2_d),
            w_rows: experts * h,
            w_scales: dev.ptr(&sw2_d),
            y16,
        };
        if tile.cluster() > 1 && h.div_ceil(tile.block_n()) % 2 == 1 {
            let err = launch_tile(dev, Elem::Bf16, dev.ptr(&counter), &g, tile).unwrap_err();
            assert!(err.to_string().contains("odd"), "{err}");
            return;
        }
        launch_tile(dev, Elem::Bf16, dev.ptr(&counter), &g, tile).unwrap();
        let y = dev.download(&y_d, bytes).unwrap();
        let (mut got, mut want) = (Vec::new(), Vec::new());
        for r in (0..a_rows).filter(|&r| real(r)) {
            let e = if r < 200 { 0 } else { 1 };
            for c in 0..h {
                let row = e * h + c;
                let v: f64 = (0..n)
                    .map(|j| {
                        deq(&qa2, &sa2, a_rows, n, r, j)
                            * e4m3_to_f32(qw2[row * n + j]) as f64
                            * sw2[e * kb2 * h + (j / 128) * h + c] as f64
                    })
                    .sum();
                want.push(v as f32);
                let i = r * h + c;
                got.push(if y16 {
                    half::bf16::from_bits(u16::from_le_bytes([y[2 * i], y[2 * i + 1]])).to_f32()
                } else {
                    f32::from_le_bytes([y[4 * i], y[4 * i + 1], y[4 * i + 2], y[4 * i + 3]])
                });
            }
        }
        assert!(got.iter().all(|v| v.is_finite()), "{tile:?} down h={h} y16={y16}: unwritten (poisoned) outputs");
        let err = rel_l2(&got, &want);
        eprintln!("{tile:?} down h={h} y16={y16} rel err {err:.2e}");
        assert!(err < if y16 { 1e-2 } else { 1e-3 }, "{tile:?} down h={h} y16={y16} rel err {err:e}");
    }
}

/// `moe_quant_rows` launched as the backend does, on bf16 rows; returns (codes, scales) of `rows`
/// layout rows, poisoned (0xFF: e4m3 NaN, f32 NaN) where nothing was written.
fn quant_rows_on_device(
    dev: &CudaDevice,
    x: &[u16],
    p: moe_cuda::kernels::QuantRowsParams,
    rows: usize,
    k: usize,
) -> (Vec<u8>, Vec<u32>) {
    use moe_cuda::kernels::{KernelId, QuantKind};
    let x_d = dev.upload(x).unwrap();
    let q_d = dev.alloc::<u8>(rows * k).unwrap();
    let s_d = dev.alloc::<u32>(k / 128 * rows).unwrap();
    dev.memset_ptr_value(dev.ptr(&q_d), 0xFF, rows * k).unwrap();
    dev.memset_ptr_value(dev.ptr(&s_d), 0xFF, k / 128 * rows * 4).unwrap();
    let p = moe_cuda::kernels::QuantRowsParams {
        x: dev.ptr(&x_d),
        q: dev.ptr(&q_d),
        scales: dev.ptr(&s_d),
        k: k as i32,
        rows: rows as i32,
        ..p
    };
    // 8 source rows a block, 8 groups of 128 channels a block column (QR_ROWS, QR_PAIRS).
    let grid = ((p.src_rows as usize).div_ceil(8) as u32, (k / 128).div_ceil(8) as u32, 1);
    dev.launch(KernelId::QuantRows(QuantKind::Fp8Block, Elem::Bf16), grid, 256, 0, &p).unwrap();
    (dev.download(&q_d, rows * k).unwrap(), dev.download(&s_d, k / 128 * rows).unwrap())
}

/// The fused gather + quantization (token rows straight to their layout rows) against the
/// row pass over a host-permuted bf16 copy and against a host model of DeepSeek's formula
/// (scale = amax / 448, code = e4m3(x / scale)); padding rows and non-local pairs stay unwritten.
#[test]
fn fused_gather_quantization_matches_the_row_pass() {
    let Some(dev) = device() else { return };
    // 9 groups of 128 channels: two block columns, the second partial.
    let (tokens, top_k, k) = (60usize, 3usize, 1152usize);
    let rows = 256usize; // two 128-row tiles: real rows 0..100 and 128..200
    let tile_expert = [0i32, 1];
    let tile_end = [100i32, 200];
    let real: Vec<usize> = (0..100).chain(128..200).collect();
    // Pair -> layout row: a shuffled assignment of the 172 real rows; 8 pairs are not local.
    let mut rng = Lcg(11);
    let mut order: Vec<usize> = (0..tokens * top_k).collect();
    for i in (1..order.len()).rev() {
        let j = ((rng.next() + 1.0) * 0.5 * (i + 1) as f32) as usize % (i + 1);
        order.swap(i, j);
    }
    let mut row_of = vec![-1i32; tokens * top_k];
    for (slot, &pair) in order.iter().enumerate().take(real.len()) {
        row_of[pair] = real[slot] as i32;
    }
    // Token rows whose magnitude varies by group; token 7's group 2 is all zero (scale 1, codes 0).
    let x: Vec<u16> = (0..tokens * k)
        .map(|i| {
            let (t, c) = (i / k, i % k);
            let mag = 0.01 + ((t * 5 + c / 128 * 3) % 7) as f32;
            let v = if t == 7 && c / 128 == 2 { 0.0 } else { rng.next() * mag };
            half::bf16::from_f32(v).to_bits()
        })
        .collect();
    let te_d = dev.upload(&tile_expert[..]).unwrap();
    let tend_d = dev.upload(&tile_end[..]).unwrap();
    let ro_d = dev.upload(&row_of).unwrap();
    let base = moe_cuda::kernels::QuantRowsParams::default();
    let fused = moe_cuda::kernels::QuantRowsParams {
        dest: dev.ptr(&ro_d),
        src_rows: tokens as i32,
        top_k: top_k as i32,
        ..base
    };
    let (qf, sf) = quant_rows_on_device(&dev, &x, fused, rows, k);
    // The permuted copy: real rows hold their token's row, padding rows garbage (never read).
    let mut a = vec![half::bf16::from_f32(1e4).to_bits(); rows * k];
    for (pair, &r) in row_of.iter().enumerate() {
        if r >= 0 {
            let t = pair / top_k;
            a[r as usize * k..(r as usize + 1) * k].copy_from_slice(&x[t * k..(t + 1) * k]);
        }
    }
    let unfused = moe_cuda::kernels::QuantRowsParams {
        tile_expert: dev.ptr(&te_d),
        tile_end: dev.ptr(&tend_d),
        src_rows: rows as i32,
        tile_m: 128,
        ..base
    };
    let (qu, su) = quant_rows_on_device(&dev, &a, unfused, rows, k);
    assert_eq!(qf, qu, "fused and row-pass codes differ");
    assert_eq!(sf, su, "fused and row-pass scales differ");
    let groups = k / 128;
    let mut off_by_one = 0usize;
    for r in 0..rows {
        let is_real = real.contains(&r);
        for g in 0..groups {
            let s = f32::from_bits(sf[g * rows + r]);
            let codes = &qf[r * k + g * 128..r * k + (g + 1) * 128];
            if !is_real {
                assert!(s.is_nan() && codes.iter().all(|&b| b == 0xFF), "padding row {r} group {g} was written");
                continue;
            }
            let vals: Vec<f32> =
                a[r * k + g * 128..r * k + (g + 1) * 128].iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect();
            let amax = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
            let want_s = if amax > 0.0 { amax / 448.0 } else { 1.0 };
            assert_eq!(s, want_s, "row {r} group {g} scale");
            for (i, v) in vals.iter().enumerate() {
                // Equal values (+0 / -0 alike), or the neighbouring code where the host rounding
                // of a tie may differ from cvt.rn (counted below).
                let want = f32_to_e4m3((v / want_s).clamp(-448.0, 448.0));
                let got = codes[i];
                if e4m3_to_f32(got) == e4m3_to_f32(want) {
                    continue;
                }
                let adjacent = (got ^ want) & 0x80 == 0 && (got as i32 - want as i32).abs() == 1;
                assert!(adjacent, "row {r} group {g} channel {i}: x = {v}, code {got:#x}, host {want:#x}");
                off_by_one += 1;
            }
        }
    }
    assert!(off_by_one * 1000 < real.len() * k, "{off_by_one} codes one step from the host rounding");
}
