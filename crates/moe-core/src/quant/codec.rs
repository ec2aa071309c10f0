//! Bit-level number formats shared by the quant methods: float8 e4m3fn (via the `float8` crate),
//! E8M0 power-of-two scales, E2M1 (fp4) codes and the two-codes-per-byte packing (low nibble =
//! even element) used by MXFP4, NVFP4 and our int4 layout. Decoders are lookup tables so kernels
//! can use them in inner loops.

use float8::F8E4M3;

/// Largest finite float8 e4m3fn value.
pub const E4M3_MAX: f32 = 448.0;

/// Largest E2M1 magnitude.
pub const E2M1_MAX: f32 = 6.0;

/// E2M1 code -> value (bit 3 is the sign).
pub const E2M1_LUT: [f32; 16] =
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

const fn e4m3_table() -> [f32; 256] {
    let mut t = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = F8E4M3::from_bits(i as u8).to_f32();
        i += 1;
    }
    t
}

/// float8 e4m3fn byte -> f32 (0x7F / 0xFF decode to NaN).
pub static E4M3_LUT: [f32; 256] = e4m3_table();

/// Decodes one e4m3fn byte.
#[inline]
pub fn e4m3_to_f32(b: u8) -> f32 {
    E4M3_LUT[b as usize]
}

/// Encodes f32 to e4m3fn: round to nearest even, saturating to +-448 (NaN stays NaN).
#[inline]
pub fn f32_to_e4m3(x: f32) -> u8 {
    F8E4M3::from_f32(x).to_bits()
}

/// Whether an e4m3fn byte is NaN (the format has no infinities).
#[inline]
pub fn e4m3_is_nan(b: u8) -> bool {
    b & 0x7F == 0x7F
}

/// Decodes an E8M0 scale: `2^(b - 127)`; 255 is NaN.
#[inline]
pub fn e8m0_to_f32(b: u8) -> f32 {
    match b {
        255 => f32::NAN,
        // 2^-127 is an f32 subnormal: mantissa bit 22 set, exponent 0.
        0 => f32::from_bits(0x0040_0000),
        _ => f32::from_bits((b as u32) << 23),
    }
}

/// Encodes E2M1: nearest representable value, ties to the even code, saturating at +-6.
#[inline]
pub fn f32_to_e2m1(x: f32) -> u8 {
    let a = x.abs();
    // Thresholds are the midpoints; `<=` where the lower neighbour has the even code.
    let mag = if a <= 0.25 {
        0
    } else if a < 0.75 {
        1
    } else if a <= 1.25 {
        2
    } else if a < 1.75 {
        3
    } else if a <= 2.5 {
        4
    } else if a < 3.5 {
        5
    } else if a <= 5.0 {
        6
    } else {
        7
    };
    if x.is_sign_negative() && mag != 0 {
        mag | 8
    } else {
        mag
    }
}

/// Packs 4-bit codes two per byte, element `2i` in the low nibble. `codes.len()` must be even.
pub fn pack_nibbles(codes: &[u8]) -> Vec<u8> {
    codes.chunks_exact(2).map(|p| (p[0] & 0x0F) | (p[1] << 4)).collect()
}

/// Unpacks bytes into 4-bit codes, low nibble first.
pub fn unpack_nibbles(bytes: &[u8]) -> Vec<u8> {
    bytes.iter().flat_map(|&b| [b & 0x0F, b >> 4]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward e4m3fn decoder from the bit layout (1 sign, 4 exponent bias 7, 3 mantissa).
    fn decode_e4m3_naive(b: u8) -> f32 {
        let sign = if b & 0x80 != 0 { -1.0f64 } else { 1.0 };
        let e = ((b >> 3) & 0x0F) as i32;
        let m = (b & 0x07) as f64;
        if e == 15 && m == 7.0 {
            return f32::NAN;
        }
        let v = if e == 0 { m / 8.0 * 2f64.powi(-6) } else { (1.0 + m / 8.0) * 2f64.powi(e - 7) };
        (sign * v) as f32
    }

    #[test]
    fn e4m3_decode_is_exhaustively_correct() {
        for b in 0..=255u8 {
            let (got, want) = (e4m3_to_f32(b), decode_e4m3_naive(b));
            if want.is_nan() {
                assert!(got.is_nan() && e4m3_is_nan(b), "byte {b:#04x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "byte {b:#04x}: {got} vs {want}");
                assert!(!e4m3_is_nan(b));
            }
        }
        assert_eq!(e4m3_to_f32(0x7E), E4M3_MAX);
    }

    #[test]
    fn e4m3_encode_roundtrips_and_rounds_to_nearest_even() {
        let finite: Vec<(u8, f32)> = (0..=255u8).map(|b| (b, decode_e4m3_naive(b))).filter(|p| !p.1.is_nan()).collect();
        for &(b, v) in &finite {
            let back = f32_to_e4m3(v);
            // -0 and +0 both decode to zero; everything else must roundtrip bit-exactly.
            assert_eq!(e4m3_to_f32(back), v, "byte {b:#04x} value {v}");
        }
        // Midpoints between neighbouring positives go to the neighbour with the even mantissa.
        let mut pos: Vec<f32> = finite.iter().map(|p| p.1).filter(|v| *v >= 0.0).collect();
        pos.sort_by(|a, b| a.partial_cmp(b).unwrap());
        pos.dedup();
        for w in pos.windows(2) {
            let mid = (w[0] + w[1]) / 2.0;
            let got = e4m3_to_f32(f32_to_e4m3(mid));
            let even = if f32_to_e4m3(w[0]) & 1 == 0 { w[0] } else { w[1] };
            assert_eq!(got, even, "midpoint of {} and {}", w[0], w[1]);
            // Just off the midpoint rounds to the nearer neighbour.
            assert_eq!(e4m3_to_f32(f32_to_e4m3(mid - (w[1] - w[0]) * 0.01)), w[0]);
            assert_eq!(e4m3_to_f32(f32_to_e4m3(mid + (w[1] - w[0]) * 0.01)), w[1]);
        }
        assert_eq!(e4m3_to_f32(f32_to_e4m3(1e6)), E4M3_MAX);
        assert_eq!(e4m3_to_f32(f32_to_e4m3(-1e6)), -E4M3_MAX);
        assert!(e4m3_is_nan(f32_to_e4m3(f32::NAN)));
    }

    #[test]
    fn e8m0_decodes_powers_of_two() {
        for b in 0..=254u8 {
            assert_eq!(e8m0_to_f32(b) as f64, 2f64.powi(b as i32 - 127), "byte {b}");
        }
        assert!(e8m0_to_f32(255).is_nan());
    }

    #[test]
    fn e2m1_encode_is_nearest_with_even_ties() {
        for code in 0..16u8 {
            let v = E2M1_LUT[code as usize];
            let back = f32_to_e2m1(v);
            assert_eq!(E2M1_LUT[back as usize], v, "code {code}");
        }
        // Brute force over a fine grid: distance to the chosen value is minimal; ties pick even codes.
        for i in -800..=800 {
            let x = i as f32 * 0.01;
            let c = f32_to_e2m1(x);
            let d = (E2M1_LUT[c as usize] - x.clamp(-6.0, 6.0)).abs();
            for (j, &v) in E2M1_LUT.iter().enumerate() {
                let dj = (v - x.clamp(-6.0, 6.0)).abs();
                assert!(d <= dj + 1e-6, "x={x}: picked {} but {} is nearer", E2M1_LUT[c as usize], v);
                if (dj - d).abs() < 1e-7 && v.abs() != E2M1_LUT[c as usize].abs() {
                    assert_eq!(c & 1, 0, "x={x}: tie between codes {c} and {j} must pick the even one");
                }
            }
        }
    }

    #[test]
    fn nibbles_pack_low_first() {
        assert_eq!(pack_nibbles(&[1, 2, 15, 0]), vec![0x21, 0x0F]);
        assert_eq!(unpack_nibbles(&[0x21, 0x0F]), vec![1, 2, 15, 0]);
    }
}
